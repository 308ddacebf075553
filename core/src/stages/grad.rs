//! Stage **grad** (SPEC §6): ∂total/∂student_conf and ∂total/∂student_loc, with matching,
//! mining and the teacher bound held fixed. Twin of `shaders/grad.wgsl`, kernel by kernel:
//! [`grad_conf`] and [`grad_loc`], each a loop over priors (a thread per prior there).
//!
//! A selected row's conf gradient is [`conf_grad`], function by function the kernel's
//! `conf_grad` ([`top_class`], [`row_softmax`], [`class_probs`], [`add_class`], [`ce_grad`],
//! [`soft_grad`], [`grad_entry`]: the target's and the top class's entries from the other
//! classes' sums where their probability is over 1/2). The pieces are generic over their
//! float ([`GradFloat`]): the CPU runs them in f64 from the f64 softmaxes and rounds once,
//! the GPU in f32 (a test holds the f32 instantiation to the f64 one within SPEC §7). The
//! CPU backend's fast path (`host/src/cpu/rows.rs`) builds its own loop from the same
//! pieces, from the probabilities its forward pass kept.

use crate::config::LossConfig;
use crate::stages::prior_terms::{classes_of, loc_terms, smooth_l1_grad, SoftmaxF64};
use core::ops::{Add, Div, Mul, Neg, Sub};

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

/// A float the pieces of [`conf_grad`] run in: f64 on the CPU, f32 as the GPU's
/// `grad_conf` does.
pub trait GradFloat:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// From an f32 (exact).
    fn of(x: f32) -> Self;
    /// Rounded to f32.
    fn to_f32(self) -> f32;
}

impl GradFloat for f32 {
    #[inline(always)]
    fn of(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl GradFloat for f64 {
    #[inline(always)]
    fn of(x: f32) -> Self {
        f64::from(x)
    }
    #[inline(always)]
    #[allow(clippy::cast_possible_truncation)] // the one rounding, to the gradient's f32
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// What every entry of a selected row's conf gradient reads from the configuration, in
/// the float `F` (`GradForm` and `grad_form` in `grad.wgsl`, which read the rest from
/// `params`).
#[derive(Clone, Copy, Debug)]
pub struct GradForm<F> {
    /// `w_conf / N`.
    pub scale_conf: F,
    /// `T w_soft / N`.
    pub soft_scale: F,
    /// ε of the class-weighted form.
    pub eps: F,
    /// `w_0`, the background's class weight.
    pub neg_w: F,
    /// `w_c` of every other class.
    pub pos_w: F,
    /// The class-weighted form (`neg_w > 1`, SPEC §5).
    pub weighted: bool,
}

impl<F: GradFloat> GradForm<F> {
    /// The form of a batch's factors `scale` under `config`.
    #[must_use]
    #[inline(always)]
    pub fn new(scale: &GradScale, config: &LossConfig) -> Self {
        Self {
            scale_conf: F::of(scale.conf),
            soft_scale: F::of(scale.soft) * F::of(config.temperature),
            eps: F::of(config.eps),
            neg_w: F::of(config.neg_w),
            pos_w: F::of(config.pos_w),
            weighted: config.weighted_soft_loss(),
        }
    }
}

/// Class `c` of a selected row (`ClassProbs` in `grad.wgsl`, SPEC §6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassProbs<F> {
    /// `softmax(student)_c`, the cross-entropy's.
    pub softmax: F,
    /// `p_c = softmax(student / T)_c`.
    pub p: F,
    /// `q_c = softmax(teacher / T)_c`.
    pub q: F,
}

/// The class of a row's largest logit, the lowest on ties (NaN never wins) (`top_class` in
/// `grad.wgsl`): the only class whose probability can be over 1/2.
#[must_use]
#[inline]
pub fn top_class(row: &[f32]) -> usize {
    let Some((&first, rest)) = row.split_first() else {
        return 0;
    };
    let (mut top, mut max) = (0, first);
    for (c, &x) in rest.iter().enumerate() {
        // Selects, not branches: random logits would mispredict them.
        let above = x > max;
        top = if above { c + 1 } else { top };
        max = if above { x } else { max };
    }
    top
}

/// A selected row's three softmaxes (`RowSoftmax` in `grad.wgsl`): the cross-entropy's
/// `softmax(student)` and the soft term's `p = softmax(student / T)`,
/// `q = softmax(teacher / T)`, each a [`SoftmaxF64`] (`e_c / S` in f64, where the GPU takes
/// `e^((x − max) · scale − ln S)` in f32).
#[derive(Clone, Debug)]
pub struct RowSoftmax<'a> {
    softmax: SoftmaxF64<'a>,
    student: SoftmaxF64<'a>,
    teacher: SoftmaxF64<'a>,
}

/// The softmaxes of a selected row's logits (`row_softmax` in `grad.wgsl`).
#[must_use]
pub fn row_softmax<'a>(
    student_row: &'a [f32],
    teacher_row: &'a [f32],
    config: &LossConfig,
) -> RowSoftmax<'a> {
    let inv_t = 1.0 / f64::from(config.temperature);
    RowSoftmax {
        softmax: SoftmaxF64::new(student_row, 1.0),
        student: SoftmaxF64::new(student_row, inv_t),
        teacher: SoftmaxF64::new(teacher_row, inv_t),
    }
}

