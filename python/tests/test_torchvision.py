"""ssdkd.torchvision against torchvision's own SSD loss (``SSD.compute_loss``), in float64:
the terms and their gradients on random batches over three anchor sets (ssd300_vgg16's, a
custom-backbone SSD's and a non-square one's), the model's own call through `use_ssdkd`,
the distillation path and the errors.

Where ssdkd and torchvision may take different decisions by rule (SPEC §3.6 and §4.3's
near-ties, SPEC §4.2's clamp where torchvision counts some positives twice), each batch's
decisions (ssdkd's labels and negative mask against torchvision's) are compared: a batch
whose decisions differ must be explained by a near-tie found in torchvision's own numbers
and is counted apart; the unclamped-negatives corner is checked against torchvision's
value less its second count of those positives."""

import math
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from collections import OrderedDict  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torchvision.models.detection.ssd import SSD, ssd300_vgg16  # noqa: E402
from torchvision.models.detection import _utils as det_utils  # noqa: E402
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

import ssdkd  # noqa: E402
import ssdkd.torch as st  # noqa: E402
import ssdkd.torchvision as stv  # noqa: E402

TIE = 2e-5  # wider than SPEC §3.6's 1e-5: what may be decided by a near-tie
BATCHES_PER_SET = 20


# --------------------------------------------------------------------------- tolerances


def term_close(actual, expected):
    """SPEC §7.1 on a loss term."""
    if abs(expected) < 1e-2:
        return abs(actual - expected) <= 1e-6
    return abs(actual - expected) <= 1e-4 * abs(expected)


def assert_grad_close(actual, expected, what):
    """SPEC §7.1 on every gradient element."""
    bound = 1e-3 * expected.abs() + 1e-7
    worst = ((actual - expected).abs() - bound).max()
    assert worst <= 0, f"{what}: gradient off by {float(worst):.3g} beyond SPEC §7.1"


# --------------------------------------------------------------------------- models and anchors


class SmallBackbone(torch.nn.Module):
    """Three feature maps at strides 8, 16, 32."""

    def __init__(self, width=8):
        super().__init__()
        w = width
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, w, 3, 4, 1), torch.nn.ReLU(),
                                     torch.nn.Conv2d(w, w, 3, 2, 1), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(w, w, 3, 2, 1), torch.nn.ReLU())
        self.c = torch.nn.Sequential(torch.nn.Conv2d(w, w, 3, 2, 1), torch.nn.ReLU())
        self.out_channels = [w, w, w]

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        return OrderedDict([("0", a), ("1", b), ("2", self.c(b))])


def small_ssd(size=(128, 128), num_classes=5, aspect_ratios=((2,), (2, 3), (2,)),
              scales=(0.125, 0.3125, 0.5625, 0.875), steps=(8, 16, 32), width=8, seed=0):
    torch.manual_seed(seed)
    generator = DefaultBoxGenerator([list(r) for r in aspect_ratios], scales=list(scales),
                                    steps=None if steps is None else list(steps))
    return SSD(SmallBackbone(width), generator, size, num_classes)


def anchors_of(generator, image_hw, grids, batch):
    """The generator's pixel anchors for `batch` images of `image_hw` and feature maps of
    `grids` (sizes (h, w)), as SSD.forward makes them, in float64."""
    images = ImageList(torch.zeros(batch, 3, *image_hw), [tuple(image_hw)] * batch)
    features = [torch.zeros(1, 1, h, w, dtype=torch.float64) for h, w in grids]
    return generator(images, features)


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return ssd300_vgg16(weights=None, weights_backbone=None)


def anchor_sets(vgg):
    """(name, generator, (H, W), grids, K): ssd300_vgg16's, a custom backbone's on 128 px
    (clamped negatives fall short of P on a crowded image) and a non-square one without
    steps."""
    return [
        ("ssd300_vgg16", vgg.anchor_generator, (300, 300),
         [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)], 21),
        ("custom 128", small_ssd().anchor_generator, (128, 128), [(16, 16), (8, 8), (4, 4)], 5),
        ("custom 96x160", small_ssd(size=(160, 96), steps=None).anchor_generator, (96, 160),
         [(12, 20), (6, 10), (3, 5)], 4),
    ]


