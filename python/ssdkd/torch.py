"""PyTorch drop-ins for the seed code base's two losses, backed by ssdkd.

- :class:`MultiBoxLoss_KD` (the distillation loss) returns ``(soft_loss, l2_loss, loss_c,
  loss_l)``; :class:`MultiBoxLoss` (the plain SSD loss that trains the teacher) returns
  ``(loss_l, loss_c)``. Both are ``torch.nn.Module``\\ s with the original constructors and
  attributes (``threshold``, ``negpos_ratio``, ``T``, ...), read at each forward.
- The loss is the PyTorch operator ``torch.ops.ssdkd.loss`` (``torch.library.custom_op``,
  with a fake implementation and ``register_autograd``); its backward is the operator
  ``torch.ops.ssdkd.loss_backward``. ``torch.compile`` traces a training step that calls a
  drop-in without a graph break. The module's attributes reach the operator as a string
  and are checked inside it: a bad value is an :class:`ssdkd.InputError` naming the
  attribute, at the next forward.
- Backward is ssdkd's analytic gradient (SPEC §6): the incoming gradients of the returned
  terms are the weights of ONE ssdkd gradient evaluation, so any combination
  ``a*soft + b*loss_c + c*l2 + d*loss_l`` backpropagates as autograd on the original would.
  The inputs are saved with ``save_for_backward``: an in-place change between forward and
  backward raises PyTorch's own error. Backward is once-differentiable: a gradient penalty
  through it raises a ``RuntimeError`` saying so (``once_differentiable``). Non-finite
  incoming gradients give non-finite gradients. ``torch.func.vmap`` raises an
  :class:`ssdkd.InputError` (the loss is batched already); ``torch.func.grad``/``vjp``
  raise a ``RuntimeError`` naming ``loss.backward()`` where torch applies no torch.func
  transform to a custom operator's autograd rule (torch 2.15).
- Cost of a step (``reduction="mean"``): once a module's last two backward calls got the
  same weights (a training loop's fixed combination), its forward evaluates the gradients
  for those weights in the same pass and a backward with those weights takes them: one
  evaluation per step, the gradients of what the forward saw (the last few forwards' are
  kept; an older one's backward evaluates again). Otherwise (the first two steps, other
  weights, ``reduction="sum"``) backward evaluates again, with gradients, on the saved
  inputs. Each module owns its :class:`ssdkd.Backend`.
- Terms are float32 (float64 for float64 inputs), also for float16/bfloat16 inputs and
  under autocast, as PyTorch's own losses; gradients come back in the inputs' dtype and
  device. CPU float32 tensors are shared with NumPy without a copy; others are copied to
  host float32 once.
- CUDA tensors (README "On a CUDA GPU"): with ``backend="auto"`` or ``"cuda"`` and a build
  of ssdkd that has ``CudaShared``, they stay on the GPU: copied device to device (as
  float32, contiguous) on torch's current stream into buffers shared with ssdkd's Vulkan
  device, the gradients written into tensors torch allocates. :func:`cuda_path` says which
  path runs for a device and why. No NVIDIA run has measured this path yet.
- ``reduction="sum"`` returns the un-normalised sums and the local positive count for
  data-parallel training; :func:`global_terms` normalises them by the positives of all
  workers (see ``examples/ddp.py``).
"""

import ast as _ast
import collections as _collections
import contextlib as _contextlib
import functools as _functools
import itertools as _itertools
import math as _math
import threading as _threading
import warnings as _warnings
import weakref as _weakref
from typing import Optional as _Optional

import numpy as _np
import torch as _torch

from . import (InputError, NoAdapterError, _TENSORS, _config_json, _input_error, _new_backend,
               _plain, _ssdkd)

__all__ = ["MultiBoxLoss", "MultiBoxLoss_KD", "cuda_path", "global_terms", "pad_targets"]

# The original modules' attributes that are SPEC §8 config keys, read at each forward.
_KEYS = {"num_classes": "num_classes", "threshold": "overlap_threshold",
         "negpos_ratio": "negpos_ratio", "negatives_for_hard": "negatives_for_hard",
         "variance": "variance", "T": "temperature", "pos_w": "pos_w", "neg_w": "neg_w",
         "reg_m": "reg_m"}
# Attributes of the originals with the one value ssdkd supports (docs/SPEC.md).
_FIXED = {"use_prior_for_matching": True, "background_label": 0, "do_neg_mining": True}
# The attributes that reach the operator, besides the config keys.
_OPTIONS = ("reduction", "validate", "backend")
# The backend choices of a drop-in: ssdkd.Backend's, and "cuda" (the shared CUDA path only).
_CHOICES = ("auto", "cpu", "gpu", "cuda")


