"""CI check of `examples/distill_shapes.py --study`: a two-variant, one-seed, tiny
study is killed after its first student, resumed, and its three outputs checked."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_shapes.py")
TINY = ["--train-images", "64", "--val-images", "32", "--epochs", "2", "--batch", "16", "--threads", "1"]

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")


def study_command(out, *extra):
    return [sys.executable, EXAMPLE, "--study", "--out", str(out), "--variants", "baseline,recipe",
            "--seeds", "0", *TINY, *extra]


def numbers(value):
    """Every number in a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    run_dir = out / "runs" / "seed0" / "w6"
    first = subprocess.Popen(study_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "baseline.json").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "no first run within 120 s"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # no chance to clean up: the hardest interruption
    first.communicate()
    assert not (run_dir / "recipe.json").exists(), "the study finished before it could be interrupted"
    kept = (run_dir / "baseline.json").read_bytes()
    teacher_time = (out / "runs" / "seed0" / "teacher.pt").stat().st_mtime_ns

    done = subprocess.run(study_command(out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (run_dir / "baseline.json").read_bytes() == kept, "a kept run was trained again"
    assert (out / "runs" / "seed0" / "teacher.pt").stat().st_mtime_ns == teacher_time, "the teacher was trained again"
    return out, done.stdout


def test_resumes_where_it_stopped(study):
    _, stdout = study
    assert "1 kept from before, 1 to train (and 0 teacher(s))" in stdout


def test_study_json_has_every_run_and_finite_figures(study):
    out, _ = study
    with open(out / "study.json") as f:
        data = json.load(f)
    assert sorted(r["variant"] for r in data["runs"]) == ["baseline", "recipe"]
    assert {r["variant"] for r in data["summary"]} == {"baseline", "recipe"}
    for r in data["runs"]:
        assert r["seed"] == 0 and r["width"] == 6
        assert 0.0 <= r["map50"] <= 1.0
        assert r["settings"]["kd"] == (r["variant"] == "recipe")
    recipe = next(r for r in data["summary"] if r["variant"] == "recipe")
    base = next(r for r in data["summary"] if r["variant"] == "baseline")
    assert recipe["diff"] == [pytest.approx(recipe["map50"][0] - base["map50"][0])]
    assert recipe["diff_sd"] is None  # one seed: no spread to report
    figures = list(numbers(data))
    assert figures and all(math.isfinite(x) for x in figures)


def test_study_md_is_sorted_by_difference(study):
    out, _ = study
    text = (out / "study.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == 2
    with open(out / "study.json") as f:
        summary = json.load(f)["summary"]
    order = [r["variant"] for r in sorted(summary, key=lambda r: -r["diff_mean"])]
    assert [row.split("|")[1].strip() for row in rows] == order
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE)


def test_study_png_is_a_picture(study):
    out, _ = study
    import matplotlib.image as mpimg

    picture = mpimg.imread(out / "study.png")
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100


def test_other_settings_in_the_same_out_are_refused(study):
    out, _ = study
    done = subprocess.run(study_command(out, "--epochs", "3"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "other settings" in done.stderr and "epochs" in done.stderr


def test_unknown_variant_is_refused(tmp_path):
    done = subprocess.run([sys.executable, EXAMPLE, "--study", "--out", str(tmp_path), "--variants", "recipe,nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown nope" in done.stderr and "baseline" in done.stderr
