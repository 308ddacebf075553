#!/usr/bin/env python3
"""Distil a small SSD detector from a larger one with ssdkd's losses, on synthetic shapes.

The story of the original training log, on your machine in minutes:

1. "Start Teacher Train": a small SSD-style teacher learns with `ssdkd.torch.MultiBoxLoss`
   (smooth-L1 + cross-entropy with hard-negative mining).
2. "Start teacher2student_KD Train": a thinner student learns from the ground truth and the
   frozen teacher with `ssdkd.torch.MultiBoxLoss_KD`, total
   `0.3·soft + 0.7·conf + 0.5·l2 + loc`.
3. "Start student_baseline Train": the same student, from the same initialisation and seed,
   without distillation (`MultiBoxLoss`, `conf + loc`).

Then all three are evaluated on the validation split (decode with the priors and variances,
per-class NMS, mAP at IoU 0.5 by torchmetrics) and the run writes, to `--out DIR`:
`log.json` (per stage and epoch: the mean of every term on train and validation, lr, time;
the final mAPs; the command line and seed), `losses.png` and `detections.png`.

Data are made on the fly from the seed (no download): 128×128 images of 1–5 filled
rectangles, ellipses and triangles in varied colours and sizes, sometimes overlapping, on
textured noise.

    pip install ./python torchvision torchmetrics faster-coco-eval tqdm matplotlib
    python examples/distill_shapes.py --out runs/shapes            # about 3 minutes on 2 cores
    python examples/distill_shapes.py --out runs/quick --quick     # under 90 seconds

`--study` trains a teacher per seed and the student under a grid of loss variants (baseline,
the seed recipe, each distillation term alone, plain KL, temperatures, hard/soft balances),
and writes `study.json`, `study.md` and `study.png` (see `distill_study.py`):

    python examples/distill_shapes.py --study --out runs/study --threads 1
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import ssdkd
import ssdkd.torch as ssdkd_torch

CLASSES = ("rectangle", "ellipse", "triangle")
NUM_CLASSES = len(CLASSES) + 1  # class 0 is background
IMAGE_SIZE = 128
VARIANCE = (0.1, 0.2)

# Priors for the three feature maps of the models below (strides 8, 16, 32 on 128 px).
PRIOR_CONFIG = dict(
    image_size=IMAGE_SIZE,
    feature_maps=[16, 8, 4],
    steps=[8, 16, 32],
    min_sizes=[16, 40, 72],
    max_sizes=[40, 72, 112],
    aspect_ratios=[[2], [2, 3], [2]],
    clip=True,
)
BOXES_PER_CELL = [2 + 2 * len(r) for r in PRIOR_CONFIG["aspect_ratios"]]

# The original's distillation total: 0.3·soft + 0.7·conf + 0.5·l2 + loc.
KD_WEIGHTS = dict(soft_loss=0.3, loss_c=0.7, l2_loss=0.5, loss_l=1.0)

# Shown on the progress bars and logged, with the original's names.
TERM_NAMES = dict(loss_c="conf_loss", loss_l="loc_loss", l2_loss="l2_loss", soft_loss="soft_loss")


# --------------------------------------------------------------------------- data


def _shape_mask(kind, x0, y0, w, h, xx, yy):
    if kind == 0:  # rectangle
        return (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
    if kind == 1:  # ellipse inscribed in the box
        cx, cy = x0 + w / 2, y0 + h / 2
        return ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1.0
    # triangle: apex at the top centre, base along the bottom of the box
    t = (yy - y0) / h
    return (t >= 0) & (t <= 1) & (np.abs(xx - (x0 + w / 2)) <= (w / 2) * t)


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def make_split(count, seed):
    """`count` images (uint8, N×3×S×S) and their objects (a list of [M_i, 5] float32 arrays:
    xmin, ymin, xmax, ymax normalised to the image, label 0..2), all from `seed`."""
    rng = np.random.default_rng(seed)
    s = IMAGE_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    images = np.empty((count, 3, s, s), np.uint8)
    objects = []
    for i in range(count):
        base = rng.uniform(0.25, 0.75, 3).astype(np.float32)
        coarse = rng.normal(0.0, 0.10, (8, 8, 3)).astype(np.float32)
        texture = np.kron(coarse, np.ones((s // 8, s // 8, 1), np.float32))
        image = base + texture + rng.normal(0.0, 0.06, (s, s, 3)).astype(np.float32)
        boxes = []
        for _ in range(int(rng.integers(1, 6))):
            for _attempt in range(20):
                w, h = rng.uniform(14, 64, 2)
                x0, y0 = rng.uniform(0, s - w), rng.uniform(0, s - h)
                box = (x0, y0, x0 + w, y0 + h)
                # Overlaps are allowed, but no object may hide most of another.
                if all(_iou(box, b[:4]) < 0.3 for b in boxes):
                    break
            else:
                continue
            kind = int(rng.integers(0, len(CLASSES)))
            while True:  # a colour that stands out from the background
                colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
                if np.abs(colour - base).max() > 0.35:
                    break
            mask = _shape_mask(kind, x0, y0, w, h, xx, yy)
            image[mask] = colour + rng.normal(0.0, 0.03, (int(mask.sum()), 3)).astype(np.float32)
            boxes.append((x0, y0, x0 + w, y0 + h, kind))
        images[i] = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(2, 0, 1)
        b = np.array(boxes, np.float32).reshape(-1, 5)
        b[:, :4] /= s
        objects.append(b)
    return images, objects


def batches(images, objects, batch_size, generator=None):
    """Mini-batches of (float images, list of per-image [M_i, 5] targets). With a generator
    (training), shuffled and half of the images flipped left-right (every shape here is
    symmetric that way), which keeps the small training split from being memorised."""
    n = len(images)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size].numpy()
        x = torch.from_numpy(images[idx]).float().div_(255.0)
        targets = [torch.from_numpy(objects[j]).clone() for j in idx]
        if generator is not None:
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
            for t in (t for t, f in zip(targets, flip) if f):
                t[:, [0, 2]] = 1.0 - t[:, [2, 0]]
        yield x, targets


# --------------------------------------------------------------------------- models


def conv_bn(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class TinySSD(nn.Module):
    """An SSD-style detector with three feature maps (16×16, 8×8, 4×4 on 128 px) and a 3×3
    convolution head per map for box offsets and class logits, in the prior order of
    `ssdkd.priors` (cells row-major, boxes per cell innermost). `width` sets the channels:
    the teacher is wider than the student."""

    def __init__(self, width, num_classes=NUM_CLASSES):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            conv_bn(3, w, 2), conv_bn(w, 2 * w, 2), conv_bn(2 * w, 2 * w, 1),
            conv_bn(2 * w, 4 * w, 2), conv_bn(4 * w, 4 * w, 1),
        )  # 16×16
        self.down1 = nn.Sequential(conv_bn(4 * w, 8 * w, 2), conv_bn(8 * w, 8 * w, 1))  # 8×8
        self.down2 = conv_bn(8 * w, 8 * w, 2)  # 4×4
        channels = [4 * w, 8 * w, 8 * w]
        self.loc_heads = nn.ModuleList(
            nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(channels, BOXES_PER_CELL)
        )
        self.conf_heads = nn.ModuleList(
            nn.Conv2d(c, a * num_classes, 3, padding=1) for c, a in zip(channels, BOXES_PER_CELL)
        )

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.down1(f1)
        f3 = self.down2(f2)
        b = x.shape[0]
        loc = [h(f).permute(0, 2, 3, 1).reshape(b, -1, 4) for h, f in zip(self.loc_heads, (f1, f2, f3))]
        conf = [
            h(f).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes)
            for h, f in zip(self.conf_heads, (f1, f2, f3))
        ]
        return torch.cat(loc, 1), torch.cat(conf, 1)


# --------------------------------------------------------------------------- training


def run_epoch(stage, model, data, steps, priors, loss_fn, desc, optimizer=None, scheduler=None, teacher=None,
              weights=KD_WEIGHTS, quiet=False):
    """One pass over `data` (`steps` mini-batches, for the bar); returns the mean of every term and of the total. Trains when an
    optimizer is given. `weights` weigh the four terms of the "kd" stage (the seed recipe by default); `quiet` hides the bar."""
    training = optimizer is not None
    model.train(training)
    sums, count = {}, 0
    bar = tqdm(data, desc=desc, total=steps, leave=False, dynamic_ncols=True, mininterval=0.5, disable=quiet)
    for images, targets in bar:
        images = images.to(priors.device)
        targets = [t.to(priors.device) for t in targets]
        with torch.set_grad_enabled(training):
            loc, conf = model(images)
            if stage == "kd":
                with torch.no_grad():
                    t_loc, t_conf = teacher(images)
                soft, l2, loss_c, loss_l = loss_fn((loc, conf, priors), (t_loc, t_conf), targets)
                terms = dict(soft_loss=soft, l2_loss=l2, loss_c=loss_c, loss_l=loss_l)
                total = sum(weights[k] * v for k, v in terms.items())
            else:
                loss_l, loss_c = loss_fn((loc, conf, priors), targets)
                terms = dict(loss_c=loss_c, loss_l=loss_l)
                total = loss_c + loss_l
        if training:
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
        n = images.shape[0]
        count += n
        values = {k: v.detach().item() for k, v in terms.items()}
        values["total"] = total.detach().item()
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * n
        postfix = {TERM_NAMES[k]: f"{sums[k] / count:.4f}" for k in terms}
        if training:
            postfix["lr"] = f"{scheduler.get_last_lr()[0]:.2e}"
        bar.set_postfix(postfix)
    bar.close()
    return {k: v / count for k, v in sums.items()}


def train_stage(stage, title, model, train, val, priors, loss_fn, args, teacher=None, weights=KD_WEIGHTS,
                quiet=False, on_epoch=None):
    """Trains `model` for `args.epochs` epochs (AdamW, one-cycle schedule, the same data order for
    every stage of a seed); returns a record per epoch. `quiet` prints nothing and shows no bars
    (the study shows its own); `on_epoch()` is called after every epoch."""
    if not quiet:
        print(title, flush=True)
    steps_per_epoch = math.ceil(len(train[0]) / args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    shuffle = torch.Generator().manual_seed(args.seed + 1)  # the same order for every stage
    records = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        train_means = run_epoch(
            stage, model, batches(*train, args.batch, shuffle), steps_per_epoch, priors, loss_fn,
            f"Epoch {epoch}/{args.epochs} train", optimizer, scheduler, teacher, weights, quiet,
        )
        with torch.no_grad():
            val_means = run_epoch(
                stage, model, batches(*val, args.batch), math.ceil(len(val[0]) / args.batch), priors, loss_fn,
                f"Epoch {epoch}/{args.epochs} val  ", teacher=teacher, weights=weights, quiet=quiet,
            )
        seconds = time.perf_counter() - start
        lr = scheduler.get_last_lr()[0]
        shown = "  ".join(f"{TERM_NAMES.get(k, k)} {v:.4f}" for k, v in train_means.items())
        if not quiet:
            print(f"  epoch {epoch:>2}/{args.epochs}  train {shown}  |  val total {val_means['total']:.4f}"
                  f"  lr {lr:.2e}  {seconds:.1f} s", flush=True)
        records.append(dict(epoch=epoch, train=train_means, val=val_means, lr=lr, time_s=seconds))
        if on_epoch is not None:
            on_epoch()
    return records


# --------------------------------------------------------------------------- set-up (shared with the study)

TEACHER_WIDTH = 16
STUDENT_WIDTH = 6


def make_data(args, seed):
    """The training and validation splits of `seed` (`args.train_images`, `args.val_images`)."""
    return make_split(args.train_images, seed * 2 + 1000), make_split(args.val_images, seed * 2 + 1001)


def make_priors(device):
    return torch.from_numpy(np.asarray(ssdkd.priors(**PRIOR_CONFIG), np.float32)).to(device)


def make_plain_loss(backend):
    """`MultiBoxLoss` (conf + loc), for the teacher and the baseline."""
    return ssdkd_torch.MultiBoxLoss(NUM_CLASSES, 0.5, True, 0, True, 3, 0.5, False, True,
                                    variance=VARIANCE, backend=backend)


def make_kd_loss(backend, temperature, neg_w=1.5):
    """`MultiBoxLoss_KD` at temperature T; `neg_w` 1.5 is the class-weighted soft term, 1 plain KL."""
    return ssdkd_torch.MultiBoxLoss_KD(NUM_CLASSES, 0.5, True, 0, True, 3, 0.5, False, True, 100.0, neg_w, 1.0,
                                       temperature, 0.0, variance=VARIANCE, backend=backend)


def make_teacher(seed, device):
    torch.manual_seed(seed)
    return TinySSD(width=TEACHER_WIDTH).to(device)


def make_student(seed, device, width=STUDENT_WIDTH):
    """The student's initialisation of `seed`: the same for every loss it is trained with."""
    torch.manual_seed(seed + 7)
    return TinySSD(width=width).to(device)


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- evaluation


