//! Detection and mAP@0.5: decode the offsets with the priors
//! and variances (SPEC §3's encoding inverted), softmax, per-class NMS, then VOC-style AP
//! per class at IoU 0.5 with COCO's 101-point interpolation (what torchmetrics computes for
//! the Python example), averaged over the classes that have ground truth.

use crate::data::Object;

/// One detection in an image: corners normalised to the image, its class 0..=2 and score.
#[derive(Clone, Copy, Debug)]
pub struct Detection {
    pub bbox: [f32; 4],
    pub class: usize,
    pub score: f32,
}

pub const SCORE_THRESHOLD: f32 = 0.05;
pub const NMS_IOU: f32 = 0.45;
pub const TOP_K: usize = 100;

pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Corner box of prior `p` (`[cx, cy, w, h]`) moved by the offsets `loc` (SPEC §3).
pub fn decode(loc: &[f32], prior: &[f32], variance: [f32; 2]) -> [f32; 4] {
    let cx = prior[0] + loc[0] * variance[0] * prior[2];
    let cy = prior[1] + loc[1] * variance[0] * prior[3];
    let w = prior[2] * (loc[2] * variance[1]).exp();
    let h = prior[3] * (loc[3] * variance[1]).exp();
    [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0].map(|v| v.clamp(0.0, 1.0))
}

/// The detections of one image from its `loc` `[P, 4]` and `conf` `[P, C]` (logits, class 0
/// background): every (prior, class) scoring above [`SCORE_THRESHOLD`], NMS per class at
/// [`NMS_IOU`], the best [`TOP_K`] kept.
pub fn detect(
    loc: &[f32], conf: &[f32], priors: &[f32], classes: usize, variance: [f32; 2],
) -> Vec<Detection> {
    let num_priors = priors.len() / 4;
    let mut candidates: Vec<Vec<Detection>> = vec![Vec::new(); classes - 1];
    for p in 0..num_priors {
        let logits = &conf[p * classes..(p + 1) * classes];
        let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = logits.iter().map(|&v| (v - top).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let mut bbox = None;
        for (c, &e) in exps.iter().enumerate().skip(1) {
            let score = e / sum;
            if score > SCORE_THRESHOLD {
                let b = *bbox.get_or_insert_with(|| {
                    decode(&loc[p * 4..p * 4 + 4], &priors[p * 4..p * 4 + 4], variance)
                });
                candidates[c - 1].push(Detection { bbox: b, class: c - 1, score });
            }
        }
    }
    let mut kept = Vec::new();
    for mut list in candidates {
        list.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut class_kept: Vec<Detection> = Vec::new();
        for d in list {
            if class_kept.iter().all(|k| iou(&k.bbox, &d.bbox) <= NMS_IOU) {
                class_kept.push(d);
            }
        }
        kept.extend(class_kept);
    }
    kept.sort_by(|a, b| b.score.total_cmp(&a.score));
    kept.truncate(TOP_K);
    kept
}

/// mAP at IoU 0.5 over `classes` object classes: per class, the detections of all images by
/// falling score, each a true positive when it overlaps a not yet matched object of its
/// class by ≥ 0.5 (the best such), else a false positive; AP is the precision envelope
/// sampled at the 101 recalls 0, 0.01, …, 1. Classes without ground truth are left out.
pub fn map50(detections: &[Vec<Detection>], truth: &[Vec<Object>], classes: usize) -> f64 {
    let mut aps = Vec::new();
    for class in 0..classes {
        let total: usize =
            truth.iter().map(|objs| objs.iter().filter(|o| o.class == class).count()).sum();
        if total == 0 {
            continue;
        }
        let mut ranked: Vec<(f32, usize, [f32; 4])> = detections
            .iter()
            .enumerate()
            .flat_map(|(i, dets)| {
                dets.iter().filter(|d| d.class == class).map(move |d| (d.score, i, d.bbox))
            })
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut matched: Vec<Vec<bool>> =
            truth.iter().map(|objs| vec![false; objs.len()]).collect();
        let (mut tp, mut fp) = (0usize, 0usize);
        let mut curve = Vec::with_capacity(ranked.len()); // (recall, precision)
        for (_, image, bbox) in ranked {
            let mut best = (0.5f32, None);
            for (m, o) in truth[image].iter().enumerate() {
                if o.class != class || matched[image][m] {
                    continue;
                }
                let overlap = iou(&bbox, &o.bbox);
                if overlap >= best.0 {
                    best = (overlap, Some(m));
                }
            }
            match best.1 {
                Some(m) => {
                    matched[image][m] = true;
                    tp += 1;
                }
                None => fp += 1,
            }
            curve.push((tp as f64 / total as f64, tp as f64 / (tp + fp) as f64));
        }
        // Precision envelope: the best precision at this recall or any higher one.
        let mut best = 0.0f64;
        for point in curve.iter_mut().rev() {
            best = best.max(point.1);
            point.1 = best;
        }
        let mut sum = 0.0;
        let mut j = 0;
        for r in 0..=100 {
            let recall = f64::from(r) / 100.0;
            while j < curve.len() && curve[j].0 < recall {
                j += 1;
            }
            if j < curve.len() {
                sum += curve[j].1;
            }
        }
        aps.push(sum / 101.0);
    }
    if aps.is_empty() {
        0.0
    } else {
        aps.iter().sum::<f64>() / aps.len() as f64
    }
}