def _float_tensor(t, name):
    if not isinstance(t, _torch.Tensor) or not t.is_floating_point():
        found = t.dtype if isinstance(t, _torch.Tensor) else type(t).__name__
        raise _input_error(f"tensor `{name}`: expected a float torch.Tensor, found {found}",
                           tensor=name)
    if t.device.type == "meta" or t.layout != _torch.strided:
        where = "on the meta device" if t.device.type == "meta" else f"of layout {t.layout}"
        raise _input_error(f"tensor `{name}`: {where}, a tensor without data in memory "
                           "(ssdkd needs a dense CPU or CUDA tensor)", tensor=name)
    return t


def _host(t, name):
    """A C-contiguous float32 NumPy array of tensor ``t`` (no copy for a contiguous CPU
    float32 tensor)."""
    if isinstance(t, _np.ndarray):
        return t
    t = _float_tensor(t, name).detach()
    if t.device.type != "cpu" or t.dtype != _torch.float32 or not t.is_contiguous():
        t = t.to(device="cpu", dtype=_torch.float32).contiguous()
    return t.numpy()


def pad_targets(targets):
    """Per-image ``[M_i, 5]`` target tensors (the original data loader's list) as one
    padded ``[B, M, 5]`` float32 array, padding rows labelled -1 (SPEC §1); a tensor that
    is already ``[B, M, 5]`` is copied as it is."""
    if isinstance(targets, _torch.Tensor):
        return _host(targets, "targets").copy()
    return _padded(targets, None).numpy()


def _padded(targets, batch):
    """``targets`` (a list of per-image ``[M_i, 5]`` tensors, or a ``[B, M, 5]`` tensor) as a
    new ``[B, M, 5]`` float tensor, padding rows labelled -1 (SPEC §1). In torch operations
    only, so that ``torch.compile`` traces it. ``batch``: the B the predictions have."""
    if isinstance(targets, _np.ndarray):
        targets = _torch.from_numpy(targets)
    if isinstance(targets, _torch.Tensor):
        _float_tensor(targets, "targets")
        if batch is not None and targets.dim() == 3 and targets.shape[0] != batch:
            raise _input_error(f"tensor `targets`: {targets.shape[0]} images given, {batch} "
                               f"needed (B of student_conf)", tensor="targets")
        return targets.detach().clone()
    if not isinstance(targets, (list, tuple)):
        raise _input_error("tensor `targets`: expected a list of [M_i, 5] tensors or a "
                           f"[B, M, 5] tensor, found {type(targets).__name__}",
                           tensor="targets")
    if batch is not None and len(targets) != batch:
        raise _input_error(f"tensor `targets`: {len(targets)} images given, {batch} needed "
                           "(one [M_i, 5] tensor per image of student_conf's batch)",
                           tensor="targets")
    rows = []
    for i, a in enumerate(targets):
        if isinstance(a, _np.ndarray):
            a = _torch.from_numpy(a)
        a = _float_tensor(a, "targets").detach()
        if a.dim() != 2 or a.shape[-1] != 5:
            if a.numel():
                raise _input_error(f"tensor `targets`: image {i} has shape {list(a.shape)} "
                                   "where [M_i, 5] is needed", tensor="targets")
            a = a.reshape(0, 5)
        rows.append(a)
    device = rows[0].device if rows else _torch.device("cpu")
    out = _torch.zeros((len(rows), max([1] + [a.shape[0] for a in rows]), 5),
                       dtype=_torch.float32, device=device)
    out[..., 4] = -1.0
    for i, a in enumerate(rows):
        out[i, : a.shape[0]] = a.to(device=device, dtype=_torch.float32)
    return out


@_contextlib.contextmanager
def _naming_attributes():
    """An InputError about a config key raised inside names the module's attribute."""
    try:
        yield
    except InputError as e:
        attr = {key: attr for attr, key in _KEYS.items()}.get(e.key)
        if attr is None:
            raise
        problem = str(e).split(": ", 1)[-1]
        raise _input_error(f"attribute `{attr}` (config `{e.key}`): {problem}",
                           key=attr) from None


# -- The module's settings as an operator argument ------------------------------------------

def _literal(value):
    """A module attribute as a Python literal (``repr``/``ast.literal_eval`` round-trip);
    NumPy scalars as Python numbers."""
    if isinstance(value, _np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_literal(v) for v in value)
    return value


