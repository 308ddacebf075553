"""Every error class raises the right exception, with its fields, and the process lives on
(SPEC §9's messages and §10.3's exceptions)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ssdkd
import ssdkd.torch as st
from ssdkd.testing import synthetic_batch


@pytest.fixture()
def batch():
    return synthetic_batch(batch=2, classes=5, preset="mobilenet300", seed=3)


def still_alive(batch):
    """The interpreter and the library still work after the error."""
    ev = ssdkd.evaluate(**batch, num_classes=5, backend="cpu")
    assert ev.num_pos > 0 and np.isfinite(ev.total)


def test_exception_classes():
    assert issubclass(ssdkd.InputError, ValueError)
    assert issubclass(ssdkd.NoAdapterError, RuntimeError)
    assert issubclass(ssdkd.GpuError, RuntimeError)
    assert issubclass(ssdkd.NumericalError, RuntimeError)
    assert not issubclass(ssdkd.NumericalError, ssdkd.GpuError)


@pytest.mark.parametrize("tensor,image,index", [("student_conf", 1, 17), ("teacher_loc", 0, 5),
                                                ("student_loc", 1, 2999)])
def test_nan_names_tensor_image_and_index(batch, tensor, image, index):
    bad = dict(batch)
    bad[tensor] = batch[tensor].copy()
    bad[tensor][image, index, 2] = np.nan
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**bad, num_classes=5, backend="cpu")
    err = e.value
    assert (err.tensor, err.image, err.index) == (tensor, image, index)
    assert f"tensor `{tensor}`" in str(err) and "non-finite" in str(err)
    still_alive(batch)


def test_degenerate_target_box_names_the_object(batch):
    bad = dict(batch)
    bad["targets"] = batch["targets"].copy()
    bad["targets"][1, 0, 2] = bad["targets"][1, 0, 0]  # xmax == xmin
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**bad, num_classes=5, backend="cpu")
    assert (e.value.tensor, e.value.image, e.value.index) == ("targets", 1, 0)
    still_alive(batch)


@pytest.mark.parametrize("tensor,shape", [("student_loc", (2, 3000, 5)),
                                          ("student_conf", (2, 2999, 5)),
                                          ("teacher_conf", (2, 3000, 4)),
                                          ("targets", (2, 6, 4)),
                                          ("priors", (3000, 4, 1))])
def test_wrong_shape_names_the_tensor(batch, tensor, shape):
    bad = dict(batch)
    bad[tensor] = np.zeros(shape, np.float32)
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**bad, num_classes=5, backend="cpu")
    assert e.value.tensor == tensor and f"`{tensor}`" in str(e.value)
    still_alive(batch)


@pytest.mark.parametrize("value", [np.zeros((2, 3000, 5), np.int32), [[1.0]], "x", None])
def test_wrong_dtype_or_type_is_an_input_error(batch, value):
    bad = dict(batch, student_conf=value)
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**bad, num_classes=5, backend="cpu")
    assert e.value.tensor == "student_conf"
    still_alive(batch)


def test_wrong_number_of_classes_names_the_key(batch):
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**batch, num_classes=21, backend="cpu")  # C = 5
    assert e.value.key == "num_classes"
    assert str(e.value) == "config `num_classes`: 21, but student_conf has C = 5 classes"
    still_alive(batch)


def test_num_classes_defaults_to_the_arrays_c(batch):
    assert ssdkd.DEFAULT_CONFIG["num_classes"] is None
    a = ssdkd.evaluate(**batch, backend="cpu", gradients=True)
    b = ssdkd.evaluate(**batch, num_classes=5, backend="cpu", gradients=True)
    assert a.total == b.total and a.num_pos == b.num_pos > 0
    np.testing.assert_array_equal(a.grad_student_conf, b.grad_student_conf)


def test_batch_too_large_for_memory_is_refused_before_allocating(batch):
    """The memory check of `ssdkd eval` (ssdkd::limits::check) runs first: with
    SSDKD_MEMORY_LIMIT below the estimate, evaluate raises naming key `batch`. In a
    subprocess: the limit is read from the environment."""
    code = (
        "import ssdkd, ssdkd.testing as T\n"
        "b = T.synthetic_batch(batch=2, classes=5, preset='mobilenet300', seed=3)\n"
        "try:\n"
        "    ssdkd.evaluate(**b, backend='cpu', gradients=True)\n"
        "except ssdkd.InputError as e:\n"
        "    print(e.key, 'needs' in str(e), 'SSDKD_MEMORY_LIMIT' in str(e))\n"
    )
    env = dict(os.environ, SSDKD_MEMORY_LIMIT="1K")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["batch", "True", "True"], out.stdout + out.stderr


def test_one_teacher_tensor_alone_is_an_error(batch):
    for given, missing in (("teacher_loc", "teacher_conf"), ("teacher_conf", "teacher_loc")):
        bad = dict(batch)
        bad[missing] = None
        with pytest.raises(ssdkd.InputError) as e:
            ssdkd.evaluate(**bad, backend="cpu")
        assert e.value.tensor == missing and "both or neither" in str(e.value)
    still_alive(batch)


def test_write_target_that_is_a_device_is_refused(batch):
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.write_batch("/dev/null", batch, {})
    assert e.value.path == "/dev/null"
    still_alive(batch)


def test_zero_images(batch):
    empty = {k: (v[:0] if k != "priors" else v) for k, v in batch.items()}
    with pytest.raises(ssdkd.InputError, match="B is 0"):
        ssdkd.evaluate(**empty, num_classes=5, backend="cpu")
    still_alive(batch)


@pytest.mark.parametrize("key,value", [("temperature", float("nan")), ("negpos_ratio", -1),
                                       ("weights", (1.0, 2.0)), ("no_such_key", 1.0),
                                       ("variance", (0.0, 0.2))])
def test_bad_config_names_the_key(batch, key, value):
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**batch, num_classes=5, backend="cpu", **{key: value})
    assert e.value.key == key
    still_alive(batch)


def test_bad_backend_name(batch):
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.evaluate(**batch, num_classes=5, backend="tpu")
    assert e.value.key == "backend"
    still_alive(batch)


def test_missing_file_and_unwritable_output(batch, tmp_path):
    with pytest.raises(ssdkd.InputError) as e:
        ssdkd.read_batch(tmp_path / "missing.safetensors")
    assert e.value.path.endswith("missing.safetensors")
    with pytest.raises(OSError):
        ssdkd.write_batch(tmp_path / "no" / "dir" / "b.safetensors", batch, {"num_classes": 5})
    assert not (tmp_path / "no").exists()
    still_alive(batch)


def test_torch_wrapper_errors(batch):
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    crit = st.MultiBoxLoss_KD(5, backend="cpu")
    with pytest.raises(ssdkd.InputError) as e:
        crit((t["student_loc"], t["student_conf"], t["priors"]),
             (t["teacher_loc"], t["teacher_conf"]), [torch.zeros(3, 4)])
    assert e.value.tensor == "targets"
    bad_conf = t["student_conf"].clone()
    bad_conf[0, 3, 1] = float("inf")
    with pytest.raises(ssdkd.InputError) as e:
        crit((t["student_loc"], bad_conf, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
             t["targets"])
    assert (e.value.tensor, e.value.image, e.value.index) == ("student_conf", 0, 3)
    for kwargs in ({"bkg_label": 1}, {"neg_mining": False}, {"prior_for_matching": False},
                   {"reduction": "none"}):
        with pytest.raises(ssdkd.InputError):
            st.MultiBoxLoss_KD(5, **kwargs)
    still_alive(batch)


def test_no_adapter_error_when_gpu_is_required():
    """backend="gpu" with no adapter (wgpu restricted to a backend this OS lacks) raises
    NoAdapterError; the process goes on (on the CPU) afterwards. In a subprocess: the
    GPU backend is created once per process."""
    code = (
        "import ssdkd, ssdkd.testing as T\n"
        "b = T.synthetic_batch(batch=1, classes=3, preset='mobilenet300', seed=1)\n"
        "try:\n"
        "    ssdkd.evaluate(**b, num_classes=3, backend='gpu')\n"
        "except ssdkd.NoAdapterError as e:\n"
        "    print('NoAdapterError', isinstance(e, RuntimeError),\n"
        "          str(e).startswith('no GPU adapter: ') and str(e).count('no GPU adapter') == 1)\n"
        "print(ssdkd.evaluate(**b, num_classes=3, backend='cpu').num_pos > 0)\n"
    )
    backend = "metal" if sys.platform != "darwin" else "dx12"
    env = dict(os.environ, WGPU_BACKEND=backend)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["NoAdapterError", "True", "True", "True"], out.stdout + out.stderr


def test_auto_falls_back_to_cpu_with_a_warning():
    code = (
        "import warnings, ssdkd, ssdkd.testing as T\n"
        "b = T.synthetic_batch(batch=1, classes=3, preset='mobilenet300', seed=1)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    ev = ssdkd.evaluate(**b, num_classes=3)\n"
        "print(ev.backend, len(w), 'CPU backend' in str(w[0].message))\n"
    )
    backend = "metal" if sys.platform != "darwin" else "dx12"
    env = dict(os.environ, WGPU_BACKEND=backend)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "1", "True"], out.stdout + out.stderr
