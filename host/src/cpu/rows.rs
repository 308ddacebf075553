//! The selected rows' cross-entropy, soft term and conf gradient: the core's functions
//! ([`cross_entropy_from`], [`add_soft_terms`], and [`conf_grad`]'s pieces) fed with
//! exponentials taken in vectorised loops (`simd.rs`), each exponential once. The soft
//! term (forward) keeps each selected row's `p_c = softmax(student / T)_c` and
//! `q_c = softmax(teacher / T)_c` (the core's [`SoftmaxF64`], same values) for the
//! gradient (backward, [`conf_grad_kept`]). Tested against the core in
//! `tests/fast_cpu.rs` (sums and gradients compared with `assert_eq`).

use super::simd::{row_exps_f32, soft_terms, softmax_exps, LANES_F32};
use ssdkd_core::math::{Lanes, LANES};
use ssdkd_core::stages::grad::{
    ce_grad, direct_ce, direct_soft, grad_entry, soft_grad, soft_ratio, top_class, ClassProbs,
    GradForm, RestSums,
};
use ssdkd_core::stages::prior_terms::{cross_entropy_from, row_max, SoftmaxF64};
use ssdkd_core::stages::reduce::soft_term_total;
use ssdkd_core::{GradScale, LossConfig};

#[cfg(doc)]
use ssdkd_core::stages::{
    grad::{add_class, conf_grad},
    reduce::add_soft_terms,
};

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
/// [`conf_grad_kept`].
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

/// The core's [`conf_grad`] of one selected row, bit for bit, from the row's
/// probabilities `kept`: its `p_c` then its `q_c` (2C values, [`SoftmaxF64::prob`]'s bits,
/// as [`row_soft_term`] keeps them). At T = 1 the cross-entropy's softmax is `p_c` itself
/// (`x · 1 = x`); otherwise it is taken from the row ([`conf_grad_kept_at_t`]).
#[inline]
pub fn conf_grad_kept(
    student_row: &[f32],
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    kept: &[f64],
    out: &mut [f32],
) {
    let classes = student_row.len();
    let (p, q) = (&kept[..classes], &kept[classes..2 * classes]);
    let out = &mut out[..classes];
    let top = top_class(student_row);
    if config.temperature != 1.0 {
        conf_grad_kept_at_t(student_row, top, target, scale, config, p, q, out);
        return;
    }
    let class_probs = |c: usize| ClassProbs {
        softmax: p[c],
        p: p[c],
        q: q[c],
    };
    kept_entries(top, target, scale, config, class_probs, out);
}

/// [`conf_grad_kept`] at T ≠ 1, with the cross-entropy's softmax from the row (apart,
/// so that the T = 1 loops vectorise).
#[inline(never)]
#[allow(clippy::too_many_arguments)] // conf_grad_kept's, with the row's probabilities split
fn conf_grad_kept_at_t(
    student_row: &[f32],
    top: usize,
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    p: &[f64],
    q: &[f64],
    out: &mut [f32],
) {
    let softmax = SoftmaxF64::new(student_row, 1.0);
    let class_probs = |c: usize| ClassProbs {
        softmax: softmax.prob(c),
        p: p[c],
        q: q[c],
    };
    kept_entries(top, target, scale, config, class_probs, out);
}

/// The entries of [`conf_grad`] from `class_probs(c)`, each class's probabilities: `G`
/// first (class-weighted form), then every entry in the direct form ([`direct_ce`],
/// [`direct_soft`]; a flat loop, which vectorises), then the at most two entries whose
/// probability is over 1/2 again from the sums over the other classes
/// ([`kept_complements`]), taken only then. The same operations in the same order as
/// the core's two loops, so the same bits.
#[inline(always)]
fn kept_entries(
    top: usize,
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    class_probs: impl Fn(usize) -> ClassProbs<f64>,
    out: &mut [f32],
) {
    let target = target as usize;
    let num_classes = out.len();
    if num_classes == 0 {
        return;
    }
    let form = GradForm::<f64>::new(scale, config);
    let mut g_sum = 0.0;
    if form.weighted {
        g_sum = (0..num_classes).fold(0.0, |sum, c| {
            let k = class_probs(c);
            sum + soft_ratio(&form, c, k.p, k.q) * k.p
        });
    }
    // The branch in `direct_soft` is the same for every class: the loop is unswitched and
    // each form vectorises.
    for (c, o) in out.iter_mut().enumerate() {
        let k = class_probs(c);
        *o = grad_entry(
            &form,
            direct_ce(c, target, k.softmax),
            direct_soft(&form, c, k, g_sum),
        );
    }
    let ce_complement = target < num_classes && class_probs(target).softmax > 0.5;
    let soft_complement = class_probs(top).p > 0.5;
    if ce_complement || soft_complement {
        kept_complements(
            &form,
            top,
            target,
            ce_complement,
            soft_complement,
            g_sum,
            &class_probs,
            out,
        );
    }
}

/// Writes again the entries at the target and the class `top` by the core's [`ce_grad`]
/// and [`soft_grad`], from the sums of the core's [`add_class`] that they read (each in
/// class order, so the same bits): over the classes other than `top` where
/// `soft_complement`, other than the target where `ce_complement`, with `G` from the
/// direct form's pass. Apart from [`kept_entries`]' loops, so that those vectorise.
#[inline(never)]
#[allow(clippy::too_many_arguments)] // the row's form, classes, complements and probabilities
fn kept_complements(
    form: &GradForm<f64>,
    top: usize,
    target: usize,
    ce_complement: bool,
    soft_complement: bool,
    g_sum: f64,
    class_probs: &impl Fn(usize) -> ClassProbs<f64>,
    out: &mut [f32],
) {
    let num_classes = out.len();
    let mut sums = RestSums {
        g_sum,
        ..RestSums::default()
    };
    if soft_complement {
        for c in (0..num_classes).filter(|&c| c != top) {
            let k = class_probs(c);
            sums.rest_p += k.p;
            if form.weighted {
                sums.rest_ph += k.p * soft_ratio(form, c, k.p, k.q);
            } else {
                sums.rest_q += k.q;
            }
        }
    }
    if ce_complement {
        for c in (0..num_classes).filter(|&c| c != target) {
            sums.rest_ce += class_probs(c).softmax;
        }
    }
    let fixes = if top == target { 1 } else { 2 };
    for c in [target, top].into_iter().take(fixes) {
        if c < num_classes {
            let k = class_probs(c);
            let ce = ce_grad(c, target, k.softmax, sums.rest_ce);
            out[c] = grad_entry(form, ce, soft_grad(form, c, top, k, &sums));
        }
    }
}