@_functools.lru_cache(maxsize=64)
def _settings(text):
    """The settings string of :meth:`_Base._settings_text` as ``(config, choice, sum,
    validate)``: ``config`` the SPEC §8 dict; a bad value is an InputError naming the
    module's attribute (checked by the library, as ``ssdkd.evaluate``)."""
    names, reprs = _ast.literal_eval(text)
    attrs = {}
    for name, shown in zip(names, reprs):
        try:
            attrs[name] = _ast.literal_eval(shown)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise _input_error(f"attribute `{name}`: {shown} is not a number or a string "
                               "ssdkd can read", key=name) from None
    for name, value in _FIXED.items():
        if attrs[name] != value:
            raise _input_error(f"attribute `{name}`: {attrs[name]!r} is not supported by "
                               f"ssdkd (only {value!r}, as in docs/SPEC.md)", key=name)
    if attrs["reduction"] not in ("mean", "sum"):
        raise _input_error(f"attribute `reduction`: {attrs['reduction']!r}: expected \"mean\" "
                           "or \"sum\"", key="reduction")
    choice = attrs["backend"]
    if choice not in _CHOICES:
        raise _input_error(f"attribute `backend`: {choice!r}: expected one of "
                           f"{', '.join(map(repr, _CHOICES))}", key="backend")
    config = {key: attrs[attr] for attr, key in _KEYS.items() if attr in attrs}
    with _naming_attributes():
        _plain("num_classes", attrs["num_classes"])  # required, as in the originals
        _ssdkd.check_config(_config_json(config))
    return config, choice, attrs["reduction"] == "sum", bool(attrs["validate"])


# -- Modules by handle (the operator cannot take a module) ----------------------------------

_MODULES = _weakref.WeakValueDictionary()
_HANDLES = _itertools.count(1)
_DEFAULT_BACKENDS = {}


def _backend_of(handle, choice):
    """The ssdkd.Backend of the module with ``handle`` (its own; a default one per choice
    once the module is gone)."""
    module = _MODULES.get(handle)
    if module is not None:
        return module._owned_backend()
    if choice not in _DEFAULT_BACKENDS:
        _DEFAULT_BACKENDS[choice] = _new_backend(choice, stacklevel=2)
    return _DEFAULT_BACKENDS[choice]


# The gradients a forward evaluated for predicted weights, by token, until their backward
# takes them. Bounded: a forward whose backward never comes (or comes after this many
# others) leaves nothing behind; its backward then evaluates again.
_FORWARD_GRADIENTS = _collections.OrderedDict()
_KEPT_FORWARDS = 4
_TOKENS = _itertools.count(1)
_LOCK = _threading.Lock()


def _keep(weights, grad_loc, grad_conf):
    with _LOCK:
        token = next(_TOKENS)
        _FORWARD_GRADIENTS[token] = (weights, grad_loc, grad_conf)
        while len(_FORWARD_GRADIENTS) > _KEPT_FORWARDS:
            _FORWARD_GRADIENTS.popitem(last=False)
    return token


def _take(token):
    with _LOCK:
        return _FORWARD_GRADIENTS.pop(token, None)


# -- The shared CUDA path ---------------------------------------------------------------------

_SHARED = {}       # CUDA device index -> CudaShared, or the reason it cannot be opened
_WARNED = set()    # (device index, reason) warned about once
_SHARED_LOCK = _threading.Lock()


def _shared_backend(index):
    """``(CudaShared, None)`` for CUDA device ``index`` (one per device in the process), or
    ``(None, reason)``."""
    with _SHARED_LOCK:
        if index not in _SHARED:
            shared_class = getattr(_ssdkd, "CudaShared", None)
            reason_of = getattr(_ssdkd, "cuda_unavailable_reason", None)
            if shared_class is None or reason_of is None:
                _SHARED[index] = ("this build of ssdkd has no CUDA sharing (its compiled "
                                  "module has no CudaShared; build the wheel with the "
                                  "`cuda` feature)")
            else:
                reason = reason_of(index)
                if reason is None:
                    try:
                        reason = shared_class(index)
                    except (RuntimeError, ValueError, OSError) as e:
                        reason = str(e) or type(e).__name__
                _SHARED[index] = reason
        found = _SHARED[index]
    return (None, found) if isinstance(found, str) else (found, None)


def _path(choice, device):
    """Which path evaluates tensors on ``device`` for a module's backend ``choice``:
    ``(CudaShared, None)`` for the shared CUDA path, ``(None, None)`` for the host path.
    ``"cuda"`` raises when the shared path cannot run; ``"auto"`` warns once per device and
    reason, naming it, and takes the host path."""
    if device.type != "cuda":
        if choice == "cuda":
            raise _input_error(f"attribute `backend`: \"cuda\" needs CUDA tensors, found "
                               f"tensors on {device}", key="backend")
        return None, None
    if choice not in ("auto", "cuda"):
        return None, None
    index = device.index if device.index is not None else _torch.cuda.current_device()
    shared, reason = _shared_backend(index)
    if shared is not None:
        return shared, None
    if choice == "cuda":
        raise NoAdapterError(f"backend \"cuda\" cannot run on cuda:{index}: {reason}")
    with _SHARED_LOCK:
        first = (index, reason) not in _WARNED
        _WARNED.add((index, reason))
    if first:
        _warnings.warn(f"ssdkd: the shared CUDA path cannot run on cuda:{index}: {reason}; "
                       "the loss copies its inputs to the host (the path of backend "
                       "\"auto\" without CUDA sharing)", RuntimeWarning, stacklevel=2)
    return None, None


