#!/usr/bin/env python3
"""PyTorch peer benchmark of ssdkd: the SSD knowledge-distillation loss of docs/SPEC.md.

A faithful PyTorch implementation of the project's docs/SPEC.md (priors §2, matching with
the tie rule §3, hard-negative mining §4, the four terms §5, gradients §6 via
autograd), timed the way `ssdkd bench` times itself.

Usage:
    pip install torch numpy safetensors
    python3 bench/pytorch_peer.py [--device cpu|cuda] [--matching loop|batched]
                                  [--batch 8,32,128] [--classes 21] [--iters 20]
                                  [--preset ssd300] [--json]
                                  [--check FILE[,FILE...]] [--no-check] [--check-only]
                                  [--ssdkd PATH] [--threads N] [--inputs device|host]

    --matching loop     classic ssd.pytorch MultiBoxLoss: Python loop over images,
                        jaccard + match per image, two-sort mining (sort, argsort).
    --matching batched  matching of the whole [B, M, P] batch at once, padding rows
                        (label < 0) masked; mining ranks by one sort + scatter.

Before timing, `--check FILE` (default tests/golden/voc_default_b4.safetensors
relative to the repository root) evaluates the golden file with BOTH matching styles
and asserts the five losses (1e-4 relative, 1e-6 absolute below 1e-2), the counts,
labels and negative mask (exact), and the gradients (1e-3 relative + 1e-7 absolute)
against the file's expectations; if an `ssdkd` binary is given (--ssdkd) or found at
target/release/ssdkd it also asserts the peer's total equals
`ssdkd eval FILE --backend cpu --json`'s total to 1e-4 relative. Results go to
stderr; a failed check exits with status 1 before anything is timed.

Timing: synthetic batches like `ssdkd bench` (same SplitMix64 generator and layout:
SSD300 priors, 6 objects per image, seed 300; teacher closer to the truth than the
student), 2 forward+backward warm-ups, then --iters forwards (under torch.no_grad(),
as ssdkd's forward computes no gradient) and --iters forward+backwards (autograd
w.r.t. student_loc and student_conf); the medians (sorted[n // 2], as ssdkd) are
reported. On CUDA, torch.cuda.synchronize() brackets every timed call. Everything
is float32. --json prints one JSON object per batch size on stdout.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIE = 1e-5  # SPEC §3: overlaps >= max * (1 - 1e-5) tie with the maximum

DEFAULT_CONFIG = {
    "num_classes": 21,
    "overlap_threshold": 0.5,
    "negpos_ratio": 3,
    "negatives_for_hard": 100,
    "variance": [0.1, 0.2],
    "temperature": 1.0,
    "pos_w": 1.0,
    "neg_w": 1.5,
    "reg_m": 0.0,
    "eps": 1e-10,
    "weights": [0.3, 0.7, 0.5, 1.0],
}

# --------------------------------------------------------------------------- priors (§2)

MIN_SIZES = [30, 60, 111, 162, 213, 264]
MAX_SIZES = [60, 111, 162, 213, 264, 315]
SSD_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
PRESETS = {
    "ssd300": dict(image_size=300, feature_maps=[38, 19, 10, 5, 3, 1], steps=None,
                   aspect_ratios=SSD_RATIOS),
    "ssd300-strided": dict(image_size=300, feature_maps=[38, 19, 10, 5, 3, 1],
                           steps=[8, 16, 32, 64, 100, 300], aspect_ratios=SSD_RATIOS),
    "ssd512": dict(image_size=512, feature_maps=[64, 32, 16, 8, 6, 4], steps=None,
                   aspect_ratios=SSD_RATIOS),
    "mobilenet300": dict(image_size=300, feature_maps=[19, 10, 5, 3, 2, 1], steps=None,
                         aspect_ratios=[[2, 3]] * 6),
}


def prior_boxes(image_size, feature_maps, steps, aspect_ratios, min_sizes=MIN_SIZES,
                max_sizes=MAX_SIZES, clip=True):
    """SPEC §2 (ssd.pytorch PriorBox): [P, 4] float32 in centre form."""
    rows = []
    for k, f in enumerate(feature_maps):
        f_k = image_size / steps[k] if steps is not None else f
        s_k = min_sizes[k] / image_size
        s_k_prime = math.sqrt(s_k * (max_sizes[k] / image_size))
        for i in range(f):
            for j in range(f):
                cx = (j + 0.5) / f_k
                cy = (i + 0.5) / f_k
                rows.append((cx, cy, s_k, s_k))
                rows.append((cx, cy, s_k_prime, s_k_prime))
                for ar in aspect_ratios[k]:
                    r = math.sqrt(ar)
                    rows.append((cx, cy, s_k * r, s_k / r))
                    rows.append((cx, cy, s_k / r, s_k * r))
    out = torch.tensor(rows, dtype=torch.float64)
    if clip:
        out.clamp_(0.0, 1.0)
    return out.float()


def preset_priors(name):
    return prior_boxes(**PRESETS[name])


# ------------------------------------------------------------------------- box helpers


def point_form(boxes):
    """centre form (cx, cy, w, h) -> corners (xmin, ymin, xmax, ymax)."""
    return torch.cat((boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2), -1)


def jaccard(box_a, box_b):
    """IoU of corner boxes: box_a [..., A, 4], box_b [Pb, 4] -> [..., A, Pb]."""
    a = box_a[..., :, None, :]
    b = box_b
    max_xy = torch.min(a[..., 2:], b[..., 2:])
    min_xy = torch.max(a[..., :2], b[..., :2])
    wh = (max_xy - min_xy).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = ((box_a[..., 2] - box_a[..., 0]) * (box_a[..., 3] - box_a[..., 1]))[..., None]
    area_b = (box_b[:, 2] - box_b[:, 0]) * (box_b[:, 3] - box_b[:, 1])
    return inter / (area_a + area_b - inter)


def first_tied_argmax(x, dim):
    """(max, index): every value >= max * (1 - 1e-5) ties with the max; lowest index wins."""
    best = x.max(dim, keepdim=True).values
    tied = x >= best * (1.0 - TIE)
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    idx = torch.arange(n, device=x.device).view(shape)
    first = torch.where(tied, idx, torch.full_like(idx, n)).min(dim).values
    return best.squeeze(dim), first


def encode(matched, priors, variances):
    """SPEC §3.5: matched corners [..., P, 4], priors centre [P, 4] -> offsets."""
    g_cxcy = (matched[..., :2] + matched[..., 2:]) / 2 - priors[:, :2]
    g_cxcy = g_cxcy / (variances[0] * priors[:, 2:])
    g_wh = (matched[..., 2:] - matched[..., :2]) / priors[:, 2:]
    g_wh = torch.log(g_wh) / variances[1]
    return torch.cat([g_cxcy, g_wh], -1)


# ----------------------------------------------------------------------- matching (§3)


def match_one(truths, labels, priors, priors_pf, threshold, variances):
    """ssd.pytorch `match` for one image with the SPEC tie rule. truths [n, 4] (n >= 1)."""
    overlaps = jaccard(truths, priors_pf)                         # [n, P]
    _, best_prior_idx = first_tied_argmax(overlaps, 1)            # [n]
    best_truth_overlap, best_truth_idx = first_tied_argmax(overlaps, 0)  # [P]
    best_truth_overlap = best_truth_overlap.index_fill(0, best_prior_idx, 2.0)
    for j in range(best_prior_idx.size(0)):                       # later object wins
        best_truth_idx[best_prior_idx[j]] = j
    matches = truths[best_truth_idx]
    conf = labels[best_truth_idx].long() + 1
    conf[best_truth_overlap < threshold] = 0
    loc = encode(matches, priors, variances)
    return loc, conf


def match_loop(targets, priors, threshold, variances):
    """Classic MultiBoxLoss: a Python loop over the images."""
    num, num_priors = targets.shape[0], priors.shape[0]
    loc_t = torch.zeros(num, num_priors, 4, device=targets.device)
    conf_t = torch.zeros(num, num_priors, dtype=torch.long, device=targets.device)
    priors_pf = point_form(priors)
    for idx in range(num):
        t = targets[idx]
        t = t[t[:, 4] >= 0]                                       # drop padding rows
        if t.shape[0] == 0:
            continue                                              # all background, offsets 0
        loc_t[idx], conf_t[idx] = match_one(t[:, :4], t[:, 4], priors, priors_pf,
                                            threshold, variances)
    return loc_t, conf_t


def match_batched(targets, priors, threshold, variances):
    """Whole-batch matching, no Python loop over images; label < 0 rows are masked."""
    B, M, _ = targets.shape
    P = priors.shape[0]
    dev = targets.device
    valid = targets[..., 4] >= 0                                  # [B, M]
    truths = targets[..., :4]
    overlaps = jaccard(truths, point_form(priors))                # [B, M, P]
    overlaps = torch.where(valid[..., None], overlaps, torch.full_like(overlaps, -1.0))
    # best object of each prior (padding rows at -1 never tie with a real max >= 0)
    bo, bt = first_tied_argmax(overlaps, 1)                       # [B, P]
    bt = bt.clamp(max=M - 1)                                      # images without objects
    # best prior of each object; padding rows get the dummy column P
    _, bp = first_tied_argmax(overlaps, 2)                        # [B, M]
    bp = torch.where(valid, bp, torch.full_like(bp, P))
    # forced matches in object order: the highest object index claiming a prior wins
    obj = torch.arange(M, device=dev).expand(B, M)
    forced = torch.full((B, P + 1), -1, dtype=torch.long, device=dev)
    forced.scatter_reduce_(1, bp, obj, reduce="amax", include_self=True)
    forced = forced[:, :P]
    has_forced = forced >= 0
    bt = torch.where(has_forced, forced, bt)
    bo = torch.where(has_forced, torch.full_like(bo, 2.0), bo)
    matches = torch.gather(truths, 1, bt[..., None].expand(B, P, 4))
    labels = torch.gather(targets[..., 4], 1, bt)
    conf_t = torch.where(bo < threshold, torch.zeros_like(bt), labels.long() + 1)
    has_obj = valid.any(1)[:, None, None]
    loc_t = encode(matches, priors, variances)
    loc_t = torch.where(has_obj, loc_t, torch.zeros_like(loc_t))
    return loc_t, conf_t


# ------------------------------------------------------------------------- mining (§4)


def mining_scores(student_conf, conf_t, pos):
    with torch.no_grad():
        score = torch.logsumexp(student_conf, -1) - student_conf.gather(-1, conf_t[..., None]).squeeze(-1)
        return torch.where(pos, torch.zeros_like(score), score)


def num_negatives(num_pos, P, cfg):
    k = torch.clamp(cfg["negpos_ratio"] * num_pos, max=P - 1)
    return torch.where(k == 0, torch.full_like(k, int(cfg["negatives_for_hard"])), k)


def mine_two_sort(score, k):
    """ssd.pytorch: sort descending (stable: equal scores keep the lower index first),
    then argsort the order to get each prior's rank."""
    _, loss_idx = score.sort(dim=1, descending=True, stable=True)
    _, idx_rank = loss_idx.sort(1)
    return idx_rank < k[:, None]


