"""The Python snippets of the main README's "From PyTorch" section run as written, each in
a fresh interpreter in the repository root.
Fenced blocks marked `python` are complete programs; `py` marks a fragment."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")


def snippets():
    text = open(README, encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_snippets():
    blocks = snippets()
    assert len(blocks) >= 3
    assert any("MultiBoxLoss_KD" in b and "backward()" in b for b in blocks)
    assert any("compare(" in b for b in blocks)
    assert "pip install ./python" in open(README, encoding="utf-8").read()


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs(index):
    code = snippets()[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"snippet {index}:\n{code}\n--- stderr:\n{out.stderr[-3000:]}"
    assert out.stdout.strip(), "each snippet prints its result"
