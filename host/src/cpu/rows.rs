//! The selected rows' conf gradient of the core's [`conf_grad_row`], bit for bit, with each
//! exponential taken once: the core's closures compute `p_c` and `q_c` twice per class in
//! the class-weighted form, and at T = 1 the softmax of the cross-entropy term is `p_c`
//! itself (the same f64 expression: `x · 1 = x`, and `lse_s` is then `lse`). Tested against
//! the core in `tests/fast_cpu.rs` (gradients compared with `assert_eq`).

use ssdkd_core::math::exp_f64;
use ssdkd_core::stages::grad::GradScale;
use ssdkd_core::stages::prior_terms::{row_max, shifted_log_sum_exp_f64};
use ssdkd_core::LossConfig;

/// Per-thread scratch: each class's `p_c` and `q_c`.
#[derive(Clone, Debug, Default)]
pub struct RowScratch {
    p: Vec<f64>,
    q: Vec<f64>,
}

/// [`ssdkd_core::stages::grad::conf_grad_row`], the same operations on the same values,
/// each exponential once.
pub fn conf_grad_row(
    student_row: &[f32],
    teacher_row: &[f32],
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    out: &mut [f32],
    scratch: &mut RowScratch,
) {
    let t = f64::from(config.temperature);
    let inv_t = 1.0 / t;
    let (max_s, max_t) = (row_max(student_row), row_max(teacher_row));
    let lse = shifted_log_sum_exp_f64(student_row, max_s, 1.0);
    let unit = inv_t == 1.0;
    let lse_s = if unit {
        lse
    } else {
        shifted_log_sum_exp_f64(student_row, max_s, inv_t)
    };
    let lse_t = shifted_log_sum_exp_f64(teacher_row, max_t, inv_t);
    let shifted = |x: f32, max: f32| f64::from(x) - f64::from(max);
    let conf_scale = f64::from(scale.conf);
    let soft_scale = f64::from(scale.soft) * t;
    scratch.p.clear();
    scratch.q.clear();
    for (&s, &te) in student_row.iter().zip(teacher_row) {
        scratch.p.push(exp_f64(shifted(s, max_s) * inv_t - lse_s));
        scratch.q.push(exp_f64(shifted(te, max_t) * inv_t - lse_t));
    }
    let (p, q) = (&scratch.p, &scratch.q);
    let cross_entropy = |c: usize| {
        let softmax = if unit {
            p[c]
        } else {
            exp_f64(shifted(student_row[c], max_s) - lse)
        };
        softmax - f64::from(u8::from(c as u32 == target))
    };
    if config.weighted_soft_loss() {
        let eps = f64::from(config.eps);
        let class_w = |c: usize| f64::from(if c == 0 { config.neg_w } else { config.pos_w });
        let g_sum: f64 = (0..out.len())
            .map(|c| class_w(c) * (q[c] + eps) / (p[c] + eps) * p[c])
            .sum();
        for (c, o) in out.iter_mut().enumerate() {
            let h = class_w(c) * (q[c] + eps) / (p[c] + eps);
            *o = (conf_scale * cross_entropy(c) + soft_scale * p[c] * (g_sum - h)) as f32;
        }
    } else {
        for (c, o) in out.iter_mut().enumerate() {
            *o = (conf_scale * cross_entropy(c) + soft_scale * (p[c] - q[c])) as f32;
        }
    }
}
