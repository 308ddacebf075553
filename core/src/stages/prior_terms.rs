//! Stage **prior terms** (SPEC §4, §5): the per-prior maths — cross-entropy,
//! mining score, smooth-L1 and the teacher-bounded L2 test. Twin of
//! `shaders/prior_terms.wgsl` function by function ([`prior_terms`], [`cross_entropy`],
//! [`loc_terms`], [`prior_loss_record`]; the row helpers [`row_max`], [`shifted_sum`] and
//! [`shifted_log_sum_exp`] are `logits.wgsl`'s, which the reduce and grad stages share).

use crate::config::LossConfig;
use crate::math::{self, Lanes};

/// C of a `[P, C]` row-major tensor of `len` values over `num_priors` rows (0 when P is 0):
/// the stages take C from their slices, not from the config.
///
/// # Panics
/// If `len` is not a multiple of `num_priors`.
#[must_use]
pub fn classes_of(len: usize, num_priors: usize) -> usize {
    let num_classes = len.checked_div(num_priors).unwrap_or(0);
    assert_eq!(
        num_classes * num_priors,
        len,
        "a [P, C] tensor of {len} values over P = {num_priors}"
    );
    num_classes
}

/// The largest value of a row (NaN passed over), by four independent chains of
/// [`f32::max`] (IEEE maxNum) combined at the end, so that a loop of it vectorises and
/// does not wait on one long chain. maxNum is associative and commutative, so the order
/// gives the value of a left-to-right fold, up to the sign of a zero maximum, which enters
/// the formulas only as `x − max` or `e^(±0) = 1`.
#[must_use]
#[inline]
pub fn row_max(row: &[f32]) -> f32 {
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

/// The [`Lanes`] sum of a row's f32 exponentials `exp_f32((x − max) · scale)` for the
/// row's `max` ([`row_max`]; `shifted_sum` in `logits.wgsl`, which adds in class order): each term in `(0, 1]`, the sum in `[1, C]`. Its logarithm
/// is the row's shifted log-sum-exp ([`shifted_log_sum_exp`], [`cross_entropy_from`]);
/// the fast path computes the same exponentials in a vectorised loop and sums them with
/// [`Lanes::add_all`], the same bits.
#[must_use]
pub fn shifted_sum(row: &[f32], max: f32, scale: f32) -> Lanes<f32> {
    let mut exps = Lanes::new();
    for (c, &x) in row.iter().enumerate() {
        exps.add(c, math::exp_f32((x - max) * scale));
    }
    exps
}

/// `ln Σ exp((row[c] − max) · scale)` ([`shifted_sum`]) for the row's `max`
/// (`shifted_log_sum_exp` in `logits.wgsl`): in
/// `[0, ln C]`, so that a log-probability `(x − max) · scale − ln Σ` never subtracts two
/// large numbers (with logits of 1e6, `x · scale − lse` would lose every digit of f32).
#[must_use]
pub fn shifted_log_sum_exp(row: &[f32], max: f32, scale: f32) -> f32 {
    math::ln(shifted_sum(row, max, scale).total())
}

/// `(x − max) · scale` in f64: the argument of a row's softmax exponential
/// ([`shifted_exp_f64`]) and its log-probability before `− ln S` ([`SoftmaxF64::log_prob`]).
#[must_use]
#[inline(always)]
pub fn shifted_f64(x: f32, max: f32, scale: f64) -> f64 {
    (f64::from(x) - f64::from(max)) * scale
}

/// `e^((x − max) · scale)` in f64: one exponential of a row's softmax ([`SoftmaxF64`]).
#[must_use]
#[inline(always)]
pub fn shifted_exp_f64(x: f32, max: f32, scale: f64) -> f64 {
    math::exp_f64(shifted_f64(x, max, scale))
}

/// `softmax(row · scale)` of one row in f64, as the soft term and the conf gradient take
/// it (SPEC §5, §6): with `e_c = e^((x_c − max) · scale)` ([`shifted_exp_f64`], `max` the
/// row's [`row_max`]) and `S = Σ_c e_c` (a [`Lanes`] sum),
/// - `p_c = e_c / S` ([`SoftmaxF64::prob`]): each exponential serves the sum and the
///   probability, so a caller that keeps the `e_c` ([`SoftmaxF64::from_exps`]) takes C
///   exponentials per row, not 2C;
/// - `ln p_c = (x_c − max) · scale − ln S` ([`SoftmaxF64::log_prob`]): S is in `[1, C]`,
///   so no large numbers cancel (with logits of 1e6, `x · scale − lse` would lose every
///   digit).
#[derive(Clone, Debug)]
pub struct SoftmaxF64<'a> {
    row: &'a [f32],
    max: f32,
    scale: f64,
    sum: f64,
    /// `ln S`, taken on the first [`SoftmaxF64::log_prob`] (the class-weighted form never
    /// needs it).
    ln_sum: core::cell::OnceCell<f64>,
}

