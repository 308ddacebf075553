"""PyTorch drop-ins for the seed code base's two losses, backed by ssdkd.

- :class:`MultiBoxLoss_KD` (the distillation loss) returns ``(soft_loss, l2_loss, loss_c,
  loss_l)``; :class:`MultiBoxLoss` (the plain SSD loss that trains the teacher) returns
  ``(loss_l, loss_c)``. Both are ``torch.nn.Module``\\ s with the original constructors and
  attributes (``threshold``, ``negpos_ratio``, ``T``, ...), read at each forward.
- Backward is ssdkd's analytic gradient (SPEC §6): the incoming gradients of the returned
  terms are the weights of ONE ssdkd gradient evaluation, so any combination
  ``a*soft + b*loss_c + c*l2 + d*loss_l`` backpropagates as autograd on the original would.
  The inputs are saved with ``save_for_backward``: an in-place change between forward and
  backward raises PyTorch's own error. Backward is once-differentiable: a gradient penalty
  through it raises PyTorch's ``once_differentiable`` error. Non-finite incoming gradients give non-finite gradients.
- Cost of a step (``reduction="mean"``): once a module's last two backward calls got the
  same weights (a training loop's fixed combination), its forward evaluates the gradients
  for those weights in the same pass and a backward with those weights takes them: one
  evaluation per step, the gradients of what the forward saw. Otherwise (the first two
  steps, other weights, ``reduction="sum"``) backward evaluates again, with gradients, on
  the saved inputs. Each module owns its :class:`ssdkd.Backend`.
- Terms are float32 (float64 for float64 inputs), also for float16/bfloat16 inputs and
  under autocast, as PyTorch's own losses; gradients come back in the inputs' dtype and
  device. CPU float32 tensors are shared with NumPy without a copy; others are copied to
  host float32 once.
- ``reduction="sum"`` returns the un-normalised sums and the local positive count for
  data-parallel training; :func:`global_terms` normalises them by the positives of all
  workers (see ``examples/ddp.py``).
"""

import contextlib as _contextlib
import math as _math

import numpy as _np
import torch as _torch

from . import InputError, _TENSORS, _config_json, _input_error, _new_backend, _plain, _ssdkd

__all__ = ["MultiBoxLoss", "MultiBoxLoss_KD", "global_terms", "pad_targets"]

# The original modules' attributes that are SPEC §8 config keys, read at each forward.
_KEYS = {"num_classes": "num_classes", "threshold": "overlap_threshold",
         "negpos_ratio": "negpos_ratio", "negatives_for_hard": "negatives_for_hard",
         "variance": "variance", "T": "temperature", "pos_w": "pos_w", "neg_w": "neg_w",
         "reg_m": "reg_m"}
# Attributes of the originals with the one value ssdkd supports (docs/SPEC.md).
_FIXED = {"use_prior_for_matching": True, "background_label": 0, "do_neg_mining": True}


def _float_tensor(t, name):
    if not isinstance(t, _torch.Tensor) or not t.is_floating_point():
        found = t.dtype if isinstance(t, _torch.Tensor) else type(t).__name__
        raise _input_error(f"tensor `{name}`: expected a float torch.Tensor, found {found}",
                           tensor=name)
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
    if not isinstance(targets, (list, tuple)):
        raise _input_error("tensor `targets`: expected a list of [M_i, 5] tensors or a "
                           f"[B, M, 5] tensor, found {type(targets).__name__}",
                           tensor="targets")
    rows = [_host(t, "targets") for t in targets]
    for i, a in enumerate(rows):
        if a.ndim != 2 or a.shape[1] != 5:
            if a.size:
                raise _input_error(f"tensor `targets`: image {i} has shape {list(a.shape)} "
                                   "where [M_i, 5] is needed", tensor="targets")
            rows[i] = a.reshape(0, 5)
    out = _np.zeros((len(rows), max([1] + [a.shape[0] for a in rows]), 5), _np.float32)
    out[..., 4] = -1.0
    for i, a in enumerate(rows):
        out[i, : a.shape[0]] = a
    return out