def mine_scatter(score, k):
    """One stable sort, ranks by scatter (no second sort)."""
    _, order = score.sort(dim=1, descending=True, stable=True)
    B, P = score.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(P, device=score.device).expand(B, P))
    return rank < k[:, None]


# ------------------------------------------------------------------------- loss (§5)


def kd_loss(student_loc, student_conf, teacher_loc, teacher_conf, targets, priors, cfg,
            matching="loop"):
    """Returns a dict of 0-d tensors: soft_loss, l2_loss, loss_c, loss_l, total, counts,
    and the matching/mining decisions (conf_t, neg)."""
    B, P, C = student_conf.shape
    variances = cfg["variance"]
    with torch.no_grad():
        if matching == "loop":
            loc_t, conf_t = match_loop(targets, priors, cfg["overlap_threshold"], variances)
        else:
            loc_t, conf_t = match_batched(targets, priors, cfg["overlap_threshold"], variances)
        pos = conf_t > 0
        num_pos = pos.sum(1, keepdim=False)
        score = mining_scores(student_conf, conf_t, pos)
        k = num_negatives(num_pos, P, cfg)
        neg = mine_two_sort(score, k) if matching == "loop" else mine_scatter(score, k)
        sel = pos | neg
        N = pos.sum().clamp(min=1).to(student_conf.dtype)

    # loss_l: smooth-L1 over positives
    loc_p = student_loc[pos]
    loc_tp = loc_t[pos]
    loss_l = F.smooth_l1_loss(loc_p, loc_tp, reduction="sum", beta=1.0)

    # l2_loss: teacher-bounded regression over positives
    d_s = ((loc_p - loc_tp) ** 2).sum(-1)
    with torch.no_grad():
        d_t = ((teacher_loc[pos] - loc_tp) ** 2).sum(-1)
        bounded = (d_s + cfg["reg_m"]) > d_t
    l2_loss = (d_s * bounded).sum()

    # loss_c: cross-entropy over positives and mined negatives
    conf_s = student_conf[sel]
    loss_c = F.cross_entropy(conf_s, conf_t[sel], reduction="sum")

    # soft_loss over the same rows
    T = float(cfg["temperature"])
    s = conf_s / T
    q = F.softmax(teacher_conf[sel] / T, -1)
    if cfg["neg_w"] > 1:
        eps = cfg["eps"]
        w = torch.full((C,), float(cfg["pos_w"]), device=s.device, dtype=s.dtype)
        w[0] = float(cfg["neg_w"])
        p = F.softmax(s, -1)
        soft = (w * (q + eps) * (torch.log(q + eps) - torch.log(p + eps))).sum()
    else:
        soft = F.kl_div(F.log_softmax(s, -1), q, reduction="sum")
    soft = soft * (T * T)

    soft_loss, l2_loss, loss_c, loss_l = soft / N, l2_loss / N, loss_c / N, loss_l / N
    ws, wc, wl2, wl = cfg["weights"]
    total = ws * soft_loss + wc * loss_c + wl2 * l2_loss + wl * loss_l
    return dict(soft_loss=soft_loss, l2_loss=l2_loss, loss_c=loss_c, loss_l=loss_l,
                total=total, num_pos=pos.sum(), num_neg=neg.sum(), num_bounded=bounded.sum(),
                conf_t=conf_t, neg=neg)


