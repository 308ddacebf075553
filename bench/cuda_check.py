#!/usr/bin/env python3
"""The NVIDIA check of ssdkd.torch's shared CUDA path: one run, one JSON object on stdout.

Usage (on the GPU machine, after `pip install --no-deps ssdkd-*.whl`, with torch and
torchvision):
    python bench/cuda_check.py [--device cuda|cpu] [--dry-run] [--steps 2000]
                               [--batch 8,32,128] [--iters 20] [--ssd-batch 32]

Parts (docs/SPEC.md §7 tolerances; medians are sorted[n // 2] of synchronised timings):
  a  the path ssdkd.torch takes for the device (ssdkd.torch.cuda_path): the Vulkan adapter,
     its UUID against torch's for that GPU, and the ordering with torch's stream;
  b  MultiBoxLoss_KD and MultiBoxLoss forward + backward on the device's tensors against
     bench/pytorch_peer.py on the same device (float64 autograd), also under autocast +
     GradScaler (float16 on CUDA, bfloat16 on the CPU) and, on CUDA, on a non-default stream;
  c  --steps training steps of a small head, half at one shape and half at changing
     shapes (B and objects per image), with device memory (torch.cuda.mem_get_info) and
     host RSS after warm-up and at the end of each half;
  d  forward + backward medians at each --batch for ssdkd through the shared buffers,
     ssdkd through the host (backend "gpu"), the batched peer and the per-image loop peer;
  e  one whole training step (forward, loss, backward, SGD step) of torchvision's
     ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21) at --ssd-batch,
     its head outputs [B, 8732, 4] / [B, 8732, 21] with SSD300 priors, with each loss.

--device cpu (or --dry-run, which also shrinks every size) runs the same code on the CPU:
everything but CUDA (no stream, no device memory); it checks the script, not a GPU.
--device cuda without CUDA exits 2 with the reason. Any failed check exits 1 after the
JSON is printed. Target on an H100 or H200: all of it in under 5 minutes.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import pytorch_peer as peer  # noqa: E402

import ssdkd  # noqa: E402
import ssdkd.testing  # noqa: E402,F401  (binds ssdkd.testing)
import ssdkd.torch as st  # noqa: E402
from ssdkd import _ssdkd  # noqa: E402

TERMS = ("soft_loss", "l2_loss", "loss_c", "loss_l")
WEIGHTS = (0.3, 0.5, 0.7, 1.0)  # soft, l2, c, l (the outputs' order)


def fail(message):
    print(f"cuda_check: {message}", file=sys.stderr)
    sys.exit(2)


def rss_mib():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def device_mib(device):
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, iters, warmup=2):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2] * 1e3


def batch_on(device, b, classes=21, preset="ssd300", objects=6, seed=300):
    t = ssdkd.testing.synthetic_batch(batch=b, classes=classes, preset=preset,
                                      objects=objects, seed=seed)
    return {k: torch.from_numpy(v).to(device) for k, v in t.items()}


def image_list(t):
    return [img[img[:, 4] >= 0] for img in t["targets"]]


# -- a ---------------------------------------------------------------------------------------

def part_a(device):
    report = st.cuda_path(device)
    out = dict(report, device=str(device))
    if device.type != "cuda":
        out["ok"] = report["path"] == "host"
        return out
    props = torch.cuda.get_device_properties(device)
    out["gpu"] = props.name
    torch_uuid = str(getattr(props, "uuid", "")).replace("-", "").lower()
    out["torch_uuid"] = torch_uuid or None
    if report["path"] == "cuda-shared":
        ours = report["uuid"].replace("-", "").lower()
        out["uuid_match"] = bool(torch_uuid) and ours == torch_uuid
        out["adapter_is_gpu"] = props.name.lower() in report["adapter"].lower() or \
            report["adapter"].lower() in props.name.lower()
        out["ok"] = out["uuid_match"] and report["ordering"] in ("timeline-semaphore",
                                                                "full-sync")
    else:
        out["ok"] = False
    return out


# -- b ---------------------------------------------------------------------------------------

def peer_reference(t, cfg, weights, teacher=True):
    """The peer on the same device in float64: the terms and the gradients of Σ w·terms."""
    sl = t["student_loc"].double().requires_grad_(True)
    sc = t["student_conf"].double().requires_grad_(True)
    tl = t["teacher_loc"].double() if teacher else sl.detach()
    tc = t["teacher_conf"].double() if teacher else sc.detach()
    r = peer.kd_loss(sl, sc, tl, tc, t["targets"].double(), t["priors"].double(),
                     dict(cfg, weights=(1.0, 1.0, 1.0, 1.0)), "batched")
    sum(w * r[k] for w, k in zip(weights, TERMS)).backward()
    return [float(r[k]) for k in TERMS], sl.grad.float().cpu(), sc.grad.float().cpu()


def agreement(terms, grads, reference):
    """Units of SPEC §7 tolerance of the worst term and the worst gradient element."""
    want_terms, want_loc, want_conf = reference
    rel, abs_ = _ssdkd.LOSS_TOLERANCE
    grel, gabs = _ssdkd.GRADIENT_TOLERANCE
    term_units = max(_ssdkd.compare_loss(a, b, rel, abs_) for a, b in zip(terms, want_terms))
    grad_units = 0.0
    for got, want in zip(grads, (want_loc, want_conf)):
        got = np.ascontiguousarray(got.detach().to("cpu", torch.float32).numpy())
        grad_units = max(grad_units, _ssdkd.compare_gradient(
            got, np.ascontiguousarray(want.numpy()), grel, gabs)[3])
    return {"term_units": term_units, "grad_units": grad_units,
            "ok": term_units <= 1.0 and grad_units <= 1.0}


def kd_run(crit, t, dtype=None, teacher=True, weights=WEIGHTS):
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    loc, conf = (sl, sc) if dtype is None else (sl.to(dtype), sc.to(dtype))
    if teacher:
        out = crit((loc, conf, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
                   image_list(t))
    else:
        loss_l, loss_c = crit((loc, conf, t["priors"]), image_list(t))
        out = (loss_c * 0, loss_c * 0, loss_c, loss_l)
    sum(w * o for w, o in zip(weights, out)).backward()
    return [float(o.detach()) for o in out], (sl.grad, sc.grad)


def part_b(device, dry):
    t = batch_on(device, 4 if dry else 32, seed=11)
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=21)
    out = {}
    kd = st.MultiBoxLoss_KD(21)
    out["kd"] = agreement(*kd_run(kd, t), peer_reference(t, cfg, WEIGHTS))
    out["kd"]["path"] = kd.last_path
    plain_weights = (0.0, 0.0, 0.7, 1.0)
    plain = st.MultiBoxLoss(21)
    out["multibox"] = agreement(*kd_run(plain, t, teacher=False, weights=plain_weights),
                                peer_reference(t, cfg, plain_weights, teacher=False))
    out["multibox"]["path"] = plain.last_path
    # Autocast + GradScaler: a few steps of a head, ours against the peer's (float32).
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    out["autocast"] = autocast_check(device, half, t, cfg)
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            terms, grads = kd_run(st.MultiBoxLoss_KD(21), t)
        stream.synchronize()
        out["stream"] = agreement(terms, grads, peer_reference(t, cfg, WEIGHTS))
    else:
        out["stream"] = {"ok": True, "skipped": "no CUDA streams on the CPU"}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def autocast_check(device, dtype, t, cfg):
    b, p, c = t["student_conf"].shape
    x = torch.linspace(-1, 1, b * 8, device=device).view(b, 8)

    def train(loss_of):
        torch.manual_seed(0)
        head = torch.nn.Linear(8, p * (4 + c)).to(device)
        opt = torch.optim.SGD(head.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            with torch.autocast(device.type, dtype=dtype):
                y = head(x).view(b, p, 4 + c)
                loss = loss_of(y[..., :4], y[..., 4:])
            losses.append(float(loss.detach()))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return losses, head.weight.detach().float().cpu()

    crit = st.MultiBoxLoss_KD(21)

    def ours(loc, conf):
        out = crit((loc, conf, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
                   t["targets"])
        return sum(w * o for w, o in zip(WEIGHTS, out))

    def theirs(loc, conf):
        r = peer.kd_loss(loc.float(), conf.float(), t["teacher_loc"], t["teacher_conf"],
                         t["targets"], t["priors"], dict(cfg, weights=(1, 1, 1, 1)), "batched")
        return sum(w * r[k] for w, k in zip(WEIGHTS, TERMS))

    a, wa = train(ours)
    b_, wb = train(theirs)
    loss_rel = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b_))
    weight_diff = float((wa - wb).abs().max())
    return {"dtype": str(dtype).replace("torch.", ""), "losses": a, "peer_losses": b_,
            "loss_rel_diff": loss_rel, "weight_max_abs_diff": weight_diff,
            "ok": loss_rel <= 1e-3 and weight_diff <= 1e-3 and a[-1] < a[0]}


# -- c ---------------------------------------------------------------------------------------

def part_c(device, steps, strict=True):
    torch.manual_seed(0)
    crit = st.MultiBoxLoss_KD(21, validate=False)
    rng = np.random.default_rng(0)
    half = steps // 2
    warm = max(1, half // 10)
    fixed = batch_on(device, 8, seed=21)
    count = max(1, min(24, (steps - half) // 2))
    shapes = [batch_on(device, int(b), objects=int(m), seed=100 + i) for i, (b, m) in
              enumerate(zip(rng.integers(1, 9, count), rng.integers(1, 11, count)))]
    marks = {}

    def step(t):
        sl = t["student_loc"].clone().requires_grad_(True)
        sc = t["student_conf"].clone().requires_grad_(True)
        out = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), t["targets"])
        sum(w * o for w, o in zip(WEIGHTS, out)).backward()

    def mark(name):
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks[name] = {"rss_mib": rss_mib(), "device_mib": device_mib(device)}

    start = time.perf_counter()
    for i in range(half):
        step(fixed)
        if i + 1 == warm:
            mark("fixed_warm")
    mark("fixed_end")
    # Changing shapes: every shape seen once in warm-up, then drawn at random.
    for i in range(steps - half):
        step(shapes[i % len(shapes)] if i < len(shapes) else shapes[rng.integers(len(shapes))])
        if i + 1 == min(max(warm, len(shapes)), steps - half):
            mark("changing_warm")
    mark("changing_end")

    def growth(a, b, key):
        x, y = marks[a][key], marks[b][key]
        return None if x is None else y - x

    out = {"steps": steps, "seconds": time.perf_counter() - start, "marks": marks,
           "fixed_rss_growth_mib": growth("fixed_warm", "fixed_end", "rss_mib"),
           "changing_rss_growth_mib": growth("changing_warm", "changing_end", "rss_mib"),
           "fixed_device_growth_mib": growth("fixed_warm", "fixed_end", "device_mib"),
           "changing_device_growth_mib": growth("changing_warm", "changing_end", "device_mib"),
           "path": crit.last_path}
    limits = [out["fixed_rss_growth_mib"], out["changing_rss_growth_mib"],
              out["fixed_device_growth_mib"], out["changing_device_growth_mib"]]
    if strict:
        out["ok"] = all(g is None or g <= 1.0 for g in limits)
    else:  # a dry run's few steps check the code, not the memory
        out["ok"], out["limits_checked"] = True, False
    return out


# -- d ---------------------------------------------------------------------------------------

def part_d(device, batches, iters):
    clock = Clock(device)
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=21)
    rows = []
    shared_ok = st.cuda_path(device)["path"] == "cuda-shared" if device.type == "cuda" else False
    for b in batches:
        t = batch_on(device, b)
        row = {"batch": b}
        losses = {"ssdkd_host": st.MultiBoxLoss_KD(21, backend="gpu" if device.type == "cuda"
                                                   else "cpu", validate=False)}
        if shared_ok:
            losses["ssdkd_shared"] = st.MultiBoxLoss_KD(21, backend="cuda", validate=False)
        for name, crit in losses.items():
            row[f"{name}_ms"] = clock.median_ms(lambda: kd_run(crit, t), iters)
        for matching in ("batched", "loop"):
            def run_peer():
                sl = t["student_loc"].detach().requires_grad_(True)
                sc = t["student_conf"].detach().requires_grad_(True)
                r = peer.kd_loss(sl, sc, t["teacher_loc"], t["teacher_conf"], t["targets"],
                                 t["priors"], dict(cfg, weights=(0.3, 0.7, 0.5, 1.0)),
                                 matching)
                r["total"].backward()
            row[f"peer_{matching}_ms"] = clock.median_ms(run_peer, iters)
        rows.append(row)
    return rows


# -- e ---------------------------------------------------------------------------------------

def part_e(device, batch, iters, warmup=1):
    import torchvision

    clock = Clock(device)
    torch.manual_seed(0)
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                      num_classes=21).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = torch.randn(batch, 3, 300, 300, device=device)
    t = batch_on(device, batch, seed=31)
    priors = t["priors"]
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=21)

    def heads():
        features = list(model.backbone(images).values())
        out = model.head(features)
        return out["bbox_regression"], out["cls_logits"]

    with torch.no_grad():
        loc, conf = heads()
    if loc.shape[1] != priors.shape[0]:
        raise RuntimeError(f"ssd300_vgg16 gives {loc.shape[1]} boxes, SSD300 priors "
                           f"{priors.shape[0]}")
    teacher = (loc + 0.1 * torch.randn_like(loc), conf + torch.randn_like(conf))

    def ssdkd_loss(crit):
        def loss(loc, conf):
            out = crit((loc, conf, priors), teacher, image_list(t))
            return sum(w * o for w, o in zip(WEIGHTS, out))
        return loss

    def peer_loss(matching):
        def loss(loc, conf):
            r = peer.kd_loss(loc, conf, teacher[0], teacher[1], t["targets"], priors,
                             dict(cfg, weights=(0.3, 0.7, 0.5, 1.0)), matching)
            return r["total"]
        return loss

    losses = {"ssdkd_host": ssdkd_loss(st.MultiBoxLoss_KD(
        21, backend="gpu" if device.type == "cuda" else "cpu", validate=False))}
    if device.type == "cuda" and st.cuda_path(device)["path"] == "cuda-shared":
        losses["ssdkd_shared"] = ssdkd_loss(st.MultiBoxLoss_KD(21, backend="cuda",
                                                               validate=False))
    losses["peer_batched"] = peer_loss("batched")
    losses["peer_loop"] = peer_loss("loop")
    row = {"batch": batch, "model": "torchvision ssd300_vgg16 (random weights)",
           "priors": int(priors.shape[0])}
    for name, loss_of in losses.items():
        def step():
            opt.zero_grad(set_to_none=True)
            loss_of(*heads()).backward()
            opt.step()
        row[f"{name}_step_ms"] = clock.median_ms(step, iters, warmup=warmup)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dry-run", action="store_true",
                    help="the CPU with every size shrunk: checks the script in seconds")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", default="8,32,128")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ssd-batch", type=int, default=32)
    ap.add_argument("--parts", default="abcde")
    args = ap.parse_args()
    if args.dry_run:
        args.device = "cpu"
        args.steps, args.batch, args.iters, args.ssd_batch = 40, "1,2", 2, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("CUDA was requested (--device cuda) but torch.cuda.is_available() is False "
             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run on an "
             "NVIDIA GPU, or pass --device cpu / --dry-run to check the script on the CPU")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batches = [int(b) for b in args.batch.split(",")]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else peer.adapter_name(device),
              "torch": torch.__version__, "ssdkd": ssdkd.__version__,
              "python": platform.python_version(), "dry_run": args.dry_run}
    start = time.perf_counter()
    parts = {"a": lambda: part_a(device), "b": lambda: part_b(device, args.dry_run),
             "c": lambda: part_c(device, args.steps, not args.dry_run),
             "d": lambda: part_d(device, batches, args.iters),
             "e": lambda: part_e(device, args.ssd_batch, max(1, args.iters // 2),
                                 0 if args.dry_run else 1)}
    failures = []
    for name in args.parts:
        began = time.perf_counter()
        try:
            result[name] = parts[name]()
        except Exception as e:  # one part's failure is reported; the others still run
            result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if isinstance(result[name], dict) and not result[name].get("ok", True):
            failures.append(name)
        result[f"{name}_seconds"] = round(time.perf_counter() - began, 2)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["failed"] = failures
    print(json.dumps(result))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