def decode(loc, priors):
    """SPEC §3's encoding inverted: offsets [B, P, 4] → corner boxes [B, P, 4] (normalised)."""
    v0, v1 = VARIANCE
    centre = priors[:, :2] + loc[..., :2] * v0 * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * v1)
    return torch.cat((centre - size / 2, centre + size / 2), -1)


@torch.no_grad()
def detect(model, images, priors, score_threshold=0.05, nms_iou=0.45, top_k=100):
    """Per image: boxes (pixels, xyxy), scores and labels (0..2) after per-class NMS."""
    from torchvision.ops import batched_nms

    model.eval()
    loc, conf = model(images.to(priors.device))
    boxes = decode(loc, priors).clamp(0.0, 1.0) * IMAGE_SIZE
    scores = F.softmax(conf, -1)[..., 1:]  # drop the background
    out = []
    for b, s in zip(boxes, scores):
        keep_prior, label = (s > score_threshold).nonzero(as_tuple=True)
        cand_boxes, cand_scores = b[keep_prior], s[keep_prior, label]
        keep = batched_nms(cand_boxes, cand_scores, label, nms_iou)[:top_k]
        out.append(dict(boxes=cand_boxes[keep].cpu(), scores=cand_scores[keep].cpu(), labels=label[keep].cpu()))
    return out


