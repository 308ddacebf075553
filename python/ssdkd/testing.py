"""Verification of your own PyTorch loss against ssdkd (SPEC §7 tolerances).

``compare(loss_fn, batch)`` runs ``loss_fn`` (a callable with the original
``MultiBoxLoss_KD.forward`` signature: ``loss_fn(predictions, pred_t, targets)`` returning
``(soft_loss, l2_loss, loss_c, loss_l)``) and ssdkd on the same batch, and compares the four
terms, the weighted total and both gradients of that total. A loss that raises, returns
the wrong number of terms, floats, detached tensors or NaN gets FAIL rows saying why.
``assert_matches`` raises ``AssertionError`` with the report's table when they differ.
"""

import math
import os

import numpy as np
import torch

from . import DEFAULT_CONFIG, _checked, _input_error, _ssdkd, evaluate, read_batch

__all__ = ["Report", "Row", "assert_matches", "compare", "synthetic_batch"]

_TERMS = tuple(_ssdkd.TERMS)  # soft_loss, l2_loss, loss_c, loss_l, total
_GRADIENTS = ("grad_student_conf", "grad_student_loc")


def synthetic_batch(batch=2, classes=21, preset="ssd300", objects=6, seed=0):
    """A deterministic random batch (ssdkd's generator: random boxes, 1..objects objects
    per image, a teacher closer to the truth than the student) as a dict of float32
    arrays named as SPEC §1."""
    ints = [_checked(k, int, v) for k, v in
            (("batch", batch), ("classes", classes), ("objects", objects), ("seed", seed))]
    return _ssdkd.synthetic(ints[0], ints[1], str(preset), ints[2], True, ints[3])


class Row:
    """One compared quantity: ``name``, ``theirs``, ``ssdkd``, ``rel_diff`` (relative
    difference; for a gradient the worst element's), ``ok``, and ``reason`` (why it
    failed; empty when it passed)."""

    __slots__ = ("name", "theirs", "ssdkd", "rel_diff", "ok", "reason")

    def __init__(self, name, theirs, ssdkd, units, reason=""):
        self.name, self.theirs, self.ssdkd = name, theirs, ssdkd
        self.rel_diff = abs(theirs - ssdkd) / max(abs(ssdkd), 1e-300) if theirs != ssdkd else 0.0
        self.ok = not reason and units <= 1.0
        self.reason = reason or ("" if self.ok else "out of tolerance" if math.isfinite(theirs)
                                 else "not finite")

    def __repr__(self):
        return (f"Row({self.name!r}, theirs={self.theirs!r}, ssdkd={self.ssdkd!r}, "
                f"rel_diff={self.rel_diff!r}, ok={self.ok!r}, reason={self.reason!r})")