/// Class `c`'s probabilities from the row's softmaxes (`class_probs` in `grad.wgsl`).
#[must_use]
pub fn class_probs(row: &RowSoftmax<'_>, c: usize) -> ClassProbs<f64> {
    ClassProbs {
        softmax: row.softmax.prob(c),
        p: row.student.prob(c),
        q: row.teacher.prob(c),
    }
}

/// `h_c = w_c (q_c + ε) / (p_c + ε)` of the class-weighted form (`soft_ratio` in
/// `grad.wgsl`).
#[must_use]
#[inline(always)]
pub fn soft_ratio<F: GradFloat>(form: &GradForm<F>, c: usize, p: F, q: F) -> F {
    (if c == 0 { form.neg_w } else { form.pos_w }) * (q + form.eps) / (p + form.eps)
}

/// The sums over a selected row's classes that its entries take (`RestSums` in
/// `grad.wgsl`), each in class order: `G = Σ h_c p_c` (class-weighted form), and the sums
/// over the classes other than `top` or the target from which [`ce_grad`] and [`soft_grad`]
/// take the entries whose probability is over 1/2.
#[derive(Clone, Copy, Debug)]
pub struct RestSums<F> {
    /// `G = Σ_c h_c p_c` (class-weighted form).
    pub g_sum: F,
    /// `Σ_{c≠top} p_c`.
    pub rest_p: F,
    /// `Σ_{c≠top} q_c`.
    pub rest_q: F,
    /// `Σ_{c≠top} p_c h_c` (class-weighted form).
    pub rest_ph: F,
    /// `Σ_{c≠target} softmax_c`.
    pub rest_ce: F,
}

impl<F: GradFloat> Default for RestSums<F> {
    fn default() -> Self {
        let zero = F::of(0.0);
        Self {
            g_sum: zero,
            rest_p: zero,
            rest_q: zero,
            rest_ph: zero,
            rest_ce: zero,
        }
    }
}

/// Adds class `c`'s share `k` into `sums` (`add_class` in `grad.wgsl`): the body of
/// [`conf_grad`]'s first loop over the classes. `h_c` only in the class-weighted form,
/// the only one that reads it.
#[inline(always)]
pub fn add_class<F: GradFloat>(
    sums: &mut RestSums<F>,
    form: &GradForm<F>,
    c: usize,
    top: usize,
    target: usize,
    k: ClassProbs<F>,
) {
    if form.weighted {
        let h = soft_ratio(form, c, k.p, k.q);
        sums.g_sum = sums.g_sum + h * k.p;
        if c != top {
            sums.rest_ph = sums.rest_ph + k.p * h;
        }
    }
    if c != top {
        sums.rest_p = sums.rest_p + k.p;
        sums.rest_q = sums.rest_q + k.q;
    }
    if c != target {
        sums.rest_ce = sums.rest_ce + k.softmax;
    }
}

/// The cross-entropy's entry in the direct form, `softmax_c − [c = target]` (`direct_ce` in
/// `grad.wgsl`).
#[must_use]
#[inline(always)]
pub fn direct_ce<F: GradFloat>(c: usize, target: usize, softmax: F) -> F {
    softmax - F::of(if c == target { 1.0 } else { 0.0 })
}

/// The cross-entropy's entry (`ce_grad` in `grad.wgsl`): [`direct_ce`], but at the target
/// where its softmax is over 1/2 (where `softmax − 1` would lose its digits)
/// `−Σ_{c≠target} softmax_c`.
#[must_use]
#[inline(always)]
pub fn ce_grad<F: GradFloat>(c: usize, target: usize, softmax: F, rest_ce: F) -> F {
    if c == target && softmax > F::of(0.5) {
        -rest_ce
    } else {
        direct_ce(c, target, softmax)
    }
}

/// The soft term's entry in the direct form before its factor `T w_soft / N`
/// (`direct_soft` in `grad.wgsl`): `p_c (G − h_c)` (class-weighted) or `p_c − q_c`.
#[must_use]
#[inline(always)]
pub fn direct_soft<F: GradFloat>(form: &GradForm<F>, c: usize, k: ClassProbs<F>, g_sum: F) -> F {
    if form.weighted {
        k.p * (g_sum - soft_ratio(form, c, k.p, k.q))
    } else {
        k.p - k.q
    }
}