def _evaluate(ctx, tensors, weights, validate=False):
    """One evaluation of ``tensors`` (student_loc, student_conf, teacher_loc, teacher_conf,
    priors) with the forward's settings; with gradients for ``weights`` when given."""
    arrays = dict(zip(("student_loc", "student_conf", "teacher_loc", "teacher_conf", "priors"),
                      tensors), targets=ctx.targets)
    arrays = [None if arrays[n] is None else _host(arrays[n], n) for n in _TENSORS]
    config = ctx.config if weights is None else dict(ctx.config, weights=weights)
    return ctx.backend.evaluate(*arrays, _config_json(config), weights is not None, False,
                                validate)


class _SsdkdLoss(_torch.autograd.Function):
    """Forward: the four terms (or sums), with the gradients for the module's predicted
    weights when it has some; backward: those gradients when the incoming gradients are
    those weights, else an evaluation with gradients of the saved inputs."""

    @staticmethod
    def forward(ctx, module, targets, predicted, student_loc, student_conf, teacher_loc,
                teacher_conf, priors):
        ctx.module, ctx.targets, ctx.backend = module, targets, module._owned_backend()
        ctx.config, ctx.sum = module._config(), module.reduction == "sum"
        tensors = (student_loc, student_conf, teacher_loc, teacher_conf, priors)
        ctx.save_for_backward(*tensors)
        ev = _evaluate(ctx, tensors, predicted, module.validate)
        ctx.cached = predicted and (predicted, ev.grad_student_conf, ev.grad_student_loc)
        ctx.num_pos = ev.num_pos
        keys = ("soft_sum", "l2_sum", "conf_sum", "loc_sum") if ctx.sum else _ssdkd.TERMS[:4]
        like = dict(dtype=student_conf.dtype, device=student_conf.device)
        terms = tuple(_torch.tensor(getattr(ev, k), **like) for k in keys)
        if ctx.sum:
            num_pos = _torch.tensor(ev.num_pos, dtype=_torch.int64, device=like["device"])
            ctx.mark_non_differentiable(num_pos)
            terms += (num_pos,)
        return terms

    @staticmethod
    def backward(ctx, *incoming):
        with _torch.no_grad():
            grads = _SsdkdLoss.gradients(ctx, *incoming)
        if _torch.is_grad_enabled():
            # create_graph=True: what once_differentiable gives, so that differentiating
            # the gradient (a gradient penalty) raises instead of counting it as constant.
            grads = _torch._C._functions.DelayedError(
                b"trying to differentiate twice a function that was marked with "
                b"@once_differentiable", 2)(*(g.detach().requires_grad_() for g in grads))
        return (None, None, None) + tuple(grads) + (None, None, None)

    @staticmethod
    def gradients(ctx, g_soft, g_l2, g_conf, g_loc, *_):
        tensors = ctx.saved_tensors  # PyTorch's error if one was changed in place since
        # d(sum)/dx = N_local * d(term)/dx, N_local = max(num_pos, 1) (SPEC §5).
        scale = float(max(ctx.num_pos, 1)) if ctx.sum else 1.0
        g = tuple(0.0 if x is None else float(x) * scale for x in (g_soft, g_conf, g_l2, g_loc))
        ctx.module._observe(g)
        cached, ctx.cached = ctx.cached, None  # a second backward (retain_graph) evaluates
        grads = None
        if cached and cached[0] == g:
            grads = [_torch.from_numpy(cached[2]), _torch.from_numpy(cached[1])]
        else:
            # Non-finite weights as autograd uses them: w * ∂term, on the elements that
            # term reaches; the finite weights in one evaluation.
            finite = tuple(w if _math.isfinite(w) else 0.0 for w in g)
            parts = [(None, finite)] if any(finite) else []
            parts += [(w, tuple(float(i == k) for i in range(4)))
                      for k, w in enumerate(g) if not _math.isfinite(w)]
            for w, weights in parts:
                ev = _evaluate(ctx, tensors, weights)
                new = [_torch.from_numpy(a) for a in (ev.grad_student_loc, ev.grad_student_conf)]
                if w is not None:
                    new = [_torch.where(a != 0, w * a, 0.0) for a in new]
                grads = new if grads is None else [a + b for a, b in zip(grads, new)]
        grads = grads or [_torch.zeros(t.shape) for t in tensors[:2]]
        return [a.to(dtype=t.dtype, device=t.device) for a, t in zip(grads, tensors)]


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