def mean_ap(model, val, priors, batch_size):
    """VOC-style mAP at IoU 0.5 on the validation split (torchmetrics; COCO's 101-point
    interpolation at the single threshold 0.5)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5], backend="faster_coco_eval")
    for images, targets in batches(*val, batch_size):
        preds = detect(model, images, priors)
        truth = [dict(boxes=t[:, :4] * IMAGE_SIZE, labels=t[:, 4].long()) for t in targets]
        metric.update(preds, truth)
    return float(metric.compute()["map"])


# --------------------------------------------------------------------------- pictures


def plot_losses(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(log["stages"].items())
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.8), squeeze=False)
    for ax, (name, records) in zip(axes[0], stages):
        epochs = [r["epoch"] for r in records]
        for i, key in enumerate(records[0]["train"]):
            colour = f"C{i}"
            label = TERM_NAMES.get(key, key)
            ax.plot(epochs, [r["train"][key] for r in records], "-o", ms=3, color=colour, label=f"{label} train")
            ax.plot(epochs, [r["val"][key] for r in records], "--", color=colour, label=f"{label} val")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_detections(models, val, priors, path, count=4, min_score=0.3):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    images = torch.from_numpy(val[0][:count]).float() / 255.0
    columns = [("ground truth", None)] + list(models.items())
    found = {name: detect(m, images, priors) for name, m in models.items()}
    fig, axes = plt.subplots(count, len(columns), figsize=(2.6 * len(columns), 2.6 * count), squeeze=False)
    for row in range(count):
        for col, (name, _) in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(images[row].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if name == "ground truth":
                items = [(b * IMAGE_SIZE, int(b[4]), None) for b in val[1][row]]
            else:
                d = found[name][row]
                items = [
                    (b.numpy(), int(l), float(s))
                    for b, l, s in zip(d["boxes"], d["labels"], d["scores"])
                    if s >= min_score
                ]
            for box, label, score in items:
                x0, y0, x1, y1 = (float(v) for v in box[:4])
                ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, color=f"C{label}"))
                text = CLASSES[label] if score is None else f"{CLASSES[label][:4]} {score:.2f}"
                ax.text(x0, y0 - 1, text, fontsize=5, color="white", backgroundcolor=f"C{label}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for log.json, losses.png, detections.png (default runs/shapes); "
                   "with --study, for every run's results and study.json, study.md, study.png (default runs/study)")
    p.add_argument("--quick", action="store_true", help="fewer images and epochs (under 90 s on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps (PyTorch device of the models)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "gpu", "auto"], help="ssdkd's backend for the loss")
    p.add_argument("--train-images", type=int, help="default 1600 (400 with --quick)")
    p.add_argument("--val-images", type=int, help="default 400 (120 with --quick)")
    p.add_argument("--epochs", type=int, help="epochs per stage, default 10 (3 with --quick)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    study = p.add_argument_group(
        "study", "--study trains a teacher per seed and the student under a grid of loss variants, and reports "
        "mAP@0.5 per variant against the baseline over the seeds (see distill_study.py)")
    study.add_argument("--study", action="store_true", help="run the study instead of the three stages")
    study.add_argument("--variants", default="all",
                       help="comma-separated variants to train, or 'all' (the default); --list-variants names them")
    study.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, or a range like 0-4 (default 0,1,2)")
    study.add_argument("--widths", default=str(STUDENT_WIDTH),
                       help=f"comma-separated student widths (default {STUDENT_WIDTH}, today's student; "
                       f"the teacher's is {TEACHER_WIDTH})")
    study.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "runs/study" if args.study else "runs/shapes"
    if args.train_images is None:
        args.train_images = 400 if args.quick else 1600
    if args.val_images is None:
        args.val_images = 120 if args.quick else 400
    if args.epochs is None:
        args.epochs = 3 if args.quick else 10
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.study or args.list_variants:
        import distill_study

        return distill_study.run(args, argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)

    train, val = make_data(args, args.seed)
    priors = make_priors(device)
    print(f"data: {len(train[0])} training and {len(val[0])} validation images of {IMAGE_SIZE} px, "
          f"{sum(len(o) for o in train[1])} training objects; {priors.shape[0]} priors; "
          f"{NUM_CLASSES} classes with background", flush=True)

    plain_loss = make_plain_loss(args.backend)
    kd_loss = make_kd_loss(args.backend, args.temperature)

    teacher = make_teacher(args.seed, device)
    student_init = make_student(args.seed, device)
    student_kd = TinySSD(width=STUDENT_WIDTH).to(device)
    student_kd.load_state_dict(student_init.state_dict())
    student_base = TinySSD(width=STUDENT_WIDTH).to(device)
    student_base.load_state_dict(student_init.state_dict())
    print(f"teacher: {count_parameters(teacher):,} parameters; student: {count_parameters(student_kd):,} parameters",
          flush=True)

    log = dict(
        command=[sys.executable] + sys.argv if argv is None else ["distill_shapes.py"] + list(argv),
        seed=args.seed, args=vars(args), prior_config=PRIOR_CONFIG, num_priors=int(priors.shape[0]),
        kd_weights=KD_WEIGHTS, stages={},
    )
    log["stages"]["teacher"] = train_stage(
        "plain", "Start Teacher Train", teacher, train, val, priors, plain_loss, args
    )
    freeze(teacher)
    log["stages"]["teacher2student_KD"] = train_stage(
        "kd", "Start teacher2student_KD Train", student_kd, train, val, priors, kd_loss, args, teacher
    )
    log["stages"]["student_baseline"] = train_stage(
        "plain", "Start student_baseline Train (same student, no distillation)",
        student_base, train, val, priors, plain_loss, args,
    )

    models = {"teacher": teacher, "student (KD)": student_kd, "student (baseline)": student_base}
    maps = {name: mean_ap(m, val, priors, args.batch) for name, m in models.items()}
    log["map50"] = maps
    log["elapsed_s"] = time.perf_counter() - started

    print("\nmAP@0.5 on the validation split")
    print(f"  {'model':<20} {'mAP@0.5':>8}")
    for name, value in maps.items():
        print(f"  {name:<20} {value:>8.3f}")
    gain = maps["student (KD)"] - maps["student (baseline)"]
    verdict = "beats" if gain > 0 else "does not beat"
    print(f"distillation {verdict} the baseline here: {gain:+.3f} mAP")
    log["kd_minus_baseline"] = gain

    with open(os.path.join(args.out, "log.json"), "w") as f:
        json.dump(log, f, indent=1)
    plot_losses(log, os.path.join(args.out, "losses.png"))
    plot_detections(models, val, priors, os.path.join(args.out, "detections.png"))
    print(f"wrote log.json, losses.png and detections.png to {args.out} "
          f"({log['elapsed_s']:.0f} s in all)")
    return log


if __name__ == "__main__":
    main()