impl<'a> SoftmaxF64<'a> {
    /// The softmax of `row` at `scale` (1 or 1/T).
    #[must_use]
    pub fn new(row: &'a [f32], scale: f64) -> Self {
        let max = row_max(row);
        let mut sum = Lanes::new();
        for (c, &x) in row.iter().enumerate() {
            sum.add(c, shifted_exp_f64(x, max, scale));
        }
        Self::with_sum(row, max, scale, sum.total())
    }

    /// [`SoftmaxF64::new`] from the row's exponentials `exps[c]` = [`shifted_exp_f64`]`(row[c],
    /// max, scale)`, that is [`math::exp_f64`] of [`shifted_f64`] (computed by the caller,
    /// e.g. in a vectorised loop; `max` the value of [`row_max`]): the same sum, so
    /// `exps[c] / S` is [`SoftmaxF64::prob`]`(c)` bit for bit.
    #[must_use]
    pub fn from_exps(row: &'a [f32], max: f32, scale: f64, exps: &[f64]) -> Self {
        let mut sum = Lanes::new();
        sum.add_all(exps);
        Self::with_sum(row, max, scale, sum.total())
    }

    fn with_sum(row: &'a [f32], max: f32, scale: f64, sum: f64) -> Self {
        Self {
            row,
            max,
            scale,
            sum,
            ln_sum: core::cell::OnceCell::new(),
        }
    }

    /// `p_c = e_c / S` from the class's exponential `e_c`.
    #[must_use]
    #[inline]
    pub fn prob_of_exp(&self, exp: f64) -> f64 {
        exp / self.sum
    }

    /// `e_c`, the exponential of class `c` ([`shifted_exp_f64`]).
    #[must_use]
    #[inline]
    pub fn exp(&self, c: usize) -> f64 {
        shifted_exp_f64(self.row[c], self.max, self.scale)
    }

    /// `p_c`.
    #[must_use]
    pub fn prob(&self, c: usize) -> f64 {
        self.prob_of_exp(self.exp(c))
    }

    /// `ln p_c`.
    #[must_use]
    #[inline]
    pub fn log_prob(&self, c: usize) -> f64 {
        let ln_sum = *self.ln_sum.get_or_init(|| math::ln_f64(self.sum));
        shifted_f64(self.row[c], self.max, self.scale) - ln_sum
    }
}

/// Cross-entropy of a logit row against class `target` (SPEC §5; `cross_entropy` in
/// `prior_terms.wgsl`): with `max` the row's largest logit ([`row_max`]) and `ln S` its
/// [`shifted_log_sum_exp`] at scale 1, `(max − row[target]) + ln S`. The difference is formed before `ln S` (in `[0, ln C]`) is
/// added, so that equal logits of any magnitude give ln C: `(max + ln S) − x` would round
/// `ln S` away next to a large `max`. The fast path hands its own exponentials to
/// [`cross_entropy_from`].
#[must_use]
pub fn cross_entropy(row: &[f32], target: u32) -> f32 {
    let max = row_max(row);
    (max - row[target as usize]) + shifted_log_sum_exp(row, max, 1.0)
}