class Report:
    """The comparison: ``rows`` (a :class:`Row` per term, the total and each gradient),
    ``ok`` (all passed), ``failed`` (names of the rows that did not); ``str()`` is a table."""

    def __init__(self, rows, note=""):
        self.rows, self.note = list(rows), note
        self.ok = all(r.ok for r in self.rows)
        self.failed = [r.name for r in self.rows if not r.ok]

    def __bool__(self):
        return self.ok

    def __str__(self):
        head = ("term", "theirs", "ssdkd", "rel diff", "result")
        cells = [head] + [(r.name, f"{r.theirs:.9g}", f"{r.ssdkd:.9g}", f"{r.rel_diff:.3g}",
                           "pass" if r.ok else f"FAIL: {r.reason}") for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "all match" if self.ok else "MISMATCH in " + ", ".join(self.failed)
        return "\n".join(lines + [verdict + (f" ({self.note})" if self.note else "")])

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


def _run_theirs(loss_fn, t, sl, sc, targets):
    """``loss_fn``'s four terms, and why its gradients cannot be compared (or "")."""
    try:
        out = tuple(loss_fn((sl, sc, t["priors"]), (t["teacher_loc"], t["teacher_conf"]),
                            targets))
    except Exception as e:  # the user's loss failing is a result, not a crash of compare
        raise _Failed(f"loss_fn raised {type(e).__name__}: {e}") from None
    if len(out) != 4:
        raise _Failed(f"loss_fn returned {len(out)} values, not 4 (soft_loss, l2_loss, "
                      "loss_c, loss_l)")
    try:
        values = [float(x) for x in out]
    except (TypeError, ValueError, RuntimeError) as e:
        raise _Failed(f"a term is not a number: {e}") from None
    if not all(isinstance(x, torch.Tensor) for x in out):
        return out, values, "returned Python numbers: no gradient"
    if not any(x.requires_grad for x in out):
        return out, values, "the terms are detached: no gradient"
    return out, values, ""


class _Failed(Exception):
    pass


def compare(loss_fn, batch=None, *, config=None, seed=0, batch_size=2, preset="ssd300",
            rtol=None, atol=None, grad_rtol=None, grad_atol=None, dtype=torch.float64,
            targets="list", backend="cpu"):
    """Compares ``loss_fn`` with ssdkd on one batch; returns a :class:`Report`.

    - ``batch``: ``None`` (a synthetic batch from ``seed``, ``batch_size`` images,
      ``preset`` priors), a batch file path (its config, updated by ``config``) or a dict
      of the SPEC §1 arrays.
    - ``config``: SPEC §8 keys (defaults for the rest); construct ``loss_fn`` with the same
      settings. The gradient compared is that of ``total`` with ``config["weights"]``.
    - Tolerances: SPEC §7's (the library's) unless given: a term passes when
      ``|theirs - ssdkd| <= rtol·|ssdkd|``, or ``<= atol`` where ``|ssdkd| < 1e-2``; a
      gradient when every element has ``|theirs - ssdkd| <= grad_rtol·|ssdkd| + grad_atol``.
    - ``dtype``: the dtype ``loss_fn`` sees (float64 by default: its own rounding then does
      not count against it); ``targets``: ``"list"`` (per-image ``[M_i, 5]`` tensors, as
      the original data loader gives) or ``"padded"`` (``[B, M, 5]``, label -1 = padding).
    """
    (rel, abs_), (grel, gabs) = _ssdkd.LOSS_TOLERANCE, _ssdkd.GRADIENT_TOLERANCE
    rtol, atol = rel if rtol is None else rtol, abs_ if atol is None else atol
    grad_rtol, grad_atol = grel if grad_rtol is None else grad_rtol, gabs if grad_atol is None else grad_atol
    if targets not in ("list", "padded"):
        raise _input_error(f"targets: {targets!r}: expected \"list\" or \"padded\"",
                           key="targets")
    config = _checked("config", dict, config or {})
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise _input_error(f"dtype: {dtype!r}: expected a float torch.dtype", key="dtype")
    # Synthetic batches: C from `num_classes`, 21 when not given.
    tensors, file_config = _load(batch, seed, int(config.get("num_classes") or 21), preset,
                                 batch_size)
    cfg = dict(DEFAULT_CONFIG, **file_config, **config)
    ev = evaluate(**tensors, gradients=True, backend=backend, **cfg)
    ours = [getattr(ev, k) for k in _TERMS]
    t = {k: None if v is None else torch.from_numpy(
        np.ascontiguousarray(v, dtype=np.float32)).to(dtype) for k, v in tensors.items()}
    sl = t["student_loc"].clone().requires_grad_(True)
    sc = t["student_conf"].clone().requires_grad_(True)
    tg = t["targets"] if targets == "padded" else [img[img[:, 4] >= 0] for img in t["targets"]]
    note = f"{ev.num_pos} positives, backend {ev.backend}"
    try:
        out, values, no_grad = _run_theirs(loss_fn, t, sl, sc, tg)
    except _Failed as e:
        rows = [Row(n, math.nan, b, math.inf, str(e)) for n, b in zip(_TERMS, ours)]
        return Report(rows + [Row(n, math.nan, 0.0, math.inf, str(e)) for n in _GRADIENTS], note)
    ws, wc, wl2, wl = (float(w) for w in cfg["weights"])
    values.append(ws * values[0] + wl2 * values[1] + wc * values[2] + wl * values[3])
    rows = [Row(n, a, b, _ssdkd.compare_loss(a, b, rtol, atol)) for n, a, b in
            zip(_TERMS, values, ours)]
    if not no_grad:
        try:
            (ws * out[0] + wl2 * out[1] + wc * out[2] + wl * out[3]).backward()
        except Exception as e:
            no_grad = f"backward raised {type(e).__name__}: {e}"
    for name, grad in zip(_GRADIENTS, (sc.grad, sl.grad)):
        want = getattr(ev, name)
        if no_grad or grad is None:
            reason = no_grad or f"no gradient reached {name[5:]}"
            rows.append(Row(name, math.nan, float(np.abs(want).max()), math.inf, reason))
            continue
        got = np.ascontiguousarray(grad.detach().to("cpu", torch.float32).numpy())
        if got.shape != want.shape:
            rows.append(Row(name, math.nan, 0.0, math.inf, f"shape {list(got.shape)}"))
            continue
        index, a, b, units, _ = _ssdkd.compare_gradient(got, want, grad_rtol, grad_atol)
        rows.append(Row(name, a, b, units))
    return Report(rows, note)


def assert_matches(loss_fn, batch=None, **kwargs):
    """:func:`compare`, raising ``AssertionError`` with the report's table on a mismatch;
    returns the report otherwise."""
    report = compare(loss_fn, batch, **kwargs)
    if not report.ok:
        raise AssertionError("loss differs from ssdkd:\n" + str(report))
    return report
