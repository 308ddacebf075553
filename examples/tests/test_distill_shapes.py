"""CI check of examples/distill_shapes.py --quick (issue: "Distil a real detector with it")."""

import json
import math
import os
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_shapes.py")
STAGES = ("teacher", "teacher2student_KD", "student_baseline")

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    done = subprocess.run(
        [sys.executable, EXAMPLE, "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "log.json") as f:
        return out, json.load(f), done.stdout


def test_all_three_stages_ran_with_the_original_words(quick_run):
    _, log, stdout = quick_run
    assert list(log["stages"]) == list(STAGES)
    assert "Start Teacher Train" in stdout
    assert "Start teacher2student_KD Train" in stdout
    kd_terms = set(log["stages"]["teacher2student_KD"][0]["train"])
    assert {"soft_loss", "l2_loss", "loss_c", "loss_l", "total"} <= kd_terms
    assert {"loss_c", "loss_l", "total"} <= set(log["stages"]["teacher"][0]["train"])


def test_every_logged_loss_is_finite(quick_run):
    _, log, _ = quick_run
    for stage, records in log["stages"].items():
        assert records, stage
        for record in records:
            for split in ("train", "val"):
                for term, value in record[split].items():
                    assert math.isfinite(value), (stage, record["epoch"], split, term, value)


def test_each_stage_learns(quick_run):
    _, log, _ = quick_run
    for stage, records in log["stages"].items():
        first, last = records[0]["train"]["total"], records[-1]["train"]["total"]
        assert last <= 0.8 * first, (stage, first, last)


def test_pictures_and_log_are_written(quick_run):
    out, _, _ = quick_run
    import matplotlib.image as mpimg

    for name in ("losses.png", "detections.png"):
        picture = mpimg.imread(out / name)
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100, name
    assert (out / "log.json").stat().st_size > 0


def test_maps_are_probabilities(quick_run):
    _, log, _ = quick_run
    assert set(log["map50"]) == {"teacher", "student (KD)", "student (baseline)"}
    for name, value in log["map50"].items():
        assert 0.0 <= value <= 1.0, (name, value)
