"""Soak of the GPU backend through the Python package at changing shapes.

``STEPS`` evaluations (default 5,000) with gradients, each of a batch whose shape is drawn
among ``4 * MAX_M`` (B, M) pairs (B 1-4, M 1-``MAX_M`` target rows of which 0-10 objects per
image; ``MAX_M`` 250 by default: 1,000 pairs, so that new shapes keep coming well after step
1,000). Prints the process's resident set size (RSS) every 500 steps and its growth after
the first 1,000 steps, which is to stay under 1 MiB once the backend's shape cache is warm.
Not a timed test. The Rust twin, ``bench/soak_shapes.rs``, also prints the device memory
and the cache's contents.

    NODEVICE_SELECT=1 python bench/soak_shapes.py [--steps 5000] [--priors 256] [--max-m 250]
"""

import argparse
import os

import numpy as np

import ssdkd


def rss():
    """The process's resident set, in bytes."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def batch(rng, b, p, c, m):
    """Random logits and offsets, and targets with 0-10 objects per image, padding after."""
    normal = lambda *shape: rng.uniform(-2, 2, shape).astype(np.float32)  # noqa: E731
    targets = np.zeros((b, m, 5), np.float32)
    targets[:, :, 4] = -1
    for i in range(b):
        for row in range(min(int(rng.integers(0, 11)), m)):
            w, h = rng.uniform(0.1, 0.6, 2)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            targets[i, row] = [x, y, x + w, y + h, rng.integers(0, c - 1)]
    return normal(b, p, 4), normal(b, p, c), normal(b, p, 4), normal(b, p, c), targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--priors", type=int, default=256)
    parser.add_argument("--max-m", type=int, default=250)
    parser.add_argument("--backend", default="gpu")
    args = parser.parse_args()
    p, c = args.priors, 21
    rng = np.random.default_rng(2017)
    i = np.arange(p)
    side = 0.1 + 0.8 * (i % 7) / 7
    priors = np.stack([i % 8 / 8 + 0.06, i // 8 % 8 / 8 + 0.06, side, side], 1).astype(np.float32)
    backend = ssdkd.Backend(args.backend)
    print(f"{backend!r}, P = {p}, C = {c}, B 1-4, M 1-{args.max_m}, {args.steps} steps",
          flush=True)
    pairs, at_1000, last = set(), None, rss()
    for step in range(1, args.steps + 1):
        b, m = int(rng.integers(1, 5)), int(rng.integers(1, args.max_m + 1))
        pairs.add((b, m))
        ev = ssdkd.evaluate(*batch(rng, b, p, c, m), priors, backend=backend, gradients=True)
        assert np.isfinite(ev.total) and ev.grad_student_conf.shape == (b, p, c)
        if step % 500 == 0:
            last = rss()
            print(f"step {step:5}: RSS {last / 2**20:8.2f} MiB, {len(pairs):4} (B, M) pairs seen",
                  flush=True)
            if step == 1000:
                at_1000 = last
    if at_1000 is not None:
        print(f"RSS growth after step 1000, over {args.steps - 1000} steps: "
              f"{(last - at_1000) / 2**20:+.3f} MiB")


if __name__ == "__main__":
    main()
