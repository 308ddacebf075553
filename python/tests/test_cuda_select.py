"""The choice between the shared CUDA path and the host path (README "On a CUDA GPU"),
driven on the CPU with stand-ins for the compiled ``CudaShared`` class: which path each
backend choice takes, the one warning of ``"auto"``, the reason an explicit ``"cuda"``
gives, one shared backend per device, and the marshalling of tensors into
``CudaShared.evaluate`` (pointers, shape, dtype, gradients torch allocates). The real
class needs an NVIDIA GPU: bench/cuda_check.py runs it there."""

import ctypes
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import ssdkd
import ssdkd.torch as st
from ssdkd.testing import synthetic_batch

from conftest import REPO

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


class StandIn:
    """A CudaShared stand-in: records the devices opened and evaluates on the CPU backend,
    reading the inputs from and writing the gradients to the pointers it is given (host
    memory here, device memory for the real class)."""

    opened = []
    calls = []

    def __init__(self, device_index):
        StandIn.opened.append(device_index)
        self.ordering, self.adapter, self.uuid = "full-sync", "stand-in", "00" * 16
        self.bytes_read_back = 0

    def evaluate(self, ptrs, shape, config_json, stream, grad_conf_ptr, grad_loc_ptr,
                 validate):
        b, p, c, m = shape
        StandIn.calls.append(dict(ptrs=list(ptrs), shape=tuple(shape), stream=stream,
                                  config=json.loads(config_json), validate=validate))
        sizes = [(b, p, 4), (b, p, c), (b, p, 4), (b, p, c), (b, m, 5), (p, 4)]
        arrays = []
        for ptr, size in zip(ptrs, sizes):
            if ptr == 0:
                arrays.append(None)
                continue
            buf = (ctypes.c_float * int(np.prod(size))).from_address(ptr)
            arrays.append(np.frombuffer(buf, np.float32).reshape(size).copy())
        gradients = bool(grad_conf_ptr)
        ev = ssdkd.Backend("cpu").evaluate(*arrays, config_json, gradients, False, validate)
        if gradients:
            for ptr, g in ((grad_conf_ptr, ev.grad_student_conf),
                           (grad_loc_ptr, ev.grad_student_loc)):
                ctypes.memmove(ptr, np.ascontiguousarray(g).ctypes.data, g.nbytes)
        self.bytes_read_back += 64
        return ev


@pytest.fixture
def fresh(monkeypatch):
    """No shared backend opened yet, no warning given yet, no stand-in calls."""
    monkeypatch.setattr(st, "_SHARED", {})
    monkeypatch.setattr(st, "_WARNED", set())
    StandIn.opened, StandIn.calls = [], []
    return monkeypatch


def install(monkeypatch, reason=None, shared=StandIn):
    monkeypatch.setattr(ssdkd._ssdkd, "CudaShared", shared, raising=False)
    monkeypatch.setattr(ssdkd._ssdkd, "cuda_unavailable_reason",
                        lambda index: reason(index) if callable(reason) else reason,
                        raising=False)