def cuda_path(device=None, backend="auto"):
    """Which path a drop-in with ``backend`` takes for CUDA tensors on ``device`` (default:
    torch's current CUDA device), as a dict: ``path`` (``"cuda-shared"``: device-to-device
    copies into buffers shared with ssdkd's Vulkan device; ``"host"``: copies to host
    memory and back), ``reason`` (why not shared, else ``None``) and, for the shared path,
    the ``ordering`` with torch's stream (``"timeline-semaphore"`` or ``"full-sync"``),
    the Vulkan ``adapter``, the device ``uuid`` and ``bytes_read_back`` so far. Opens the
    device's shared backend when it can (once per process)."""
    device = _torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return {"path": "host", "reason": f"tensors on {device} are not CUDA tensors"}
    if device.index is None and not _torch.cuda.is_available():
        return {"path": "host", "reason": "torch sees no CUDA device"}
    if backend not in ("auto", "cuda"):
        return {"path": "host", "reason": f"backend {backend!r} takes the host path"}
    index = device.index if device.index is not None else _torch.cuda.current_device()
    shared, reason = _shared_backend(index)
    if shared is None:
        return {"path": "host", "reason": reason}
    return {"path": "cuda-shared", "reason": None, "ordering": shared.ordering,
            "adapter": shared.adapter, "uuid": shared.uuid,
            "bytes_read_back": shared.bytes_read_back}


def _shared_evaluate(shared, tensors, config_json, gradients, validate, stream):
    """One evaluation on the shared CUDA path: ``tensors`` the six of SPEC §1 (teacher's may
    be None) on one device, cast to contiguous float32 there; the gradients (when asked)
    written into float32 tensors torch allocates on that device. Returns ``(Evaluation,
    grad_loc, grad_conf)``."""
    sl = tensors[0]
    device = sl.device
    f32 = [None if t is None else
           t.detach().to(device=device, dtype=_torch.float32).contiguous() for t in tensors]
    b, p, c = f32[1].shape
    m = f32[4].shape[1]
    grad_loc = grad_conf = None
    if gradients:
        grad_loc = _torch.empty((b, p, 4), dtype=_torch.float32, device=device)
        grad_conf = _torch.empty((b, p, c), dtype=_torch.float32, device=device)
    ptrs = [0 if t is None else t.data_ptr() for t in f32]
    ev = shared.evaluate(ptrs, (b, p, c, m), config_json, stream,
                         0 if grad_conf is None else grad_conf.data_ptr(),
                         0 if grad_loc is None else grad_loc.data_ptr(), bool(validate))
    return ev, grad_loc, grad_conf


def _evaluate(tensors, settings, handle, weights, validate):
    """One evaluation of ``tensors`` (the six of SPEC §1, torch tensors) with the module's
    ``settings``; with gradients for ``weights`` (soft, conf, l2, loc) when given. Returns
    ``(Evaluation, grad_loc, grad_conf)``, the gradients torch tensors on the inputs'
    device (float32) or None."""
    config, choice, _, _ = settings
    if weights is not None:
        config = dict(config, weights=weights)
    device = tensors[1].device
    shared, _ = _path(choice, device)
    module = _MODULES.get(handle)
    if shared is not None:
        with _torch.cuda.device(device):
            stream = _torch.cuda.current_stream(device).cuda_stream
            with _naming_attributes():
                ev, grad_loc, grad_conf = _shared_evaluate(
                    shared, tensors, _config_json(config), weights is not None, validate,
                    stream)
        if module is not None:
            module.last_path = "cuda-shared"
        return ev, grad_loc, grad_conf
    arrays = [None if t is None else _host(t, n) for t, n in zip(tensors, _TENSORS)]
    with _naming_attributes():
        ev = _backend_of(handle, choice).evaluate(*arrays, _config_json(config),
                                                  weights is not None, False, validate)
    if module is not None:
        module.last_path = "host"
    if weights is None:
        return ev, None, None
    return ev, _torch.from_numpy(ev.grad_student_loc), _torch.from_numpy(ev.grad_student_conf)


# -- The operators ----------------------------------------------------------------------------