/// The soft term's entry at the class `top` from the sums over the other classes
/// (`complement_soft` in `grad.wgsl`): `p_top (Σ_{c≠top} p_c h_c − h_top Σ_{c≠top} p_c)`
/// (class-weighted) or `Σ_{c≠top} q_c − Σ_{c≠top} p_c`.
#[must_use]
#[inline(always)]
pub fn complement_soft<F: GradFloat>(
    form: &GradForm<F>,
    top: usize,
    k: ClassProbs<F>,
    sums: &RestSums<F>,
) -> F {
    if form.weighted {
        k.p * (sums.rest_ph - soft_ratio(form, top, k.p, k.q) * sums.rest_p)
    } else {
        sums.rest_q - sums.rest_p
    }
}

/// The soft term's entry (`soft_grad` in `grad.wgsl`): [`direct_soft`], but at the class
/// `top` where its `p` is over 1/2 (where `p − q` or `G − h` would lose its digits)
/// [`complement_soft`].
#[must_use]
#[inline(always)]
pub fn soft_grad<F: GradFloat>(
    form: &GradForm<F>,
    c: usize,
    top: usize,
    k: ClassProbs<F>,
    sums: &RestSums<F>,
) -> F {
    if c == top && k.p > F::of(0.5) {
        complement_soft(form, top, k, sums)
    } else {
        direct_soft(form, c, k, sums.g_sum)
    }
}

/// An entry from its two parts, each scaled by its `w / N`, rounded once to f32
/// (`grad_entry` in `grad.wgsl`).
#[must_use]
#[inline(always)]
pub fn grad_entry<F: GradFloat>(form: &GradForm<F>, ce: F, soft: F) -> f32 {
    (form.scale_conf * ce + form.soft_scale * soft).to_f32()
}

