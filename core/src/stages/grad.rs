//! Stage **grad** (SPEC §6): ∂total/∂student_conf and ∂total/∂student_loc, with matching,
//! mining and the teacher bound held fixed. Twin of `shaders/grad.wgsl`, kernel by kernel:
//! [`grad_conf`] and [`grad_loc`], each a loop over priors (a thread per prior there).
//!
//! A selected row's conf gradient has two forms here: [`conf_grad_row`], the reference,
//! direct in f64 and rounded once (exact to f32 rounding), and
//! [`conf_grad_row_complement`], the port of the GPU's f32 algorithm (the target's and
//! the top class's entries from the other classes' sums). The CPU backend runs the
//! reference; a test holds the port to it within SPEC §7.

use crate::config::LossConfig;
use crate::math;
use crate::stages::prior_terms::{
    classes_of, loc_terms, row_max, shifted_log_sum_exp, smooth_l1_grad, SoftmaxF64,
};

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
    let softmax = SoftmaxF64::new(student_row, 1.0);
    let student = SoftmaxF64::new(student_row, inv_t);
    let teacher = SoftmaxF64::new(teacher_row, inv_t);
    let conf_scale = f64::from(scale.conf);
    let soft_scale = f64::from(scale.soft) * t;
    let probabilities = |c: usize| (student.prob(c), teacher.prob(c));
    let cross_entropy = |c: usize| softmax.prob(c) - f64::from(u8::from(c as u32 == target));
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

/// The GPU's f32 algorithm for one selected row's conf gradient (`grad_conf` in
/// `grad.wgsl`), ported line by line: the same result as [`conf_grad_row`] where f32
/// suffices, the form the GPU runs. In f32, `softmax − 1` at the target and `p − q` or
/// `G − h` at a class whose `p` is near 1 lose their digits; where that probability is over
/// 1/2 they are taken from the other classes' sums instead: the target's cross-entropy
/// term is `−Σ_{c≠t} softmax_c`, and the class `top` of largest logit (the only `p` that
/// can be over 1/2) gets `Σ_{c≠top} q_c − Σ_{c≠top} p_c`, or
/// `G − h_top = Σ_{c≠top} p_c h_c − h_top Σ_{c≠top} p_c`. (Below 1/2 the direct form is
/// the exact one: the complements would cancel instead, e.g. at a large temperature.)
pub fn conf_grad_row_complement(
    student_row: &[f32],
    teacher_row: &[f32],
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    out: &mut [f32],
) {
    let num_classes = student_row.len();
    let target_class = target as usize;
    let t = config.temperature;
    let inv_t = 1.0 / t;
    let mut top = 0;
    for c in 1..num_classes {
        if student_row[c] > student_row[top] {
            top = c;
        }
    }
    // Log-probabilities as (x − max) · scale − ln Σ: no large numbers cancel.
    let max_s = student_row[top];
    let max_t = row_max(teacher_row);
    let lse = shifted_log_sum_exp(student_row, max_s, 1.0);
    let lse_s = shifted_log_sum_exp(student_row, max_s, inv_t);
    let lse_t = shifted_log_sum_exp(teacher_row, max_t, inv_t);
    let soft_scale = scale.soft * t;
    let eps = config.eps;
    let weighted = config.weighted_soft_loss();
    let class_w = |c: usize| if c == 0 { config.neg_w } else { config.pos_w };
    let mut g_sum = 0.0;
    let mut rest_p = 0.0;
    let mut rest_q = 0.0;
    let mut rest_ph = 0.0;
    let mut rest_ce = 0.0;
    for c in 0..num_classes {
        let s = student_row[c];
        let q = math::exp((teacher_row[c] - max_t) * inv_t - lse_t);
        let p = math::exp((s - max_s) * inv_t - lse_s);
        let h = class_w(c) * (q + eps) / (p + eps);
        g_sum += h * p;
        if c != top {
            rest_p += p;
            rest_q += q;
            rest_ph += p * h;
        }
        if c != target_class {
            rest_ce += math::exp((s - max_s) - lse);
        }
    }
    for c in 0..num_classes {
        let s = student_row[c];
        let q = math::exp((teacher_row[c] - max_t) * inv_t - lse_t);
        let p = math::exp((s - max_s) * inv_t - lse_s);
        let softmax = math::exp((s - max_s) - lse);
        // The complements only where they are the exact side: a probability over 1/2.
        let ce = if c == target_class {
            if softmax > 0.5 {
                -rest_ce
            } else {
                softmax - 1.0
            }
        } else {
            softmax
        };
        let complement = c == top && p > 0.5;
        let soft = if weighted {
            let h = class_w(c) * (q + eps) / (p + eps);
            p * if complement {
                rest_ph - h * rest_p
            } else {
                g_sum - h
            }
        } else if complement {
            rest_q - rest_p
        } else {
            p - q
        };
        out[c] = scale.conf * ce + soft_scale * soft;
    }
}

