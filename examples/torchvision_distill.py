#!/usr/bin/env python3
"""Distil one torchvision SSD into another with ssdkd, on the synthetic shapes of
distill_shapes.py.

A teacher and a thinner student are both `torchvision.models.detection.SSD` models, each
with a small backbone of its own and the same `DefaultBoxGenerator` (three feature maps,
16×16, 8×8 and 4×4 on 128 px images: 1472 anchors, the priors of distill_shapes.py).

1. The teacher trains through its own call, `model(images, targets)`, after
   `ssdkd.torchvision.use_ssdkd(teacher)` made ssdkd its loss.
2. The student trains from the ground truth and the frozen teacher with
   `ssdkd.torchvision.Distiller(student, teacher)`: MultiBoxLoss_KD's four terms, total
   `0.3·soft + 0.7·classification + 0.5·l2 + bbox_regression`.
3. The same student, from the same initialisation and data order, trains without the
   teacher (`use_ssdkd(student)`): the baseline.

Then each is evaluated with torchvision's own post-processing (`model.eval()`;
`model(images)`) and mAP at IoU 0.5 by torchmetrics on the validation split. The run
writes `log.json` to `--out DIR`.

    pip install './python[torchvision]' torchmetrics faster-coco-eval tqdm
    python examples/torchvision_distill.py --out runs/tv            # a few minutes on 2 cores
    python examples/torchvision_distill.py --out runs/tvq --quick   # under 90 seconds

`--bench` times torchvision's loss (SSDMatcher, then SSD.compute_loss) against ssdkd's
(`SSDLoss`), forward and backward, on ssd300_vgg16's 8732 anchors with 21 classes, at
batch 8 and 32 on the CPU (docs/PERFORMANCE.md):

    python examples/torchvision_distill.py --bench
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ssdkd.torchvision as stv  # noqa: E402
from distill_shapes import (  # noqa: E402  (the synthetic shapes and their model sizes)
    IMAGE_SIZE, NUM_CLASSES, PRIOR_CONFIG, STUDENT_WIDTH, TEACHER_WIDTH, batches, conv_bn,
    count_parameters, make_split,
)

# distill_shapes.py's priors as a DefaultBoxGenerator: scales are the min sizes over the
# image size, the last one the last max size.
SCALES = [s / IMAGE_SIZE for s in PRIOR_CONFIG["min_sizes"]] + [
    PRIOR_CONFIG["max_sizes"][-1] / IMAGE_SIZE]


class Backbone(nn.Module):
    """Three feature maps (16×16, 8×8, 4×4 on 128 px), as distill_shapes.py's TinySSD."""

    def __init__(self, width):
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv_bn(3, w, 2), conv_bn(w, 2 * w, 2), conv_bn(2 * w, 2 * w, 1),
                                  conv_bn(2 * w, 4 * w, 2), conv_bn(4 * w, 4 * w, 1))
        self.down1 = nn.Sequential(conv_bn(4 * w, 8 * w, 2), conv_bn(8 * w, 8 * w, 1))
        self.down2 = conv_bn(8 * w, 8 * w, 2)
        self.out_channels = [4 * w, 8 * w, 8 * w]

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.down1(f1)
        return OrderedDict([("0", f1), ("1", f2), ("2", self.down2(f2))])


def make_ssd(width, seed):
    """A torchvision SSD with a backbone of `width` and the shared anchors."""
    torch.manual_seed(seed)
    anchors = DefaultBoxGenerator([list(r) for r in PRIOR_CONFIG["aspect_ratios"]], scales=SCALES,
                                  steps=PRIOR_CONFIG["steps"], clip=PRIOR_CONFIG["clip"])
    # The images are already 128 px: torchvision's transform only normalises them in
    # training (`_skip_resize`). Detection keeps distill_shapes.py's settings (score 0.05,
    # 100 per image).
    return SSD(Backbone(width), anchors, (IMAGE_SIZE, IMAGE_SIZE), NUM_CLASSES,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], score_thresh=0.05,
               detections_per_img=100, topk_candidates=100, _skip_resize=True)


