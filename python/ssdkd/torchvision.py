"""ssdkd as the loss of torchvision's SSD models (``torchvision.models.detection.SSD``:
``ssd300_vgg16``, ``ssdlite320_mobilenet_v3_large`` or an ``SSD`` with a backbone of your
own), and distillation from one torchvision SSD into another.

- :class:`SSDLoss` has the signature of ``SSD.compute_loss`` (``targets``,
  ``head_outputs``, ``anchors``, optionally ``matched_idxs``) and returns its dict
  ``{"bbox_regression", "classification"}``, computed by ssdkd (:mod:`ssdkd.torch`); with
  ``teacher_outputs`` (the teacher's head outputs) it returns the four terms of
  ``MultiBoxLoss_KD`` (SPEC §5) under torchvision's names.
- :func:`use_ssdkd` makes a torchvision ``SSD`` use it, so that ``model(images, targets)``
  in training mode returns ssdkd's losses; :class:`Distiller` trains a student ``SSD`` from
  a frozen teacher ``SSD`` that has the same anchors.
- Conventions (torchvision → SPEC §1): anchors xyxy in pixels of the transformed image →
  priors ``cx, cy, w, h`` normalised; target ``boxes`` xyxy in pixels → corners normalised;
  ``labels`` 1..K−1 → 0..K−2; the box coder's weights ``(wx, wy, ww, wh)`` → ``variance
  (1/wx, 1/ww)``; :data:`TORCHVISION_CONFIG` is torchvision's mining (3 negatives per
  positive, no negatives in an image without positives). The conversions run on the
  tensors' device and make one new tensor each; nothing else is copied here.
- ssdkd matches anchors to objects itself (SPEC §3, the rule of torchvision's
  ``SSDMatcher``: IoU ≥ threshold, each object's best anchor forced, a later object
  winning a shared anchor): ``matched_idxs`` is accepted for the signature and not read.
  Two differences remain: near-ties (SPEC §3.6 and §4.3 give overlaps within 1e-5 and
  equal mining scores to the lowest index, where torchvision takes the larger value or
  its sort's order), and an image with more than a quarter of its anchors positive, where
  torchvision's unclamped ``num_negative`` counts some positives twice and ssdkd counts
  each once (SPEC §4.2).
- Data-parallel training (``torch.distributed``, SPEC §5.7): build the loss with
  ``reduction="sum"`` (:class:`SSDLoss`, :func:`use_ssdkd`, :class:`Distiller`), so that
  each rank's dict holds its images' un-normalised sums and ``"num_pos"``, and pass that
  dict to :func:`global_losses`: its values are the whole batch's terms, its gradients
  this rank's share. Under ``DistributedDataParallel`` (which averages the ranks'
  gradients) backpropagate ``total(losses) * world_size``.
"""

import math as _math
from collections import OrderedDict as _OrderedDict
from collections.abc import Mapping as _Mapping

import torch as _torch

try:
    import torchvision as _torchvision  # noqa: F401
    from torchvision.models.detection.ssd import SSD as _SSD
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("ssdkd.torchvision needs torchvision: pip install './python[torchvision]' "
                      f"(or pip install torchvision); {_e}") from _e

from . import InputError
from . import torch as _st

__all__ = ["TORCHVISION_CONFIG", "KD_WEIGHTS", "SSDLoss", "Distiller", "use_ssdkd",
           "to_spec", "total", "global_losses"]

#: torchvision's matching and mining as SPEC §8 config keys: IoU ≥ 0.5 is positive,
#: 3 negatives per positive (``positive_fraction = 0.25``), and no negatives at all in an
#: image without positives (``negatives_for_hard = 0``, SPEC §4.2), variances 0.1 / 0.2
#: (box coder weights 10, 10, 5, 5).
TORCHVISION_CONFIG = {"overlap_threshold": 0.5, "negpos_ratio": 3, "negatives_for_hard": 0,
                      "variance": (0.1, 0.2)}

#: The weights of the four distillation terms in SPEC §5.6's default total, under the
#: names :class:`SSDLoss` returns them.
KD_WEIGHTS = {"soft_loss": 0.3, "classification": 0.7, "l2_loss": 0.5, "bbox_regression": 1.0}