def random_targets(rng, hw, count, num_classes, crowded=False):
    h, w = hw
    n = count if not crowded else 40
    lo = 0.05 if not crowded else 0.3
    size = rng.uniform(lo, 0.9, (n, 2)) * [w, h]
    corner = rng.uniform(0, 1, (n, 2)) * ([w, h] - size)
    boxes = np.concatenate([corner, corner + size], 1)
    labels = rng.integers(1, num_classes, n)
    return {"boxes": torch.from_numpy(boxes).double().reshape(-1, 4),
            "labels": torch.from_numpy(labels).long()}


def crowded_targets(rng, hw, anchors, num_classes):
    """An image crowded with objects: 40 large ones where P is large; else one object on
    each first-map square anchor inside the image (each then has 3 positive anchors:
    itself and its aspect-2 pair, IoU 0.55), so that more than a quarter of P is
    positive."""
    h, w = hw
    if anchors.shape[0] > 4000:
        return random_targets(rng, hw, 0, num_classes, crowded=True)
    square = anchors[: anchors.shape[0] // 2 : 4]
    inside = (square[:, :2] >= 1).all(1) & (square[:, 2] <= w - 1) & (square[:, 3] <= h - 1)
    boxes = square[inside]
    return {"boxes": boxes.double(),
            "labels": torch.from_numpy(rng.integers(1, num_classes, boxes.shape[0])).long()}


def random_batch(rng, hw, anchors, num_classes, kind):
    """A batch of `kind` "empty" (no image has objects), "crowded" (image 0 crowded, see
    crowded_targets) or "random" (0 to 6 objects per image)."""
    b = len(anchors)
    p = anchors[0].shape[0]
    if kind == "empty":
        targets = [random_targets(rng, hw, 0, num_classes) for _ in range(b)]
    else:
        targets = [random_targets(rng, hw, int(rng.integers(0, 7)), num_classes) for i in range(b)]
        if kind == "crowded":
            targets[0] = crowded_targets(rng, hw, anchors[0], num_classes)
    head = {"bbox_regression": torch.from_numpy(rng.normal(0, 1.0, (b, p, 4))),
            "cls_logits": torch.from_numpy(rng.normal(0, 1.5, (b, p, num_classes)))}
    return targets, head


# --------------------------------------------------------------------------- torchvision's side


def torchvision_loss(targets, head, anchors):
    """torchvision's own loss: SSD.forward's matching (SSDMatcher(0.5) on box_iou) and
    SSD.compute_loss, on a stand-in with the attributes it reads."""
    matcher = det_utils.SSDMatcher(0.5)
    ious = [box_iou(t["boxes"], a) if t["boxes"].numel() else None for t, a in zip(targets, anchors)]
    matched = [torch.full((a.shape[0],), -1, dtype=torch.int64) if iou is None else matcher(iou)
               for iou, a in zip(ious, anchors)]
    owner = types.SimpleNamespace(box_coder=det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)),
                                  neg_to_pos_ratio=3.0)
    return SSD.compute_loss(owner, targets, head, anchors, matched), matched, ious


def torchvision_decisions(targets, head, matched):
    """torchvision's labels, selected negatives and per-anchor cross-entropy, as
    SSD.compute_loss derives them."""
    conf = head["cls_logits"].detach()
    labels = torch.stack([torch.where(m >= 0, t["labels"][m.clamp(min=0)], 0) if t["labels"].numel()
                          else torch.zeros_like(m) for t, m in zip(targets, matched)])
    ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), labels.reshape(-1),
                         reduction="none").view(labels.shape)
    fg = labels > 0
    num_negative = 3.0 * fg.sum(1, keepdim=True)
    negative = ce.clone()
    negative[fg] = -float("inf")
    _, idx = negative.sort(1, descending=True)
    background = idx.sort(1)[1] < num_negative
    return labels, background, ce


