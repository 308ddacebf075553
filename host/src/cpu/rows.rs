//! The selected rows' cross-entropy, soft term and conf gradient: the core's functions
//! ([`cross_entropy_from`], [`add_soft_terms`], [`conf_grad_row_kept`]) fed with
//! exponentials taken in vectorised loops (`simd.rs`), each exponential once. The soft
//! term (forward) keeps each selected row's `p_c = softmax(student / T)_c` and
//! `q_c = softmax(teacher / T)_c` (the core's [`SoftmaxF64`], same values) for the
//! gradient (backward). Tested against the core in `tests/fast_cpu.rs` (sums and gradients
//! compared with `assert_eq`).

use super::simd::{row_exps_f32, soft_terms, softmax_exps, LANES_F32};
use ssdkd_core::math::{Lanes, LANES};
use ssdkd_core::stages::prior_terms::{cross_entropy_from, row_max, SoftmaxF64};
use ssdkd_core::stages::reduce::soft_term_total;
use ssdkd_core::LossConfig;

#[cfg(doc)]
use ssdkd_core::stages::{grad::conf_grad_row_kept, reduce::add_soft_terms};

/// The core's [`cross_entropy`](ssdkd_core::stages::prior_terms::cross_entropy) of a row
/// (the mining's and the loss's), bit for bit: the core's [`row_max`], the exponentials of
/// `x − max` into `scratch` padded to a multiple of [`LANES_F32`] by the vectorised
/// [`row_exps_f32`] (the padding's are 0, which adds nothing to a lane), then the core's
/// [`cross_entropy_from`] of their [`Lanes`] sum.
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

/// The core's [`soft_term`](ssdkd_core::stages::reduce::soft_term) of one selected row,
/// bit for bit, each exponential taken once: the row's `e_c` (student and teacher side by
/// side in `scratch`, each padded to a multiple of [`LANES`]) by the vectorised
/// [`softmax_exps`], serving both the sums ([`SoftmaxF64::from_exps`]) and the core's
/// [`add_soft_terms`] over the whole row (vectorised by [`soft_terms`]), which turns them
/// into the `p_c`, `q_c`. Appends the row's `p_c` then its `q_c` (2C values) to `kept` for
/// [`conf_grad_row`].
pub fn row_soft_term(
    from_student: &[f32],
    from_teacher: &[f32],
    classes: usize,
    config: &LossConfig,
    kept: &mut Vec<f64>,
    scratch: &mut Vec<f64>,
) -> f64 {
    let (student_row, teacher_row) = (&from_student[..classes], &from_teacher[..classes]);
    let inv_t = 1.0 / f64::from(config.temperature);
    let padded = classes.next_multiple_of(LANES);
    // p then q, each padded (the padding's values are never added).
    scratch.resize(2 * padded, 0.0);
    let (max_s, max_t) = (row_max(student_row), row_max(teacher_row));
    softmax_exps(
        from_student,
        max_s,
        from_teacher,
        max_t,
        classes,
        inv_t,
        scratch,
    );
    let (p, q) = scratch.split_at_mut(padded);
    let student = SoftmaxF64::from_exps(student_row, max_s, inv_t, &p[..classes]);
    let teacher = SoftmaxF64::from_exps(teacher_row, max_t, inv_t, &q[..classes]);
    let sum = soft_terms(config, &student, &teacher, classes, p, q);
    kept.extend_from_slice(&p[..classes]);
    kept.extend_from_slice(&q[..classes]);
    soft_term_total(config, &sum)
}