/// [`cross_entropy`] from the row's maximum, its target logit and the [`Lanes`] sum of its
/// exponentials ([`shifted_sum`] at scale 1).
#[must_use]
pub fn cross_entropy_from(max: f32, target_logit: f32, exps: &Lanes<f32>) -> f32 {
    (max - target_logit) + math::ln(exps.total())
}

/// Mining score (SPEC §4): the cross-entropy against the matched label, 0 for positives.
/// `+ 0.0` keeps the score off −0 so that its bits order like its value. A NaN (from a
/// non-finite logit, which only an unscanned input can hold) is made the positive NaN,
/// which ranks first: the row is mined and its cross-entropy makes the result non-finite,
/// refused, rather than the row silently dropping out of the mining (a negative NaN
/// would rank last).
#[must_use]
pub fn mining_score(cross_entropy: f32, positive: bool) -> f32 {
    if positive {
        0.0
    } else if cross_entropy.is_nan() {
        f32::NAN
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
    /// Whether `d_t = ‖teacher − target‖²` is finite: where it is not (a non-finite
    /// `teacher_loc`, which only an unscanned input can hold), the bound cannot be decided
    /// and [`prior_loss_record`] makes the L2 term NaN, so that the result is refused
    /// rather than the prior silently left out.
    pub teacher_finite: bool,
}

/// Localisation terms of one positive prior (SPEC §5; `loc_terms` in `prior_terms.wgsl`).
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
        teacher_finite: teacher_sq.is_finite(),
    }
}

/// One prior's `prior_loss` record (SPEC §4, §5; `prior_loss_record` in `prior_terms.wgsl`)
/// from its cross-entropy `ce`:
/// `(ce, smooth-L1 over the 4 coordinates, d_s where the teacher bound holds else 0, 1
/// where it holds else 0)` for a positive, `(ce, 0, 0, 0)` otherwise.
#[must_use]
#[inline]
pub fn prior_loss_record(
    ce: f32,
    positive: bool,
    student_loc: [f32; 4],
    teacher_loc: [f32; 4],
    loc_target: [f32; 4],
    reg_m: f32,
) -> [f32; 4] {
    if !positive {
        return [ce, 0.0, 0.0, 0.0];
    }
    let terms = loc_terms(student_loc, teacher_loc, loc_target, reg_m);
    let (student_sq, bounded) = if terms.bounded {
        (terms.student_sq, 1.0)
    } else if !terms.teacher_finite {
        (f32::NAN, 0.0)
    } else {
        (0.0, 0.0)
    };
    [ce, terms.smooth_l1, student_sq, bounded]
}

/// The stage, a loop over priors (`prior_terms` in `prior_terms.wgsl`, a thread per
/// prior): writes each prior's `mining_score` and its `prior_loss` record
/// ([`prior_loss_record`]). `student_conf`
/// is `P × C` row-major. The soft term, needed only on the selected rows, is taken by the
/// reduce stage once mining has chosen them.
///
/// # Panics
/// If the slices do not agree on P and C.
#[allow(clippy::too_many_arguments)] // one slice per tensor, as the shader binds them
pub fn prior_terms(
    student_conf: &[f32],
    student_loc: &[[f32; 4]],
    teacher_loc: &[[f32; 4]],
    conf_target: &[u32],
    loc_target: &[[f32; 4]],
    config: &LossConfig,
    mining_score_out: &mut [f32],
    prior_loss: &mut [[f32; 4]],
) {
    let num_classes = classes_of(student_conf.len(), conf_target.len());
    if num_classes == 0 {
        return;
    }
    for index in 0..conf_target.len() {
        let row = &student_conf[index * num_classes..(index + 1) * num_classes];
        let target_class = conf_target[index];
        let positive = target_class > 0;
        let ce = cross_entropy(row, target_class);
        mining_score_out[index] = mining_score(ce, positive);
        prior_loss[index] = prior_loss_record(
            ce,
            positive,
            student_loc[index],
            teacher_loc[index],
            loc_target[index],
            config.reg_m,
        );
    }
}
