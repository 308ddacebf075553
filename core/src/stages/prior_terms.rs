//! Stage **prior terms** (SPEC §4, §5): the per-prior maths — log-sum-exp, cross-entropy,
//! mining score, smooth-L1, the teacher-bounded L2 test and both soft-loss forms.
//! Twin of `shaders/prior_terms.wgsl`.

use crate::config::LossConfig;
use crate::math;

/// `ln Σ exp(row[c] · scale)`, stable (max first). `scale` is 1 or 1/T.
#[must_use]
pub fn log_sum_exp(row: &[f32], scale: f32) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let sum: f32 = row.iter().map(|&x| math::exp(x * scale - max)).sum();
    max + math::ln(sum)
}

/// [`log_sum_exp`] in f64, for the selected rows' soft terms and gradients.
#[must_use]
pub fn log_sum_exp_f64(row: &[f32], scale: f64) -> f64 {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x) * scale));
    let sum: f64 = row
        .iter()
        .map(|&x| math::exp_f64(f64::from(x) * scale - max))
        .sum();
    max + math::ln_f64(sum)
}

/// Cross-entropy of a logit row against class `target`, given the row's log-sum-exp.
#[must_use]
pub fn cross_entropy(lse: f32, row: &[f32], target: u32) -> f32 {
    lse - row[target as usize]
}

/// Mining score (SPEC §4): the cross-entropy against the matched label, 0 for positives.
/// `+ 0.0` keeps the score off −0 so that its bits order like its value.
#[must_use]
pub fn mining_score(cross_entropy: f32, positive: bool) -> f32 {
    if positive {
        0.0
    } else {
        cross_entropy + 0.0
    }
}

/// Smooth-L1 with β = 1: `0.5 d²` when `|d| < 1`, else `|d| − 0.5`.
#[must_use]
pub fn smooth_l1(d: f32) -> f32 {
    let a = d.abs();
    if a < 1.0 {
        0.5 * d * d
    } else {
        a - 0.5
    }
}

/// Derivative of [`smooth_l1`]: `d` when `|d| < 1`, else `sign(d)` (SPEC §6).
#[must_use]
pub fn smooth_l1_grad(d: f32) -> f32 {
    if d.abs() < 1.0 {
        d
    } else if d > 0.0 {
        1.0
    } else {
        -1.0
    }
}

/// The localisation terms of one positive prior.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LocTerms {
    /// Σ over the 4 coordinates of smooth-L1(student − target).
    pub smooth_l1: f32,
    /// `d_s = ‖student − target‖²`.
    pub student_sq: f32,
    /// Whether the teacher bound holds: `d_s + reg_m > d_t` (SPEC §5).
    pub bounded: bool,
}

/// Localisation terms of one positive prior (SPEC §5).
#[must_use]
pub fn loc_terms(
    student_loc: [f32; 4],
    teacher_loc: [f32; 4],
    loc_target: [f32; 4],
    reg_m: f32,
) -> LocTerms {
    let mut smooth = 0.0;
    let mut student_sq = 0.0;
    let mut teacher_sq = 0.0;
    for i in 0..4 {
        let ds = student_loc[i] - loc_target[i];
        let dt = teacher_loc[i] - loc_target[i];
        smooth += smooth_l1(ds);
        student_sq += ds * ds;
        teacher_sq += dt * dt;
    }
    LocTerms {
        smooth_l1: smooth,
        student_sq,
        bounded: student_sq + reg_m > teacher_sq,
    }
}

/// The soft-target term of one row (SPEC §5), not yet divided by N: with
/// `q = softmax(teacher / T)`, `p = softmax(student / T)`,
/// - class-weighted (`neg_w > 1`): `T² Σ_c w_c (q_c + ε)(ln(q_c + ε) − ln(p_c + ε))`;
/// - otherwise plain KL: `T² Σ_c q_c (ln q_c − ln p_c)`, with `q_c = 0` terms counting 0.
///
/// Computed in f64 (only the selected rows come here): a student close to its teacher makes
/// the terms cancel.
#[must_use]
pub fn soft_term(student_row: &[f32], teacher_row: &[f32], config: &LossConfig) -> f64 {
    let t = f64::from(config.temperature);
    let inv_t = 1.0 / t;
    let lse_s = log_sum_exp_f64(student_row, inv_t);
    let lse_t = log_sum_exp_f64(teacher_row, inv_t);
    let mut sum = 0.0;
    if config.weighted_soft_loss() {
        let eps = f64::from(config.eps);
        for (c, (&s, &te)) in student_row.iter().zip(teacher_row).enumerate() {
            let q = math::exp_f64(f64::from(te) * inv_t - lse_t) + eps;
            let p = math::exp_f64(f64::from(s) * inv_t - lse_s) + eps;
            let w = f64::from(if c == 0 { config.neg_w } else { config.pos_w });
            sum += w * q * (math::ln_f64(q) - math::ln_f64(p));
        }
    } else {
        for (&s, &te) in student_row.iter().zip(teacher_row) {
            let log_q = f64::from(te) * inv_t - lse_t;
            let q = math::exp_f64(log_q);
            if q > 0.0 {
                sum += q * (log_q - (f64::from(s) * inv_t - lse_s));
            }
        }
    }
    t * t * sum
}

/// Per-prior outputs of the stage over one image, and the sums it can already take.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LocSums {
    /// Σ over positives of smooth-L1 (un-normalised `loss_l`).
    pub loc: f64,
    /// Σ over positives whose teacher bound holds of `d_s` (un-normalised `l2_loss`).
    pub l2: f64,
    /// Positives whose teacher bound holds.
    pub num_bounded: u32,
}

/// Runs the stage over one image: writes each prior's `cross_entropy` and `mining_score`
/// (`student_conf` is `P × C` row-major) and sums the localisation terms over the positives.
///
/// # Panics
/// If the slices do not agree on P and C.
#[allow(clippy::too_many_arguments)] // one slice per tensor, as the shader binds them
pub fn prior_terms_image(
    student_conf: &[f32],
    student_loc: &[[f32; 4]],
    teacher_loc: &[[f32; 4]],
    conf_target: &[u32],
    loc_target: &[[f32; 4]],
    config: &LossConfig,
    cross_entropy_out: &mut [f32],
    mining_score_out: &mut [f32],
) -> LocSums {
    let num_classes = config.num_classes as usize;
    assert_eq!(student_conf.len(), conf_target.len() * num_classes);
    let mut sums = LocSums::default();
    for (p, row) in student_conf.chunks_exact(num_classes).enumerate() {
        let target = conf_target[p];
        let positive = target > 0;
        let ce = cross_entropy(log_sum_exp(row, 1.0), row, target);
        cross_entropy_out[p] = ce;
        mining_score_out[p] = mining_score(ce, positive);
        if positive {
            let terms = loc_terms(student_loc[p], teacher_loc[p], loc_target[p], config.reg_m);
            sums.loc += f64::from(terms.smooth_l1);
            if terms.bounded {
                sums.l2 += f64::from(terms.student_sq);
                sums.num_bounded += 1;
            }
        }
    }
    sums
}
