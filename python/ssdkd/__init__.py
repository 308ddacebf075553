"""ssdkd: the SSD knowledge-distillation loss and its analytic gradient (SPEC.md).

A thin layer over the Rust library: :func:`evaluate` on NumPy arrays, :func:`priors`,
:func:`read_batch` / :func:`write_batch` for batch files (SPEC §8), and the exceptions
:class:`InputError` (a ``ValueError``), :class:`NoAdapterError`, :class:`GpuError` and
:class:`NumericalError` (``RuntimeError``\\ s). The PyTorch drop-ins are in :mod:`ssdkd.torch`, the verification
helper for your own loss in :mod:`ssdkd.testing`.
"""

import json as _json
import math as _math
import os as _os
import warnings as _warnings

# Mesa's device-select layer prints a harmless error on headless machines; the `ssdkd`
# binary turns it off the same way (README).
if not _os.environ.get("XDG_RUNTIME_DIR"):
    _os.environ.setdefault("NODEVICE_SELECT", "1")

import numpy as _np  # noqa: E402  (never bind the bare name `numpy`: STYLE.md)

from . import _ssdkd  # noqa: E402
from ._ssdkd import GpuError, InputError, NoAdapterError, NumericalError  # noqa: E402

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_CONFIG",
    "Evaluation",
    "GpuError",
    "InputError",
    "NoAdapterError",
    "NumericalError",
    "PRESETS",
    "evaluate",
    "priors",
    "read_batch",
    "write_batch",
]

try:
    from importlib.metadata import version as _version

    __version__ = _version("ssdkd")
except Exception:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

#: The SPEC §8 ``config`` keys and their defaults. ``num_classes`` ``None``: C comes from
#: the arrays' shapes; when given, it is checked against them (as the CLI's config key).
DEFAULT_CONFIG = {
    "num_classes": None,
    "overlap_threshold": 0.5,
    "negpos_ratio": 3,
    "negatives_for_hard": 100,
    "variance": (0.1, 0.2),
    "temperature": 1.0,
    "pos_w": 1.0,
    "neg_w": 1.5,
    "reg_m": 0.0,
    "eps": 1e-10,
    "weights": (0.3, 0.7, 0.5, 1.0),
}
CONFIG_KEYS = tuple(DEFAULT_CONFIG)
#: The prior presets of SPEC §2.
PRESETS = ("ssd300", "ssd300-strided", "ssd512", "mobilenet300")

_TENSORS = ("student_loc", "student_conf", "teacher_loc", "teacher_conf", "targets", "priors")


def _input_error(message, tensor=None, key=None):
    return _ssdkd.make_input_error(message, tensor, key)


def _as_f32(name, x):
    """C-contiguous float32 arrays pass through without a copy; other float arrays are
    converted once; anything else is an InputError naming the tensor."""
    if not isinstance(x, _np.ndarray):
        raise _input_error(
            f"tensor `{name}`: expected a NumPy float array, found {type(x).__name__}",
            tensor=name,
        )
    if x.dtype.kind != "f":
        raise _input_error(
            f"tensor `{name}`: expected a float array, found dtype {x.dtype}", tensor=name
        )
    return _np.ascontiguousarray(x, dtype=_np.float32)


def _plain(key, value):
    """A config value as JSON-ready Python numbers (NumPy scalars and tuples included)."""
    if isinstance(value, (list, tuple, _np.ndarray)):
        return [_plain(key, v) for v in value]
    if isinstance(value, (bool, _np.bool_)):
        raise _input_error(f"config `{key}`: expected a number, found {value!r}", key=key)
    if isinstance(value, (int, _np.integer)):
        return int(value)
    if isinstance(value, (float, _np.floating)):
        value = float(value)
        if not _math.isfinite(value):
            raise _input_error(f"config `{key}`: {value} is not finite", key=key)
        return value
    raise _input_error(f"config `{key}`: expected a number, found {value!r}", key=key)


def _config_json(config):
    # Unknown keys are rejected by the library's config parser, naming the key.
    # `num_classes=None` means "C from the arrays": the key is left out.
    return _json.dumps({k: _plain(k, v) for k, v in config.items()
                        if not (k == "num_classes" and v is None)})