# SPEC §8 config keys → the keyword of ssdkd.torch's constructors.
_ARGUMENTS = {"overlap_threshold": "overlap_thresh", "negpos_ratio": "neg_pos",
              "negatives_for_hard": "negatives_for_hard", "variance": "variance",
              "temperature": "Temp", "pos_w": "pos_w", "neg_w": "neg_w", "reg_m": "reg_m"}


def _error(message, key=None, tensor=None, image=None, index=None):
    e = InputError(message)
    e.tensor, e.image, e.index, e.key, e.path = tensor, image, index, key, None
    return e


def _variance(weights):
    """SPEC §3.5's variances from a torchvision box coder's ``(wx, wy, ww, wh)``."""
    try:
        wx, wy, ww, wh = (float(w) for w in weights)
    except (TypeError, ValueError):
        raise _error(f"argument `box_coder_weights`: expected four numbers, found {weights!r}",
                     key="box_coder_weights") from None
    if wx != wy or ww != wh or not all(_math.isfinite(w) and w > 0 for w in (wx, ww)):
        raise _error(f"argument `box_coder_weights`: {tuple(weights)} cannot be SPEC §3.5 "
                     "variances (needs wx == wy > 0 and ww == wh > 0)", key="box_coder_weights")
    return (1.0 / wx, 1.0 / ww)


def _image_scale(image_size, like):
    """``[W, H, W, H]`` of ``image_size = (H, W)`` as a tensor like ``like``."""
    try:
        h, w = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise _error(f"argument `image_size`: expected (height, width), found {image_size!r}",
                     key="image_size") from None
    if not (h > 0 and w > 0 and _math.isfinite(h) and _math.isfinite(w)):
        raise _error(f"argument `image_size`: {image_size!r} is not a positive size",
                     key="image_size")
    return _torch.tensor([w, h, w, h], dtype=like.dtype, device=like.device)


def _float(t):
    """``t`` itself when it is float32/float64, else as float32 (anchors made in float16
    under autocast)."""
    return t if t.dtype in (_torch.float32, _torch.float64) else t.float()