def near_ties(ious, anchors, labels, ce):
    """Per image: (matching near-tie, mining near-tie, unclamped corner) in torchvision's
    float64 numbers (`ious` its overlaps, None for an image without objects)."""
    out = []
    for i, (iou, a) in enumerate(zip(ious, anchors)):
        match_tie = mine_tie = False
        if iou is not None:
            match_tie |= bool(((iou - 0.5).abs() <= TIE * 0.5).any())
            if iou.shape[0] > 1:
                top = iou.topk(2, dim=0).values
                close = (top[0] - top[1] <= TIE * top[0]) & (top[0] != top[1])
                match_tie |= bool((close & (top[0] >= 0.5 * (1 - TIE))).any())
            best = iou.max(1, keepdim=True).values
            for row, m in zip(iou >= best * (1 - TIE), iou):
                candidates = row.nonzero()[:, 0]
                match_tie |= len(candidates) > 1 and int(m.argmax()) != int(candidates[0])
        p = a.shape[0]
        pos = int((labels[i] > 0).sum())
        corner = 3 * pos > p - pos
        if pos and not corner:
            scores = ce[i][labels[i] == 0].sort(descending=True).values
            k = 3 * pos
            mine_tie = bool(scores[k - 1] - scores[k] <= TIE * scores[k - 1])
        out.append((match_tie, mine_tie, corner))
    return out


def padded(spec_targets):
    m = max([1] + [t.shape[0] for t in spec_targets])
    out = np.zeros((len(spec_targets), m, 5), np.float32)
    out[..., 4] = -1
    for i, t in enumerate(spec_targets):
        out[i, : t.shape[0]] = t.detach().numpy()
    return out


# --------------------------------------------------------------------------- equality


def test_equals_torchvision_compute_loss_on_random_batches(vgg):
    """≥ 50 float64 batches: both terms within SPEC §7.1 of SSD.compute_loss and the
    gradients of a random combination within SPEC §7.1 of autograd through it."""
    rng = np.random.default_rng(27)
    loss = stv.SSDLoss(backend="cpu")
    counted = dict(batches=0, empty=0, crowded=0, corner=0, tie_decided=0, near_tie=0)
    for name, generator, hw, grids, k in anchor_sets(vgg):
        for n in range(BATCHES_PER_SET):
            kind = "empty" if n == 0 else "crowded" if n in (1, 2) else "random"
            b = 1 + n % 2
            anchors = anchors_of(generator, hw, grids, b)
            targets, head = random_batch(rng, hw, anchors, k, kind)
            what = f"{name} batch {n} ({kind})"
            counted["batches"] += 1
            counted["empty"] += kind == "empty"
            counted["crowded"] += kind == "crowded"

            theirs_head = {key: v.clone().requires_grad_() for key, v in head.items()}
            theirs, matched, ious = torchvision_loss(targets, theirs_head, anchors)
            labels, background, ce = torchvision_decisions(targets, head, matched)
            ties = near_ties(ious, anchors, labels, ce)

            spec, priors = stv.to_spec(targets, anchors, hw)
            ev = ssdkd.evaluate(head["bbox_regression"].numpy().astype(np.float32),
                                head["cls_logits"].numpy().astype(np.float32), None, None,
                                padded(spec), priors.numpy().astype(np.float32),
                                backend="cpu", decisions=True, **stv.TORCHVISION_CONFIG)
            conf_target = torch.from_numpy(np.asarray(ev.conf_target)).long().view_as(labels)
            neg_mask = torch.from_numpy(np.asarray(ev.neg_mask)).bool().view_as(labels)
            decided_by_tie = False
            for i, (match_tie, mine_tie, corner) in enumerate(ties):
                if not torch.equal(conf_target[i], labels[i]):
                    assert match_tie, f"{what}, image {i}: labels differ without a near-tie"
                    decided_by_tie = True
                    continue
                negatives = labels[i] == 0
                if corner:
                    # SPEC §4.2 takes every negative; torchvision too, plus some positives.
                    assert bool(neg_mask[i][negatives].all()), what
                    counted["corner"] += 1
                elif not torch.equal(neg_mask[i], background[i]):
                    assert mine_tie, f"{what}, image {i}: negatives differ without a near-tie"
                    decided_by_tie = True
            counted["near_tie"] += any(t[0] or t[1] for t in ties)
            if decided_by_tie:
                counted["tie_decided"] += 1
                continue

            # torchvision's value with each positive counted once (the corner's difference).
            fg = labels > 0
            twice = background & fg
            n_fg = max(1, int(fg.sum()))
            expected_cls = theirs["classification"] - (
                F.cross_entropy(theirs_head["cls_logits"].reshape(-1, k), labels.reshape(-1),
                                reduction="none").view(labels.shape)[twice].sum() / n_fg)
            ours_head = {key: v.clone().requires_grad_() for key, v in head.items()}
            ours = loss(targets, ours_head, anchors)
            assert set(ours) == {"bbox_regression", "classification"}
            assert ours["classification"].dtype == torch.float64
            for key, exp in (("bbox_regression", theirs["bbox_regression"]),
                             ("classification", expected_cls)):
                got, exp = float(ours[key].detach()), float(exp.detach())
                assert term_close(got, exp), (what, key, got, exp)
            a, c = rng.uniform(0.2, 2.0, 2)
            (a * expected_cls + c * theirs["bbox_regression"]).backward()
            (a * ours["classification"] + c * ours["bbox_regression"]).backward()
            for key in head:
                assert_grad_close(ours_head[key].grad, theirs_head[key].grad, f"{what} {key}")
    print(f"\ntorchvision equality: {counted}")
    assert counted["batches"] >= 50 and counted["empty"] >= 3 and counted["crowded"] >= 6
    assert counted["corner"] >= 1, "the crowded custom batches reach the unclamped corner"
    assert counted["tie_decided"] <= counted["batches"] // 10, counted