class Evaluation:
    """The result of :func:`evaluate`.

    Attributes: ``soft_loss``, ``l2_loss``, ``loss_c``, ``loss_l``, ``total`` (floats,
    SPEC §5); ``num_pos``, ``num_neg``, ``num_bounded`` (ints); the un-normalised sums
    ``soft_sum``, ``l2_sum``, ``conf_sum``, ``loc_sum`` (each term = sum / max(num_pos, 1));
    ``backend`` (``"cpu"`` or ``"gpu"``) and ``adapter``; with ``gradients=True``
    ``grad_student_conf`` [B, P, C] and ``grad_student_loc`` [B, P, 4] (float32, of the
    weighted total, SPEC §6); with ``decisions=True`` ``conf_target`` [B, P] (uint32),
    ``loc_target`` [B, P, 4] (float32) and ``neg_mask`` [B, P] (uint8), SPEC §3-4.
    Attributes that were not requested are ``None``.
    """

    _FIELDS = (
        "soft_loss", "l2_loss", "loss_c", "loss_l", "total",
        "num_pos", "num_neg", "num_bounded",
        "soft_sum", "l2_sum", "conf_sum", "loc_sum",
        "backend", "adapter",
        "grad_student_conf", "grad_student_loc", "conf_target", "loc_target", "neg_mask",
    )
    __slots__ = _FIELDS

    def __init__(self, fields):
        for name in self._FIELDS:
            setattr(self, name, fields.get(name))

    def terms(self):
        """The four terms and the total as a dict."""
        return {k: getattr(self, k) for k in ("soft_loss", "l2_loss", "loss_c", "loss_l", "total")}

    def __repr__(self):
        shown = ", ".join(
            f"{k}={getattr(self, k)!r}"
            for k in self._FIELDS[:8] + ("backend", "adapter")
        )
        return f"Evaluation({shown})"


def evaluate(student_loc, student_conf, teacher_loc, teacher_conf, targets, priors, *,
             backend="auto", gradients=False, decisions=False, validate=True, **config):
    """Evaluates the loss of SPEC §5 (and on request its gradient, §6, and decisions).

    Arrays have the shapes of SPEC §1: ``student_loc``/``teacher_loc`` [B, P, 4],
    ``student_conf``/``teacher_conf`` [B, P, C], ``targets`` [B, M, 5] (label < 0 =
    padding), ``priors`` [P, 4] or a preset name (see :data:`PRESETS`). ``teacher_loc``
    and ``teacher_conf`` may both be ``None``: the plain MultiBox loss (SPEC §10), soft
    and L2 terms 0. ``config`` keywords are the SPEC §8 keys (:data:`CONFIG_KEYS`) with
    their defaults; ``num_classes`` (default ``None``: C from ``student_conf``'s shape) is
    only checked against the arrays' C. ``backend``: ``"auto"`` (a GPU when one is found, else the CPU, with
    a warning), ``"cpu"`` or ``"gpu"``. ``validate=False`` skips the value scan (shapes and
    config are checked regardless). The GIL is released while the loss runs.

    C-contiguous float32 arrays are read without a copy; other float arrays are converted
    once; anything else raises :class:`InputError`. Before anything is allocated, the
    memory the evaluation needs is checked against the memory available (as ``ssdkd
    eval``): too large a batch raises :class:`InputError` with ``key == "batch"``. Errors:
    :class:`InputError` (shapes, dtypes, values, config), :class:`NoAdapterError`
    (``backend="gpu"`` without an adapter), :class:`GpuError` (a GPU failure, or a batch
    over the GPU backend's limits with ``backend="gpu"``), :class:`NumericalError` (a
    non-finite result from accepted inputs).
    """
    if isinstance(priors, str):
        priors = _ssdkd.preset_priors(priors)
    arrays = {}
    for name, x in zip(_TENSORS, (student_loc, student_conf, teacher_loc, teacher_conf,
                                  targets, priors)):
        arrays[name] = None if (x is None and name.startswith("teacher")) else _as_f32(name, x)
    return Evaluation(_evaluate_arrays(arrays, backend, gradients, decisions, validate,
                                       _config_json(config), stacklevel=3))


def _evaluate_arrays(arrays, backend, gradients, decisions, validate, config_json,
                     stacklevel):
    """The binding's evaluation of ``arrays`` (the six of :data:`_TENSORS`, already through
    :func:`_as_f32`; the teacher's may be ``None``) with a config from :func:`_config_json`:
    its dict of :class:`Evaluation`'s fields. A fallback to the CPU warns, pointing
    ``stacklevel`` frames up."""
    out = _ssdkd.evaluate(
        arrays["student_loc"], arrays["student_conf"], arrays["teacher_loc"],
        arrays["teacher_conf"], arrays["targets"], arrays["priors"],
        str(backend), bool(gradients), bool(decisions), bool(validate), config_json,
    )
    if out.get("fallback"):
        _warnings.warn(f"ssdkd: {out['fallback']}; using the CPU backend",
                       RuntimeWarning, stacklevel=stacklevel)
    return out


