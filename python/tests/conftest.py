"""Shared fixtures: the repository root, the PyTorch peer (bench/pytorch_peer.py) and the
GPU policy (SSDKD_REQUIRE_GPU=1 turns a missing adapter into a failure, as in .ci/run)."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "bench"))

import pytorch_peer  # noqa: E402  (the SPEC-faithful autograd peer)

import ssdkd  # noqa: E402

GOLDEN = os.path.join(REPO, "tests", "golden")


@pytest.fixture(scope="session")
def peer():
    return pytorch_peer


@pytest.fixture(scope="session")
def gpu_available():
    """True when a wgpu adapter is found; skips (or fails with SSDKD_REQUIRE_GPU=1)."""
    t = ssdkd.testing.synthetic_batch(batch=1, classes=3, preset="mobilenet300", seed=1)
    try:
        ssdkd.evaluate(**t, num_classes=3, backend="gpu")
    except ssdkd.NoAdapterError as e:
        if os.environ.get("SSDKD_REQUIRE_GPU") == "1":
            pytest.fail(f"SSDKD_REQUIRE_GPU=1 but no adapter: {e}")
        pytest.skip(f"no GPU adapter: {e}")
    return True


def pytest_configure(config):
    import ssdkd.testing  # noqa: F401  (binds ssdkd.testing for the fixtures)