def test_priors_are_torchvision_default_boxes(vgg):
    """The priors converted from pixel anchors are DefaultBoxGenerator's own normalised
    boxes, before it scales them to pixels."""
    for name, generator, hw, grids, _ in anchor_sets(vgg):
        anchors = anchors_of(generator, hw, grids, 2)
        _, priors = stv.to_spec([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()}] * 2,
                                anchors, hw)
        boxes = generator._grid_default_boxes(grids, list(hw), dtype=torch.float64)
        assert priors.shape == boxes.shape, name
        assert torch.allclose(priors, boxes, atol=1e-12), name
    # ssd300_vgg16's 8732 anchors, other sizes than SPEC §2.2's ssd300 priors
    assert anchors_of(vgg.anchor_generator, (300, 300), anchor_sets(vgg)[0][3], 1)[0].shape == (8732, 4)


def test_scale_of_an_axis_does_not_change_the_terms(vgg):
    """Without image_size each axis is divided by its largest coordinate: same terms."""
    rng = np.random.default_rng(3)
    _, generator, hw, grids, k = anchor_sets(vgg)[2]
    anchors = anchors_of(generator, hw, grids, 2)
    targets, head = random_batch(rng, hw, anchors, k, "random")
    targets[0] = random_targets(rng, hw, 3, k)
    with_size = stv.SSDLoss(hw, backend="cpu")(targets, head, anchors)
    without = stv.SSDLoss(backend="cpu")(targets, head, anchors)
    theirs = torchvision_loss(targets, head, anchors)[0]
    for key in theirs:
        assert term_close(float(with_size[key]), float(theirs[key])), key
        assert term_close(float(without[key]), float(theirs[key])), key


def test_preset_has_no_negatives_without_positives():
    """TORCHVISION_CONFIG is a valid SPEC §8 config whose image without positives mines no
    negatives (SPEC §4.2 with negatives_for_hard 0), where SPEC's default mines 100."""
    t = ssdkd.testing.synthetic_batch(batch=1, classes=4, preset="mobilenet300", seed=2)
    t["targets"][...] = -1
    ours = ssdkd.evaluate(**t, backend="cpu", **stv.TORCHVISION_CONFIG)
    default = ssdkd.evaluate(**t, backend="cpu")
    assert (ours.num_pos, ours.num_neg, ours.loss_c, ours.loss_l) == (0, 0, 0.0, 0.0)
    assert default.num_neg == 100 and default.loss_c > 0


# --------------------------------------------------------------------------- the model's own call