def priors(preset_or_config=None, /, *, image_size=None, feature_maps=None, steps=None,
           min_sizes=(30, 60, 111, 162, 213, 264), max_sizes=(60, 111, 162, 213, 264, 315),
           aspect_ratios=None, clip=True):
    """Prior boxes (SPEC §2) as a [P, 4] float32 array in centre form.

    ``priors("ssd300")`` gives a preset (:data:`PRESETS`); otherwise give the fields:
    ``image_size`` S, ``feature_maps`` (one size f per map), ``steps`` (one step per map,
    ``f_k = S / step``; ``None`` for ``f_k = f``), ``min_sizes``, ``max_sizes``,
    ``aspect_ratios`` (one list per map) and ``clip``. A dict of those fields may be
    passed as the only positional argument.
    """
    if isinstance(preset_or_config, str):
        return _ssdkd.preset_priors(preset_or_config)
    fields = dict(image_size=image_size, feature_maps=feature_maps, steps=steps,
                  min_sizes=min_sizes, max_sizes=max_sizes, aspect_ratios=aspect_ratios,
                  clip=clip)
    if isinstance(preset_or_config, dict):
        unknown = set(preset_or_config) - set(fields)
        if unknown:
            key = sorted(unknown)[0]
            raise _input_error(f"config `{key}`: unknown prior field (known: "
                               f"{', '.join(fields)})", key=key)
        fields.update(preset_or_config)
    elif preset_or_config is not None:
        raise _input_error("priors: expected a preset name or the prior fields",
                           key="preset")
    for key in ("image_size", "feature_maps", "aspect_ratios"):
        if fields[key] is None:
            raise _input_error(f"config `{key}`: required for a custom prior configuration",
                               key=key)
    maps = list(fields["feature_maps"])
    steps = fields["steps"]
    per_map = {"min_sizes": list(fields["min_sizes"]), "max_sizes": list(fields["max_sizes"]),
               "aspect_ratios": [list(a) for a in fields["aspect_ratios"]],
               "steps": list(steps) if steps is not None else [None] * len(maps)}
    for key, values in per_map.items():
        if len(values) != len(maps):
            raise _input_error(f"config `{key}`: {len(values)} values for {len(maps)} "
                               f"feature maps", key=key)
    try:
        records = [(int(f), None if s is None else float(s), float(lo), float(hi),
                    [float(a) for a in ar])
                   for f, s, lo, hi, ar in zip(maps, per_map["steps"], per_map["min_sizes"],
                                               per_map["max_sizes"], per_map["aspect_ratios"])]
        if any(f < 0 for f, *_ in records):
            raise ValueError("negative feature map size")
    except (TypeError, ValueError, OverflowError) as e:
        raise _input_error(f"config `feature_maps`: {e}", key="feature_maps") from None
    return _ssdkd.custom_priors(float(fields["image_size"]), records, bool(fields["clip"]))


def read_batch(path):
    """Reads a batch file (SPEC §8): returns ``(tensors, config)``, ``tensors`` a dict of
    float32 arrays named as SPEC §1 (priors from ``prior_preset`` when the file has none),
    ``config`` the resolved SPEC §8 config (every key). In a file without teacher tensors
    ``teacher_loc`` and ``teacher_conf`` are ``None``. ``evaluate(**tensors, **config)``
    evaluates it."""
    tensors, config = _ssdkd.read_batch(_os.fspath(path))
    config = _json.loads(config)
    config["variance"] = tuple(config["variance"])
    config["weights"] = tuple(config["weights"])
    return tensors, config


def write_batch(path, tensors, config=None):
    """Writes a batch file (SPEC §8) through the library's safe writer (atomic; a device
    file, FIFO or directory is refused with :class:`InputError`): ``tensors`` a dict with
    the six tensors of SPEC §1 (priors may be a preset name; ``teacher_loc`` and
    ``teacher_conf`` may both be absent or ``None``: a batch without teacher), ``config``
    SPEC §8 keys (defaults for the rest)."""
    config = dict(config or {})
    tensors = dict(tensors)
    for name in ("teacher_loc", "teacher_conf"):
        tensors.setdefault(name, None)
    missing = [n for n in _TENSORS if n not in tensors]
    if missing:
        raise _input_error(f"tensor `{missing[0]}`: missing", tensor=missing[0])
    extra = sorted(set(tensors) - set(_TENSORS))
    if extra:
        raise _input_error(f"tensor `{extra[0]}`: not a batch tensor (known: "
                           f"{', '.join(_TENSORS)})", tensor=extra[0])
    if isinstance(tensors["priors"], str):
        tensors["priors"] = _ssdkd.preset_priors(tensors["priors"])
    arrays = [None if (tensors[n] is None and n.startswith("teacher")) else _as_f32(n, tensors[n])
              for n in _TENSORS]
    _ssdkd.write_batch(_os.fspath(path), *arrays, _config_json(config))