def to_torchvision(targets):
    """distill_shapes.py's [M, 5] targets (normalised corners, labels 0..2) as torchvision's
    dicts (pixels, labels 1..3)."""
    return [{"boxes": t[:, :4] * IMAGE_SIZE, "labels": t[:, 4].long() + 1} for t in targets]


def train_stage(title, model, loss_of, train, args):
    """Trains `model`'s parameters on `loss_of(images, targets) -> dict` (AdamW, one-cycle,
    the same data order for every stage); returns the mean terms per epoch."""
    print(title, flush=True)
    steps = math.ceil(len(train[0]) / args.batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                    total_steps=args.epochs * steps, pct_start=0.15)
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    records = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        start, sums, count = time.perf_counter(), {}, 0
        bar = tqdm(batches(*train, args.batch, shuffle), total=steps, leave=False,
                   desc=f"Epoch {epoch}/{args.epochs}", dynamic_ncols=True, mininterval=0.5)
        for images, targets in bar:
            losses = loss_of(list(images), to_torchvision(targets))
            total = stv.total(losses)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            n = images.shape[0]
            count += n
            values = dict({k: float(v.detach()) for k, v in losses.items()}, total=float(total.detach()))
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * n
            bar.set_postfix({k: f"{sums[k] / count:.4f}" for k in values})
        bar.close()
        means = {k: v / count for k, v in sums.items()}
        seconds = time.perf_counter() - start
        print(f"  epoch {epoch:>2}/{args.epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
              + f"  {seconds:.1f} s", flush=True)
        records.append(dict(epoch=epoch, train=means, time_s=seconds))
    return records