def training_batch(rng, hw, count, num_classes, batch=2):
    images = [torch.rand(3, *hw) for _ in range(batch)]
    targets = [random_targets(rng, hw, count, num_classes) for _ in range(batch)]
    return images, [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets]


def test_use_ssdkd_on_ssd300_vgg16_equals_the_models_losses(vgg):
    rng = np.random.default_rng(5)
    vgg.train()
    images, targets = training_batch(rng, (300, 300), 4, 91)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    with torch.no_grad():
        own = vgg(images, targets)
        model = stv.use_ssdkd(vgg, backend="cpu")
        assert model is vgg and isinstance(vgg.ssdkd_loss, stv.SSDLoss)
        ours = vgg(images, targets)
    del vgg.compute_loss  # the module fixture's model back to its own loss
    assert set(ours) == set(own) == {"bbox_regression", "classification"}
    for key in own:
        assert term_close(float(ours[key]), float(own[key])), (key, float(ours[key]), float(own[key]))


def test_use_ssdkd_trains_a_custom_ssd():
    """A training step through model(images, targets): the losses are the model's own and
    every head parameter gets a gradient."""
    rng = np.random.default_rng(6)
    model = small_ssd().train()
    images, targets = training_batch(rng, (128, 128), 3, 5)
    torch.manual_seed(1)
    own = model(images, targets)
    stv.use_ssdkd(model, backend="cpu")
    ours = model(images, targets)
    for key in own:
        assert term_close(float(ours[key].detach()), float(own[key].detach())), key
    stv.total(ours).backward()
    for name, p in model.head.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_autocast_and_sum_reduction_go_through():
    """Under CPU autocast (bfloat16 head outputs and anchors) the terms are float32 and
    equal the float32 ones within bfloat16's rounding; reduction="sum" gives the sums and
    the positive count of SPEC §5.7."""
    rng = np.random.default_rng(8)
    model = small_ssd().train()
    images, targets = training_batch(rng, (128, 128), 3, 5)
    stv.use_ssdkd(model, backend="cpu")
    plain = model(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(images, targets)
    for key in plain:
        assert mixed[key].dtype == torch.float32
        assert abs(float(mixed[key].detach()) - float(plain[key].detach())) <= 0.05 * float(plain[key].detach())
    stv.total(mixed).backward()
    anchors, targets, head, _ = kd_batch(9)
    mean = stv.SSDLoss(backend="cpu")(targets, head, anchors)
    sums = stv.SSDLoss(backend="cpu", reduction="sum")(targets, head, anchors)
    n = int(sums["num_pos"])
    assert n > 0
    for key in mean:
        assert term_close(float(sums[key]) / n, float(mean[key])), key


# --------------------------------------------------------------------------- recipes: GradScaler, DDP


def recipe_models(kind, seed=0):
    """(module, parameters) of a small custom SSD through the adapter: `use_ssdkd(model)`
    ("plain") or a Distiller from a wider teacher ("distill"), the same weights for the same
    seed; `reduction` goes to the loss."""

    def build(reduction="mean"):
        if kind == "plain":
            model = stv.use_ssdkd(small_ssd(seed=seed), backend="cpu", reduction=reduction)
            return model.train(), list(model.parameters())
        student, teacher = small_ssd(width=4, seed=seed), small_ssd(width=12, seed=seed + 1)
        distiller = stv.Distiller(student, teacher, backend="cpu", reduction=reduction,
                                  temperature=2.0)
        return distiller.train(), list(student.parameters())

    return build


def recipe_batch(seed, batch):
    """`batch` 128 px images (the last without objects) and their targets."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images, targets = training_batch(rng, (128, 128), 3, 5, batch=batch)
    targets[-1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, targets


@pytest.mark.parametrize("kind", ["plain", "distill"])
def test_grad_scaler_step_equals_the_unscaled_step(kind):
    """A GradScaler step (torch.amp.GradScaler("cpu")) through the adapter: the scaled
    gradients are the scale times the plain ones, unscale_ gives the plain gradients within
    SPEC §7.1, no overflow is found (the scale stays) and the SGD step equals the plain
    one."""
    build = recipe_models(kind)
    images, targets = recipe_batch(21, 2)
    plain, plain_params = build()
    plain_opt = torch.optim.SGD(plain_params, lr=0.1)
    stv.total(plain(images, targets)).backward()
    expected = [p.grad.clone() for p in plain_params]
    plain_opt.step()

    scaled, params = build()
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scale = scaler.get_scale()
    assert scale == 65536.0
    scaler.scale(stv.total(scaled(images, targets))).backward()
    assert any(bool(p.grad.abs().sum() > 0) for p in params)
    for i, (p, g) in enumerate(zip(params, expected)):
        assert_grad_close(p.grad / scale, g, f"{kind} scaled parameter {i}")
    scaler.unscale_(opt)
    for i, (p, g) in enumerate(zip(params, expected)):
        assert_grad_close(p.grad, g, f"{kind} unscaled parameter {i}")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale  # no inf/NaN found in the gradients
    for i, (p, q) in enumerate(zip(params, plain_params)):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), f"{kind} parameter {i} after the step"


DDP_IMAGES_PER_RANK = 2


def ddp_worker():
    """One rank of the 2-process gloo run (`torchrun ... test_torchvision.py ddp`): each
    recipe's model under DistributedDataParallel on this rank's images, the loss with
    reduction="sum" and global_losses, backward of total * world size (DDP averages). Rank 0
    then runs the whole batch in one process and prints one JSON line per recipe."""
    import json

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, targets = recipe_batch(31, DDP_IMAGES_PER_RANK * world)
    shard = slice(rank * DDP_IMAGES_PER_RANK, (rank + 1) * DDP_IMAGES_PER_RANK)
    for kind in ("plain", "distill"):
        build = recipe_models(kind)
        module, params = build("sum")
        ddp = DistributedDataParallel(module)
        sums = ddp(images[shard], targets[shard])
        losses = stv.global_losses(sums)
        (stv.total(losses) * world).backward()
        num_pos = sums["num_pos"].detach().clone().double()
        dist.all_reduce(num_pos)
        grads = torch.cat([p.grad.flatten() for p in params])
        gathered = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        if rank == 0:
            single, single_params = build()
            whole = single(images, targets)
            stv.total(whole).backward()
            expected = torch.cat([p.grad.flatten() for p in single_params])
            bound = 1e-3 * expected.abs() + 1e-7
            print(json.dumps({
                "kind": kind, "world_size": world,
                "num_pos": [float(sums["num_pos"]), float(num_pos)],
                "ddp": {k: float(v.detach()) for k, v in losses.items()},
                "single": {k: float(v.detach()) for k, v in whole.items()},
                "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
                "grad_excess": float(((grads - expected).abs() - bound).max()),
                "grad_nonzero": int((expected != 0).sum()),
            }), flush=True)
    dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process():
    """torchrun, 2 gloo ranks on the CPU: use_ssdkd(model) and the Distiller, each under
    DistributedDataParallel with reduction="sum" and global_losses, give the whole batch's
    terms (SPEC §7.1) and its parameter gradients (SPEC §7.1 on every element) on every
    rank."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__),
           "ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert [r["kind"] for r in rows] == ["plain", "distill"], out.stdout
    for r in rows:
        assert r["world_size"] == 2
        local, whole = r["num_pos"]
        assert 0 < local < whole, r  # the global N differs from rank 0's own
        assert set(r["ddp"]) == set(r["single"]), r
        for key, exp in r["single"].items():
            assert term_close(r["ddp"][key], exp), (r["kind"], key, r["ddp"][key], exp)
        assert r["single"]["classification"] > 0 and r["single"]["bbox_regression"] > 0, r
        assert r["ranks_agree"], r
        assert r["grad_nonzero"] > 100, r
        assert r["grad_excess"] <= 0, r


# --------------------------------------------------------------------------- distillation


def kd_batch(seed, k=5):
    rng = np.random.default_rng(seed)
    anchors = anchors_of(small_ssd().anchor_generator, (128, 128), [(16, 16), (8, 8), (4, 4)], 2)
    targets, head = random_batch(rng, (128, 128), anchors, k, "random")
    targets[0] = random_targets(rng, (128, 128), 4, k)
    teacher = {"bbox_regression": torch.from_numpy(rng.normal(0, 1, head["bbox_regression"].shape)),
               "cls_logits": torch.from_numpy(rng.normal(0, 2, head["cls_logits"].shape))}
    return anchors, targets, head, teacher


def test_kd_terms_equal_multiboxloss_kd_on_the_converted_tensors():
    """The four terms and the gradient of SPEC §5.6's total equal MultiBoxLoss_KD's on
    tensors converted by hand (priors straight from DefaultBoxGenerator, boxes divided by
    the image size, labels minus one)."""
    anchors, targets, head, teacher = kd_batch(11)
    generator = small_ssd().anchor_generator
    priors = generator._grid_default_boxes([(16, 16), (8, 8), (4, 4)], [128, 128], torch.float64)
    by_hand = [torch.cat((t["boxes"] / 128.0, (t["labels"] - 1).double()[:, None]), 1) for t in targets]
    config = dict(temperature=2.0, neg_w=1.5, reg_m=0.1)
    ours_head = {key: v.clone().requires_grad_() for key, v in head.items()}
    ours = stv.SSDLoss((128, 128), backend="cpu", **config)(targets, ours_head, anchors,
                                                            teacher_outputs=teacher)
    assert set(ours) == {"soft_loss", "l2_loss", "classification", "bbox_regression"}
    kd = st.MultiBoxLoss_KD(5, 0.5, True, 0, True, 3, 0.5, False, True, 0, 1.5, 1.0, 2.0, 0.1,
                            backend="cpu")
    loc, conf = (head[k].clone().requires_grad_() for k in ("bbox_regression", "cls_logits"))
    soft, l2, loss_c, loss_l = kd((loc, conf, priors),
                                  (teacher["bbox_regression"], teacher["cls_logits"]), by_hand)
    for key, exp in (("soft_loss", soft), ("l2_loss", l2), ("classification", loss_c),
                     ("bbox_regression", loss_l)):
        assert term_close(float(ours[key]), float(exp)), key
    assert float(ours["soft_loss"]) > 0 and float(ours["l2_loss"]) > 0
    stv.total(ours).backward()
    (0.3 * soft + 0.7 * loss_c + 0.5 * l2 + loss_l).backward()
    assert_grad_close(ours_head["bbox_regression"].grad, loc.grad, "loc")
    assert_grad_close(ours_head["cls_logits"].grad, conf.grad, "conf")
    assert teacher["cls_logits"].grad is None


def test_distiller_runs_the_teacher_on_the_students_transformed_images():
    rng = np.random.default_rng(12)
    student, teacher = small_ssd(width=4, seed=1), small_ssd(width=12, seed=2)
    distiller = stv.Distiller(student, teacher, backend="cpu", temperature=2.0).train()
    assert not teacher.training and student.training
    images, targets = training_batch(rng, (100, 140), 3, 5)  # resized to 128 by the transform
    torch.manual_seed(3)
    got = distiller(images, targets)
    assert set(got) == {"soft_loss", "l2_loss", "classification", "bbox_regression"}
    stv.total(got).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters())

    # By hand: the student's transform, both heads on its output, SSDLoss with the teacher.
    with torch.no_grad():
        image_list, converted = student.transform(images, targets)
        feats = list(student.backbone(image_list.tensors).values())
        head = student.head(feats)
        anchors = student.anchor_generator(image_list, feats)
        t_head = teacher.head(list(teacher.backbone(image_list.tensors).values()))
        loss = stv.SSDLoss((128, 128), backend="cpu", temperature=2.0)
        expected = loss(converted, head, anchors, teacher_outputs=t_head)
    for key in expected:
        assert term_close(float(got[key]), float(expected[key])), key