def _terms_dtype(student_conf):
    return _torch.float64 if student_conf.dtype == _torch.float64 else _torch.float32


def _forward(student_loc, student_conf, teacher_loc, teacher_conf, targets, priors, settings,
             handle, follows):
    tensors = (student_loc, student_conf, teacher_loc, teacher_conf, targets, priors)
    # The shapes and the memory are checked before anything is converted.
    _ssdkd.check_shapes([None if t is None else list(t.shape) for t in tensors], True)
    parsed = _settings(settings)
    _, _, total, validate = parsed
    module = _MODULES.get(handle)
    # Gradients in the forward only for a backward that will come, with weights that are
    # known: "sum" scales them by the positive count the forward finds.
    predicted = module._predicted if module is not None and follows and not total else None
    ev, grad_loc, grad_conf = _evaluate(tensors, parsed, handle, predicted, validate)
    keys = ("soft_sum", "l2_sum", "conf_sum", "loc_sum") if total else _ssdkd.TERMS[:4]
    terms = _torch.tensor([getattr(ev, k) for k in keys], dtype=_terms_dtype(student_conf))
    token = _keep(predicted, grad_loc, grad_conf) if predicted else 0
    device = student_conf.device
    return (terms.to(device), _torch.tensor(ev.num_pos, dtype=_torch.int64).to(device),
            _torch.tensor(token, dtype=_torch.int64))


@_torch.library.custom_op("ssdkd::loss", mutates_args=())
def _loss_op(student_loc: _torch.Tensor, student_conf: _torch.Tensor,
             teacher_loc: _Optional[_torch.Tensor], teacher_conf: _Optional[_torch.Tensor],
             targets: _torch.Tensor, priors: _torch.Tensor, settings: str, handle: int,
             follows: bool) -> tuple[_torch.Tensor, _torch.Tensor, _torch.Tensor]:
    """The loss of SPEC §5 on any device through host memory: ``(terms [4], num_pos,
    token)``; terms are (soft, l2, conf, loc) means, or sums for ``reduction="sum"``.
    ``token`` (int64, CPU) names the gradients the forward evaluated, 0 for none."""
    return _forward(student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                    settings, handle, follows)


@_loss_op.register_kernel("cuda")
def _loss_op_cuda(student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                  settings, handle, follows):
    """CUDA tensors: the shared CUDA path when the module's backend choice and the build
    allow it (see :func:`cuda_path`), else the host path."""
    return _forward(student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                    settings, handle, follows)


@_loss_op.register_fake
def _loss_op_fake(student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                  settings, handle, follows):
    return (student_conf.new_empty((4,), dtype=_terms_dtype(student_conf)),
            student_conf.new_empty((), dtype=_torch.int64),
            _torch.empty((), dtype=_torch.int64, device="cpu"))


def _backward(incoming, token, num_pos, tensors, settings, handle):
    parsed = _settings(settings)
    total = parsed[2]
    # d(sum)/dx = N_local * d(term)/dx, N_local = max(num_pos, 1) (SPEC §5).
    scale = float(max(int(num_pos), 1)) if total else 1.0
    soft, l2, conf, loc = (float(x) * scale for x in incoming.detach().double().cpu().tolist())
    g = (soft, conf, l2, loc)  # the library's weights order
    module = _MODULES.get(handle)
    if module is not None:
        module._observe(g)
    cached = _take(int(token)) if int(token) else None  # a second backward evaluates
    grads = None
    if cached and cached[0] == g:
        grads = [cached[1], cached[2]]
    else:
        # Non-finite weights as autograd uses them: w * ∂term, on the elements that term
        # reaches; the finite weights in one evaluation.
        finite = tuple(w if _math.isfinite(w) else 0.0 for w in g)
        parts = [(None, finite)] if any(finite) else []
        parts += [(w, tuple(float(i == k) for i in range(4)))
                  for k, w in enumerate(g) if not _math.isfinite(w)]
        for w, weights in parts:
            _, *new = _evaluate(tensors, parsed, handle, weights, False)
            if w is not None:
                new = [_torch.where(a != 0, w * a, 0.0) for a in new]
            grads = new if grads is None else [a + b for a, b in zip(grads, new)]
    if grads is None:
        grads = [_torch.zeros(t.shape) for t in tensors[:2]]
    return tuple(a.to(dtype=t.dtype, device=t.device) for a, t in zip(grads, tensors))


