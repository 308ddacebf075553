"""PyTorch drop-ins for the seed code base's two losses, backed by ssdkd.

- :class:`MultiBoxLoss_KD` (the distillation loss) returns ``(soft_loss, l2_loss, loss_c,
  loss_l)``; :class:`MultiBoxLoss` (the plain SSD loss that trains the teacher) returns
  ``(loss_l, loss_c)``. Both are ``torch.nn.Module``\\ s with the original constructors.
- Backward is ssdkd's analytic gradient (SPEC §6): the incoming gradients of the returned
  terms are the weights of ONE ssdkd gradient evaluation, so any combination
  ``a*soft + b*loss_c + c*l2 + d*loss_l`` backpropagates as autograd on the original would.
- Cost of a step (``reduction="mean"``): once the last two backward calls of a module got
  the same weights (a training loop's fixed combination), its forward evaluates the
  gradients for those weights in the same pass, and a backward with those weights takes
  them: one evaluation with gradients per step, as ``ssdkd bench`` times it. Otherwise
  (the first two steps, weights that change, ``reduction="sum"``) the forward evaluates
  the losses only and backward, on the CPU backend, runs the gradient pass alone on what
  the forward kept (the selected rows, their probabilities, the labels) unless another
  evaluation came in between (then, and on a GPU, backward is one evaluation with
  gradients). Under ``torch.no_grad()`` or without inputs that need a gradient, the
  forward never evaluates gradients. The input tensors must not change between forward
  and backward.
- CPU float32 tensors are shared with NumPy without a copy; other tensors (CUDA, MPS,
  float64) are copied to host float32 once, and gradients come back on the inputs'
  device and dtype.
- ``reduction="sum"`` returns the un-normalised sums and the local positive count for
  data-parallel training; :func:`global_terms` normalises them by the positives of all
  workers (see ``examples/ddp.py``).
"""

import numpy as _np
import torch as _torch

from . import InputError  # noqa: F401  (re-exported)
from . import _as_f32, _config_json, _evaluate_arrays, _input_error, _ssdkd

__all__ = ["MultiBoxLoss", "MultiBoxLoss_KD", "global_terms", "pad_targets"]


def _host(t, name):
    """A C-contiguous float32 NumPy array of tensor ``t`` (no copy for a contiguous CPU
    float32 tensor)."""
    if not isinstance(t, _torch.Tensor):
        raise _input_error(f"tensor `{name}`: expected a torch.Tensor, found "
                           f"{type(t).__name__}", tensor=name)
    if not t.is_floating_point():
        raise _input_error(f"tensor `{name}`: expected a float tensor, found {t.dtype}",
                           tensor=name)
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != _torch.float32 or not t.is_contiguous():
        t = t.to(device="cpu", dtype=_torch.float32).contiguous()
    return t.numpy()


def pad_targets(targets):
    """Per-image ``[M_i, 5]`` target tensors (the original data loader's list) as one
    padded ``[B, M, 5]`` float32 array, padding rows labelled -1 (SPEC §1); a tensor that
    is already ``[B, M, 5]`` passes through."""
    if isinstance(targets, _torch.Tensor):
        return _host(targets, "targets")
    if not isinstance(targets, (list, tuple)):
        raise _input_error("tensor `targets`: expected a list of [M_i, 5] tensors or a "
                           f"[B, M, 5] tensor, found {type(targets).__name__}",
                           tensor="targets")
    rows = []
    for i, t in enumerate(targets):
        a = _host(t, "targets")
        if a.ndim != 2 or a.shape[1] != 5:
            if a.size == 0:
                a = a.reshape(0, 5)
            else:
                raise _input_error(f"tensor `targets`: image {i} has shape {list(a.shape)} "
                                   "where [M_i, 5] is needed", tensor="targets")
        rows.append(a)
    m = max([1] + [a.shape[0] for a in rows])
    out = _np.zeros((len(rows), m, 5), _np.float32)
    out[..., 4] = -1.0
    for i, a in enumerate(rows):
        out[i, : a.shape[0]] = a
    return out


class _Step:
    """A module's state from one step to the next: its config as JSON for each set of
    weights (kept, a training loop uses few), and the weights its next backward will most
    likely get (soft, conf, l2, loc): those of its last two backward calls when they were
    equal, else ``None``."""

    def __init__(self, config):
        self.config = config
        self._seen = None
        self._json = {}
        self.last = None
        self.predicted = None

    def json(self, weights=None):
        """The config with ``weights`` (``None``: the config's own) as the binding's JSON."""
        if self.config != self._seen:  # first use, or the module's config dict was changed
            self._seen, self._json = dict(self.config), {}
        text = self._json.get(weights)
        if text is None:
            if len(self._json) >= 8:
                self._json.clear()
            config = self.config if weights is None else dict(self.config, weights=weights)
            text = self._json[weights] = _config_json(config)
        return text

    def observe(self, weights):
        """A backward got ``weights`` (all zero: no gradients to predict)."""
        self.predicted = weights if weights == self.last and any(weights) else None
        self.last = weights