@pytest.mark.parametrize("teacher_kwargs, message", [
    (dict(aspect_ratios=((2,), (2,), (2,))), "anchors differ in number"),
    (dict(scales=(0.1, 0.3125, 0.5625, 0.875)), "anchors differ in sizes"),
    (dict(aspect_ratios=((2,), (3, 2), (2,))), "anchors differ in order"),
    (dict(num_classes=6), "number of classes differs"),
    (dict(size=(160, 160)), "transformed image size differs"),
])
def test_distiller_refuses_each_mismatch(teacher_kwargs, message):
    rng = np.random.default_rng(13)
    student = small_ssd(seed=1)
    images, targets = training_batch(rng, (128, 128), 2, 5)
    with pytest.raises(ssdkd.InputError, match=message):
        distiller = stv.Distiller(student, small_ssd(seed=2, **teacher_kwargs), backend="cpu")
        distiller(images, targets)


def test_kd_head_mismatches_are_refused():
    anchors, targets, head, teacher = kd_batch(14)
    loss = stv.SSDLoss(backend="cpu")
    fewer = {k: v[:, :-6] for k, v in teacher.items()}
    with pytest.raises(ssdkd.InputError, match="number of anchors differs: the student has 1472"):
        loss(targets, head, anchors, teacher_outputs=fewer)
    more = dict(teacher, cls_logits=torch.zeros(*teacher["cls_logits"].shape[:2], 7).double())
    with pytest.raises(ssdkd.InputError, match="number of classes differs: the student has 5, the teacher 7"):
        loss(targets, head, anchors, teacher_outputs=more)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_are_input_errors_naming_them():
    anchors, targets, head, _ = kd_batch(15)
    loss = stv.SSDLoss(backend="cpu")
    background = [dict(t) for t in targets]
    background[0] = dict(background[0], labels=background[0]["labels"].clone())
    background[0]["labels"][2] = 0
    with pytest.raises(ssdkd.InputError, match=r'targets\[0\]\["labels"\]`: index 2 is 0') as e:
        loss(background, head, anchors)
    assert (e.value.tensor, e.value.image, e.value.index) == ("targets", 0, 2)
    too_big = [dict(t) for t in targets]
    too_big[0] = dict(too_big[0], labels=too_big[0]["labels"].clone())
    too_big[0]["labels"][1] = 5
    with pytest.raises(ssdkd.InputError, match=r"index 1 is 5, expected 1..4"):
        loss(too_big, head, anchors)
    shifted = [anchors[0], anchors[1] + 1.0]
    with pytest.raises(ssdkd.InputError, match=r"anchors\[1\]`: anchor 0 differs"):
        loss(targets, head, shifted)
    with pytest.raises(ssdkd.InputError, match="box_coder_weights"):
        stv.SSDLoss(box_coder_weights=(10.0, 5.0, 5.0, 5.0))
    with pytest.raises(ssdkd.InputError, match="config `weights`") as e:
        stv.SSDLoss(weights=(1, 1, 1, 1))
    assert e.value.key == "weights"
    with pytest.raises(ssdkd.InputError, match="overlap_threshold"):
        stv.SSDLoss(overlap_threshold=1.5)
    with pytest.raises(ssdkd.InputError, match="expected a torchvision.models.detection.SSD"):
        stv.use_ssdkd(torch.nn.Linear(2, 2))
    with pytest.raises(ssdkd.InputError, match='reduction="sum"') as e:
        stv.global_losses(loss(targets, head, anchors))  # a "mean" dict: no num_pos
    assert e.value.key == "losses"
    model = small_ssd()
    model.neg_to_pos_ratio = 2.5
    with pytest.raises(ssdkd.InputError, match="neg_to_pos_ratio"):
        stv.use_ssdkd(model)


def test_stub_names_what_the_module_has():
    import ast
    import os

    stub = os.path.join(os.path.dirname(stv.__file__), "torchvision.pyi")
    tree = ast.parse(open(stub, encoding="utf-8").read())
    stubbed = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stubbed.add(node.name)
            for item in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    assert hasattr(getattr(stv, node.name), item.name), (node.name, item.name)
        elif isinstance(node, ast.AnnAssign):
            stubbed.add(node.target.id)
    assert set(stv.__all__) == stubbed
    assert all(hasattr(stv, n) for n in stubbed)
    assert math.isfinite(stv.KD_WEIGHTS["soft_loss"])


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["ddp"]:
        ddp_worker()