def to_spec(targets, anchors, image_size=None, validate=True, num_classes=None):
    """torchvision's ``targets`` (a list of dicts with ``boxes`` [M_i, 4] xyxy in pixels and
    ``labels`` [M_i] in 1..K−1) and ``anchors`` (a list of [P, 4] xyxy pixel tensors, one
    per image, all equal) as SPEC §1's tensors: a list of per-image ``[M_i, 5]`` targets
    (corners normalised, labels 0..K−2) and the ``[P, 4]`` priors (``cx, cy, w, h``
    normalised), on the anchors' device.

    ``image_size = (H, W)`` of the transformed images normalises the coordinates. Without
    it, each axis is divided by the largest coordinate of the anchors and boxes along it:
    every quantity of SPEC §3 (overlaps, the encoding) is unchanged by scaling an axis, so
    the terms are the same. ``validate`` checks that every label is in 1..K−1
    (``num_classes`` K) and that every image has the same anchors (one synchronisation)."""
    if not isinstance(anchors, (list, tuple)) or not anchors or not all(
            isinstance(a, _torch.Tensor) for a in anchors):
        raise _error("argument `anchors`: expected a list of [P, 4] tensors, one per image",
                     tensor="anchors")
    if not isinstance(targets, (list, tuple)):
        raise _error("argument `targets`: expected a list of dicts with `boxes` and `labels`",
                     tensor="targets")
    first = anchors[0]
    if first.dim() != 2 or first.shape[1] != 4:
        raise _error(f"tensor `anchors[0]`: shape {list(first.shape)} where [P, 4] is needed",
                     tensor="anchors", image=0)
    for i, a in enumerate(anchors[1:], 1):
        if a.shape != first.shape:
            raise _error(f"tensor `anchors[{i}]`: shape {list(a.shape)} differs from image 0's "
                         f"{list(first.shape)}; SPEC §1 has one set of priors per batch",
                         tensor="anchors", image=i)
    boxes, labels = [], []
    for i, t in enumerate(targets):
        try:
            b, lab = t["boxes"], t["labels"]
        except (TypeError, KeyError, IndexError):
            raise _error(f"argument `targets[{i}]`: expected a dict with `boxes` and `labels`",
                         tensor="targets", image=i) from None
        if not isinstance(b, _torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
            found = list(b.shape) if isinstance(b, _torch.Tensor) else type(b).__name__
            raise _error(f"tensor `targets[{i}][\"boxes\"]`: {found} where [M, 4] is needed",
                         tensor="targets", image=i)
        if not isinstance(lab, _torch.Tensor) or lab.shape != b.shape[:1]:
            found = list(lab.shape) if isinstance(lab, _torch.Tensor) else type(lab).__name__
            raise _error(f"tensor `targets[{i}][\"labels\"]`: {found} where [{b.shape[0]}] is "
                         "needed", tensor="targets", image=i)
        boxes.append(b)
        labels.append(lab)
    a = _float(first)
    if image_size is not None:
        scale = _image_scale(image_size, a)
    else:
        extent = a[:, 2:].amax(0)
        nonempty = [_float(b)[:, 2:].to(a.dtype) for b in boxes if b.shape[0]]
        if nonempty:
            extent = _torch.maximum(extent, _torch.cat(nonempty).amax(0))
        scale = extent.repeat(2)
    if validate:
        _check(anchors, labels, num_classes)
    wh = a[:, 2:] - a[:, :2]
    priors = _torch.cat((a[:, :2] + 0.5 * wh, wh), 1) / scale
    spec = [_torch.cat((_float(b) / scale.to(_float(b).dtype),
                        (lab - 1).to(_float(b).dtype).unsqueeze(1)), 1)
            for b, lab in zip(boxes, labels)]
    return spec, priors


def _check(anchors, labels, num_classes):
    """Every label in 1..K−1 and every image's anchors equal to image 0's, with one
    synchronisation; the first fault is an InputError naming it."""
    checks = []
    if labels:
        everything = _torch.cat([lab.reshape(-1) for lab in labels])
        bad = everything < 1
        if num_classes is not None:
            bad = bad | (everything >= num_classes)
        checks.append(bad.any())
    for a in anchors[1:]:
        if a is not anchors[0]:
            checks.append(_torch.ne(a, anchors[0]).any())
    if not checks or not bool(_torch.stack([c.to(checks[0].device) for c in checks]).any()):
        return
    expected = f"1..{num_classes - 1}" if num_classes is not None else "≥ 1"
    for i, lab in enumerate(labels):
        bad = (lab < 1) if num_classes is None else (lab < 1) | (lab >= num_classes)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise _error(f"tensor `targets[{i}][\"labels\"]`: index {j} is {int(lab[j])}, expected "
                         f"{expected} (0 is the background in torchvision's labels)",
                         tensor="targets", image=i, index=j)
    for i, a in enumerate(anchors[1:], 1):
        if bool(_torch.ne(a, anchors[0]).any()):
            j = int(_torch.ne(a, anchors[0]).any(1).nonzero()[0, 0])
            raise _error(f"tensor `anchors[{i}]`: anchor {j} differs from image 0's; SPEC §1 has "
                         "one set of priors per batch", tensor="anchors", image=i, index=j)


def _head(outputs, name):
    try:
        loc, conf = outputs["bbox_regression"], outputs["cls_logits"]
    except (TypeError, KeyError, IndexError):
        raise _error(f"argument `{name}`: expected a dict with `bbox_regression` and "
                     "`cls_logits`", key=name) from None
    return loc, conf


class SSDLoss(_torch.nn.Module):
    """ssdkd as ``SSD.compute_loss``: ``forward(targets, head_outputs, anchors,
    matched_idxs=None, teacher_outputs=None)``.

    - Without ``teacher_outputs``: ``{"bbox_regression", "classification"}``, the plain
      MultiBox loss (SPEC §10.1) by :class:`ssdkd.torch.MultiBoxLoss`; with
      :data:`TORCHVISION_CONFIG` (the default) equal to torchvision's own loss (see the
      module's note on ties).
    - With ``teacher_outputs`` (the teacher's ``head_outputs`` on the same images, same
      anchors and classes): ``{"soft_loss", "l2_loss", "classification",
      "bbox_regression"}``, the four terms of :class:`ssdkd.torch.MultiBoxLoss_KD`
      (SPEC §5); :func:`total` weighs them. The teacher's tensors get no gradient.
    - ``reduction="sum"``: the un-normalised sums and ``"num_pos"`` (SPEC §5.7), for
      :func:`ssdkd.torch.global_terms`.

    ``image_size = (H, W)``: the transformed images' size (see :func:`to_spec`).
    ``box_coder_weights``: the model's ``box_coder.weights`` (variances 1/wx, 1/ww).
    ``**config``: SPEC §8 keys (``overlap_threshold``, ``negpos_ratio``,
    ``negatives_for_hard``, ``variance``, ``temperature``, ``pos_w``, ``neg_w``,
    ``reg_m``) over :data:`TORCHVISION_CONFIG`. ``backend`` and ``validate`` as in
    :mod:`ssdkd.torch`. ``matched_idxs`` is not read: ssdkd matches itself (SPEC §3).
    """

    def __init__(self, image_size=None, *, box_coder_weights=None, backend="auto",
                 reduction="mean", validate=True, **config):
        super().__init__()
        unknown = [k for k in config if k not in _ARGUMENTS]
        if unknown:
            raise _error(f"config `{unknown[0]}`: not a key of ssdkd.torchvision (accepted: "
                         f"{', '.join(_ARGUMENTS)}; the terms' weights are how you combine "
                         "the returned terms, see `total`)", key=unknown[0])
        config = dict(TORCHVISION_CONFIG, **config)
        if box_coder_weights is not None:
            variance = _variance(box_coder_weights)
            if "variance" in config and config["variance"] is not TORCHVISION_CONFIG["variance"] \
                    and tuple(config["variance"]) != variance:
                raise _error(f"config `variance`: {tuple(config['variance'])} differs from the box "
                             f"coder's {variance} (weights {tuple(box_coder_weights)})",
                             key="variance")
            config["variance"] = variance
        if image_size is not None:
            _image_scale(image_size, _torch.zeros(()))
        self.image_size = None if image_size is None else tuple(image_size)
        self.config = config
        self.validate = validate
        args = {_ARGUMENTS[k]: v for k, v in config.items()}
        plain = {k: v for k, v in args.items() if k not in ("Temp", "pos_w", "neg_w", "reg_m")}
        common = dict(backend=backend, reduction=reduction, validate=validate)
        # num_classes is read at each forward from the logits; 2 checks the config now.
        self.plain = _st.MultiBoxLoss(2, **plain, **common)
        self.kd = _st.MultiBoxLoss_KD(2, **args, **common)

    def forward(self, targets, head_outputs, anchors, matched_idxs=None, teacher_outputs=None):
        """The loss dict (see the class)."""
        loc, conf = _head(head_outputs, "head_outputs")
        if not isinstance(conf, _torch.Tensor) or conf.dim() != 3:
            raise _error("tensor `head_outputs[\"cls_logits\"]`: expected [N, P, K]",
                         tensor="student_conf")
        teacher = None
        if teacher_outputs is not None:
            teacher = _head(teacher_outputs, "teacher_outputs")
            _same_head(loc, conf, *teacher)
        if len(targets) != conf.shape[0] or len(anchors) != conf.shape[0]:
            raise _error(f"argument `targets`/`anchors`: {len(targets)} targets and "
                         f"{len(anchors)} anchor sets for {conf.shape[0]} images", tensor="targets")
        spec, priors = to_spec(targets, anchors, self.image_size, self.validate, conf.shape[-1])
        loss = self.plain if teacher is None else self.kd
        loss.num_classes = conf.shape[-1]
        if teacher is None:
            out = loss((loc, conf, priors), spec)
            result = {"bbox_regression": out[0], "classification": out[1]}
            if len(out) == 3:
                result["num_pos"] = out[2]
            return result
        out = loss((loc, conf, priors), teacher, spec)
        result = {"soft_loss": out[0], "l2_loss": out[1], "classification": out[2],
                  "bbox_regression": out[3]}
        if len(out) == 5:
            result["num_pos"] = out[4]
        return result


def _same_head(loc, conf, t_loc, t_conf):
    """The teacher's head outputs have the student's anchors and classes."""
    if not all(isinstance(t, _torch.Tensor) for t in (loc, conf, t_loc, t_conf)):
        raise _error("argument `teacher_outputs`: expected tensors", key="teacher_outputs")
    if t_conf.dim() != 3 or t_conf.shape[-1] != conf.shape[-1]:
        raise _error(f"number of classes differs: the student has {conf.shape[-1]}, the teacher "
                     f"{t_conf.shape[-1] if t_conf.dim() == 3 else list(t_conf.shape)}",
                     tensor="teacher_conf")
    if t_conf.shape[1] != conf.shape[1] or t_loc.shape[:2] != loc.shape[:2]:
        raise _error(f"number of anchors differs: the student has {conf.shape[1]}, the teacher "
                     f"{t_conf.shape[1]}", tensor="teacher_conf")
    if t_conf.shape[0] != conf.shape[0]:
        raise _error(f"number of images differs: the student has {conf.shape[0]}, the teacher "
                     f"{t_conf.shape[0]}", tensor="teacher_conf")


def total(losses, weights=None):
    """The weighted sum of a loss dict of :class:`SSDLoss`; ``weights`` defaults to
    :data:`KD_WEIGHTS` (SPEC §5.6) for the four distillation terms and to 1 for each of
    the two plain terms (torchvision's ``sum(losses.values())``)."""
    if weights is None:
        weights = KD_WEIGHTS if "soft_loss" in losses else {"bbox_regression": 1.0,
                                                             "classification": 1.0}
    return sum(w * losses[k] for k, w in weights.items())


def global_losses(losses, group=None):
    """The whole batch's loss dict from one rank's ``reduction="sum"`` dict (its sums and
    ``"num_pos"``), by :func:`ssdkd.torch.global_terms` over ``group``: each term's value
    is the global sum over the global N = max(Σ num_pos, 1), its gradient this rank's sum
    over that N (SPEC §5.7). Returns the dict without ``"num_pos"``."""
    if not isinstance(losses, _Mapping) or "num_pos" not in losses:
        raise _error("argument `losses`: expected the dict of a loss built with "
                     "reduction=\"sum\" (it holds `num_pos`)", key="losses")
    conf, loc = losses["classification"], losses["bbox_regression"]
    if "soft_loss" in losses:
        soft, l2 = losses["soft_loss"], losses["l2_loss"]
    else:
        soft = l2 = conf.new_zeros(())
    soft, l2, conf, loc = _st.global_terms(soft, l2, conf, loc, losses["num_pos"], group=group)
    out = {"bbox_regression": loc, "classification": conf}
    if "soft_loss" in losses:
        out = {"soft_loss": soft, "l2_loss": l2, "classification": conf, "bbox_regression": loc}
    return out


def _model_config(model, config):
    """The SSDLoss arguments that reproduce ``model``'s own loss, with ``config`` over them."""
    if not isinstance(model, _SSD):
        raise _error(f"argument `model`: expected a torchvision.models.detection.SSD, found "
                     f"{type(model).__name__}", key="model")
    ratio = float(model.neg_to_pos_ratio)
    if not ratio.is_integer() and "negpos_ratio" not in config:
        raise _error(f"attribute `neg_to_pos_ratio`: {ratio} (from positive_fraction) is not an "
                     "integer; SPEC §8 needs an integer negpos_ratio (pass negpos_ratio=...)",
                     key="neg_to_pos_ratio")
    matcher = model.proposal_matcher
    threshold = float(getattr(matcher, "high_threshold", 0.5))
    base = dict(TORCHVISION_CONFIG, overlap_threshold=threshold, negpos_ratio=int(ratio))
    base.pop("variance")
    base.update(config)
    size = model.transform.fixed_size
    return dict(image_size=None if size is None else (size[1], size[0]),
                box_coder_weights=model.box_coder.weights, **base)


def use_ssdkd(model, *, backend="auto", reduction="mean", validate=True, **config):
    """Makes the torchvision ``SSD`` ``model`` compute its loss with ssdkd: in training mode
    ``model(images, targets)`` returns ``{"bbox_regression", "classification"}`` from an
    :class:`SSDLoss` with the model's IoU threshold, negative ratio, box coder and image
    size (``**config`` SPEC §8 keys over them). The loss is the module ``model.ssdkd_loss``.
    ``reduction="sum"`` returns the sums and ``"num_pos"`` for :func:`global_losses`.
    Returns the model."""
    loss = SSDLoss(backend=backend, reduction=reduction, validate=validate,
                   **_model_config(model, config))
    model.ssdkd_loss = loss
    # An instance attribute: SSD.forward's `self.compute_loss(...)` finds it first.
    object.__setattr__(model, "compute_loss", loss)
    return model


def _features(model, tensors):
    features = model.backbone(tensors)
    if isinstance(features, _torch.Tensor):
        features = _OrderedDict([("0", features)])
    return list(features.values())


def _describe_anchors(student, teacher):
    """What differs between two anchor tensors, or None when they are equal."""
    if student.shape != teacher.shape:
        return (f"anchors differ in number: the student has P = {student.shape[0]}, the teacher "
                f"P = {teacher.shape[0]}")
    if _torch.equal(student, teacher):
        return None
    j = int(_torch.ne(student, teacher).any(1).nonzero()[0, 0])
    same_set = _torch.equal(_torch.unique(student, dim=0), _torch.unique(teacher, dim=0))
    what = "order" if same_set else "sizes or positions"
    return (f"anchors differ in {what}: anchor {j} is {student[j].tolist()} for the student and "
            f"{teacher[j].tolist()} for the teacher")


def _transform_differences(student, teacher):
    s, t = student.transform, teacher.transform
    for name in ("fixed_size", "min_size", "max_size", "size_divisible"):
        if getattr(s, name, None) != getattr(t, name, None):
            return (f"transformed image size differs: `transform.{name}` is "
                    f"{getattr(s, name, None)} for the student, {getattr(t, name, None)} for the "
                    "teacher")
    for name in ("image_mean", "image_std"):
        if list(getattr(s, name)) != list(getattr(t, name)):
            return (f"image normalisation differs: `transform.{name}` is {getattr(s, name)} for "
                    f"the student, {getattr(t, name)} for the teacher")
    return None


class Distiller(_torch.nn.Module):
    """A student torchvision ``SSD`` trained from a frozen teacher ``SSD`` with ssdkd's
    distillation loss (SPEC §5, :class:`ssdkd.torch.MultiBoxLoss_KD`).

    ``forward(images, targets)`` (torchvision's inputs) transforms the images with the
    student's transform, runs the student, runs the teacher without gradient on the same
    transformed images, and returns ``{"soft_loss", "l2_loss", "classification",
    "bbox_regression"}`` (:func:`total` weighs them). In eval mode the same terms are
    computed with the student in eval mode (validation losses). The teacher stays in eval
    mode and gets no gradient.

    The two models must have the same transform (image size and normalisation), the same
    number of classes and the same anchors (number, sizes and order, checked on the first
    batch of each image size): any difference is an :class:`ssdkd.InputError` naming it.
    ``**config``: SPEC §8 keys over the student's own (see :func:`use_ssdkd`), e.g.
    ``temperature``, ``neg_w``, ``reg_m``. ``reduction="sum"``: the sums and ``"num_pos"``
    for :func:`global_losses`.
    """

    def __init__(self, student, teacher, *, backend="auto", reduction="mean", validate=True,
                 **config):
        super().__init__()
        settings = _model_config(student, config)
        if not isinstance(teacher, _SSD):
            raise _error(f"argument `teacher`: expected a torchvision.models.detection.SSD, "
                         f"found {type(teacher).__name__}", key="teacher")
        differs = _transform_differences(student, teacher)
        if differs:
            raise _error(differs, key="transform")
        s_classes, t_classes = _num_classes(student), _num_classes(teacher)
        if s_classes is not None and t_classes is not None and s_classes != t_classes:
            raise _error(f"number of classes differs: the student has {s_classes}, the teacher "
                         f"{t_classes}", key="num_classes")
        self.student, self.teacher = student, teacher
        self.loss = SSDLoss(backend=backend, reduction=reduction, validate=validate, **settings)
        self._checked = set()
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode=True):
        """Sets the student's mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images, targets):
        """The four distillation terms (see the class)."""
        if targets is None:
            raise _error("argument `targets`: needed for the distillation loss", key="targets")
        images, targets = self.student.transform(images, targets)
        features = _features(self.student, images.tensors)
        head = self.student.head(features)
        anchors = self.student.anchor_generator(images, features)
        with _torch.no_grad():
            t_features = _features(self.teacher, images.tensors)
            t_head = self.teacher.head(t_features)
            key = (tuple(images.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in features),
                   tuple(tuple(f.shape[-2:]) for f in t_features))
            if key not in self._checked:
                t_anchors = self.teacher.anchor_generator(images, t_features)
                differs = _describe_anchors(anchors[0], t_anchors[0])
                if differs:
                    raise _error(differs, tensor="anchors")
                self._checked.add(key)
        return self.loss(targets, head, anchors, teacher_outputs=t_head)


def _num_classes(model):
    head = getattr(model.head, "classification_head", None)
    return getattr(head, "num_columns", None)