class _SsdkdLoss(_torch.autograd.Function):
    """Forward: the four terms (or sums), with the gradients for the predicted weights
    when there are some; backward: those gradients when the incoming gradients are those
    weights, else one ssdkd gradient evaluation weighted by the incoming gradients."""

    @staticmethod
    def forward(ctx, student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                opts):
        arrays = dict(
            student_loc=_host(student_loc, "student_loc"),
            student_conf=_host(student_conf, "student_conf"),
            teacher_loc=None if teacher_loc is None else _host(teacher_loc, "teacher_loc"),
            teacher_conf=None if teacher_conf is None else _host(teacher_conf, "teacher_conf"),
            targets=targets,
            priors=_host(priors, "priors"),
        )
        # Converted once here, so that backward passes the very arrays forward evaluated
        # (the CPU backend recognises its last batch by the arrays' addresses).
        arrays = {k: None if v is None else _as_f32(k, v) for k, v in arrays.items()}
        step, predicted = opts["step"], opts["predicted"]
        out = _evaluate_arrays(arrays, opts["backend"], predicted is not None, False,
                               opts["validate"], step.json(predicted), stacklevel=2)
        ctx.predicted = None
        if predicted is not None:
            ctx.predicted = (predicted, out["grad_student_conf"], out["grad_student_loc"])
        ctx.arrays = arrays
        ctx.opts = opts
        ctx.like = [(student_loc.dtype, student_loc.device),
                    (student_conf.dtype, student_conf.device)]
        ctx.num_pos = out["num_pos"]
        dtype, device = student_conf.dtype, student_conf.device
        if opts["reduction"] == "sum":
            keys = ("soft_sum", "l2_sum", "conf_sum", "loc_sum")
        else:
            keys = ("soft_loss", "l2_loss", "loss_c", "loss_l")
        terms = tuple(_torch.tensor(out[k], dtype=dtype, device=device) for k in keys)
        if opts["reduction"] == "sum":
            num_pos = _torch.tensor(out["num_pos"], dtype=_torch.int64, device=device)
            ctx.mark_non_differentiable(num_pos)
            terms = terms + (num_pos,)
        return terms

    @staticmethod
    def backward(ctx, g_soft, g_l2, g_conf, g_loc, *_):
        scale = 1.0
        if ctx.opts["reduction"] == "sum":
            # d(sum)/dx = N_local * d(term)/dx, N_local = max(num_pos, 1) (SPEC §5).
            scale = float(max(ctx.num_pos, 1))
        g = tuple(0.0 if x is None else float(x) * scale
                  for x in (g_soft, g_conf, g_l2, g_loc))
        step = ctx.opts["step"]
        step.observe(g)
        # Taken once: a second backward (retain_graph) must not get the same arrays again.
        predicted, ctx.predicted = ctx.predicted, None
        (dt_loc, dev_loc), (dt_conf, dev_conf) = ctx.like
        a = ctx.arrays
        if not any(g):
            grad_loc = _torch.zeros(a["student_loc"].shape, dtype=dt_loc, device=dev_loc)
            grad_conf = _torch.zeros(a["student_conf"].shape, dtype=dt_conf, device=dev_conf)
        else:
            if predicted is not None and predicted[0] == g:
                # The forward's evaluation had these weights: its gradients, bit for bit
                # what an evaluation now would give.
                grads = predicted[1:]
            else:
                # The CPU backend still holds what this step's forward kept (the selected
                # rows, their probabilities, the labels): the gradients from it, no forward
                # again — unless another evaluation came in between, or on a GPU: then one
                # evaluation with gradients (the inputs were scanned in forward).
                grads = _ssdkd.gradients_of_last(
                    a["student_loc"], a["student_conf"], a["teacher_loc"], a["teacher_conf"],
                    a["targets"], a["priors"], str(ctx.opts["backend"]), step.json(g))
                if grads is None:
                    out = _evaluate_arrays(a, ctx.opts["backend"], True, False, False,
                                           step.json(g), stacklevel=2)
                    grads = (out["grad_student_conf"], out["grad_student_loc"])
            grad_conf = _torch.from_numpy(grads[0]).to(dtype=dt_conf, device=dev_conf)
            grad_loc = _torch.from_numpy(grads[1]).to(dtype=dt_loc, device=dev_loc)
        return grad_loc, grad_conf, None, None, None, None, None


