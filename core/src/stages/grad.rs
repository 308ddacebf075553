//! Stage **grad** (SPEC §6): ∂total/∂student_conf and ∂total/∂student_loc, with matching,
//! mining and the teacher bound held fixed. Twin of `shaders/grad.wgsl`, kernel by kernel:
//! [`grad_conf`] and [`grad_loc`], each a loop over priors (a thread per prior there).
//!
//! A selected row's conf gradient is one algorithm, [`conf_grad`], the one `grad_conf`
//! runs on the GPU (the target's and the top class's entries from the other classes' sums
//! where their probability is over 1/2), generic over its float: the CPU runs it in f64
//! from the f64 softmaxes and rounds once ([`conf_grad_row`], and [`conf_grad_row_kept`]
//! from probabilities the fast path kept), the GPU in f32 (a test holds the f32
//! instantiation to the f64 one within SPEC §7).

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

/// A float [`conf_grad`] runs in: f64 on the CPU, f32 as the GPU's `grad_conf` does.
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

/// Class `c` of a selected row as [`conf_grad`] takes it (SPEC §6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassProbs<F> {
    /// `softmax(student)_c`, the cross-entropy's.
    pub softmax: F,
    /// `p_c = softmax(student / T)_c`.
    pub p: F,
    /// `q_c = softmax(teacher / T)_c`.
    pub q: F,
}

/// The class of a row's largest logit, the lowest on ties (NaN never wins), as `grad_conf`
/// finds its `top`: the only class whose probability can be over 1/2.
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

/// Writes the gradient of one selected row's `w_conf·CE + w_soft·soft` into `out`
/// (C entries; `class(c)` gives class `c`'s probabilities, `top` is [`top_class`] of the
/// student row), the algorithm of `grad_conf` in `grad.wgsl`:
/// - cross-entropy: `softmax_c − [c = target]`;
/// - plain KL: `T (p_c − q_c)`;
/// - class-weighted: `T p_c (G − h_c)` with `h_c = w_c (q_c + ε) / (p_c + ε)`,
///   `G = Σ h_c p_c`;
///
/// each scaled by its `w / N`. `softmax − 1` at the target and `p − q` or `G − h` at a
/// class whose `p` is near 1 would lose their digits; where that probability is over 1/2
/// they are taken from the other classes' sums instead: the target's cross-entropy term is
/// `−Σ_{c≠t} softmax_c`, and the class `top` gets `Σ_{c≠top} q_c − Σ_{c≠top} p_c`, or
/// `G − h_top = Σ_{c≠top} p_c h_c − h_top Σ_{c≠top} p_c`. (Below 1/2 the direct form is
/// the exact one: the complements would cancel instead, e.g. at a large temperature.)
///
/// Every entry in the direct form first (a flat loop, which vectorises), then the at most
/// two entries whose probability is over 1/2 again from the sums over the other classes,
/// taken only then; each entry is rounded once to f32. In f64 with few positives, where
/// the factors `w / N` are large, every entry is exact to that rounding.
#[inline(always)]
pub fn conf_grad<F: GradFloat>(
    top: usize,
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    class: impl Fn(usize) -> ClassProbs<F>,
    out: &mut [f32],
) {
    let target = target as usize;
    let num_classes = out.len();
    if num_classes == 0 {
        return;
    }
    let mut row = RowForm::new(scale, config, target);
    if row.weighted {
        row.g_sum = (0..num_classes).fold(F::of(0.0), |sum, c| {
            let ClassProbs { p, q, .. } = class(c);
            sum + row.h(c, p, q) * p
        });
    }
    // The branch in `direct_soft` is the same for every class: the loop is unswitched and
    // each form vectorises.
    for (c, o) in out.iter_mut().enumerate() {
        let ClassProbs { softmax, p, q } = class(c);
        *o = row.entry(row.direct_ce(c, softmax), row.direct_soft(c, p, q));
    }
    // The complements only where they are the exact side: a probability over 1/2.
    let half = F::of(0.5);
    let ce_complement = target < num_classes && class(target).softmax > half;
    let soft_complement = class(top).p > half;
    if ce_complement || soft_complement {
        row.complements(top, ce_complement, soft_complement, &class, out);
    }
}

