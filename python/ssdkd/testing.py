"""Verification of your own PyTorch loss against ssdkd (SPEC §7 tolerances).

``compare(loss_fn, batch)`` runs ``loss_fn`` (a callable with the original
``MultiBoxLoss_KD.forward`` signature: ``loss_fn(predictions, pred_t, targets)`` returning
``(soft_loss, l2_loss, loss_c, loss_l)``) and ssdkd on the same batch, and compares the four
terms, the weighted total and both gradients of that total. ``assert_matches`` raises
``AssertionError`` with the report's table when they differ.
"""

import math
import os

import numpy as np
import torch

from . import DEFAULT_CONFIG, _input_error, _ssdkd, evaluate, read_batch

__all__ = ["Report", "Row", "assert_matches", "compare", "synthetic_batch"]

_TERMS = ("soft_loss", "l2_loss", "loss_c", "loss_l")


def synthetic_batch(batch=2, classes=21, preset="ssd300", objects=6, seed=0):
    """A deterministic random batch (ssdkd's generator: random boxes, 1..objects objects
    per image, a teacher closer to the truth than the student) as a dict of float32
    arrays named as SPEC §1."""
    return _ssdkd.synthetic(int(batch), int(classes), str(preset), int(objects), True,
                            int(seed))


class Row:
    """One compared quantity: ``name``, ``theirs``, ``ssdkd``, ``rel_diff`` (relative
    difference; for a gradient the worst element's), ``ok``."""

    __slots__ = ("name", "theirs", "ssdkd", "rel_diff", "ok")

    def __init__(self, name, theirs, ssdkd, rel_diff, ok):
        self.name, self.theirs, self.ssdkd, self.rel_diff, self.ok = (
            name, theirs, ssdkd, rel_diff, ok)

    def __repr__(self):
        return (f"Row({self.name!r}, theirs={self.theirs!r}, ssdkd={self.ssdkd!r}, "
                f"rel_diff={self.rel_diff!r}, ok={self.ok!r})")


class Report:
    """The comparison: ``rows`` (a :class:`Row` per term, the total and each gradient),
    ``ok`` (all passed), ``failed`` (names of the rows that did not); ``str()`` is a table."""

    def __init__(self, rows, note=""):
        self.rows = list(rows)
        self.note = note
        self.ok = all(r.ok for r in self.rows)
        self.failed = [r.name for r in self.rows if not r.ok]

    def __bool__(self):
        return self.ok

    def __str__(self):
        head = ("term", "theirs", "ssdkd", "rel diff", "result")
        cells = [head] + [
            (r.name, f"{r.theirs:.9g}", f"{r.ssdkd:.9g}", f"{r.rel_diff:.3g}",
             "pass" if r.ok else "FAIL")
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "all match" if self.ok else "MISMATCH in " + ", ".join(self.failed)
        if self.note:
            verdict += f" ({self.note})"
        return "\n".join(lines + [verdict])

    def __repr__(self):
        return f"<Report ok={self.ok} failed={self.failed}>"


def _load(batch, seed, classes, preset, batch_size):
    if batch is None:
        return synthetic_batch(batch_size, classes, preset, 6, seed), {}
    if isinstance(batch, (str, os.PathLike)):
        return read_batch(batch)
    if isinstance(batch, dict):
        return dict(batch), {}
    raise _input_error("batch: expected None, a batch file path or a dict of tensors",
                       key="batch")


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300) if a != b else 0.0


def compare(loss_fn, batch=None, *, config=None, seed=0, batch_size=2, preset="ssd300",
            rtol=1e-4, atol=1e-6, grad_rtol=1e-3, grad_atol=1e-7, dtype=torch.float64,
            targets="list", backend="cpu"):
    """Compares ``loss_fn`` with ssdkd on one batch; returns a :class:`Report`.

    - ``batch``: ``None`` (a synthetic batch from ``seed``, ``batch_size`` images,
      ``preset`` priors), a batch file path (its config, updated by ``config``) or a dict
      of the SPEC §1 arrays.
    - ``config``: SPEC §8 keys (defaults for the rest); construct ``loss_fn`` with the same
      settings. The gradient compared is that of ``total`` with ``config["weights"]``.
    - Tolerances (SPEC §7): a term passes when ``|theirs - ssdkd| <= rtol·|ssdkd|``, or
      ``<= atol`` where ``|ssdkd| < 1e-2``; a gradient when every element has
      ``|theirs - ssdkd| <= grad_rtol·|ssdkd| + grad_atol``.
    - ``dtype``: the dtype ``loss_fn`` sees (float64 by default: its own rounding then does
      not count against it); ``targets``: ``"list"`` (per-image ``[M_i, 5]`` tensors, as
      the original data loader gives) or ``"padded"`` (``[B, M, 5]``, label -1 = padding).
    """
    config = dict(config or {})
    # Synthetic batches: C from `num_classes`, 21 when not given.
    classes = int(config.get("num_classes") or 21)
    tensors, file_config = _load(batch, seed, classes, preset, batch_size)
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(file_config)
    cfg.update(config)
    if isinstance(tensors.get("priors"), str):
        tensors["priors"] = _ssdkd.preset_priors(tensors["priors"])

    ev = evaluate(**tensors, gradients=True, backend=backend, **cfg)

    t = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dtype)
         for k, v in tensors.items()}
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    if targets == "list":
        tg = [img[img[:, 4] >= 0] for img in t["targets"]]
    elif targets == "padded":
        tg = t["targets"]
    else:
        raise _input_error(f"targets: {targets!r}: expected \"list\" or \"padded\"",
                           key="targets")
    out = loss_fn((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]), tg)
    theirs = [out[i] for i in range(4)]
    ws, wc, wl2, wl = (float(w) for w in cfg["weights"])
    total = ws * theirs[0] + wl2 * theirs[1] + wc * theirs[2] + wl * theirs[3]
    total.backward()

    rows = []
    ours = [ev.soft_loss, ev.l2_loss, ev.loss_c, ev.loss_l, ev.total]
    for name, a, b in zip(_TERMS + ("total",), [float(x.detach()) for x in theirs] + [float(total.detach())],
                          ours):
        tol = atol if abs(b) < 1e-2 else rtol * abs(b)
        ok = math.isfinite(a) and abs(a - b) <= tol
        rows.append(Row(name, a, b, _rel(a, b), ok))
    for name, grad, want in (("grad_student_conf", sc.grad, ev.grad_student_conf),
                             ("grad_student_loc", sl.grad, ev.grad_student_loc)):
        want = want.astype(np.float64)
        got = (np.zeros_like(want) if grad is None
               else grad.detach().to("cpu", torch.float64).numpy())
        diff = np.abs(got - want)
        # The element nearest to (or furthest past) its tolerance is the one shown.
        ratio = diff / (grad_rtol * np.abs(want) + grad_atol)
        worst = int(np.argmax(ratio)) if ratio.size else 0
        ok = bool(np.all(np.isfinite(got))) and bool(np.all(ratio <= 1.0))
        a, b = float(got.flat[worst]), float(want.flat[worst])
        rows.append(Row(name, a, b, _rel(a, b), ok))
    note = f"{ev.num_pos} positives, backend {ev.backend}"
    return Report(rows, note)


def assert_matches(loss_fn, batch=None, **kwargs):
    """:func:`compare`, raising ``AssertionError`` with the report's table on a mismatch;
    returns the report otherwise."""
    report = compare(loss_fn, batch, **kwargs)
    if not report.ok:
        raise AssertionError("loss differs from ssdkd:\n" + str(report))
    return report
