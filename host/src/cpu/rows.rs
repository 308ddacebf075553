//! The selected rows' soft term and conf gradient, bit for bit the core's
//! ([`ssdkd_core::stages::reduce::soft_term`], [`ssdkd_core::stages::grad::conf_grad_row`]),
//! with each exponential taken once: the soft term (forward) keeps each selected row's
//! exponentials, turns them into `p_c = softmax(student / T)_c` and
//! `q_c = softmax(teacher / T)_c` (the core's [`SoftmaxF64`], same values), and keeps those
//! for the gradient (backward), which the core computes again from the same expressions;
//! at T = 1 the cross-entropy's softmax is `p_c` itself (`x · 1 = x`). Tested against the
//! core in `tests/fast_cpu.rs` (sums and gradients compared with `assert_eq`).

use super::simd::{
    probabilities, row_exps_f32, softmax_exps, weighted_terms, LANES_F32, LANES_F64,
};
use ssdkd_core::math::Lanes;
use ssdkd_core::stages::grad::GradScale;
use ssdkd_core::stages::prior_terms::{cross_entropy_from, SoftmaxF64};
use ssdkd_core::stages::reduce::kl_class_term;
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

/// The core's [`cross_entropy`](ssdkd_core::stages::prior_terms::cross_entropy) of a row
/// (the mining's and the loss's), bit for bit: the same maximum (see [`row_max`]), the
/// exponentials of `x − max` into `scratch` padded to a multiple of [`LANES_F32`] by the
/// vectorised [`row_exps_f32`] (the padding's are 0, which adds nothing to a lane), then
/// the core's [`cross_entropy_from`] of their [`Lanes`] sum.
pub fn row_cross_entropy(
    from_row: &[f32],
    classes: usize,
    target: u32,
    scratch: &mut Vec<f32>,
) -> f32 {
    let max = row_max(&from_row[..classes]);
    scratch.resize(classes.next_multiple_of(LANES_F32), 0.0);
    row_exps_f32(from_row, classes, max, scratch);
    let mut exps = Lanes::new();
    exps.add_all(scratch);
    cross_entropy_from(max, from_row[target as usize], &exps)
}

/// The core's `soft_term` of one selected row, each exponential taken once: the row's
/// `e_c` (student and teacher side by side in `scratch`, each padded to a multiple of
/// [`LANES_F64`]) by the vectorised [`softmax_exps`], serving both the sums
/// ([`SoftmaxF64::from_exps`]) and the `p_c`, `q_c`; the probabilities and the
/// class-weighted terms by [`weighted_terms`], the terms added in the core's order
/// ([`Lanes`]). Appends the row's `p_c` then its `q_c` (2C values) to `kept` for
/// [`conf_grad_row`].
pub fn soft_term(
    from_student: &[f32],
    from_teacher: &[f32],
    classes: usize,
    config: &LossConfig,
    kept: &mut Vec<f64>,
    scratch: &mut Vec<f64>,
) -> f64 {
    let (student_row, teacher_row) = (&from_student[..classes], &from_teacher[..classes]);
    let t = f64::from(config.temperature);
    let inv_t = 1.0 / t;
    let padded = classes.next_multiple_of(LANES_F64);
    // p, q, then the weighted terms, each padded (the padding's values are never read).
    scratch.resize(3 * padded, 0.0);
    let (max_s, max_t) = (row_max(student_row), row_max(teacher_row));
    softmax_exps(
        from_student,
        max_s,
        from_teacher,
        max_t,
        classes,
        inv_t,
        &mut scratch[..2 * padded],
    );
    let (p, rest) = scratch.split_at_mut(padded);
    let (q, terms) = rest.split_at_mut(padded);
    let student = SoftmaxF64::from_exps(student_row, max_s, inv_t, &p[..classes]);
    let teacher = SoftmaxF64::from_exps(teacher_row, max_t, inv_t, &q[..classes]);
    let mut sum = Lanes::new();
    if config.weighted_soft_loss() {
        weighted_terms(config, &student, &teacher, p, q, terms);
        sum.add_all(&terms[..classes]);
    } else {
        probabilities(&student, p);
        probabilities(&teacher, q);
        for (c, &q) in q[..classes].iter().enumerate() {
            sum.add(c, kl_class_term(c, q, &student, &teacher));
        }
    }
    let sum = sum.total();
    kept.extend_from_slice(&p[..classes]);
    kept.extend_from_slice(&q[..classes]);
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
    // At T = 1 the cross-entropy's softmax is the same computation as `p` (scale 1).
    let softmax = (inv_t != 1.0).then(|| SoftmaxF64::new(student_row, 1.0));
    let conf_scale = f64::from(scale.conf);
    let soft_scale = f64::from(scale.soft) * t;
    let cross_entropy = |c: usize| {
        let softmax = softmax.as_ref().map_or(p[c], |s| s.prob(c));
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
