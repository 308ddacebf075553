"""``validate=False`` skips the scan of the logits and offsets, never a check whose absence
could change a result silently: labels out of range (25 with C = 21), not integers (3.7)
or beyond u32 (3e9), on an object or on a whole-image box, are the same ``InputError`` as
with the scan, on the CPU and on the GPU; never a changed loss or a ``PanicException``."""

import os

import pytest

import ssdkd

from conftest import GOLDEN

PATH = os.path.join(GOLDEN, "voc_default_b4.safetensors")
IMAGE = 1


def with_label(label, whole_image):
    tensors, config = ssdkd.read_batch(PATH)
    assert tensors["student_conf"].shape[2] == 21
    targets = tensors["targets"].copy()
    rows = targets[IMAGE]
    row = next(i for i in range(rows.shape[0]) if (rows[i, 4] < 0) == whole_image)
    if whole_image:
        rows[row, :4] = [0.0, 0.0, 1.0, 1.0]
    rows[row, 4] = label
    return dict(tensors, targets=targets), config, row


def refuse(backend):
    for label in (25.0, 3.7, 3e9):
        for whole_image in (False, True):
            tensors, config, row = with_label(label, whole_image)
            with pytest.raises(ssdkd.InputError) as scanned:
                ssdkd.evaluate(**tensors, **config, backend=backend, gradients=True)
            try:
                ssdkd.evaluate(**tensors, **config, backend=backend, gradients=True,
                               validate=False)
            except ssdkd.InputError as e:
                got = e
            else:
                pytest.fail(f"label {label} (whole image {whole_image}) gave a loss")
            assert str(got) == str(scanned.value)
            assert (got.tensor, got.image, got.index) == ("targets", IMAGE, row)
            assert f"label {label:g}" in str(got).replace("3000000000", "3e+09")


def test_labels_are_checked_on_the_cpu_without_the_scan():
    refuse("cpu")


def test_labels_are_checked_on_the_gpu_without_the_scan(gpu_available):
    refuse("gpu")


def test_an_unscanned_nan_logit_is_refused_on_the_gpu(gpu_available):
    """On the GPU the values the host skips are validated on the device, with the scan's
    error."""
    tensors, config = ssdkd.read_batch(PATH)
    conf = tensors["student_conf"].copy()
    conf[2, 4000, 7] = float("nan")
    tensors = dict(tensors, student_conf=conf)
    with pytest.raises(ssdkd.InputError) as scanned:
        ssdkd.evaluate(**tensors, **config, backend="gpu")
    with pytest.raises(ssdkd.InputError) as unscanned:
        ssdkd.evaluate(**tensors, **config, backend="gpu", validate=False)
    assert str(unscanned.value) == str(scanned.value)
    assert (unscanned.value.tensor, unscanned.value.image, unscanned.value.index) == \
        ("student_conf", 2, 4000)


def test_internal_error_is_an_exception():
    """A panic caught at the binding is an ``ssdkd.InternalError``, a ``RuntimeError`` that
    ``except Exception`` catches."""
    assert issubclass(ssdkd.InternalError, RuntimeError)
    assert "InternalError" in ssdkd.__all__