def test_without_cuda_sharing_auto_warns_once_and_cuda_fails_with_the_reason(fresh):
    fresh.delattr(ssdkd._ssdkd, "CudaShared", raising=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert st._path("auto", CUDA0) == (None, None)
        assert st._path("auto", CUDA0) == (None, None)
    assert len(w) == 1 and "no CUDA sharing" in str(w[0].message), [str(x.message) for x in w]
    assert "cuda:0" in str(w[0].message)
    with pytest.raises(ssdkd.NoAdapterError, match="cuda:0: this build of ssdkd has no CUDA"):
        st._path("cuda", CUDA0)
    assert st.cuda_path(CUDA0)["path"] == "host"


def test_shared_backend_is_chosen_once_per_device(fresh):
    install(fresh)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        first, _ = st._path("auto", CUDA0)
        again, _ = st._path("cuda", CUDA0)
        other, _ = st._path("auto", CUDA1)
    assert not w, [str(x.message) for x in w]
    assert isinstance(first, StandIn) and again is first and other is not first
    assert StandIn.opened == [0, 1]
    report = st.cuda_path(CUDA0)
    assert report == {"path": "cuda-shared", "reason": None, "ordering": "full-sync",
                      "adapter": "stand-in", "uuid": "00" * 16, "bytes_read_back": 0}
    assert StandIn.opened == [0, 1]


@pytest.mark.parametrize("choice", ["cpu", "gpu"])
def test_host_choices_never_open_the_shared_backend(fresh, choice):
    install(fresh)
    assert st._path(choice, CUDA0) == (None, None)
    assert StandIn.opened == []
    assert st.cuda_path(CUDA0, backend=choice)["path"] == "host"


def test_the_reason_is_the_librarys_and_each_device_warns_once(fresh):
    install(fresh, reason=lambda i: f"no Vulkan adapter with the UUID of CUDA device {i}")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            assert st._path("auto", CUDA0) == (None, None)
            assert st._path("auto", CUDA1) == (None, None)
    messages = sorted(str(x.message) for x in w)
    assert len(messages) == 2
    assert "no Vulkan adapter with the UUID of CUDA device 0" in messages[0]
    assert "no Vulkan adapter with the UUID of CUDA device 1" in messages[1]
    assert StandIn.opened == []
    with pytest.raises(ssdkd.NoAdapterError, match="UUID of CUDA device 1"):
        st._path("cuda", CUDA1)


def test_a_failing_constructor_gives_its_message_as_the_reason(fresh):
    class Failing:
        def __init__(self, index):
            raise ssdkd.GpuError("missing Vulkan extension VK_KHR_external_memory_fd")

    install(fresh, shared=Failing)
    with pytest.warns(RuntimeWarning, match="VK_KHR_external_memory_fd"):
        assert st._path("auto", CUDA0) == (None, None)
    with pytest.raises(ssdkd.NoAdapterError, match="VK_KHR_external_memory_fd"):
        st._path("cuda", CUDA0)
    assert st.cuda_path(CUDA0)["reason"].startswith("missing Vulkan extension")


def test_cuda_choice_with_cpu_tensors_is_an_input_error_naming_backend(fresh):
    install(fresh)
    t = {k: torch.from_numpy(v) for k, v in
         synthetic_batch(batch=1, classes=3, preset="mobilenet300", seed=3).items()}
    crit = st.MultiBoxLoss_KD(3, backend="cuda")
    with pytest.raises(ssdkd.InputError, match="needs CUDA tensors") as e:
        crit((t["student_loc"], t["student_conf"], t["priors"]),
             (t["teacher_loc"], t["teacher_conf"]), t["targets"])
    assert e.value.key == "backend"
    with pytest.raises(ssdkd.InputError) as e:
        st.MultiBoxLoss_KD(3, backend="tpu")
    assert e.value.key == "backend"


@pytest.mark.parametrize("teacher", [True, False])
def test_shared_evaluate_passes_contiguous_float32_and_fills_torch_gradients(fresh, teacher):
    """Half and non-contiguous inputs reach CudaShared.evaluate as contiguous float32 of
    the same values, in SPEC §1 order (teacher pointers 0 without a teacher); the
    gradients it writes are in tensors torch allocated, equal to the CPU backend's."""
    batch = synthetic_batch(batch=2, classes=4, preset="mobilenet300", seed=5)
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    # student_conf as a transposed view (not contiguous), teacher_conf in float16.
    sc = t["student_conf"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not sc.is_contiguous()
    tc = t["teacher_conf"].half()
    tensors = (t["student_loc"], sc, t["teacher_loc"] if teacher else None,
               tc if teacher else None, t["targets"], t["priors"])
    weights = (0.3, 0.7, 0.5, 1.0)
    config = json.dumps({"num_classes": 4, "weights": list(weights)})
    shared = StandIn(0)
    ev, grad_loc, grad_conf = st._shared_evaluate(shared, tensors, config, True, True, 1234)
    (call,) = StandIn.calls
    b, p, c = sc.shape
    assert call["shape"] == (b, p, c, t["targets"].shape[1])
    assert call["stream"] == 1234 and call["validate"] is True
    assert call["config"]["weights"] == list(weights)
    assert (call["ptrs"][2] == 0 and call["ptrs"][3] == 0) == (not teacher)
    assert call["ptrs"][1] != sc.data_ptr()  # a contiguous float32 copy was passed
    assert grad_loc.dtype == grad_conf.dtype == torch.float32
    assert grad_conf.shape == (b, p, c) and grad_loc.shape == (b, p, 4)
    want = ssdkd.evaluate(batch["student_loc"], batch["student_conf"],
                          batch["teacher_loc"] if teacher else None,
                          tc.float().numpy() if teacher else None, batch["targets"],
                          batch["priors"], backend="cpu", gradients=True, weights=weights)
    assert ev.total == want.total
    np.testing.assert_array_equal(grad_conf.numpy(), want.grad_student_conf)
    np.testing.assert_array_equal(grad_loc.numpy(), want.grad_student_loc)
    ev, grad_loc, grad_conf = st._shared_evaluate(shared, tensors, config, False, True, 0)
    assert grad_loc is None and grad_conf is None and StandIn.calls[-1]["ptrs"][0] != 0


CHECK = [sys.executable, os.path.join(REPO, "bench", "cuda_check.py")]


def test_cuda_check_dry_run_runs_every_part_on_the_cpu():
    """bench/cuda_check.py --dry-run: parts a-e on the CPU, one JSON object, exit 0."""
    out = subprocess.run(CHECK + ["--dry-run"], capture_output=True, text=True, timeout=900,
                         cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("{")]
    r = json.loads(line)
    assert r["dry_run"] is True and r["failed"] == []
    assert r["a"] == {"path": "host", "reason": "tensors on cpu are not CUDA tensors",
                      "device": "cpu", "ok": True}
    for part in ("kd", "multibox"):
        assert r["b"][part]["ok"] and r["b"][part]["path"] == "host"
        assert r["b"][part]["term_units"] <= 1.0 and r["b"][part]["grad_units"] <= 1.0
    assert r["b"]["autocast"]["dtype"] == "bfloat16" and r["b"]["autocast"]["ok"]
    assert r["c"]["steps"] == 40 and set(r["c"]["marks"]) == {
        "fixed_warm", "fixed_end", "changing_warm", "changing_end"}
    assert r["c"]["fixed_device_growth_mib"] is None  # no device memory on the CPU
    assert [row["batch"] for row in r["d"]] == [1, 2]
    for row in r["d"]:
        assert set(row) == {"batch", "ssdkd_host_ms", "peer_batched_ms", "peer_loop_ms"}
        assert all(v > 0 for k, v in row.items() if k.endswith("_ms"))
    assert r["e"]["priors"] == 8732 and r["e"]["batch"] == 1
    assert all(r["e"][f"{k}_step_ms"] > 0 for k in ("ssdkd_host", "peer_batched", "peer_loop"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_check_without_cuda_fails_with_the_reason():
    out = subprocess.run(CHECK + ["--device", "cuda"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 2 and out.stdout == ""
    assert "CUDA was requested (--device cuda) but torch.cuda.is_available() is False" in \
        out.stderr, out.stderr