@_torch.library.custom_op("ssdkd::loss_backward", mutates_args=())
def _loss_backward_op(incoming: _torch.Tensor, token: _torch.Tensor, num_pos: _torch.Tensor,
                      student_loc: _torch.Tensor, student_conf: _torch.Tensor,
                      teacher_loc: _Optional[_torch.Tensor],
                      teacher_conf: _Optional[_torch.Tensor], targets: _torch.Tensor,
                      priors: _torch.Tensor, settings: str,
                      handle: int) -> tuple[_torch.Tensor, _torch.Tensor]:
    """The gradients of ``incoming`` · terms for ``student_loc`` and ``student_conf``, in
    their dtype and device: the forward's (``token``) when it evaluated them for these
    weights, else an evaluation of the saved inputs."""
    return _backward(incoming, token, num_pos, (student_loc, student_conf, teacher_loc,
                                                teacher_conf, targets, priors), settings,
                     handle)


@_loss_backward_op.register_kernel("cuda")
def _loss_backward_op_cuda(incoming, token, num_pos, student_loc, student_conf, teacher_loc,
                           teacher_conf, targets, priors, settings, handle):
    """CUDA tensors: as the forward, on the path :func:`cuda_path` reports."""
    return _backward(incoming, token, num_pos, (student_loc, student_conf, teacher_loc,
                                                teacher_conf, targets, priors), settings,
                     handle)


@_loss_backward_op.register_fake
def _loss_backward_op_fake(incoming, token, num_pos, student_loc, student_conf, teacher_loc,
                           teacher_conf, targets, priors, settings, handle):
    return _torch.empty_like(student_loc), _torch.empty_like(student_conf)


def _loss_setup_context(ctx, inputs, output):
    (student_loc, student_conf, teacher_loc, teacher_conf, targets, priors, settings, handle,
     _) = inputs
    _, num_pos, token = output
    ctx.save_for_backward(student_loc, student_conf, teacher_loc, teacher_conf, targets,
                          priors, num_pos, token)
    ctx.settings, ctx.handle = settings, handle


def _loss_autograd(ctx, g_terms, *_):
    # PyTorch's error here when a saved input was changed in place since the forward.
    (student_loc, student_conf, teacher_loc, teacher_conf, targets, priors, num_pos,
     token) = ctx.saved_tensors
    if g_terms is None:
        g_terms = _torch.zeros(4, dtype=_terms_dtype(student_conf), device=student_conf.device)
    grad_loc, grad_conf = _loss_backward_op(g_terms, token, num_pos, student_loc,
                                            student_conf, teacher_loc, teacher_conf, targets,
                                            priors, ctx.settings, ctx.handle)
    return grad_loc, grad_conf, None, None, None, None, None, None, None


_loss_op.register_autograd(_loss_autograd, setup_context=_loss_setup_context)

# Backward is once-differentiable (ssdkd evaluates the gradient, not its derivative). With
# create_graph=True the gradient operator's outputs get this autograd rule, so that
# differentiating them (a gradient penalty) raises instead of counting them as constant.
# This is the public way to do what torch.autograd.function.once_differentiable does
# (that decorator needs a torch.autograd.Function, which torch.compile cannot trace here).
_ONCE = ("ssdkd's gradient is once_differentiable: trying to differentiate twice a "
         "function that was marked with @once_differentiable (a gradient penalty through "
         "ssdkd's loss is not supported)")


def _once_setup_context(ctx, inputs, output):
    pass


def _once_autograd(ctx, *_):
    raise RuntimeError(_ONCE)


_loss_backward_op.register_autograd(_once_autograd, setup_context=_once_setup_context)


def _no_vmap(info, in_dims, *args):
    raise _input_error("ssdkd's loss does not support torch.func.vmap: it is batched "
                       "already; call it on the [B, ...] tensors", key="vmap")


_loss_op.register_vmap(_no_vmap)
_loss_backward_op.register_vmap(_no_vmap)


# -- The drop-ins -----------------------------------------------------------------------------

def _parts(outputs, n):
    """The first ``n`` outputs of a model (``predictions``: loc, conf, priors; ``pred_t``:
    the teacher's loc, conf)."""
    try:
        if len(outputs) >= n:
            return tuple(outputs[:n])
    except TypeError:
        pass
    names = ("predictions", "(loc, conf, priors)") if n == 3 else ("pred_t", "(loc, conf)")
    raise _input_error(f"argument `{names[0]}`: expected {names[1]}, found "
                       f"{type(outputs).__name__}", key=names[0])


