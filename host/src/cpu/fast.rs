//! The CPU fast path of the forward pass: the core's stages, with the prior-terms stage's
//! log-sum-exp taken exactly only where it can change the result.
//!
//! The mining (SPEC §4) ranks every prior by its mining score, the cross-entropy
//! `lse − row[0]` of a negative (0 for a positive), and selects the top k. Only the
//! selected rows' and the positives' cross-entropies reach the sums. So:
//!
//! 1. every negative's score is bounded, `[v − margin, v + margin]` with
//!    `v = ln Σ_c e^(row[c]) − row[0]` taken by the vectorised kernel of `simd.rs` (flat
//!    blocks of many rows; no bound where the sum leaves [e⁻⁶⁰, f32::MAX]), the margin
//!    covering that kernel's error and the core's f32 rounding; a positive's score is
//!    exactly 0;
//! 2. τ = the k-th largest lower bound: at least k priors score at least τ, so a prior
//!    whose upper bound is below τ has k priors strictly above it and is not selected;
//! 3. every other prior (the candidates, about k of them) gets its score as the reference
//!    computes it, bit for bit: the core's `cross_entropy` (its exponentials vectorised,
//!    `rows::row_cross_entropy`); the positives too;
//! 4. the top k among the candidates, by the core's [`rank_key`], are the reference's
//!    top k.
//!
//! Every number that reaches the loss or the decisions is therefore the reference's, bit
//! for bit (tested in `tests/fast_cpu.rs` against [`ssdkd_core::forward_image`]); the
//! bounds decide only what need not be computed. The match stage is `matching.rs` (the
//! core's decisions, overlaps in blocks); the soft terms are `rows.rs` (the core's, their
//! probabilities kept for the gradient); the per-image sums are the core's.

use super::matching::{match_image_fast, MatchScratch, PriorColumns};
use super::rows::{row_cross_entropy, row_soft_term};
use super::simd::score_estimates_block;
use multiversion::multiversion;
use ssdkd_core::stages::mine::{kth_key, num_negatives, rank_key};
use ssdkd_core::stages::prior_terms::{classes_of, mining_score, prior_loss_record};
use ssdkd_core::stages::r#match::Offsets;
use ssdkd_core::stages::reduce::{reduce_priors, ImageRows, LossSums};
use ssdkd_core::{ImageInputs, ImageScratch, ImageTargets, LossConfig};

/// Floats per flat block of the bound kernel (whole rows; at least one row).
const BLOCK_VALUES: usize = 2048;

/// Per-image scratch of the fast path, kept with the core's workspace between calls.
#[derive(Clone, Debug, Default)]
pub struct FastScratch {
    /// `[P]` lower bound of each prior's mining score.
    lower: Vec<f32>,
    /// `[P]` upper bound of each prior's mining score.
    upper: Vec<f32>,
    /// A copy of `lower` for selecting τ.
    select: Vec<f32>,
    /// The exponentials of one block of logits.
    flat: Vec<f32>,
    /// The candidates' prior indices.
    candidates: Vec<u32>,
    /// The positives', in prior order.
    positives: Vec<u32>,
    /// The mined negatives' (the candidates in the negative mask), in prior order.
    mined: Vec<u32>,
    /// The selected rows' (positives and mined), in prior order.
    pub(super) selected: Vec<u32>,
    /// The match stage's.
    matching: MatchScratch,
    /// Each selected row's `p_c` then `q_c`, in prior order (`rows::row_soft_term`).
    pub(super) kept: Vec<f64>,
    /// One selected row's exponentials and terms (`rows::row_soft_term`).
    row: Vec<f64>,
    /// One exact row's exponentials (`rows::row_cross_entropy`).
    lse: Vec<f32>,
}

/// The margin that covers, around `v` (from the vectorised kernel), the reference's f32
/// score `fl(fl(max − row[0]) + fl(ln S))`, with room to spare:
/// - the two sums' rounding, each at most (C − 1)·2⁻²⁴ relative: `2e-7·C`;
/// - the exponentials and logarithms: the core's `exp_f32` in both the kernel and the
///   reference, within 2 ulp (its tests), the reference's `logf` within 1 ulp and the
///   kernel's `ln_f32` (the core's) within its tested bound: `4e-5` in all;
/// - the roundings of the reference's shifted logits (`x − max`), of its difference and
///   addition and of the kernel's `ln S − row[0]`, and the kernel's logarithm's error (below
///   1e-6 + 1e-7·|ln S|, |ln S| ≤ max|x| + ln C), each at most 2⁻²⁴ of a magnitude
///   ≤ 2·max|x| or ≤ |v| + max|x|: `4e-7·(2·max|x| + |v|)`.
fn margin(max_abs: f32, v: f32, classes: usize) -> f32 {
    let sums = 4e-5 + 2e-7 * classes as f32;
    sums + 4e-7 * (2.0 * max_abs + v.abs())
}

