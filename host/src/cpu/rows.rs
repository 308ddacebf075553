//! The selected rows' soft term and conf gradient, bit for bit the core's
//! ([`ssdkd_core::stages::reduce::soft_term`], [`ssdkd_core::stages::grad::conf_grad_row`]),
//! with each exponential taken once: the soft term (forward) keeps each selected row's
//! `p_c = softmax(student / T)_c` and `q_c = softmax(teacher / T)_c`, which the gradient
//! (backward) computes again in the core from the same f64 expressions; at T = 1 the
//! cross-entropy's softmax is `p_c` itself (`x · 1 = x`, and the student's log-sum-exp at
//! scale 1 is then `lse_s`). Tested against the core in `tests/fast_cpu.rs` (sums and
//! gradients compared with `assert_eq`).

use ssdkd_core::math::{exp_f64, ln_f64};
use ssdkd_core::stages::grad::GradScale;
use ssdkd_core::stages::prior_terms::shifted_log_sum_exp_f64;
use ssdkd_core::LossConfig;

/// The core's `row_max`, the same value, by four independent chains instead of one: `max`
/// (IEEE maxNum) is associative and commutative and passes over NaN, so the order does not
/// change the result; only the sign of a zero maximum can differ, and a zero maximum enters
/// the core's maths only as `x − max` with `x` ≠ 0 or as `e^(±0) = 1`.
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 4];
    let mut quads = row.chunks_exact(4);
    for quad in &mut quads {
        for (lane, &x) in lanes.iter_mut().zip(quad) {
            *lane = lane.max(x);
        }
    }
    let tail = quads
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    lanes[0].max(lanes[1]).max(lanes[2].max(lanes[3])).max(tail)
}

/// The core's `soft_term` of one selected row; with `keep`, appends the row's `p_c` then
/// its `q_c` (2C values) to `kept` for [`conf_grad_row`].
pub fn soft_term(
    student_row: &[f32],
    teacher_row: &[f32],
    config: &LossConfig,
    keep: bool,
    kept: &mut Vec<f64>,
) -> f64 {
    let t = f64::from(config.temperature);
    let inv_t = 1.0 / t;
    let (max_s, max_t) = (row_max(student_row), row_max(teacher_row));
    let lse_s = shifted_log_sum_exp_f64(student_row, max_s, inv_t);
    let lse_t = shifted_log_sum_exp_f64(teacher_row, max_t, inv_t);
    let shifted = |x: f32, max: f32| f64::from(x) - f64::from(max);
    let start = kept.len();
    let classes = student_row.len();
    if keep {
        kept.resize(start + 2 * classes, 0.0);
    }
    let mut sum = 0.0;
    if config.weighted_soft_loss() {
        let eps = f64::from(config.eps);
        for (c, (&s, &te)) in student_row.iter().zip(teacher_row).enumerate() {
            let q_raw = exp_f64(shifted(te, max_t) * inv_t - lse_t);
            let p_raw = exp_f64(shifted(s, max_s) * inv_t - lse_s);
            if keep {
                kept[start + c] = p_raw;
                kept[start + classes + c] = q_raw;
            }
            let (q, p) = (q_raw + eps, p_raw + eps);
            let w = f64::from(if c == 0 { config.neg_w } else { config.pos_w });
            sum += w * q * (ln_f64(q) - ln_f64(p));
        }
    } else {
        for (c, (&s, &te)) in student_row.iter().zip(teacher_row).enumerate() {
            let log_q = shifted(te, max_t) * inv_t - lse_t;
            let q = exp_f64(log_q);
            let log_p = shifted(s, max_s) * inv_t - lse_s;
            if keep {
                kept[start + c] = exp_f64(log_p);
                kept[start + classes + c] = q;
            }
            if q > 0.0 {
                sum += q * (log_q - log_p);
            }
        }
    }
    t * t * sum
}

/// The core's `conf_grad_row` of one selected row from the `p_c`, `q_c` that
/// [`soft_term`] kept (`kept`: 2C values).
pub fn conf_grad_row(
    student_row: &[f32],
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    kept: &[f64],
    out: &mut [f32],
) {
    let classes = student_row.len();
    let (p, q) = kept.split_at(classes);
    let t = f64::from(config.temperature);
    let inv_t = 1.0 / t;
    let unit = inv_t == 1.0;
    let max_s = row_max(student_row);
    let lse = if unit {
        0.0 // not read: the softmax is p
    } else {
        shifted_log_sum_exp_f64(student_row, max_s, 1.0)
    };
    let conf_scale = f64::from(scale.conf);
    let soft_scale = f64::from(scale.soft) * t;
    let cross_entropy = |c: usize| {
        let softmax = if unit {
            p[c]
        } else {
            exp_f64(f64::from(student_row[c]) - f64::from(max_s) - lse)
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

#[cfg(test)]
mod tests {
    /// The four-chain maximum is the core's, NaN and infinities included.
    #[test]
    fn row_max_is_the_cores() {
        let rows: [&[f32]; 6] = [
            &[1.0, -2.0, 3.5, 0.25, 7.0, -9.0, 2.0],
            &[f32::NAN, -1.0, f32::NAN, -3.0, -0.5],
            &[f32::NAN; 5],
            &[-5.0],
            &[
                f32::NEG_INFINITY,
                -1e30,
                f32::INFINITY,
                2.0,
                0.0,
                1.0,
                3.0,
                4.0,
                5.0,
            ],
            &[],
        ];
        for row in rows {
            let core = ssdkd_core::stages::prior_terms::row_max(row);
            assert_eq!(super::row_max(row).to_bits(), core.to_bits(), "{row:?}");
        }
    }
}
