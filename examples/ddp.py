#!/usr/bin/env python3
"""Data-parallel distillation loss with torch.distributed (SPEC §5.7, §7).

    torchrun --nproc_per_node 2 examples/ddp.py

Every rank builds the same batch (ssdkd's deterministic generator), takes its shard of
the images, evaluates `MultiBoxLoss_KD(..., reduction="sum")` on it, all-reduces the
un-normalised sums and the positive count (`ssdkd.torch.global_terms`), normalises by the
GLOBAL N = max(Σ num_pos, 1) and backpropagates. Rank 0 gathers the shards' gradients,
evaluates the whole batch in one process, and prints one JSON line:

    {"world_size": 2, "total_ddp": ..., "total_single": ..., "max_grad_rel_diff": ...,
     "grads_within_spec": true}

`max_grad_rel_diff` is max |g_ddp - g_single| / max(|g_single|, 1e-4) over all elements
of both gradients; `grads_within_spec` applies SPEC §7 (1e-3 relative + 1e-7 absolute).
In a real trainer with `DistributedDataParallel` (which AVERAGES parameter gradients over
ranks), backpropagate `total * world_size` so that the sum over ranks is the whole batch's
gradient.
"""

import json
import os

import torch
import torch.distributed as dist

import ssdkd.torch as st
from ssdkd.testing import synthetic_batch

WEIGHTS = (0.3, 0.7, 0.5, 1.0)  # soft, conf, l2, loc (SPEC §5 defaults)


def weighted(soft, l2, loss_c, loss_l):
    ws, wc, wl2, wl = WEIGHTS
    return ws * soft + wc * loss_c + wl2 * l2 + wl * loss_l


def run(criterion, t, images):
    """Loss terms and student tensors (with .grad after backward) for `images`."""
    sl = t["student_loc"][images].clone().requires_grad_(True)
    sc = t["student_conf"][images].clone().requires_grad_(True)
    # The original data loader's form: one [M_i, 5] tensor per image, no padding.
    targets = [img[img[:, 4] >= 0] for img in t["targets"][images]]
    out = criterion((sl, sc, t["priors"]), (t["teacher_loc"][images],
                                            t["teacher_conf"][images]), targets)
    return out, sl, sc


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = int(os.environ.get("SSDKD_DDP_IMAGES_PER_RANK", "2"))
    batch = per_rank * world
    arrays = synthetic_batch(batch=batch, classes=21, preset="mobilenet300", seed=7)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}

    # This rank's shard: sums over its images, normalised by the global N.
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    kd_sum = st.MultiBoxLoss_KD(21, backend="cpu", reduction="sum")
    sums, sl, sc = run(kd_sum, t, shard)
    terms = st.global_terms(*sums)
    total = weighted(*terms)
    total.backward()

    grads = torch.cat([sc.grad.flatten(), sl.grad.flatten()])
    gathered = [torch.empty_like(grads) for _ in range(world)] if rank == 0 else None
    dist.gather(grads, gathered, dst=0)

    if rank == 0:
        kd = st.MultiBoxLoss_KD(21, backend="cpu")
        single, sl1, sc1 = run(kd, t, slice(0, batch))
        total_single = weighted(*single)
        total_single.backward()
        n_conf = sc.grad.numel()
        ddp_conf = torch.cat([g[:n_conf].view(sc.grad.shape) for g in gathered])
        ddp_loc = torch.cat([g[n_conf:].view(sl.grad.shape) for g in gathered])
        a = torch.cat([ddp_conf.flatten(), ddp_loc.flatten()]).double()
        b = torch.cat([sc1.grad.flatten(), sl1.grad.flatten()]).double()
        diff = (a - b).abs()
        print(json.dumps({
            "world_size": world,
            "total_ddp": float(total.detach()),
            "total_single": float(total_single.detach()),
            "max_grad_rel_diff": float((diff / b.abs().clamp(min=1e-4)).max()),
            "grads_within_spec": bool((diff <= 1e-3 * b.abs() + 1e-7).all()),
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