class _Base(_torch.nn.Module):
    def _setup(self, num_classes, overlap_thresh, prior_for_matching, bkg_label, neg_mining,
               neg_pos, neg_overlap, encode_target, use_gpu, negatives_for_hard, variance,
               backend, reduction, validate):
        self.num_classes, self.threshold, self.negpos_ratio = num_classes, overlap_thresh, neg_pos
        self.use_prior_for_matching, self.background_label = prior_for_matching, bkg_label
        self.do_neg_mining, self.neg_overlap, self.encode_target = neg_mining, neg_overlap, encode_target
        self.use_gpu, self.negatives_for_hard, self.variance = use_gpu, negatives_for_hard, variance
        self.backend, self.reduction, self.validate = backend, reduction, validate
        self._device = None  # (choice, ssdkd.Backend), made at the first forward
        self._last = self._predicted = None
        self._config()

    def _config(self):
        """The SPEC §8 config of the module's attributes now; a bad value is an InputError
        naming the attribute."""
        for name, value in _FIXED.items():
            if getattr(self, name) != value:
                raise _input_error(f"attribute `{name}`: {getattr(self, name)!r} is not "
                                   f"supported by ssdkd (only {value!r}, as in docs/SPEC.md)", key=name)
        if self.reduction not in ("mean", "sum"):
            raise _input_error(f"attribute `reduction`: {self.reduction!r}: expected \"mean\" "
                               "or \"sum\"", key="reduction")
        config = {key: getattr(self, attr) for attr, key in _KEYS.items() if hasattr(self, attr)}
        with _naming_attributes():
            _plain("num_classes", self.num_classes)  # required, as in the originals
            _ssdkd.check_config(_config_json(config))
        return config

    def _owned_backend(self):
        if self._device is None or self._device[0] != self.backend:
            self._device = (self.backend, _new_backend(self.backend, stacklevel=6))
        return self._device[1]

    def _observe(self, weights):
        """A backward got ``weights``: the next forward predicts them when the last two
        were equal (and not all zero)."""
        self._predicted = weights if weights == self._last and any(weights) else None
        self._last = weights

    def __getstate__(self):  # copy.deepcopy and pickle make their own backend
        return dict(self.__dict__, _device=None)

    def _run(self, student_loc, student_conf, priors, teacher_loc, teacher_conf, targets):
        targets = pad_targets(targets)
        # The shapes and the memory are checked before anything is converted.
        tensors = (student_loc, student_conf, teacher_loc, teacher_conf, targets, priors)
        shapes = [None if t is None else list(getattr(t, "shape", ())) for t in tensors]
        _ssdkd.check_shapes(shapes, True)
        student_conf = _float_tensor(student_conf, "student_conf")
        # float16/bfloat16 (autocast) are evaluated and returned as float32, as PyTorch's
        # own losses; autograd casts the gradients back.
        student_loc = _float_tensor(student_loc, "student_loc")
        dtype = _torch.float64 if student_conf.dtype == _torch.float64 else _torch.float32
        student_loc, student_conf = student_loc.to(dtype), student_conf.to(dtype)
        # Gradients in the forward only for a backward that will come, with weights that
        # are known: "sum" scales them by the positive count the forward finds.
        follows = _torch.is_grad_enabled() and (student_loc.requires_grad or
                                                student_conf.requires_grad)
        predicted = self._predicted if follows and self.reduction == "mean" else None
        with _naming_attributes():
            return _SsdkdLoss.apply(self, targets, predicted, student_loc, student_conf,
                                    teacher_loc, teacher_conf, priors)


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
    inputs). Keyword-only: ``variance``, ``backend`` ("auto", "cpu", "gpu"),
    ``reduction`` ("mean", "sum"), ``validate`` (scan input values in forward).
    """

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