class _Base(_torch.nn.Module):
    _ATTRS = tuple(_KEYS) + tuple(_FIXED) + _OPTIONS

    def _setup(self, num_classes, overlap_thresh, prior_for_matching, bkg_label, neg_mining,
               neg_pos, neg_overlap, encode_target, use_gpu, negatives_for_hard, variance,
               backend, reduction, validate):
        self.num_classes, self.threshold, self.negpos_ratio = num_classes, overlap_thresh, neg_pos
        self.use_prior_for_matching, self.background_label = prior_for_matching, bkg_label
        self.do_neg_mining, self.neg_overlap, self.encode_target = neg_mining, neg_overlap, encode_target
        self.use_gpu, self.negatives_for_hard, self.variance = use_gpu, negatives_for_hard, variance
        self.backend, self.reduction, self.validate = backend, reduction, validate
        self._register()
        self._config()

    def _register(self):
        self._device = None  # (choice, ssdkd.Backend), made at the first host evaluation
        self._last = self._predicted = None
        #: The path of the last evaluation: "host" or "cuda-shared" (None before any).
        self.last_path = None
        self._handle = next(_HANDLES)
        _MODULES[self._handle] = self
        self._settings_cached = self._settings_text()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self._ATTRS and "_handle" in self.__dict__:
            super().__setattr__("_settings_cached", self._settings_text())

    def _settings(self):
        """The settings string the operator gets. Eager: from the attributes now (a list
        changed in place included). Under torch.compile: the string kept when an attribute
        was last set, a constant that torch.compile guards on (a changed attribute
        recompiles), as SymFloat attributes could not be written into a string."""
        if _torch.compiler.is_compiling():
            return self._settings_cached
        text = self._settings_text()
        if text != self.__dict__.get("_settings_cached"):
            super().__setattr__("_settings_cached", text)
        return text

    def _settings_text(self):
        """The attributes the operator reads, as a string of literals (checked inside the
        operator)."""
        names = [a for a in self._ATTRS if a in _KEYS and a not in self._ABSENT or
                 a not in _KEYS]
        return repr((tuple(names), tuple(repr(_literal(getattr(self, a))) for a in names)))

    def _config(self):
        """The SPEC §8 config of the module's attributes now; a bad value is an InputError
        naming the attribute."""
        return _settings(self._settings_text())[0]

    def _owned_backend(self):
        choice = self.backend
        if self._device is None or self._device[0] != choice:
            # "cuda" takes the host path only where _path refuses it first.
            self._device = (choice, _new_backend(choice, stacklevel=6))
        return self._device[1]

    def _observe(self, weights):
        """A backward got ``weights``: the next forward predicts them when the last two
        were equal (and not all zero)."""
        self._predicted = weights if weights == self._last and any(weights) else None
        self._last = weights

    def __getstate__(self):  # copy.deepcopy and pickle make their own backend
        return dict(self.__dict__, _device=None)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._handle = next(_HANDLES)
        _MODULES[self._handle] = self

    def _run(self, student_loc, student_conf, priors, teacher_loc, teacher_conf, targets):
        student_loc = _float_tensor(student_loc, "student_loc")
        student_conf = _float_tensor(student_conf, "student_conf")
        if isinstance(priors, _np.ndarray):
            priors = _torch.from_numpy(priors)
        priors = _float_tensor(priors, "priors")
        if teacher_loc is not None or teacher_conf is not None:
            teacher_loc = _float_tensor(teacher_loc, "teacher_loc")
            teacher_conf = _float_tensor(teacher_conf, "teacher_conf")
        targets = _padded(targets, student_conf.shape[0] if student_conf.dim() == 3 else None)
        follows = _torch.is_grad_enabled() and (student_loc.requires_grad or
                                                student_conf.requires_grad)
        # float16/bfloat16 (autocast) are evaluated as float32 inside the operator and the
        # terms returned as float32, as PyTorch's own losses; gradients in the inputs' dtype.
        args = (student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                self._settings(), self._handle, follows)
        if _torch.compiler.is_compiling():
            terms, num_pos, _ = _loss_op(*args)
        else:
            try:
                terms, num_pos, _ = _loss_op(*args)
            except RuntimeError as e:
                if "functorch transforms" not in str(e):
                    raise
                raise RuntimeError(
                    f"ssdkd.torch: torch {_torch.__version__} cannot apply torch.func.grad, "
                    "vjp, jacrev or jvp to ssdkd's loss (its autograd rule is a "
                    "torch.library custom operator's, which torch.func does not support "
                    "yet); use loss.backward() or torch.autograd.grad") from e
        out = tuple(terms.unbind())
        return out + (num_pos,) if self.reduction == "sum" else out


