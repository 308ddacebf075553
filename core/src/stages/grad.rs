//! Stage **grad** (SPEC §6): ∂total/∂student_conf and ∂total/∂student_loc, with matching,
//! mining and the teacher bound held fixed. Twin of `shaders/grad.wgsl`.

use crate::config::LossConfig;
use crate::math;
use crate::stages::prior_terms::{loc_terms, log_sum_exp_f64, smooth_l1_grad};

/// The factors `w_term / N` that the gradients of the four terms carry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScale {
    /// `w_soft / N`.
    pub soft: f32,
    /// `w_conf / N`.
    pub conf: f32,
    /// `w_l2 / N`.
    pub l2: f32,
    /// `w_loc / N`.
    pub loc: f32,
}

impl GradScale {
    /// The factors for a batch with `num_pos` positives in all.
    #[must_use]
    pub fn new(config: &LossConfig, num_pos: u32) -> Self {
        let n = num_pos.max(1) as f32;
        let w = config.weights;
        Self {
            soft: w.soft / n,
            conf: w.conf / n,
            l2: w.l2 / n,
            loc: w.loc / n,
        }
    }
}

/// Writes the gradient of one selected row's `w_conf·CE + w_soft·soft` into `out`:
/// - cross-entropy: `softmax(s)_c − [c = target]`;
/// - plain KL: `T (p_c − q_c)`;
/// - class-weighted: `T p_c (G − h_c)` with `h_c = w_c (q_c + ε) / (p_c + ε)`, `G = Σ h_c p_c`.
///
/// Computed in f64 and rounded once: with few positives the factors `w / N` are large, and
/// `softmax − 1` or `p − q` near 1 would lose the small results' digits in f32. Only the
/// selected rows come here, so the cost is small.
pub fn conf_grad_row(
    student_row: &[f32],
    teacher_row: &[f32],
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    out: &mut [f32],
) {
    let t = f64::from(config.temperature);
    let inv_t = 1.0 / t;
    let lse = log_sum_exp_f64(student_row, 1.0);
    let lse_s = log_sum_exp_f64(student_row, inv_t);
    let lse_t = log_sum_exp_f64(teacher_row, inv_t);
    let conf_scale = f64::from(scale.conf);
    let soft_scale = f64::from(scale.soft) * t;
    let probabilities = |c: usize| {
        let p = math::exp_f64(f64::from(student_row[c]) * inv_t - lse_s);
        let q = math::exp_f64(f64::from(teacher_row[c]) * inv_t - lse_t);
        (p, q)
    };
    let cross_entropy = |c: usize| {
        math::exp_f64(f64::from(student_row[c]) - lse) - f64::from(u8::from(c as u32 == target))
    };
    if config.weighted_soft_loss() {
        let eps = f64::from(config.eps);
        let class_w = |c: usize| f64::from(if c == 0 { config.neg_w } else { config.pos_w });
        let g_sum: f64 = (0..out.len())
            .map(|c| {
                let (p, q) = probabilities(c);
                class_w(c) * (q + eps) / (p + eps) * p
            })
            .sum();
        for (c, o) in out.iter_mut().enumerate() {
            let (p, q) = probabilities(c);
            let h = class_w(c) * (q + eps) / (p + eps);
            *o = (conf_scale * cross_entropy(c) + soft_scale * p * (g_sum - h)) as f32;
        }
    } else {
        for (c, o) in out.iter_mut().enumerate() {
            let (p, q) = probabilities(c);
            *o = (conf_scale * cross_entropy(c) + soft_scale * (p - q)) as f32;
        }
    }
}

/// The gradient of one positive prior's `w_loc·smooth-L1 + w_l2·bounded L2`.
#[must_use]
pub fn loc_grad_row(
    student_loc: [f32; 4],
    teacher_loc: [f32; 4],
    loc_target: [f32; 4],
    scale: &GradScale,
    config: &LossConfig,
) -> [f32; 4] {
    let bounded = loc_terms(student_loc, teacher_loc, loc_target, config.reg_m).bounded;
    let l2 = if bounded { 2.0 * scale.l2 } else { 0.0 };
    core::array::from_fn(|i| {
        let d = student_loc[i] - loc_target[i];
        scale.loc * smooth_l1_grad(d) + l2 * d
    })
}

/// Writes both gradients of one image: rows outside the selection get a zero conf gradient,
/// non-positive priors a zero loc gradient (SPEC §6). With `already_zero` the caller
/// promises zeroed outputs and those rows are not written at all (on a fresh allocation,
/// their memory is then never touched).
///
/// # Panics
/// If the slices do not agree on P and C.
#[allow(clippy::too_many_arguments)] // one slice per tensor, as the shader binds them
pub fn grad_image(
    student_conf: &[f32],
    teacher_conf: &[f32],
    student_loc: &[[f32; 4]],
    teacher_loc: &[[f32; 4]],
    conf_target: &[u32],
    loc_target: &[[f32; 4]],
    neg_mask: &[u8],
    scale: &GradScale,
    config: &LossConfig,
    grad_conf: &mut [f32],
    grad_loc: &mut [[f32; 4]],
    already_zero: bool,
) {
    let num_classes = config.num_classes as usize;
    assert_eq!(grad_conf.len(), student_conf.len());
    let rows = student_conf
        .chunks_exact(num_classes)
        .zip(teacher_conf.chunks_exact(num_classes))
        .zip(grad_conf.chunks_exact_mut(num_classes));
    for (p, ((student_row, teacher_row), out)) in rows.enumerate() {
        let target = conf_target[p];
        if target > 0 || neg_mask[p] != 0 {
            conf_grad_row(student_row, teacher_row, target, scale, config, out);
        } else if !already_zero {
            out.fill(0.0);
        }
        if target > 0 {
            grad_loc[p] =
                loc_grad_row(student_loc[p], teacher_loc[p], loc_target[p], scale, config);
        } else if !already_zero {
            grad_loc[p] = [0.0; 4];
        }
    }
}
