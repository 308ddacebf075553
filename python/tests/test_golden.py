"""Every golden file through ssdkd.evaluate, against its expectations (SPEC §7, §8)."""

import glob
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import ssdkd
from conftest import GOLDEN

FILES = sorted(glob.glob(os.path.join(GOLDEN, "*.safetensors")))
LOSSES = ("soft_loss", "l2_loss", "loss_c", "loss_l", "total")


def test_golden_files_exist():
    assert len(FILES) >= 5, FILES


def check_against_golden(ev, expected):
    for name, want in zip(LOSSES, expected["expected_losses"]):
        got = getattr(ev, name)
        tol = 1e-6 if abs(want) < 1e-2 else 1e-4 * abs(want)
        assert abs(got - want) <= tol, (name, got, want)
    assert [ev.num_pos, ev.num_neg, ev.num_bounded] == list(expected["expected_counts"])
    np.testing.assert_array_equal(ev.conf_target.astype(np.int64),
                                  expected["expected_conf_target"])
    np.testing.assert_array_equal(ev.neg_mask, expected["expected_neg_mask"])
    np.testing.assert_allclose(ev.loc_target, expected["expected_loc_target"],
                               rtol=1e-4, atol=1e-5)
    for name in ("grad_student_conf", "grad_student_loc"):
        got = getattr(ev, name)
        want = expected["expected_" + name]
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7, err_msg=name)


def evaluate_file(path, backend):
    tensors, config = ssdkd.read_batch(path)
    return ssdkd.evaluate(**tensors, **config, backend=backend, gradients=True,
                          decisions=True)


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_golden_cpu(path):
    ev = evaluate_file(path, "cpu")
    assert ev.backend == "cpu"
    check_against_golden(ev, load_file(path))


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_golden_gpu(path, gpu_available):
    ev = evaluate_file(path, "gpu")
    assert ev.backend == "gpu"
    check_against_golden(ev, load_file(path))


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_sums_normalise_to_terms(path):
    ev = evaluate_file(path, "cpu")
    n = max(ev.num_pos, 1)
    for term, s in (("soft_loss", "soft_sum"), ("l2_loss", "l2_sum"), ("loss_c", "conf_sum"),
                    ("loss_l", "loc_sum")):
        assert getattr(ev, term) == pytest.approx(getattr(ev, s) / n, rel=1e-12)


def test_preset_name_and_converted_arrays_give_the_same_result():
    """priors as a preset name, float64 and Fortran-ordered inputs: converted once, same
    values as the C-contiguous float32 originals."""
    path = os.path.join(GOLDEN, "voc_default_b4.safetensors")
    tensors, config = ssdkd.read_batch(path)
    base = ssdkd.evaluate(**tensors, **config, backend="cpu", gradients=True)
    other = dict(tensors)
    other["priors"] = "ssd300"
    other["student_conf"] = tensors["student_conf"].astype(np.float64)
    other["teacher_conf"] = np.asfortranarray(tensors["teacher_conf"])
    ev = ssdkd.evaluate(**other, **config, backend="cpu", gradients=True)
    assert ev.total == base.total
    np.testing.assert_array_equal(ev.grad_student_conf, base.grad_student_conf)


def test_requested_outputs_only():
    tensors, config = ssdkd.read_batch(FILES[0])
    ev = ssdkd.evaluate(**tensors, **config, backend="cpu")
    assert ev.grad_student_conf is None and ev.conf_target is None
    assert "CPU" in ev.adapter and ev.backend == "cpu"


def test_the_gil_is_released_while_the_loss_runs():
    """Another Python thread keeps running during a long evaluation: the largest pause
    it sees is well below the shortest single evaluation. Were the GIL held, the pause
    would be at least one evaluation long. The batch is large enough (tens of ms per
    evaluation) that the scheduler's own pauses of a few ms on a busy machine stay far
    below the bound."""
    import threading
    import time

    from ssdkd.testing import synthetic_batch

    t = synthetic_batch(batch=64, classes=21, preset="ssd300", seed=5)
    ssdkd.evaluate(**t, backend="cpu", gradients=True)  # warm-up
    done = threading.Event()
    each = []

    def run():
        for _ in range(3):
            start = time.perf_counter()
            ssdkd.evaluate(**t, backend="cpu", gradients=True)
            each.append(time.perf_counter() - start)
        done.set()

    worker = threading.Thread(target=run)
    stamps = [time.perf_counter()]
    worker.start()
    while not done.is_set():
        time.sleep(0.001)
        stamps.append(time.perf_counter())
    worker.join()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) > 10
    assert max(gaps) < 0.5 * min(each), (max(gaps), each)


def test_c_contiguous_float32_is_passed_through_and_others_converted_once():
    t = ssdkd.testing.synthetic_batch(batch=2, classes=5, preset="mobilenet300")
    arrays = ssdkd._float_arrays(t)
    assert all(a is t[k] for a, k in zip(arrays, ssdkd._TENSORS))
    t["student_conf"] = t["student_conf"].astype(np.float64)
    t["student_loc"] = np.asfortranarray(t["student_loc"])
    arrays = ssdkd._float_arrays(t)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_golden_without_teacher(path, backend, request):
    """A golden batch without its teacher tensors: loss_c, loss_l and the positive and
    negative counts are the golden file's, soft, l2 and num_bounded 0, and the gradient is
    the KD gradient with the soft and L2 weights 0 (SPEC §10.1)."""
    if backend == "gpu":
        request.getfixturevalue("gpu_available")
    tensors, config = ssdkd.read_batch(path)
    expected = load_file(path)
    plain = dict(tensors, teacher_loc=None, teacher_conf=None)
    ev = ssdkd.evaluate(**plain, **config, backend=backend, gradients=True)
    want = dict(zip(LOSSES, expected["expected_losses"]))
    for name in ("loss_c", "loss_l"):
        tol = 1e-6 if abs(want[name]) < 1e-2 else 1e-4 * abs(want[name])
        assert abs(getattr(ev, name) - want[name]) <= tol, name
    assert (ev.soft_loss, ev.l2_loss, ev.num_bounded, ev.soft_sum, ev.l2_sum) == (0, 0, 0, 0, 0)
    assert [ev.num_pos, ev.num_neg] == list(expected["expected_counts"][:2])
    zeroed = dict(config, weights=(0.0, config["weights"][1], 0.0, config["weights"][3]))
    kd = ssdkd.evaluate(**tensors, **zeroed, backend=backend, gradients=True)
    if backend == "cpu":
        assert (ev.loss_c, ev.loss_l, ev.total) == (kd.loss_c, kd.loss_l, kd.total)
        np.testing.assert_array_equal(ev.grad_student_conf, kd.grad_student_conf)
        np.testing.assert_array_equal(ev.grad_student_loc, kd.grad_student_loc)
    else:
        np.testing.assert_allclose(ev.grad_student_conf, kd.grad_student_conf, rtol=1e-3,
                                   atol=1e-7)
        np.testing.assert_allclose(ev.grad_student_loc, kd.grad_student_loc, rtol=1e-3,
                                   atol=1e-7)