# ----------------------------------------------------------------------- golden checks

LOSS_NAMES = ["soft_loss", "l2_loss", "loss_c", "loss_l", "total"]


def load_batch(path):
    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(json.loads(meta.get("config", "{}")))
    if "priors" in tensors:
        priors = torch.from_numpy(tensors["priors"].astype(np.float32))
    else:
        priors = preset_priors(meta.get("prior_preset", "ssd300"))
    return tensors, cfg, priors


def loss_ok(got, want):
    tol = 1e-6 if abs(want) < 1e-2 else 1e-4 * abs(want)
    return abs(got - want) <= tol


def ssdkd_total(binary, path):
    out = subprocess.run([binary, "eval", path, "--backend", "cpu", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_file(path, device, ssdkd_bin):
    tensors, cfg, priors = load_batch(path)
    name = os.path.basename(path)
    ok_all = True
    peer_total = None
    for matching in ("loop", "batched"):
        dev = lambda k: torch.from_numpy(tensors[k].astype(np.float32)).to(device)  # noqa: E731
        sl = dev("student_loc").requires_grad_(True)
        sc = dev("student_conf").requires_grad_(True)
        out = kd_loss(sl, sc, dev("teacher_loc"), dev("teacher_conf"), dev("targets"),
                      priors.to(device), cfg, matching)
        out["total"].backward()
        got = [out[k].item() for k in LOSS_NAMES]
        want = [float(x) for x in tensors["expected_losses"]]
        losses_ok = all(loss_ok(g, w) for g, w in zip(got, want))
        worst = max(abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want))
        counts = [int(out[k].item()) for k in ("num_pos", "num_neg", "num_bounded")]
        counts_ok = counts == [int(x) for x in tensors["expected_counts"]]
        dec_ok = True
        if "expected_conf_target" in tensors:
            dec_ok &= bool(np.array_equal(out["conf_t"].cpu().numpy(), tensors["expected_conf_target"]))
        if "expected_neg_mask" in tensors:
            dec_ok &= bool(np.array_equal(out["neg"].cpu().numpy().astype(np.uint8),
                                          tensors["expected_neg_mask"]))
        grad_msgs = []
        grads_ok = True
        for gname, t in (("expected_grad_student_conf", sc), ("expected_grad_student_loc", sl)):
            g = t.grad.detach().cpu().double().numpy()
            e = tensors[gname].astype(np.float64)
            excess = np.abs(g - e) / (1e-3 * np.abs(e) + 1e-7)
            grads_ok &= bool((excess <= 1.0).all())
            grad_msgs.append(f"{gname[len('expected_grad_'):]} max {excess.max():.3f}x tol")
        ok = losses_ok and counts_ok and dec_ok and grads_ok
        ok_all &= ok
        print(f"[check] {name} pytorch-{matching}: losses "
              f"{'ok' if losses_ok else 'FAIL'} (max rel {worst:.2e}; "
              + ", ".join(f"{k}={g:.6f}/{w:.6f}" for k, g, w in zip(LOSS_NAMES, got, want))
              + f"), counts {counts} {'ok' if counts_ok else 'FAIL'}, labels+neg mask "
              f"{'ok' if dec_ok else 'FAIL'}, grads {'ok' if grads_ok else 'FAIL'} ("
              + "; ".join(grad_msgs) + ")", file=sys.stderr)
        if matching == "loop":
            peer_total = got[4]
    if ssdkd_bin:
        try:
            ref = ssdkd_total(ssdkd_bin, path)
            rel = abs(peer_total - ref["total"]) / max(abs(ref["total"]), 1e-12)
            same = rel <= 1e-4
            ok_all &= same
            print(f"[check] {name} vs `{ssdkd_bin} eval --backend cpu --json`: total "
                  f"{peer_total:.6f} vs {ref['total']:.6f} (rel {rel:.2e}) "
                  f"{'ok' if same else 'FAIL'}", file=sys.stderr)
        except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as err:
            ok_all = False
            print(f"[check] {name}: running ssdkd failed: {err}", file=sys.stderr)
    else:
        print(f"[check] {name}: no ssdkd binary found (--ssdkd PATH); compared with "
              "expected_losses only", file=sys.stderr)
    return ok_all


# ----------------------------------------------------------------- synthetic batches


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(seed, start, count):
    """Draws start..start+count-1 of ssdkd's SplitMix64 stream (counter form)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(start + 1, start + count + 1, dtype=np.uint64) * _GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(z):
    return (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)


def _normal(u, v):
    u = np.maximum(u, np.float32(1e-7))
    return np.sqrt(np.float32(-2.0) * np.log(u)) * np.cos(np.float32(2 * math.pi) * v)


def synthetic_batch(batch, classes, priors, objects=6, seed=300, vary_objects=False):
    """The batch `ssdkd bench` times (host/src/demo.rs, SyntheticSpec::bench): the same
    SplitMix64 stream and draw order; values agree up to libm last-ulp differences.
    (seed=2017, vary_objects=True gives `ssdkd demo`'s batch.)"""
    P, C, M = priors.shape[0], classes, objects
    f = np.float32
    per_prior = 16 + 4 * C
    pos = 0
    targets = np.zeros((batch, M, 5), np.float32)
    targets[..., 4] = -1.0
    tl = np.empty((batch, P, 4), np.float32)
    sl = np.empty((batch, P, 4), np.float32)
    tc = np.empty((batch, P, C), np.float32)
    sc = np.empty((batch, P, C), np.float32)
    rng = lambda lo, hi, u: f(lo) + (f(hi) - f(lo)) * u  # noqa: E731
    for b in range(batch):
        count = M
        if vary_objects:
            count = 1 + int(_splitmix(seed, pos, 1)[0] % np.uint64(M))
            pos += 1
        z = _splitmix(seed, pos, 5 * count)
        pos += 5 * count
        u = _uniform(z)
        for m in range(count):
            w = rng(0.1, 0.6, u[5 * m])
            h = rng(0.1, 0.6, u[5 * m + 1])
            cx = rng(w / f(2), f(1) - w / f(2), u[5 * m + 2])
            cy = rng(h / f(2), f(1) - h / f(2), u[5 * m + 3])
            label = int(z[5 * m + 4] % np.uint64(C - 1))
            targets[b, m] = [cx - w / f(2), cy - h / f(2), cx + w / f(2), cy + h / f(2), label]
        loc_t, conf_t = match_batched(torch.from_numpy(targets[b:b + 1]), priors,
                                      DEFAULT_CONFIG["overlap_threshold"],
                                      DEFAULT_CONFIG["variance"])
        loc_t, conf_t = loc_t[0].numpy(), conf_t[0].numpy()
        u = _uniform(_splitmix(seed, pos, P * per_prior)).reshape(P, per_prior)
        pos += P * per_prior
        lu = u[:, :16].reshape(P, 4, 4)
        tl[b] = loc_t + f(0.15) * _normal(lu[..., 0], lu[..., 1])
        sl[b] = loc_t + f(0.6) * _normal(lu[..., 2], lu[..., 3])
        cu = u[:, 16:].reshape(P, C, 4)
        hit = (np.arange(C)[None, :] == conf_t[:, None]).astype(np.float32)
        tc[b] = f(3.0) * hit + _normal(cu[..., 0], cu[..., 1])
        sc[b] = f(1.5) * hit + f(1.2) * _normal(cu[..., 2], cu[..., 3])
    return dict(student_loc=sl, student_conf=sc, teacher_loc=tl, teacher_conf=tc,
                targets=targets)


# ------------------------------------------------------------------------------ timing


def adapter_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def median_ms(samples):
    samples = sorted(samples)
    return samples[len(samples) // 2] * 1e3


def bench_one(args, device, b, priors):
    cfg = dict(DEFAULT_CONFIG, num_classes=args.classes)
    host = synthetic_batch(b, args.classes, priors)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    priors_d = priors.to(device)
    if args.inputs == "host" and cuda:
        src = {k: torch.from_numpy(v).pin_memory() for k, v in host.items()}
    else:
        src = {k: torch.from_numpy(v).to(device) for k, v in host.items()}

    def call(grad):
        if args.inputs == "host" and cuda:
            t = {k: v.to(device, non_blocking=True) for k, v in src.items()}
        else:
            t = src
        sl = t["student_loc"].detach().requires_grad_(grad)
        sc = t["student_conf"].detach().requires_grad_(grad)
        if grad:
            out = kd_loss(sl, sc, t["teacher_loc"], t["teacher_conf"], t["targets"],
                          priors_d, cfg, args.matching)
            out["total"].backward()
            if args.inputs == "host" and cuda:
                sl.grad.to("cpu"), sc.grad.to("cpu")
        else:
            with torch.no_grad():
                kd_loss(sl, sc, t["teacher_loc"], t["teacher_conf"], t["targets"],
                        priors_d, cfg, args.matching)

    def timed(grad):
        sync()
        start = time.perf_counter()
        call(grad)
        sync()
        return time.perf_counter() - start

    for _ in range(2):
        timed(True)
    fwd = [timed(False) for _ in range(args.iters)]
    fwdbwd = [timed(True) for _ in range(args.iters)]
    return dict(
        backend=f"pytorch-{args.matching}",
        adapter=adapter_name(device),
        inputs=args.inputs if cuda else "host",
        preset=args.preset,
        batch=b,
        priors=int(priors.shape[0]),
        classes=args.classes,
        objects_per_image=6,
        forward_ms=median_ms(fwd),
        forward_backward_ms=median_ms(fwdbwd),
        iters=args.iters,
        matching=args.matching,
        device=str(device),
        threads=torch.get_num_threads(),
        forward_mode="no_grad",
        dtype="float32",
        torch=torch.__version__,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--matching", choices=["loop", "batched"], default="loop")
    ap.add_argument("--batch", default="8,32,128", help="batch sizes, comma-separated")
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ssd300")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", default=os.path.join(REPO_ROOT, "tests", "golden",
                                                    "voc_default_b4.safetensors"),
                    help="golden file(s), comma-separated")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="check, do not time")
    ap.add_argument("--ssdkd", default=None, help="ssdkd binary (default target/release/ssdkd)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--inputs", choices=["device", "host"], default="device",
                    help="on CUDA: inputs resident on the GPU, or copied in (and gradients "
                         "out) on every call")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    if not args.no_check:
        binary = args.ssdkd
        if binary is None:
            cand = os.path.join(REPO_ROOT, "target", "release", "ssdkd")
            binary = cand if os.access(cand, os.X_OK) else None
        ok = True
        for path in args.check.split(","):
            if not os.path.isabs(path) and not os.path.exists(path):
                path = os.path.join(REPO_ROOT, path)
            ok &= check_file(path, device, binary)
        print(f"[check] {'PASSED' if ok else 'FAILED'}", file=sys.stderr)
        if not ok:
            sys.exit(1)
    if args.check_only:
        return

    priors = preset_priors(args.preset)
    if not args.json:
        print(f"{'backend':<16} {'adapter':<40} {'batch':>6} {'priors':>7} {'classes':>7} "
              f"{'forward ms':>12} {'forward+backward ms':>20} {'iters':>6}")
    for b in [int(x) for x in args.batch.split(",") if x]:
        r = bench_one(args, device, b, priors)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{r['backend']:<16} {r['adapter'][:40]:<40} {r['batch']:>6} {r['priors']:>7} "
                  f"{r['classes']:>7} {r['forward_ms']:>12.3f} {r['forward_backward_ms']:>20.3f} "
                  f"{r['iters']:>6}", flush=True)


if __name__ == "__main__":
    main()