/// Writes the gradient of one selected row's `w_conf·CE + w_soft·soft` into `out`
/// (`conf_grad` in `grad.wgsl`, which runs it in f32; here in f64 from the f64 softmaxes,
/// rounded once):
/// - cross-entropy: `softmax_c − [c = target]`;
/// - plain KL: `T (p_c − q_c)`;
/// - class-weighted: `T p_c (G − h_c)` with `h_c = w_c (q_c + ε) / (p_c + ε)`,
///   `G = Σ h_c p_c`;
///
/// each scaled by its `w / N`. `softmax − 1` at the target and `p − q` or `G − h` at a
/// class whose `p` is near 1 would lose their digits; where that probability is over 1/2
/// they are taken from the other classes' sums instead ([`ce_grad`], [`soft_grad`]). (Below
/// 1/2 the direct form is the exact one: the complements would cancel instead, e.g. at a
/// large temperature.) In f64 with few positives, where the factors `w / N` are large,
/// every entry is exact to its rounding.
///
/// Two loops over the classes, as in the kernel: the sums ([`add_class`]), then the
/// entries.
///
/// # Panics
/// If the rows and `out` do not have the same length.
// Index loops over the classes, as the kernel's.
#[allow(clippy::needless_range_loop)]
pub fn conf_grad(
    student_row: &[f32],
    teacher_row: &[f32],
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    out: &mut [f32],
) {
    let num_classes = out.len();
    assert_eq!(student_row.len(), num_classes);
    assert_eq!(teacher_row.len(), num_classes);
    let form = GradForm::<f64>::new(scale, config);
    let target = target as usize;
    let top = top_class(student_row);
    let row = row_softmax(student_row, teacher_row, config);
    let mut sums = RestSums::default();
    for c in 0..num_classes {
        add_class(&mut sums, &form, c, top, target, class_probs(&row, c));
    }
    for c in 0..num_classes {
        let k = class_probs(&row, c);
        let ce = ce_grad(c, target, k.softmax, sums.rest_ce);
        let soft = soft_grad(&form, c, top, k, &sums);
        out[c] = grad_entry(&form, ce, soft);
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

/// A loop over priors (`grad_conf` in `grad.wgsl`, a thread per prior): each selected
/// row's conf gradient by [`conf_grad`], 0 on the other rows. With `already_zero` the
/// caller promises a zeroed output and the other rows are not written at all (on a fresh
/// allocation, their memory is then never touched).
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
    assert_eq!(teacher_conf.len(), student_conf.len());
    for index in 0..conf_target.len() {
        let row = index * num_classes..(index + 1) * num_classes;
        let target_class = conf_target[index];
        if target_class == 0 && neg_mask[index] == 0 {
            if !already_zero {
                grad_student_conf[row].fill(0.0);
            }
            continue;
        }
        conf_grad(
            &student_conf[row.clone()],
            &teacher_conf[row.clone()],
            target_class,
            scale,
            config,
            &mut grad_student_conf[row],
        );
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
    use crate::math;
    use crate::stages::prior_terms::{row_max, shifted_log_sum_exp};

    /// [`conf_grad`] in f32 from f32 probabilities `e^((x − max) · scale − ln Σ)`, as
    /// `conf_grad` in `grad.wgsl` runs it: its two loops over the classes, with the pieces
    /// in f32.
    fn conf_grad_f32(
        student_row: &[f32],
        teacher_row: &[f32],
        target: u32,
        scale: &GradScale,
        config: &LossConfig,
        out: &mut [f32],
    ) {
        let form = GradForm::<f32>::new(scale, config);
        let target = target as usize;
        let inv_t = 1.0 / config.temperature;
        let top = top_class(student_row);
        let (max_s, max_t) = (student_row[top], row_max(teacher_row));
        let lse = shifted_log_sum_exp(student_row, max_s, 1.0);
        let lse_s = shifted_log_sum_exp(student_row, max_s, inv_t);
        let lse_t = shifted_log_sum_exp(teacher_row, max_t, inv_t);
        let class_probs = |c: usize| ClassProbs {
            softmax: math::exp((student_row[c] - max_s) - lse),
            p: math::exp((student_row[c] - max_s) * inv_t - lse_s),
            q: math::exp((teacher_row[c] - max_t) * inv_t - lse_t),
        };
        let mut sums = RestSums::default();
        for c in 0..out.len() {
            add_class(&mut sums, &form, c, top, target, class_probs(c));
        }
        for (c, o) in out.iter_mut().enumerate() {
            let k = class_probs(c);
            let ce = ce_grad(c, target, k.softmax, sums.rest_ce);
            *o = grad_entry(&form, ce, soft_grad(&form, c, top, k, &sums));
        }
    }

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

    /// The algorithm in f32, as the GPU runs it, agrees with the f64 reference to SPEC §7
    /// (1e-3 relative + 1e-7 absolute) on rows with one positive in the batch (N = 1, the
    /// largest w/N), plain and class-weighted, with a confident top class (p near 1), where
    /// the direct f32 formula would lose the small entries' digits; over the temperatures
    /// the GPU takes (up to 20) and logits up to ±1e6.
    #[test]
    fn the_f32_algorithm_agrees_with_the_f64_reference_with_few_positives() {
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
            conf_grad(&student, &teacher, target, &scale, &config, &mut reference);
            conf_grad_f32(&student, &teacher, target, &scale, &config, &mut port);
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
        // The cases are not trivially equal: the f32 instantiation really runs in f32.
        assert!(worst > 0.0);
    }

    /// With a confident student and teacher (p and q within 1e-12 of 1 at the top class,
    /// the target elsewhere), the top class's `p − q` and the target's `softmax − 1` come
    /// from the other classes' sums: each entry is the exact value rounded to f32 (within
    /// 1 ulp), where `p − q` formed directly in f64 keeps only about 4 digits.
    #[test]
    fn the_complements_are_exact_where_the_direct_form_cancels() {
        let config = LossConfig {
            neg_w: 1.0,
            ..LossConfig::DEFAULT
        };
        let scale = GradScale::new(&config, 1);
        let (student, teacher) = ([0.0, 30.0, 0.0], [0.0, 29.0, 0.0]);
        // Closed forms: softmax of [0, a, 0] at the top is 1 / (1 + 2e^-a).
        let rest = |a: f64| 2.0 * (-a).exp() / (1.0 + 2.0 * (-a).exp());
        let (rest_p, rest_q) = (rest(30.0), rest(29.0));
        let t = f64::from(config.temperature);
        let (conf, soft) = (f64::from(scale.conf), f64::from(scale.soft) * t);
        // Target class 1 = top: ce = −rest_p, soft = rest_q − rest_p.
        let mut out = [0.0; 3];
        conf_grad(&student, &teacher, 1, &scale, &config, &mut out);
        let want = conf * -rest_p + soft * (rest_q - rest_p);
        let ulps = (out[1].to_bits() as i64 - (want as f32).to_bits() as i64).unsigned_abs();
        assert!(ulps <= 1, "{} against {want}", out[1]);
        // The direct form loses the difference's digits.
        let direct = (1.0 - rest_p) - (1.0 - rest_q);
        assert!(((direct - (rest_q - rest_p)) / (rest_q - rest_p)).abs() > 1e-6);
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
        conf_grad(&student, &teacher, 2, &scale, &config, &mut out);
        assert!(out.iter().map(|&g| f64::from(g)).sum::<f64>().abs() < 1e-6);
        let mut ce_only = [0.0; 4];
        let no_soft = GradScale { soft: 0.0, ..scale };
        conf_grad(&student, &teacher, 2, &no_soft, &config, &mut ce_only);
        assert!(ce_only[2] < 0.0 && ce_only[0] > 0.0);
    }
}