class MultiBoxLoss_KD(_Base):  # noqa: N801  (the original's name)
    """The distillation loss of SPEC §5, a drop-in for the seed code base's
    ``MultiBoxLoss_KD`` (same constructor arguments, names and order, same attributes).

    ``forward(predictions, pred_t, targets)``: ``predictions = (loc [B,P,4], conf [B,P,C],
    priors [P,4])``, ``pred_t = (loc, conf, ...)`` (the teacher's outputs; they get no
    gradient, even when they require one), ``targets`` a list of per-image ``[M_i, 5]``
    tensors or a padded ``[B, M, 5]`` tensor (label < 0 = padding). Returns ``(soft_loss,
    l2_loss, loss_c, loss_l)`` as 0-d tensors on the inputs' device; with
    ``reduction="sum"``, ``(soft_sum, l2_sum, conf_sum, loc_sum, num_pos)`` (see
    :func:`global_terms`).

    Not supported (raise :class:`ssdkd.InputError`): ``prior_for_matching=False``,
    ``bkg_label != 0``, ``neg_mining=False``. ``neg_overlap``, ``encode_target`` and
    ``use_gpu`` are accepted and ignored, as in the original (the device follows the
    inputs). Keyword-only: ``variance``, ``backend`` ("auto", "cpu", "gpu", or "cuda": the
    shared CUDA path only, see :func:`cuda_path`), ``reduction`` ("mean", "sum"),
    ``validate`` (scan input values in forward). ``last_path`` says which path the last
    evaluation took ("host" or "cuda-shared").
    """

    _ABSENT = ()

    def __init__(self, num_classes, overlap_thresh=0.5, prior_for_matching=True, bkg_label=0,
                 neg_mining=True, neg_pos=3, neg_overlap=0.5, encode_target=False,
                 use_gpu=True, negatives_for_hard=100.0, neg_w=1.5, pos_w=1.0, Temp=1.0,
                 reg_m=0.0, *, variance=(0.1, 0.2), backend="auto", reduction="mean",
                 validate=True):
        super().__init__()
        self.neg_w, self.pos_w, self.T, self.reg_m = neg_w, pos_w, Temp, reg_m
        self._setup(num_classes, overlap_thresh, prior_for_matching, bkg_label, neg_mining,
                    neg_pos, neg_overlap, encode_target, use_gpu, negatives_for_hard, variance,
                    backend, reduction, validate)

    def forward(self, predictions, pred_t, targets):
        """Returns ``(soft_loss, l2_loss, loss_c, loss_l)`` (see the class)."""
        (loc, conf, priors), (t_loc, t_conf) = _parts(predictions, 3), _parts(pred_t, 2)
        return self._run(loc, conf, priors, t_loc, t_conf, targets)


class MultiBoxLoss(_Base):
    """The plain SSD MultiBox loss (SPEC §10: no teacher), a drop-in for the original
    ``MultiBoxLoss`` that trains the teacher. ``forward(predictions, targets)`` returns
    ``(loss_l, loss_c)``; with ``reduction="sum"``, ``(loc_sum, conf_sum, num_pos)``.
    Arguments as :class:`MultiBoxLoss_KD`."""

    _ABSENT = ("T", "pos_w", "neg_w", "reg_m")

    def __init__(self, num_classes, overlap_thresh=0.5, prior_for_matching=True, bkg_label=0,
                 neg_mining=True, neg_pos=3, neg_overlap=0.5, encode_target=False,
                 use_gpu=True, negatives_for_hard=100.0, *, variance=(0.1, 0.2),
                 backend="auto", reduction="mean", validate=True):
        super().__init__()
        self._setup(num_classes, overlap_thresh, prior_for_matching, bkg_label, neg_mining,
                    neg_pos, neg_overlap, encode_target, use_gpu, negatives_for_hard, variance,
                    backend, reduction, validate)

    def forward(self, predictions, targets):
        """Returns ``(loss_l, loss_c)`` (see the class)."""
        out = self._run(*_parts(predictions, 3), None, None, targets)
        return (out[3], out[2], out[4]) if self.reduction == "sum" else (out[3], out[2])


def global_terms(soft_sum, l2_sum, conf_sum, loc_sum, num_pos, group=None):
    """Data-parallel normalisation (SPEC §5, §7): all-reduces the sums and the positive
    count of ``MultiBoxLoss_KD(..., reduction="sum")`` over ``group`` and returns
    ``(soft_loss, l2_loss, loss_c, loss_l)`` whose VALUES are the whole batch's terms (the
    global sums over the global N = max(Σ num_pos, 1)) and whose GRADIENTS are this
    worker's share (local sums / global N). Summing the workers' gradients (e.g.
    ``DistributedDataParallel`` averaging a loss multiplied by the world size) gives the
    whole batch's gradient."""
    import torch.distributed as dist

    local = _torch.stack([soft_sum, l2_sum, conf_sum, loc_sum])
    buf = _torch.cat([local.detach().to(_torch.float64),
                      num_pos.detach().to(_torch.float64).reshape(1)])
    dist.all_reduce(buf, group=group)
    n = buf[4].clamp(min=1.0)
    terms = (local + (buf[:4].to(local.dtype) - local.detach())) / n.to(local.dtype)
    return tuple(terms.unbind())
