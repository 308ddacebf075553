"""CI check of examples/torchvision_distill.py --quick (two torchvision SSDs, ssdkd as their
loss and as the distillation loss between them) and of its --bench command."""

import json
import math
import os
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "torchvision_distill.py")
STAGES = ("teacher", "teacher2student_KD", "student_baseline")

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tv")
    done = subprocess.run([sys.executable, EXAMPLE, "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "log.json") as f:
        return json.load(f), done.stdout


def test_three_stages_with_torchvisions_and_the_distillation_terms(quick_run):
    log, stdout = quick_run
    assert list(log["stages"]) == list(STAGES)
    assert "Start teacher2student_KD Train" in stdout
    plain = {"bbox_regression", "classification", "total"}
    assert set(log["stages"]["teacher"][0]["train"]) == plain
    assert set(log["stages"]["student_baseline"][0]["train"]) == plain
    assert set(log["stages"]["teacher2student_KD"][0]["train"]) == plain | {"soft_loss", "l2_loss"}


def test_every_stage_learns_with_finite_losses(quick_run):
    log, _ = quick_run
    for stage, records in log["stages"].items():
        for record in records:
            assert all(math.isfinite(v) for v in record["train"].values()), (stage, record)
        first, last = records[0]["train"]["total"], records[-1]["train"]["total"]
        assert last <= 0.8 * first, (stage, first, last)


def test_maps_are_probabilities_and_the_teacher_detects(quick_run):
    log, stdout = quick_run
    assert set(log["map50"]) == {"teacher", "student (KD)", "student (baseline)"}
    for name, value in log["map50"].items():
        assert 0.0 <= value <= 1.0, (name, value)
    assert log["map50"]["teacher"] > 0.05, log["map50"]
    assert "mAP@0.5 on the validation split" in stdout


def test_bench_times_both_losses():
    done = subprocess.run([sys.executable, EXAMPLE, "--bench", "--reps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for batch in (8, 32):
        assert f"B = {batch:>2}: torchvision " in done.stdout, done.stdout