/// What [`conf_grad`]'s entries of one row share: the factors, the class weights and
/// `G`.
#[derive(Clone, Copy, Debug)]
struct RowForm<F> {
    /// `w_conf / N`.
    conf_scale: F,
    /// `T w_soft / N`.
    soft_scale: F,
    eps: F,
    neg_w: F,
    pos_w: F,
    weighted: bool,
    target: usize,
    /// `G = Σ h_c p_c` (class-weighted form).
    g_sum: F,
}

impl<F: GradFloat> RowForm<F> {
    #[inline(always)]
    fn new(scale: &GradScale, config: &LossConfig, target: usize) -> Self {
        Self {
            conf_scale: F::of(scale.conf),
            soft_scale: F::of(scale.soft) * F::of(config.temperature),
            eps: F::of(config.eps),
            neg_w: F::of(config.neg_w),
            pos_w: F::of(config.pos_w),
            weighted: config.weighted_soft_loss(),
            target,
            g_sum: F::of(0.0),
        }
    }

    /// `h_c = w_c (q_c + ε) / (p_c + ε)`.
    #[inline(always)]
    fn h(&self, c: usize, p: F, q: F) -> F {
        (if c == 0 { self.neg_w } else { self.pos_w }) * (q + self.eps) / (p + self.eps)
    }

    /// `softmax_c − [c = target]`.
    #[inline(always)]
    fn direct_ce(&self, c: usize, softmax: F) -> F {
        softmax - F::of(if c == self.target { 1.0 } else { 0.0 })
    }

    /// `p_c (G − h_c)` or `p_c − q_c`.
    #[inline(always)]
    fn direct_soft(&self, c: usize, p: F, q: F) -> F {
        if self.weighted {
            p * (self.g_sum - self.h(c, p, q))
        } else {
            p - q
        }
    }

    /// The entry from its two parts, each scaled by its `w / N`, rounded once.
    #[inline(always)]
    fn entry(&self, ce: F, soft: F) -> f32 {
        (self.conf_scale * ce + self.soft_scale * soft).to_f32()
    }

    /// Writes again the entries at the target (`ce_complement`) and the top class
    /// (`soft_complement`) from the sums over the other classes. Apart from the direct
    /// form's loops, so that those vectorise.
    #[inline(never)]
    fn complements(
        &self,
        top: usize,
        ce_complement: bool,
        soft_complement: bool,
        class: &impl Fn(usize) -> ClassProbs<F>,
        out: &mut [f32],
    ) {
        let (target, num_classes) = (self.target, out.len());
        // Σ_{c≠skip} term(c) in class order.
        let sum_except = |skip: usize, term: &dyn Fn(usize, ClassProbs<F>) -> F| {
            (0..num_classes)
                .filter(|&c| c != skip)
                .fold(F::of(0.0), |sum, c| sum + term(c, class(c)))
        };
        let fixes = if top == target { 1 } else { 2 };
        for c in [target, top].into_iter().take(fixes) {
            let at_target = c == target && ce_complement;
            let at_top = c == top && soft_complement;
            if !(at_target || at_top) {
                continue;
            }
            let ClassProbs { softmax, p, q } = class(c);
            let ce = if at_target {
                -sum_except(target, &|_, k| k.softmax)
            } else {
                self.direct_ce(c, softmax)
            };
            let soft = if !at_top {
                self.direct_soft(c, p, q)
            } else if self.weighted {
                let rest_p = sum_except(top, &|_, k| k.p);
                let rest_ph = sum_except(top, &|c, k| k.p * self.h(c, k.p, k.q));
                p * (rest_ph - self.h(top, p, q) * rest_p)
            } else {
                sum_except(top, &|_, k| k.q) - sum_except(top, &|_, k| k.p)
            };
            out[c] = self.entry(ce, soft);
        }
    }
}