/// Bounds every prior's mining score into `scratch.lower`/`upper` (positives exactly 0).
fn bound_scores(
    student_conf: &[f32],
    conf_target: &[u32],
    classes: usize,
    scratch: &mut FastScratch,
) {
    let priors = conf_target.len();
    scratch.lower.resize(priors, 0.0);
    scratch.upper.resize(priors, 0.0);
    let rows_per_block = (BLOCK_VALUES / classes).max(1);
    scratch.flat.resize(rows_per_block * classes, 0.0);
    let blocks = student_conf
        .chunks(rows_per_block * classes)
        .zip(scratch.upper.chunks_mut(rows_per_block))
        .zip(scratch.lower.chunks_mut(rows_per_block))
        .zip(conf_target.chunks(rows_per_block));
    for (((rows, upper), lower), targets) in blocks {
        // The block's largest |x| stands for each row's in the margin (looser, still a bound).
        let max_abs = score_estimates_block(rows, classes, &mut scratch.flat, upper);
        widen(max_abs, classes, targets, upper, lower);
    }
}

/// Turns each row's `v` (in `upper`) into its bounds `[v − margin, v + margin]`, positives
/// `[0, 0]`, branch-free so that it vectorises.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn widen(max_abs: f32, classes: usize, targets: &[u32], upper: &mut [f32], lower: &mut [f32]) {
    let (targets, lower) = (&targets[..upper.len()], &mut lower[..upper.len()]);
    for ((u, l), &target) in upper.iter_mut().zip(lower.iter_mut()).zip(targets) {
        let v = *u;
        let m = margin(max_abs, v, classes);
        // An overflowing sum, or NaN or ∞ input (which the value scan rejects): no bound,
        // so the prior stays a candidate and lowers no τ.
        let bounded = v.is_finite() && m.is_finite();
        let (hi, lo) = if bounded {
            (v + m, v - m)
        } else {
            (f32::INFINITY, f32::NEG_INFINITY)
        };
        (*u, *l) = if target > 0 { (0.0, 0.0) } else { (hi, lo) };
    }
}

/// Reads the first and last value of each of the `rows` of `values` (C wide) in one short
/// loop of independent loads, so that the memory system fetches the rows side by side
/// before a long computation visits them one at a time (which would wait for each).
fn touch_rows(values: &[f32], classes: usize, rows: &[u32]) {
    let mut acc = 0.0_f32;
    for &p in rows {
        let start = p as usize * classes;
        acc += values[start] + values[start + classes - 1];
    }
    std::hint::black_box(acc);
}

/// The forward pass of one image is [`match_stage`] then [`forward_matched`]: together
/// they compute what [`ssdkd_core::forward_image`] computes (same sums, same decisions,
/// bit for bit), with the exact log-sum-exp only on the rows that can reach the loss, and
/// the match stage's overlaps taken a block of priors at a time (`columns`: the batch's
/// priors, [`PriorColumns::new`]). The CPU backend matches every image first (the batch's
/// N), then runs the rest of each.
///
/// This is the match stage (`matching.rs`): labels and offsets into `targets`; returns
/// the image's positives.
pub fn match_stage(
    inputs: &ImageInputs<'_>,
    config: &LossConfig,
    offsets: Offsets,
    scratch: &mut ImageScratch<'_>,
    targets: &mut ImageTargets<'_>,
    columns: &PriorColumns,
    fast: &mut FastScratch,
) -> u32 {
    match_image_fast(
        inputs.targets,
        inputs.priors,
        columns,
        config.overlap_threshold,
        config.variance,
        offsets,
        scratch.objects,
        targets.conf_target,
        targets.loc_target,
        &mut fast.matching,
    )
}

