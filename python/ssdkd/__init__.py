"""ssdkd: the SSD knowledge-distillation loss and its analytic gradient (docs/SPEC.md).

A thin layer over the Rust library: :func:`evaluate` on NumPy arrays (on a
:class:`Backend` of your own, or a default one per ``backend=`` choice), :func:`priors`,
:func:`read_batch` / :func:`write_batch` for batch files (SPEC §8), and the exceptions
:class:`InputError` (a ``ValueError``), :class:`NoAdapterError`, :class:`GpuError` and
:class:`NumericalError` (``RuntimeError``\\ s). Ctrl-C stops a running evaluation
(``KeyboardInterrupt``). The PyTorch drop-ins are in :mod:`ssdkd.torch`, the verification
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
from ._ssdkd import (Backend, Evaluation, GpuError, InputError, InternalError,  # noqa: E402
                     NoAdapterError, NumericalError)

__all__ = ["CONFIG_KEYS", "DEFAULT_CONFIG", "Backend", "Evaluation", "GpuError", "InputError",
           "InternalError", "NoAdapterError", "NumericalError", "PRESETS", "evaluate", "priors",
           "read_batch", "write_batch"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("ssdkd")
except Exception:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"


def _config_dict(text):
    """A SPEC §8 config from the library's JSON, pairs as tuples, keys in CONFIG_KEYS' order."""
    config = _json.loads(text)
    return {k: tuple(config[k]) if isinstance(config[k], list) else config[k]
            for k in _ssdkd.CONFIG_KEYS}


#: The SPEC §8 ``config`` keys (the library's table).
CONFIG_KEYS = tuple(_ssdkd.CONFIG_KEYS)
#: Their defaults (the library's). ``num_classes`` ``None``: C comes from the arrays'
#: shapes; when given, it is checked against them (as the CLI's config key).
DEFAULT_CONFIG = dict(_config_dict(_ssdkd.DEFAULT_CONFIG_JSON), num_classes=None)
#: The prior presets of SPEC §2.
PRESETS = tuple(_ssdkd.PRESETS)
_TENSORS = tuple(_ssdkd.TENSORS)


#: An :class:`InputError` naming ``tensor`` or ``key``, with the attributes the library's
#: errors have (made in one place, ``_ssdkd``).
_input_error = _ssdkd.input_error


def _checked(key, convert, value):
    """``convert(value)``, or an InputError naming ``key`` when it cannot be converted."""
    try:
        return convert(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise _input_error(f"argument `{key}`: {e}", key=key) from None


def _float_arrays(tensors, gradients=False, decisions=False):
    """The six tensors of ``tensors`` (a dict; the teacher's may be None) as C-contiguous
    float32 arrays, after the library has checked their shapes and the memory an
    evaluation needs: nothing is converted before. Float32 C-contiguous arrays are not
    copied."""
    for name in _TENSORS:
        x = tensors.get(name)
        if x is None and name.startswith("teacher"):
            continue
        found = type(x).__name__ if not isinstance(x, _np.ndarray) else f"dtype {x.dtype}"
        if not isinstance(x, _np.ndarray) or x.dtype.kind != "f":
            raise _input_error(f"tensor `{name}`: expected a NumPy float array, found {found}",
                               tensor=name)
    shapes = [None if tensors.get(n) is None else list(tensors[n].shape) for n in _TENSORS]
    _ssdkd.check_shapes(shapes, bool(gradients), bool(decisions))
    return [None if tensors.get(n) is None else _np.ascontiguousarray(tensors[n], _np.float32)
            for n in _TENSORS]


def _plain(key, value):
    """A config value as JSON-ready Python numbers (NumPy scalars and tuples included)."""
    if isinstance(value, (list, tuple, _np.ndarray)):
        return [_plain(key, v) for v in value]
    if isinstance(value, (int, float, _np.integer, _np.floating)) and not isinstance(
            value, (bool, _np.bool_)):
        if _math.isfinite(value):
            return int(value) if isinstance(value, (int, _np.integer)) else float(value)
        raise _input_error(f"config `{key}`: {value} is not finite", key=key)
    raise _input_error(f"config `{key}`: expected a number, found {value!r}", key=key)


def _config_json(config):
    # Unknown keys are rejected by the library's config parser, naming the key.
    # `num_classes=None` means "C from the arrays": the key is left out.
    return _json.dumps({k: _plain(k, v) for k, v in config.items()
                        if not (k == "num_classes" and v is None)})


def _new_backend(kind, stacklevel):
    """A :class:`Backend`; warns when ``"auto"`` fell back to the CPU."""
    backend = Backend(kind if isinstance(kind, str) else repr(kind))
    if backend.fallback:
        _warnings.warn(f"ssdkd: {backend.fallback}; using the CPU backend", RuntimeWarning,
                       stacklevel=stacklevel + 1)
    return backend


_DEFAULT_BACKENDS = {}


def evaluate(student_loc, student_conf, teacher_loc, teacher_conf, targets, priors, *,
             backend="auto", gradients=False, decisions=False, validate=True, **config):
    """Evaluates the loss of SPEC §5 (and on request its gradient, §6, and decisions).

    Arrays have the shapes of SPEC §1: ``student_loc``/``teacher_loc`` [B, P, 4],
    ``student_conf``/``teacher_conf`` [B, P, C], ``targets`` [B, M, 5] (label < 0 =
    padding), ``priors`` [P, 4] or a preset name (see :data:`PRESETS`). ``teacher_loc``
    and ``teacher_conf`` may both be ``None``: the plain MultiBox loss (SPEC §10). ``config``
    keywords are the SPEC §8 keys (:data:`CONFIG_KEYS`) with their defaults
    (:data:`DEFAULT_CONFIG`); ``num_classes`` (default ``None``: C from ``student_conf``'s
    shape) is only checked against the arrays' C. ``backend``: a :class:`Backend`, or
    ``"auto"`` (a GPU when one is found, else the CPU, with a warning), ``"cpu"`` or
    ``"gpu"`` for the default backend of that choice (made on first use). ``validate=False``
    skips the scan of the logits and offsets (shapes, config, priors and targets are checked
    regardless; on a GPU the values are validated on the device instead). The GIL is
    released while the loss runs; Ctrl-C stops it.

    Before anything is converted or allocated, the shapes and the memory the evaluation
    needs are checked (as ``ssdkd eval``): too large a batch raises :class:`InputError`
    with ``key == "batch"``. C-contiguous float32 arrays are read without a copy; other
    float arrays are converted once. Errors: :class:`InputError` (shapes, dtypes, values,
    config), :class:`NoAdapterError`, :class:`GpuError`, :class:`NumericalError`,
    :class:`InternalError` (a defect).
    """
    if not isinstance(backend, Backend):
        if backend not in _DEFAULT_BACKENDS:
            _DEFAULT_BACKENDS[backend] = _new_backend(backend, stacklevel=2)
        backend = _DEFAULT_BACKENDS[backend]
    if isinstance(priors, str):
        priors = _ssdkd.preset_priors(priors)
    tensors = dict(zip(_TENSORS, (student_loc, student_conf, teacher_loc, teacher_conf,
                                  targets, priors)))
    arrays = _float_arrays(tensors, gradients, decisions)
    return backend.evaluate(*arrays, _config_json(config), bool(gradients), bool(decisions),
                            bool(validate))


def priors(preset_or_config=None, /, *, image_size=None, feature_maps=None, steps=None,
           min_sizes=None, max_sizes=None, aspect_ratios=None, clip=True):
    """Prior boxes (SPEC §2) as a [P, 4] float32 array in centre form.

    ``priors("ssd300")`` gives a preset (:data:`PRESETS`); otherwise give the fields:
    ``image_size`` S, ``feature_maps`` (one size f per map), ``steps`` (one step per map,
    ``f_k = S / step``; ``None`` for ``f_k = f``), ``min_sizes`` and ``max_sizes``
    (default: SSD300's, SPEC §2), ``aspect_ratios`` (one list per map) and ``clip``. A
    dict of those fields may be passed as the only positional argument;
    ``_ssdkd.preset_config(name)`` gives a preset's.
    """
    if isinstance(preset_or_config, str):
        return _ssdkd.preset_priors(preset_or_config)
    ssd300 = _ssdkd.preset_config("ssd300")
    fields = dict(image_size=image_size, feature_maps=feature_maps, steps=steps,
                  min_sizes=ssd300["min_sizes"] if min_sizes is None else min_sizes,
                  max_sizes=ssd300["max_sizes"] if max_sizes is None else max_sizes,
                  aspect_ratios=aspect_ratios, clip=clip)
    if isinstance(preset_or_config, dict):
        unknown = sorted(set(preset_or_config) - set(fields))
        if unknown:
            raise _input_error(f"config `{unknown[0]}`: unknown prior field (known: "
                               f"{', '.join(fields)})", key=unknown[0])
        fields.update(preset_or_config)
    elif preset_or_config is not None:
        raise _input_error("priors: expected a preset name or the prior fields", key="preset")
    per_map = ("feature_maps", "steps", "min_sizes", "max_sizes", "aspect_ratios")
    columns = {}
    for key in ("image_size",) + per_map:
        value = fields[key]
        try:
            if key == "steps" and value is None:
                value = [None] * len(columns["feature_maps"])
            elif key == "image_size":
                value = float(value)
            else:
                value = [[float(a) for a in v] if key == "aspect_ratios" else
                         (None if v is None else (int(v) if key == "feature_maps" else float(v)))
                         for v in value]
                if len(value) != len(columns.get("feature_maps", value)):
                    raise ValueError(f"{len(value)} values for {len(columns['feature_maps'])} "
                                     "feature maps")
                if key == "feature_maps" and not all(0 <= f < 2**63 for f in value):
                    raise ValueError(f"sizes must be in 0..2^63, found {value}")
        except (TypeError, ValueError, OverflowError) as e:
            raise _input_error(f"config `{key}`: {e}", key=key) from None
        columns[key] = value
    records = list(zip(*(columns[k] for k in per_map)))
    return _ssdkd.custom_priors(columns["image_size"], records, bool(fields["clip"]))


def read_batch(path):
    """Reads a batch file (SPEC §8): returns ``(tensors, config)``, ``tensors`` a dict of
    float32 arrays named as SPEC §1 (priors from ``prior_preset`` when the file has none),
    ``config`` the resolved SPEC §8 config (every key). In a file without teacher tensors
    ``teacher_loc`` and ``teacher_conf`` are ``None``. ``evaluate(**tensors, **config)``
    evaluates it."""
    tensors, config = _ssdkd.read_batch(_checked("path", _os.fspath, path))
    return tensors, _config_dict(config)


def write_batch(path, tensors, config=None):
    """Writes a batch file (SPEC §8) through the library's safe writer (atomic; a device
    file, FIFO or directory is refused with :class:`InputError`): ``tensors`` a dict with
    the six tensors of SPEC §1 (priors may be a preset name; ``teacher_loc`` and
    ``teacher_conf`` may both be absent or ``None``: a batch without teacher), ``config``
    SPEC §8 keys (defaults for the rest). Ctrl-C during the write cancels it: its temporary file
    is removed, the target is left as it was, and ``KeyboardInterrupt`` says so in one line
    (or says the file was written whole, when the signal came after it was in place)."""
    tensors, config = _checked("tensors", dict, tensors), _checked("config", dict, config or {})
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise _input_error(f"tensor `{unknown[0]}`: not a batch tensor (known: "
                           f"{', '.join(_TENSORS)})", tensor=unknown[0])
    if isinstance(tensors.get("priors"), str):
        tensors["priors"] = _ssdkd.preset_priors(tensors["priors"])
    _ssdkd.write_batch(_checked("path", _os.fspath, path), *_float_arrays(tensors),
                       _config_json(config))
