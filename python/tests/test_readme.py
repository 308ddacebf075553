"""Every code block of the main README's "From PyTorch" section runs as written, each in a
fresh interpreter in the repository root: fenced blocks marked `python` are complete
programs; the `py` fragment (data-parallel training) runs after a prelude that gives it a
one-worker process group and a shard; `sh` blocks are install commands (.ci/python runs
them)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")

PRELUDE = """
import os, tempfile, torch, torch.distributed
import ssdkd, ssdkd.torch
from ssdkd.torch import MultiBoxLoss_KD
from ssdkd.testing import synthetic_batch
store = os.path.join(tempfile.mkdtemp(), "store")
torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
t = {k: torch.from_numpy(v) for k, v in synthetic_batch(batch=2, classes=21).items()}
preds = (t["student_loc"].requires_grad_(), t["student_conf"].requires_grad_(), t["priors"])
preds_t = (t["teacher_loc"], t["teacher_conf"])
targets = t["targets"]
"""


def section():
    text = open(README, encoding="utf-8").read()
    return text[text.index("## From PyTorch"):text.index("## See it train")]


def blocks(kind):
    return re.findall(rf"^```{kind}\n(.*?)^```", section(), flags=re.S | re.M)


def programs():
    return blocks("python") + [PRELUDE + fragment + "print(float(loss))\n"
                               for fragment in blocks("py")]


def test_readme_has_the_snippets():
    assert len(blocks("python")) >= 3 and len(blocks("py")) == 1
    assert any("MultiBoxLoss_KD" in b and "backward()" in b for b in blocks("python"))
    assert any("compare(" in b for b in blocks("python"))
    installs = "".join(blocks("sh"))
    assert "pip install ./python" in installs
    for module in ("torch", "safetensors"):  # what the snippets import beyond ssdkd
        assert re.search(rf"pip install .*\b{module}\b", installs), module


@pytest.mark.parametrize("index", range(len(programs())))
def test_readme_snippet_runs(index):
    code = programs()[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"snippet {index}:\n{code}\n--- stderr:\n{out.stderr[-3000:]}"
    assert out.stdout.strip(), "each snippet prints its result"