def _count(name, value):
    if float(value) != int(value) or int(value) < 0:
        raise _input_error(f"config `{name}`: expected a non-negative integer, found {value}",
                           key=name)
    return int(value)


def _unsupported(name, value, supported):
    if value != supported:
        raise _input_error(f"config `{name}`: {value!r} is not supported by ssdkd (only "
                           f"{supported!r}, as in SPEC.md)", key=name)


class _Base(_torch.nn.Module):
    def _setup(self, num_classes, overlap_thresh, prior_for_matching, bkg_label, neg_mining,
               neg_pos, negatives_for_hard, variance, backend, reduction, validate):
        _unsupported("prior_for_matching", prior_for_matching, True)
        _unsupported("bkg_label", bkg_label, 0)
        _unsupported("neg_mining", neg_mining, True)
        if reduction not in ("mean", "sum"):
            raise _input_error(f"config `reduction`: {reduction!r}: expected \"mean\" or "
                               "\"sum\"", key="reduction")
        self.num_classes = num_classes
        self.threshold = overlap_thresh
        self.negpos_ratio = neg_pos
        self.variance = tuple(variance)
        self.backend = backend
        self.reduction = reduction
        self.validate = validate
        self.config = dict(
            num_classes=_count("num_classes", num_classes),
            overlap_threshold=float(overlap_thresh),
            negpos_ratio=_count("neg_pos", neg_pos),
            negatives_for_hard=_count("negatives_for_hard", negatives_for_hard),
            variance=tuple(float(v) for v in variance),
        )
        self._step = _Step(self.config)

    def _run(self, student_loc, student_conf, priors, teacher_loc, teacher_conf, targets):
        # Gradients in the forward only for a backward that will come, with weights that
        # are known: "sum" scales them by the positive count the forward finds.
        backward_follows = _torch.is_grad_enabled() and any(
            isinstance(x, _torch.Tensor) and x.requires_grad for x in (student_loc, student_conf))
        predicted = None
        if backward_follows and self.reduction == "mean":
            predicted = self._step.predicted
        opts = dict(step=self._step, backend=self.backend, reduction=self.reduction,
                    validate=self.validate, predicted=predicted)
        return _SsdkdLoss.apply(student_loc, student_conf, teacher_loc, teacher_conf,
                                pad_targets(targets), priors, opts)


class MultiBoxLoss_KD(_Base):  # noqa: N801  (the original's name)
    """The distillation loss of SPEC §5, a drop-in for the seed code base's
    ``MultiBoxLoss_KD`` (same constructor arguments, names and order).

    ``forward(predictions, pred_t, targets)``: ``predictions = (loc [B,P,4], conf [B,P,C],
    priors [P,4])``, ``pred_t = (loc, conf, ...)`` (the teacher's outputs; they get no
    gradient), ``targets`` a list of per-image ``[M_i, 5]`` tensors or a padded
    ``[B, M, 5]`` tensor (label < 0 = padding). Returns ``(soft_loss, l2_loss, loss_c,
    loss_l)`` as 0-d tensors on the inputs' device and dtype; with ``reduction="sum"``,
    ``(soft_sum, l2_sum, conf_sum, loc_sum, num_pos)`` (see :func:`global_terms`).

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
        self._setup(num_classes, overlap_thresh, prior_for_matching, bkg_label, neg_mining,
                    neg_pos, negatives_for_hard, variance, backend, reduction, validate)
        self.neg_w, self.pos_w, self.T, self.reg_m = neg_w, pos_w, Temp, reg_m
        self.config.update(temperature=float(Temp), pos_w=float(pos_w), neg_w=float(neg_w),
                           reg_m=float(reg_m))

    def forward(self, predictions, pred_t, targets):
        """Returns ``(soft_loss, l2_loss, loss_c, loss_l)`` (see the class)."""
        loc, conf, priors = predictions[0], predictions[1], predictions[2]
        return self._run(loc, conf, priors, pred_t[0], pred_t[1], targets)


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
                    neg_pos, negatives_for_hard, variance, backend, reduction, validate)

    def forward(self, predictions, targets):
        """Returns ``(loss_l, loss_c)`` (see the class)."""
        loc, conf, priors = predictions[0], predictions[1], predictions[2]
        out = self._run(loc, conf, priors, None, None, targets)
        if self.reduction == "sum":
            return out[3], out[2], out[4]
        return out[3], out[2]


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
