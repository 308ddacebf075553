"""examples/ddp.py under torchrun (2 ranks, gloo): the data-parallel total and gradients
equal one process's (SPEC §7)."""

import json
import os
import socket
import subprocess
import sys

from conftest import REPO


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_example_matches_one_process():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(REPO, "examples", "ddp.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, out.stdout
    r = json.loads(lines[0])
    assert r["world_size"] == 2
    assert abs(r["total_ddp"] - r["total_single"]) <= 1e-4 * abs(r["total_single"])
    assert r["grads_within_spec"] is True
    assert r["max_grad_rel_diff"] <= 1e-3