/// A loop over priors (`grad_conf` in `grad.wgsl`): each selected row's conf gradient by
/// [`conf_grad_row`], 0 on the other rows. With `already_zero` the caller promises a zeroed
/// output and the other rows are not written at all (on a fresh allocation, their memory
/// is then never touched).
///
/// # Panics
/// If the slices do not agree on P and C.
#[allow(clippy::too_many_arguments)] // one slice per tensor, as the shader binds them
pub fn grad_conf(
    student_conf: &[f32],
    teacher_conf: &[f32],
    conf_target: &[u32],
    neg_mask: &[u8],
    scale: &GradScale,
    config: &LossConfig,
    grad_student_conf: &mut [f32],
    already_zero: bool,
) {
    let num_classes = classes_of(student_conf.len(), conf_target.len());
    assert_eq!(grad_student_conf.len(), student_conf.len());
    if num_classes == 0 {
        return;
    }
    let rows = student_conf
        .chunks_exact(num_classes)
        .zip(teacher_conf.chunks_exact(num_classes))
        .zip(grad_student_conf.chunks_exact_mut(num_classes));
    for (p, ((student_row, teacher_row), out)) in rows.enumerate() {
        let target_class = conf_target[p];
        if target_class == 0 && neg_mask[p] == 0 {
            if !already_zero {
                out.fill(0.0);
            }
            continue;
        }
        conf_grad_row(student_row, teacher_row, target_class, scale, config, out);
    }
}

/// A loop over priors (`grad_loc` in `grad.wgsl`): each positive prior's loc gradient by
/// [`loc_grad_row`], 0 elsewhere (not written with `already_zero`, as in [`grad_conf`]).
/// The GPU reads the teacher bound from `prior_loss`; the CPU tests it again from
/// `teacher_loc`, with the same f32 operations.
///
/// # Panics
/// If the slices do not agree on P.
#[allow(clippy::too_many_arguments)] // one slice per tensor, as the shader binds them
pub fn grad_loc(
    student_loc: &[[f32; 4]],
    teacher_loc: &[[f32; 4]],
    conf_target: &[u32],
    loc_target: &[[f32; 4]],
    scale: &GradScale,
    config: &LossConfig,
    grad_student_loc: &mut [[f32; 4]],
    already_zero: bool,
) {
    for (p, out) in grad_student_loc.iter_mut().enumerate() {
        if conf_target[p] == 0 {
            if !already_zero {
                *out = [0.0; 4];
            }
            continue;
        }
        *out = loc_grad_row(student_loc[p], teacher_loc[p], loc_target[p], scale, config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (no dependency in the no_std core).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The GPU's f32 complement algorithm agrees with the f64 reference to SPEC §7
    /// (1e-3 relative + 1e-7 absolute) on rows with one positive in the batch (N = 1, the
    /// largest w/N), plain and class-weighted, with a confident top class (p near 1), where
    /// the direct f32 formula would lose the small entries' digits; over the temperatures
    /// the GPU takes (up to 20) and logits up to ±1e6.
    #[test]
    fn the_complement_port_agrees_with_the_f64_reference_with_few_positives() {
        let mut rng = Lcg(7);
        let mut worst: f64 = 0.0;
        for case in 0..1200 {
            let num_classes = 2 + case % 30;
            let weighted = case % 2 == 1;
            let config = LossConfig {
                temperature: [1.0, 2.0, 4.0, 0.5, 20.0, 0.05, 10.0][case % 7],
                neg_w: if weighted { 1.5 } else { 1.0 },
                ..LossConfig::DEFAULT
            };
            let sharp = [1.0, 4.0, 12.0, 1e3, 1e6][case % 5];
            let student: Vec<f32> = (0..num_classes).map(|_| rng.next() * sharp).collect();
            let teacher: Vec<f32> = (0..num_classes).map(|_| rng.next() * sharp).collect();
            let target = (case % num_classes) as u32;
            let scale = GradScale::new(&config, 1);
            let mut reference = vec![0.0; num_classes];
            let mut port = vec![0.0; num_classes];
            conf_grad_row(&student, &teacher, target, &scale, &config, &mut reference);
            conf_grad_row_complement(&student, &teacher, target, &scale, &config, &mut port);
            for (c, (&r, &g)) in reference.iter().zip(&port).enumerate() {
                let bound = 1e-3 * f64::from(r.abs()) + 1e-7;
                let error = f64::from((r - g).abs());
                assert!(
                    error <= bound,
                    "case {case} class {c}: port {g} against reference {r}"
                );
                worst = worst.max(error / bound);
            }
        }
        // The cases are not trivially equal: the port really runs in f32.
        assert!(worst > 0.0);
    }

    /// The reference's entries of a plain row sum to 0 (softmax and p − q both sum to 0),
    /// and the target's cross-entropy entry is negative.
    #[test]
    fn a_plain_row_gradient_sums_to_zero() {
        let config = LossConfig::DEFAULT;
        let scale = GradScale::new(&config, 2);
        let student = [1.0, -2.0, 0.5, 3.0];
        let teacher = [0.0, 1.0, -1.0, 2.0];
        let mut out = [0.0; 4];
        conf_grad_row(&student, &teacher, 2, &scale, &config, &mut out);
        assert!(out.iter().map(|&g| f64::from(g)).sum::<f64>().abs() < 1e-6);
        let mut ce_only = [0.0; 4];
        let no_soft = GradScale { soft: 0.0, ..scale };
        conf_grad_row(&student, &teacher, 2, &no_soft, &config, &mut ce_only);
        assert!(ce_only[2] < 0.0 && ce_only[0] > 0.0);
    }
}