@torch.no_grad()
def mean_ap(model, val, batch_size):
    """mAP at IoU 0.5 of torchvision's own detections (torchmetrics, as distill_shapes.py)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5], backend="faster_coco_eval")
    model.eval()
    for images, targets in batches(*val, batch_size):
        found = model(list(images))
        metric.update([{k: d[k] for k in ("boxes", "scores", "labels")} for d in found],
                      to_torchvision(targets))
    return float(metric.compute()["map"])


def bench(args):
    """torchvision's loss (SSDMatcher and SSD.compute_loss) against ssdkd's SSDLoss, forward
    and backward, on ssd300_vgg16's anchors with 21 classes."""
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.ssd import SSD as _SSD
    from torchvision.ops import box_iou

    generator = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                                    steps=[8, 16, 32, 64, 100, 300])
    grids = [38, 19, 10, 5, 3, 1]
    owner = type("Owner", (), {})()
    owner.box_coder, owner.neg_to_pos_ratio = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), 3.0
    matcher = det_utils.SSDMatcher(0.5)
    ours = stv.SSDLoss((300, 300), backend=args.backend)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ssd300_vgg16 anchors, "
          "21 classes, 1-6 objects per image, float32; median of "
          f"{args.reps} forward+backward steps")
    rows = []
    for batch in (8, 32):
        anchors = generator(ImageList(torch.zeros(batch, 3, 300, 300), [(300, 300)] * batch),
                            [torch.zeros(1, 1, g, g) for g in grids])
        targets = []
        for _ in range(batch):
            n = int(rng.integers(1, 7))
            size = rng.uniform(20, 250, (n, 2))
            corner = rng.uniform(0, 1, (n, 2)) * (300 - size)
            targets.append({"boxes": torch.tensor(np.concatenate([corner, corner + size], 1),
                                                  dtype=torch.float32),
                            "labels": torch.from_numpy(rng.integers(1, 21, n))})
        head = {"bbox_regression": torch.randn(batch, 8732, 4),
                "cls_logits": torch.randn(batch, 8732, 21)}

        def torchvision_step():
            h = {k: v.clone().requires_grad_() for k, v in head.items()}
            matched = [matcher(box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]
            losses = _SSD.compute_loss(owner, targets, h, anchors, matched)
            sum(losses.values()).backward()

        def ssdkd_step():
            h = {k: v.clone().requires_grad_() for k, v in head.items()}
            sum(ours(targets, h, anchors).values()).backward()

        times = {}
        for name, step in (("torchvision", torchvision_step), ("ssdkd", ssdkd_step)):
            for _ in range(2):
                step()
            samples = []
            for _ in range(args.reps):
                start = time.perf_counter()
                step()
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples) * 1e3
        rows.append((batch, times["torchvision"], times["ssdkd"]))
        print(f"B = {batch:>2}: torchvision {times['torchvision']:.1f} ms, ssdkd "
              f"{times['ssdkd']:.1f} ms ({times['torchvision'] / times['ssdkd']:.2f}x)", flush=True)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/torchvision", help="folder for log.json")
    p.add_argument("--quick", action="store_true", help="fewer images and epochs (under 90 s on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="cpu", choices=["cpu", "gpu", "auto"], help="ssdkd's backend")
    p.add_argument("--train-images", type=int, help="default 1600 (400 with --quick)")
    p.add_argument("--val-images", type=int, help="default 400 (120 with --quick)")
    p.add_argument("--epochs", type=int, help="epochs per stage, default 10 (3 with --quick)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--bench", action="store_true", help="time the two losses instead of training")
    p.add_argument("--reps", type=int, default=20, help="timed steps per loss and batch (--bench)")
    args = p.parse_args(argv)
    args.train_images = args.train_images or (400 if args.quick else 1600)
    args.val_images = args.val_images or (120 if args.quick else 400)
    args.epochs = args.epochs or (3 if args.quick else 10)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.bench:
        return bench(args)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train = make_split(args.train_images, args.seed * 2 + 1000)
    val = make_split(args.val_images, args.seed * 2 + 1001)

    teacher = make_ssd(TEACHER_WIDTH, args.seed)
    student_kd = make_ssd(STUDENT_WIDTH, args.seed + 7)
    student_base = make_ssd(STUDENT_WIDTH, args.seed + 7)  # the same initialisation
    print(f"data: {len(train[0])} training and {len(val[0])} validation images of {IMAGE_SIZE} px; "
          f"teacher {count_parameters(teacher):,} parameters, student "
          f"{count_parameters(student_kd):,}", flush=True)

    log = dict(command=["torchvision_distill.py"] + list(sys.argv[1:] if argv is None else argv),
               args=vars(args), stages={})
    stv.use_ssdkd(teacher, backend=args.backend)
    log["stages"]["teacher"] = train_stage("Start Teacher Train (use_ssdkd)", teacher, teacher, train, args)
    distiller = stv.Distiller(student_kd, teacher, backend=args.backend, temperature=args.temperature)
    log["stages"]["teacher2student_KD"] = train_stage(
        "Start teacher2student_KD Train (Distiller)", distiller, distiller, train, args)
    stv.use_ssdkd(student_base, backend=args.backend)
    log["stages"]["student_baseline"] = train_stage(
        "Start student_baseline Train (same student, no distillation)", student_base, student_base,
        train, args)

    models = {"teacher": teacher, "student (KD)": student_kd, "student (baseline)": student_base}
    log["map50"] = {name: mean_ap(m, val, args.batch) for name, m in models.items()}
    log["elapsed_s"] = time.perf_counter() - started
    print("\nmAP@0.5 on the validation split (torchvision's post-processing)")
    for name, value in log["map50"].items():
        print(f"  {name:<20} {value:>8.3f}")
    gain = log["map50"]["student (KD)"] - log["map50"]["student (baseline)"]
    print(f"distillation {'beats' if gain > 0 else 'does not beat'} the baseline here: {gain:+.3f} mAP")
    with open(os.path.join(args.out, "log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"wrote log.json to {args.out} ({log['elapsed_s']:.0f} s in all)")
    return log


if __name__ == "__main__":
    main()