/// [`conf_grad`] in f64 of one selected row from its logits (the reference's softmaxes,
/// [`SoftmaxF64`]).
pub fn conf_grad_row(
    student_row: &[f32],
    teacher_row: &[f32],
    target: u32,
    scale: &GradScale,
    config: &LossConfig,
    out: &mut [f32],
) {
    let inv_t = 1.0 / f64::from(config.temperature);
    let softmax = SoftmaxF64::new(student_row, 1.0);
    let student = SoftmaxF64::new(student_row, inv_t);
    let teacher = SoftmaxF64::new(teacher_row, inv_t);
    let class = |c: usize| ClassProbs {
        softmax: softmax.prob(c),
        p: student.prob(c),
        q: teacher.prob(c),
    };
    conf_grad(top_class(student_row), target, scale, config, class, out);
}

/// [`conf_grad_row`] from the row's probabilities `kept`: its `p_c` then its `q_c` (2C
/// values, [`SoftmaxF64::prob`]'s bits, as the fast path keeps them from the soft term's
/// exponentials), the same entries bit for bit. At T = 1 the cross-entropy's softmax is
/// `p_c` itself (`x · 1 = x`); otherwise it is taken from the row.
#[inline]
pub fn conf_grad_row_kept(
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
    let class = |c: usize| ClassProbs {
        softmax: p[c],
        p: p[c],
        q: q[c],
    };
    conf_grad(top, target, scale, config, class, out);
}

/// [`conf_grad_row_kept`] at T ≠ 1, with the cross-entropy's softmax from the row (apart,
/// so that the T = 1 loops vectorise).
#[inline(never)]
#[allow(clippy::too_many_arguments)] // conf_grad_row_kept's, with the row's probabilities split
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
    let class = |c: usize| ClassProbs {
        softmax: softmax.prob(c),
        p: p[c],
        q: q[c],
    };
    conf_grad(top, target, scale, config, class, out);
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
    use crate::math;
    use crate::stages::prior_terms::{row_max, shifted_log_sum_exp};

    /// [`conf_grad`] in f32 from f32 probabilities `e^((x − max) · scale − ln Σ)`, as
    /// `grad_conf` in `grad.wgsl` runs it.
    fn conf_grad_row_f32(
        student_row: &[f32],
        teacher_row: &[f32],
        target: u32,
        scale: &GradScale,
        config: &LossConfig,
        out: &mut [f32],
    ) {
        let inv_t = 1.0 / config.temperature;
        let top = top_class(student_row);
        let (max_s, max_t) = (student_row[top], row_max(teacher_row));
        let lse = shifted_log_sum_exp(student_row, max_s, 1.0);
        let lse_s = shifted_log_sum_exp(student_row, max_s, inv_t);
        let lse_t = shifted_log_sum_exp(teacher_row, max_t, inv_t);
        let class = |c: usize| ClassProbs {
            softmax: math::exp((student_row[c] - max_s) - lse),
            p: math::exp((student_row[c] - max_s) * inv_t - lse_s),
            q: math::exp((teacher_row[c] - max_t) * inv_t - lse_t),
        };
        conf_grad(top, target, scale, config, class, out);
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
            conf_grad_row(&student, &teacher, target, &scale, &config, &mut reference);
            conf_grad_row_f32(&student, &teacher, target, &scale, &config, &mut port);
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
        conf_grad_row(&student, &teacher, 1, &scale, &config, &mut out);
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
        conf_grad_row(&student, &teacher, 2, &scale, &config, &mut out);
        assert!(out.iter().map(|&g| f64::from(g)).sum::<f64>().abs() < 1e-6);
        let mut ce_only = [0.0; 4];
        let no_soft = GradScale { soft: 0.0, ..scale };
        conf_grad_row(&student, &teacher, 2, &no_soft, &config, &mut ce_only);
        assert!(ce_only[2] < 0.0 && ce_only[0] > 0.0);
    }
}