/// The rest of the forward pass after [`match_stage`] (which found `num_pos`): prior
/// terms, mining, soft terms and the image's sums. The selected rows' prior indices
/// (`fast.selected`, in prior order) and probabilities (`fast.kept`) are kept for the
/// gradients, now or later (`CpuBackend::gradients_of_last`). `scratch.mining_score`,
/// `prior_loss` and `row_soft` hold the reference's values on the rows they are read on
/// (the candidates, the positives, the selected rows) and are scratch elsewhere.
///
/// # Panics
/// If the slices disagree on P, C or M.
pub fn forward_matched(
    inputs: &ImageInputs<'_>,
    config: &LossConfig,
    num_pos: u32,
    scratch: &mut ImageScratch<'_>,
    targets: &mut ImageTargets<'_>,
    fast: &mut FastScratch,
) -> LossSums {
    let priors = targets.conf_target.len();
    let classes = classes_of(inputs.student_conf.len(), priors);
    let k = num_negatives(num_pos, priors as u32, config) as usize;
    let k = k.min(priors);
    let mine = k > 0 && classes > 0;
    if mine {
        // First, so that the image's logits are in cache for the exact rows below.
        bound_scores(inputs.student_conf, targets.conf_target, classes, fast);
    }

    // The positives, exactly as the prior-terms stage writes them. (`prior_loss` is read
    // only on the selected rows, and each is written below: no fill.)
    fast.positives.clear();
    for (p, &target_class) in targets.conf_target.iter().enumerate() {
        if target_class == 0 {
            continue;
        }
        fast.positives.push(p as u32);
        let ce = row_cross_entropy(
            &inputs.student_conf[p * classes..],
            classes,
            target_class,
            &mut fast.lse,
        );
        scratch.mining_score[p] = mining_score(ce, true);
        scratch.prior_loss[p] = prior_loss_record(
            ce,
            true,
            inputs.student_loc[p],
            inputs.teacher_loc[p],
            targets.loc_target[p],
            config.reg_m,
        );
    }

    // Mining (SPEC §4) over the candidates only.
    targets.neg_mask.fill(0);
    fast.mined.clear();
    let num_neg = if mine {
        fast.select.clear();
        fast.select.extend_from_slice(&fast.lower);
        let (_, tau, _) = fast
            .select
            .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let tau = *tau;
        fast.candidates.clear();
        for (p, &upper) in fast.upper.iter().enumerate() {
            if upper >= tau {
                fast.candidates.push(p as u32);
            }
        }
        let keys = &mut scratch.keys[..fast.candidates.len()];
        for (key, &p) in keys.iter_mut().zip(&fast.candidates) {
            let p = p as usize;
            if targets.conf_target[p] == 0 {
                let ce = row_cross_entropy(
                    &inputs.student_conf[p * classes..],
                    classes,
                    0,
                    &mut fast.lse,
                );
                scratch.mining_score[p] = mining_score(ce, false);
                scratch.prior_loss[p][0] = ce;
            }
            *key = rank_key(scratch.mining_score[p], p as u32);
        }
        // Fewer than k candidates only when τ is NaN-free and yet fewer than k lower
        // bounds reach it, which cannot happen; guard anyway.
        let k = k.min(keys.len());
        if k > 0 {
            let kth = kth_key(keys, k);
            for &p in &fast.candidates {
                if rank_key(scratch.mining_score[p as usize], p) >= kth {
                    targets.neg_mask[p as usize] = 1;
                    fast.mined.push(p);
                }
            }
        }
        k as u32
    } else {
        0
    };

    // The selected rows in prior order: the positives and the mined candidates (both in
    // prior order), merged.
    fast.selected.clear();
    let (mut pos, mut neg) = (
        fast.positives.iter().peekable(),
        fast.mined.iter().peekable(),
    );
    while let Some(&next) = match (pos.peek(), neg.peek()) {
        (Some(&&a), Some(&&b)) if a == b => {
            neg.next();
            pos.next()
        }
        (Some(&&a), Some(&&b)) => {
            if a < b {
                pos.next()
            } else {
                neg.next()
            }
        }
        (Some(_), None) => pos.next(),
        (None, _) => neg.next(),
    } {
        fast.selected.push(next);
    }

    // The core's `reduce_rows` on the selected rows (the others' `row_soft` is not read),
    // keeping each one's probabilities for the gradients.
    fast.kept.clear();
    if classes > 0 {
        touch_rows(inputs.teacher_conf, classes, &fast.selected);
        touch_rows(inputs.student_conf, classes, &fast.selected);
        for &p in &fast.selected {
            let p = p as usize;
            // From the row on: the kernels read whole chunks, past the row's end.
            scratch.row_soft[p] = row_soft_term(
                &inputs.student_conf[p * classes..],
                &inputs.teacher_conf[p * classes..],
                classes,
                config,
                &mut fast.kept,
                &mut fast.row,
            );
        }
    }
    let rows = ImageRows {
        conf_target: targets.conf_target,
        neg_mask: targets.neg_mask,
        prior_loss: scratch.prior_loss,
        row_soft: scratch.row_soft,
    };
    let selected = fast.selected.iter().map(|&p| p as usize);
    reduce_priors(selected, &rows, num_pos, num_neg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{synthetic_batch, SyntheticSpec};
    use ssdkd_core::ImageWorkspace;

    /// On the bench's synthetic logits the bounds leave few candidates for the exact
    /// log-sum-exp: at least k, at most a few times k, far fewer than P.
    #[test]
    fn the_bounds_skip_most_rows_of_the_bench_batch() {
        let tensors = synthetic_batch(&SyntheticSpec::demo(2));
        let batch = tensors.batch();
        let shape = batch.shape();
        let config = LossConfig::DEFAULT;
        let columns = PriorColumns::new(bytemuck::cast_slice(batch.priors()));
        for i in 0..shape.batch {
            let mut workspace = ImageWorkspace::new(shape.priors, shape.objects);
            let mut fast = FastScratch::default();
            let (mut scratch, mut targets) = workspace.split();
            let image = batch.image(i);
            let offsets = Offsets::Positives;
            let num_pos = match_stage(
                &image,
                &config,
                offsets,
                &mut scratch,
                &mut targets,
                &columns,
                &mut fast,
            );
            let sums = forward_matched(
                &image,
                &config,
                num_pos,
                &mut scratch,
                &mut targets,
                &mut fast,
            );
            let k = sums.num_neg as usize;
            let candidates = fast.candidates.len();
            assert!(k > 0);
            assert!(
                candidates >= k && candidates <= 4 * k + 64 && candidates < shape.priors / 8,
                "{candidates} candidates for k = {k} of P = {}",
                shape.priors
            );
        }
    }
}
