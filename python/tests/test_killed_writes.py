"""Killed writes leave nothing behind (SPEC §9.6, README "Files and limits"): a Python
process in ``ssdkd.write_batch`` is killed with SIGKILL and interrupted with SIGINT at 20
seeded random moments inside its write. After each, the target is the old file or the new
one, whole, and no other file is in its folder. SIGINT cancels the write itself: the
writer catches the ``KeyboardInterrupt``, prints its one line (naming the target left
unchanged) and exits 130, the README's idiom.

"Inside the write" is found from outside: the moment the child holds a file open in the
output folder (``/proc/PID/fd``, which shows an unnamed ``O_TMPFILE`` file too) starts the
write; a first, undisturbed run measures how long it lasts until the child exits."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ssdkd
import ssdkd.testing

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/PID/fd")

MOMENTS = 20
# The most moments drawn to find MOMENTS inside the write.
MOST_ATTEMPTS = 3 * MOMENTS
# The writer: the tensors from an .npz file (quick to load, no torch to import) to a batch
# file; Ctrl-C handled as the README shows.
WRITER = """
import sys
from numpy import load
import ssdkd
try:
    with load(sys.argv[2]) as arrays:
        tensors = dict(arrays)
    ssdkd.write_batch(sys.argv[1], tensors)
except KeyboardInterrupt as e:
    print(e, file=sys.stderr)
    sys.exit(130)
"""


def _writing_in(pid, folder):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            to = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if to.startswith(folder + os.sep):
            return True
    return False


def _spawn(target, arrays):
    return subprocess.Popen([sys.executable, "-c", WRITER, target, arrays],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_write(child, folder):
    start = time.monotonic()
    while not _writing_in(child.pid, folder):
        assert child.poll() is None, f"the writer ended ({child.returncode}) before writing"
        assert time.monotonic() - start < 60, "the writer did not start writing within 60 s"
        time.sleep(0.0002)
    return time.monotonic()


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    arrays = str(tmp_path_factory.mktemp("in") / "batch.npz")
    # B = 20 images of SSD300 (8732 priors), 21 classes, with teacher: a 35 MB file.
    batch = ssdkd.testing.synthetic_batch(batch=20, classes=21, preset="ssd300", seed=28)
    np.savez(arrays, **batch)
    out = str(tmp_path_factory.mktemp("out"))
    target = os.path.join(out, "batch.safetensors")
    # The old file: a whole batch file of another batch.
    ssdkd.write_batch(target, ssdkd.testing.synthetic_batch(batch=1, classes=21,
                                                             preset="mobilenet300", seed=1))
    old = _read(target)
    child = _spawn(target, arrays)
    started = _wait_for_write(child, out)
    _, stderr = child.communicate()
    window = time.monotonic() - started
    assert child.returncode == 0, stderr.decode()
    new = _read(target)
    back = ssdkd.read_batch(target)[0]
    assert back["student_conf"].shape == (20, 8732, 21)
    np.testing.assert_array_equal(back["student_conf"], batch["student_conf"])
    assert old != new
    return arrays, out, target, old, new, window


def _outcome(sig, returncode, stderr, target):
    """What the signal did: ``"cut"`` (SIGKILL ended the writer; SIGINT cancelled the write,
    the target left unchanged), ``"finished"`` (SIGINT came after the library's last check
    of the write's cancellation, the file written whole) or ``"after"`` (the signal came
    after ``write_batch`` returned: the writer ended normally, by the signal during the
    interpreter's shutdown with nothing printed, or on a ``KeyboardInterrupt`` of Python's
    own, whose line is empty)."""
    if returncode == 0:
        return "after"
    if sig == signal.SIGKILL:
        assert returncode == -sig, stderr
        return "cut"
    if returncode == -sig and not stderr:
        return "after"
    assert returncode == 130, stderr
    lines = stderr.split("\n")
    assert len(lines) == 2 and lines[1] == "", f"not one line: {stderr!r}"
    if lines[0] == f"write_batch interrupted; {target} left unchanged":
        return "cut"
    if lines[0] == f"write_batch interrupted after {target} was written whole":
        return "finished"
    assert lines[0] == "", stderr
    return "after"


@pytest.mark.parametrize("sig, seed", [(signal.SIGKILL, 28), (signal.SIGINT, 130)])
def test_killed_write_batch_leaves_the_old_or_new_file_and_nothing_else(files, sig, seed):
    arrays, out, target, old, new, window = files
    rng = random.Random(seed)
    cut = old_left = finished = 0
    for attempt in range(MOST_ATTEMPTS):
        if cut == MOMENTS:
            break
        with open(target, "wb") as f:
            f.write(old)
        assert os.listdir(out) == ["batch.safetensors"]
        delay = window * rng.random()
        child = _spawn(target, arrays)
        started = _wait_for_write(child, out)
        time.sleep(max(0.0, delay - (time.monotonic() - started)))
        child.send_signal(sig)
        _, stderr = child.communicate(timeout=60)
        what = f"attempt {attempt} ({delay * 1e3:.1f} ms into the write): exit {child.returncode}"
        assert os.listdir(out) == ["batch.safetensors"], what
        left = _read(target)
        assert left in (old, new), f"{what}: the target is neither file"
        outcome = _outcome(sig, child.returncode, stderr.decode(), target)
        if outcome == "cut":
            cut += 1
            old_left += left == old
            if sig == signal.SIGINT:
                # Cancelled: the write was interrupted, not let finish.
                assert left == old, f"{what}: SIGINT said unchanged, the target is new"
        elif outcome == "finished":
            finished += 1
            assert left == new, what
        else:
            # The signal came after the write: it took less than `delay` this time.
            assert left == new, what
            window = delay
    print(f"{cut} writes cut short, {finished} finished before SIGINT took effect (window "
          f"{window * 1e3:.0f} ms at the end); the old file left {old_left} times")
    assert cut == MOMENTS, f"only {cut} of {MOST_ATTEMPTS} moments cut the write short"
