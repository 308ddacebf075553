#!/usr/bin/env python3
"""Cross-checks `ssdkd eval` against the PyTorch peer, run in float64, on random batches.

Usage: python3 bench/crosscheck.py SSDKD_BINARY BACKENDS [SEED] [CASES]
       e.g. python3 bench/crosscheck.py target/release/ssdkd cpu,gpu 7 30

Each case draws a preset, C, B, M, a config (threshold, negpos_ratio, negatives_for_hard,
variance, temperature, pos_w, neg_w, reg_m, weights) and random boxes, padding rows and
logits; writes a batch file with `prior_preset` metadata (no priors tensor); and checks
the five losses (SPEC §7: 1e-4 relative, 1e-6 absolute below 1e-2), the counts (exact)
and both gradients (1e-3 relative + 1e-7 absolute) that `ssdkd eval --json --grad-out`
gives against the peer's float64 values. Random data can, rarely, put a decision within
float32 noise of its boundary; a failure names the case so that it can be looked at.
Needs torch, numpy and safetensors.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pytorch_peer as peer  # noqa: E402
torch.set_default_dtype(torch.float64)
BIN = sys.argv[1]
backends = sys.argv[2].split(',')
rng = np.random.default_rng(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
fails = 0
work = tempfile.mkdtemp(prefix='ssdkd-crosscheck-')
for case in range(int(sys.argv[4]) if len(sys.argv) > 4 else 20):
    preset = rng.choice(['ssd300', 'ssd512', 'mobilenet300', 'ssd300-strided'])
    C = int(rng.choice([2, 3, 5, 21, 81]))
    B = int(rng.integers(1, 4))
    M = int(rng.integers(1, 8))
    cfg = dict(num_classes=C, overlap_threshold=float(rng.choice([0.35, 0.5, 0.65])),
               negpos_ratio=int(rng.choice([1, 3, 7])), negatives_for_hard=int(rng.choice([0, 10, 100, 50000])),
               variance=[float(rng.choice([0.1, 0.2])), float(rng.choice([0.2, 0.1]))],
               temperature=float(rng.choice([0.5, 1.0, 3.0])), pos_w=float(rng.choice([0.5, 1.0])),
               neg_w=float(rng.choice([0.8, 1.0, 1.7])), reg_m=float(rng.choice([0.0, 0.3, -0.2])), eps=1e-10,
               weights=[float(x) for x in rng.uniform(0.1, 2.0, 4)])
    priors = peer.preset_priors(preset).numpy().astype(np.float32)
    P = priors.shape[0]
    targets = np.zeros((B, M, 5), np.float32); targets[..., 4] = -1
    for b in range(B):
        n = int(rng.integers(0, M + 1))
        rows = rng.permutation(M)[:n]
        for r in rows:
            w, h = rng.uniform(0.02, 0.9, 2)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            targets[b, r] = [x, y, x + w, y + h, rng.integers(0, C - 1)]
    t = dict(student_loc=rng.normal(0, 1.5, (B, P, 4)).astype(np.float32),
             student_conf=rng.normal(0, 2, (B, P, C)).astype(np.float32),
             teacher_loc=rng.normal(0, 1.5, (B, P, 4)).astype(np.float32),
             teacher_conf=rng.normal(0, 2, (B, P, C)).astype(np.float32), targets=targets)
    path = os.path.join(work, f'case{case}.safetensors')
    save_file(t, path, metadata={'config': json.dumps(cfg), 'prior_preset': str(preset)})
    # reference in f64
    sl = torch.tensor(t['student_loc'], dtype=torch.float64, requires_grad=True)
    sc = torch.tensor(t['student_conf'], dtype=torch.float64, requires_grad=True)
    out = peer.kd_loss(sl, sc, torch.tensor(t['teacher_loc'], dtype=torch.float64), torch.tensor(t['teacher_conf'], dtype=torch.float64),
                       torch.tensor(targets, dtype=torch.float64), torch.tensor(priors, dtype=torch.float64), cfg, matching='batched')
    out['total'].backward()
    ref = {k: float(out[k].detach()) for k in ['soft_loss', 'l2_loss', 'loss_c', 'loss_l', 'total']}
    refc = [int(out['num_pos']), int(out['num_neg']), int(out['num_bounded'])]
    for be in backends:
        g = os.path.join(work, f'grads{case}.safetensors')
        r = subprocess.run([BIN, 'eval', path, '--backend', be, '--json', '--grad-out', g], capture_output=True, text=True)
        if r.returncode != 0:
            print(case, be, 'EXIT', r.returncode, r.stderr.strip()); fails += 1; continue
        js = json.loads(r.stdout)
        bad = []
        for k, v in ref.items():
            tol = 1e-6 if abs(v) < 1e-2 else 1e-4 * abs(v)
            if abs(js[k] - v) > tol: bad.append(f'{k} {js[k]} vs {v}')
        if [js['num_pos'], js['num_neg'], js['num_bounded']] != refc: bad.append(f'counts {[js["num_pos"], js["num_neg"], js["num_bounded"]]} vs {refc}')
        with safe_open(g, 'np') as f:
            for name, ref_g in [('grad_student_conf', sc.grad.numpy()), ('grad_student_loc', sl.grad.numpy())]:
                ours = f.get_tensor(name).astype(np.float64)
                excess = np.abs(ours - ref_g) - (1e-3 * np.abs(ref_g) + 1e-7)
                if (excess > 0).any(): bad.append(f'{name}: {(excess > 0).sum()} elements out, worst excess {excess.max():.3e}')
        desc = f"{preset} B={B} C={C} M={M} thr={cfg['overlap_threshold']} npr={cfg['negpos_ratio']} nfh={cfg['negatives_for_hard']} T={cfg['temperature']} neg_w={cfg['neg_w']} reg_m={cfg['reg_m']}"
        if bad:
            fails += 1; print(case, be, 'FAIL', desc, '; '.join(bad))
        else:
            print(case, be, 'ok', desc, refc)
print('fails', fails)
sys.exit(1 if fails else 0)
