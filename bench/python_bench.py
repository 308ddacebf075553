#!/usr/bin/env python3
"""Times ssdkd.torch.MultiBoxLoss_KD forward+backward beside the PyTorch peer, on the
same batches `ssdkd bench` times (SSD300 priors, 6 objects per image, seed 300; the value
scan skipped, as `ssdkd bench` does).

Usage (after `pip install ./python`, with torch):
    python bench/python_bench.py [--batch 8,32] [--classes 21] [--preset ssd300]
                                 [--iters 20] [--backend cpu|gpu] [--device cpu|cuda]
                                 [--rounds 5] [--ssdkd target/release/ssdkd] [--json]

The machine's speed can move by a third from one minute to the next, so the columns are
measured in `--rounds` interleaved rounds (wrapper, `ssdkd bench`, peer, then again), and
each ratio is the median of the rounds' ratios: every ratio compares timings taken within
the same second or two. Per batch size it reports medians (sorted[n // 2], as `ssdkd
bench`) over all rounds of
- `wrapper_fb_ms`: `MultiBoxLoss_KD` forward + `(0.3*soft + 0.7*c + 0.5*l2 + l).backward()`,
- `peer_fb_ms`: the peer's `kd_loss` forward+backward (autograd, `--matching loop`),
- `cli_fb_ms`: `ssdkd bench --backend cpu --json`'s `forward_backward_ms` for the same
  batch when the binary is found (the median of the rounds' medians), and `overhead`, the
  median over rounds of wrapper / cli - 1 (the wrapper's target: < 10% at B = 32), with
  `overhead_min`/`overhead_max` its range over the rounds;
- `library_fb_ms`: the evaluation `ssdkd bench` times (gradients, no value scan, the
  result dropped) called through the binding in this process, timed in turn with the
  wrapper, iteration by iteration, and `overhead_vs_library`, the median of the
  wrapper / library ratios of those pairs: the wrapper's overhead measured within
  milliseconds, where the machine's drift cannot reach it;
- with `--device cuda`, `copy_ms`: moving the inputs to the host and the gradients back
  (the cost of CUDA tensors with a host backend).
Measure on a quiet machine; one run, same machine, for all columns.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import pytorch_peer as peer  # noqa: E402

import ssdkd  # noqa: E402
import ssdkd.torch as st  # noqa: E402


def median(values):
    """sorted[n // 2], as `ssdkd bench`."""
    return sorted(values)[len(values) // 2]


def median_ms(seconds):
    return median(seconds) * 1e3


def samples(fns, iters, sync):
    """`iters` timings in seconds of each function of `fns`, called in turn, after two
    untimed rounds: one list per function."""
    for _ in range(2):
        for fn in fns:
            fn()
    out = [[] for _ in fns]
    for _ in range(iters):
        for fn, times in zip(fns, out):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return out


def cli_bench(binary, b, classes, preset, iters):
    if not binary or not os.path.exists(binary):
        return None
    cmd = [binary, "bench", "--batch", str(b), "--classes", str(classes), "--preset", preset,
           "--backend", "cpu", "--iters", str(iters), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    return rows[0] if rows else None


def bench_one(args, b):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    arrays = ssdkd._ssdkd.synthetic(b, args.classes, args.preset, 6, False, 300)
    backend = ssdkd.Backend(args.backend)  # the library's evaluation, on a backend of its own
    t = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    crit = st.MultiBoxLoss_KD(args.classes, backend=args.backend, validate=False)
    cfg = dict(peer.DEFAULT_CONFIG, num_classes=args.classes)

    def wrapper():
        sl = t["student_loc"].detach().requires_grad_(True)
        sc = t["student_conf"].detach().requires_grad_(True)
        soft, l2, c, l = crit((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
                              t["targets"])
        (0.3 * soft + 0.7 * c + 0.5 * l2 + l).backward()

    # What `ssdkd bench` times, called through the binding in this process: one
    # evaluation with the wrapper's weights and gradients, no value scan, result dropped.
    config = ssdkd._config_json(dict(crit._config(), weights=(0.3, 0.7, 0.5, 1.0)))

    def library():
        backend.evaluate(*(arrays[k] for k in ssdkd._TENSORS), config, True, False, False)

    def peer_fb():
        sl = t["student_loc"].detach().requires_grad_(True)
        sc = t["student_conf"].detach().requires_grad_(True)
        r = peer.kd_loss(sl, sc, t["teacher_loc"], t["teacher_conf"], t["targets"],
                         t["priors"], cfg, "loop")
        r["total"].backward()

    def copy():
        host = [t[k].to("cpu") for k in ("student_loc", "student_conf", "teacher_loc",
                                         "teacher_conf")]
        host[0].to(device), host[1].to(device)  # the gradients' way back

    timings = {"wrapper": [], "library": [], "peer": [], "copy": []}
    cli_rounds, ratios, pairs = [], [], []
    for _ in range(args.rounds):
        # The wrapper and the library's evaluation in turn, then `ssdkd bench` right after:
        # their ratios are the figures that drift most with the machine's speed.
        wrapper_round, library_round = samples([wrapper, library], args.iters, sync)
        timings["wrapper"] += wrapper_round
        timings["library"] += library_round
        pairs += [w / lib for w, lib in zip(wrapper_round, library_round)]
        cli = None
        if args.backend == "cpu":
            cli = cli_bench(args.ssdkd, b, args.classes, args.preset, args.iters)
        if cli is not None:
            cli_rounds.append(cli)
            ratios.append(median_ms(wrapper_round) / cli["forward_backward_ms"] - 1)
        timings["peer"] += samples([peer_fb], args.iters, sync)[0]
        if cuda:
            timings["copy"] += samples([copy], args.iters, sync)[0]

    row = dict(batch=b, classes=args.classes, preset=args.preset, priors=arrays["priors"].shape[0],
               backend=args.backend, device=str(device), iters=args.iters, rounds=args.rounds,
               threads=torch.get_num_threads(), torch=torch.__version__,
               ssdkd=ssdkd.__version__,
               wrapper_fb_ms=median_ms(timings["wrapper"]),
               peer_fb_ms=median_ms(timings["peer"]),
               library_fb_ms=median_ms(timings["library"]),
               overhead_vs_library=median(pairs) - 1)
    if cuda:
        row["copy_ms"] = median_ms(timings["copy"])
    if cli_rounds:
        row["cli_f_ms"] = median([c["forward_ms"] for c in cli_rounds])
        row["cli_fb_ms"] = median([c["forward_backward_ms"] for c in cli_rounds])
        row["overhead"] = median(ratios)
        row["overhead_min"], row["overhead_max"] = min(ratios), max(ratios)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--preset", default="ssd300")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per round")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds of wrapper, `ssdkd bench` and peer")
    ap.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--ssdkd", default=os.path.join(REPO, "target", "release", "ssdkd"),
                    help="the ssdkd binary for the CLI column (skipped when absent)")
    ap.add_argument("--json", action="store_true", help="one JSON object per batch size")
    args = ap.parse_args()
    if args.iters < 1 or args.rounds < 1:
        ap.error("--iters and --rounds must be >= 1")
    for b in (int(x) for x in args.batch.split(",")):
        row = bench_one(args, b)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            extra = ""
            if "overhead" in row:
                extra = (f"  cli {row['cli_fb_ms']:.1f} ms  overhead {row['overhead']:+.1%}"
                         f" ({row['overhead_min']:+.1%} to {row['overhead_max']:+.1%}"
                         f" over {args.rounds} rounds)")
            extra += (f"  library {row['library_fb_ms']:.1f} ms  overhead"
                      f" {row['overhead_vs_library']:+.1%}")
            if "copy_ms" in row:
                extra += f"  copy {row['copy_ms']:.2f} ms"
            print(f"B={b:3d}  ssdkd.torch {row['wrapper_fb_ms']:.1f} ms  "
                  f"peer {row['peer_fb_ms']:.1f} ms{extra}", flush=True)


if __name__ == "__main__":
    main()
