//! Stage **reduce** (SPEC §5): each selected row's soft term ([`reduce_rows`]), the sums
//! over the selected rows of an image ([`reduce_image`]), the batch totals
//! ([`reduce_batch`]), and their normalisation by N ([`LossSums::finish`]). Twin of
//! `shaders/reduce.wgsl`, kernel by kernel.
//!
//! The CPU takes the soft terms in f64 and sums each image's terms in f64 in prior order,
//! then the images in image order: a fixed order, so the result is deterministic. (The GPU
//! sums in f32 by a fixed pairwise tree; SPEC §7 bounds the difference.)

use crate::config::LossConfig;
use crate::math::{self, Lanes, LANES};
use crate::stages::prior_terms::{classes_of, SoftmaxF64};

/// Un-normalised sums and counts of one image or of a whole batch (SPEC §5). A
/// data-parallel trainer adds these over its workers before normalising.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSums {
    /// Σ over selected rows of the soft-target term (T² included).
    pub soft: f64,
    /// Σ over positives whose bound holds of `d_s`.
    pub l2: f64,
    /// Σ over selected rows of the cross-entropy.
    pub conf: f64,
    /// Σ over positives of smooth-L1.
    pub loc: f64,
    /// Positive priors.
    pub num_pos: u32,
    /// Selected negatives (rank < k).
    pub num_neg: u32,
    /// Positives whose teacher bound holds.
    pub num_bounded: u32,
}

impl LossSums {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &LossSums) {
        self.soft += other.soft;
        self.l2 += other.l2;
        self.conf += other.conf;
        self.loc += other.loc;
        self.num_pos += other.num_pos;
        self.num_neg += other.num_neg;
        self.num_bounded += other.num_bounded;
    }

    /// N = max(num_pos, 1), the normaliser of every term (SPEC §5).
    #[must_use]
    pub fn normaliser(&self) -> f64 {
        f64::from(self.num_pos.max(1))
    }

    /// The four terms and the total, normalised by N.
    #[must_use]
    pub fn finish(&self, config: &LossConfig) -> LossTerms {
        let n = self.normaliser();
        let w = config.weights;
        let soft_loss = self.soft / n;
        let l2_loss = self.l2 / n;
        let loss_c = self.conf / n;
        let loss_l = self.loc / n;
        let total = f64::from(w.soft) * soft_loss
            + f64::from(w.conf) * loss_c
            + f64::from(w.l2) * l2_loss
            + f64::from(w.loc) * loss_l;
        LossTerms {
            soft_loss,
            l2_loss,
            loss_c,
            loss_l,
            total,
        }
    }
}

/// The four normalised terms and their weighted total (SPEC §5).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossTerms {
    /// Soft-target (distillation) term.
    pub soft_loss: f64,
    /// Teacher-bounded L2 regression term.
    pub l2_loss: f64,
    /// Cross-entropy over the selected rows.
    pub loss_c: f64,
    /// Smooth-L1 over the positives.
    pub loss_l: f64,
    /// `w_soft·soft_loss + w_conf·loss_c + w_l2·l2_loss + w_loc·loss_l`.
    pub total: f64,
}

/// The soft-target term of one row (SPEC §5), not yet divided by N (`soft_term` in
/// `reduce.wgsl`, loop for loop): with `q = softmax(teacher / T)`, `p = softmax(student / T)`
/// ([`SoftmaxF64`]), T² ([`soft_term_total`]) times the sum over the classes (a [`Lanes`]
/// sum) of [`weighted_class_term`] (class-weighted, `neg_w > 1`) or [`kl_class_term`].
///
/// Computed in f64 (only the selected rows come here): a student close to its teacher makes
/// the terms cancel. The fast path adds the same terms a chunk of classes at a time
/// ([`add_soft_terms`]).
#[must_use]
pub fn soft_term(student_row: &[f32], teacher_row: &[f32], config: &LossConfig) -> f64 {
    let inv_t = 1.0 / f64::from(config.temperature);
    let student = SoftmaxF64::new(student_row, inv_t);
    let teacher = SoftmaxF64::new(teacher_row, inv_t);
    let weighted = config.weighted_soft_loss();
    let eps = f64::from(config.eps);
    let (neg_w, pos_w) = (f64::from(config.neg_w), f64::from(config.pos_w));
    let mut sum = Lanes::new();
    for c in 0..student_row.len() {
        let q = teacher.prob(c);
        let term = if weighted {
            let w = if c == 0 { neg_w } else { pos_w };
            weighted_class_term(w, eps, student.prob(c), q)
        } else {
            kl_class_term(c, q, &student, &teacher)
        };
        sum.add(c, term);
    }
    soft_term_total(config, &sum)
}

/// The soft term's summands of the classes `first..first + n` into `sum` (`first` a
/// multiple of [`LANES`]), from their exponentials `p[i] = e_{first+i}` of the student's
/// and `q[i]` of the teacher's softmax (each slice a multiple of [`LANES`] long, at least
/// `n`; the values past `n` are never added), which it turns into the probabilities
/// `p_c`, `q_c` in place ([`SoftmaxF64::prob_of_exp`]): [`soft_term`]'s loop a chunk at a
/// time, the same terms in the same lanes. The fast path passes a whole row's
/// exponentials, taken in a vectorised loop, and keeps the probabilities for the gradient.
/// Inlined, so that the caller's vectorisation reaches [`weighted_class_terms`].
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the row's two softmaxes and buffers, the chunk and the sum
pub fn add_soft_terms(
    config: &LossConfig,
    student: &SoftmaxF64<'_>,
    teacher: &SoftmaxF64<'_>,
    first: usize,
    n: usize,
    p: &mut [f64],
    q: &mut [f64],
    sum: &mut Lanes<f64>,
) {
    let weighted = config.weighted_soft_loss();
    let chunks = p.chunks_exact_mut(LANES).zip(q.chunks_exact_mut(LANES));
    for (k, (p, q)) in chunks.take(n.div_ceil(LANES)).enumerate() {
        let start = first + k * LANES;
        let (p, q): (&mut [f64; LANES], &mut [f64; LANES]) = (
            p.try_into().expect("a chunk of LANES"),
            q.try_into().expect("a chunk of LANES"),
        );
        for (p, q) in p.iter_mut().zip(q.iter_mut()) {
            (*p, *q) = (student.prob_of_exp(*p), teacher.prob_of_exp(*q));
        }
        let count = LANES.min(first + n - start);
        if weighted {
            let mut terms = [0.0; LANES];
            weighted_class_terms(config, start, p, q, &mut terms);
            if count == LANES {
                sum.add_chunk(&terms);
            } else {
                for (i, &term) in terms[..count].iter().enumerate() {
                    sum.add(start + i, term);
                }
            }
        } else {
            for (i, &q) in q[..count].iter().enumerate() {
                sum.add(start + i, kl_class_term(start + i, q, student, teacher));
            }
        }
    }
}

/// The soft term of a row from the [`Lanes`] sum of its summands ([`add_soft_terms`]):
/// T² times the total (`soft_term_total` in `reduce.wgsl`, which takes `T (T Σ)` in f32).
#[must_use]
#[inline]
pub fn soft_term_total(config: &LossConfig, sum: &Lanes<f64>) -> f64 {
    let t = f64::from(config.temperature);
    t * t * sum.total()
}

/// The class-weighted form's term of a class (SPEC §5; `weighted_class_term` in
/// `reduce.wgsl`) from its weight `w` (`neg_w` for class 0, else `pos_w`), `p_c` and
/// `q_c`: `w (q_c + ε) ln((q_c + ε) / (p_c + ε))`, the form's
/// `(q + ε)(ln(q + ε) − ln(p + ε))` with one logarithm (the ε exactly as SPEC §5 has it).
#[must_use]
#[inline(always)]
pub fn weighted_class_term(w: f64, eps: f64, p: f64, q: f64) -> f64 {
    let (q, p) = (q + eps, p + eps);
    w * q * math::ln_f64(q / p)
}

/// [`weighted_class_term`] of the classes `first..first + p.len()` from their `p_c`,
/// `q_c`. A flat loop (the host vectorises it by inlining).
#[inline(always)]
pub fn weighted_class_terms(
    config: &LossConfig,
    first: usize,
    p: &[f64],
    q: &[f64],
    terms: &mut [f64],
) {
    let eps = f64::from(config.eps);
    let (neg_w, pos_w) = (f64::from(config.neg_w), f64::from(config.pos_w));
    let (p, q) = (&p[..terms.len()], &q[..terms.len()]);
    for (i, term) in terms.iter_mut().enumerate() {
        let w = if first + i == 0 { neg_w } else { pos_w };
        *term = weighted_class_term(w, eps, p[i], q[i]);
    }
}

/// The plain KL form's term of class `c` (SPEC §5; `kl_class_term` in `reduce.wgsl`, which
/// takes the two log-probabilities) from `q = q_c` and the row's two softmaxes: `q (ln q_c − ln p_c)` with the stable log-softmaxes, 0 where `q = 0`.
#[must_use]
#[inline]
pub fn kl_class_term(c: usize, q: f64, student: &SoftmaxF64<'_>, teacher: &SoftmaxF64<'_>) -> f64 {
    if q > 0.0 {
        q * (teacher.log_prob(c) - student.log_prob(c))
    } else {
        0.0
    }
}

/// A loop over priors (`reduce_rows` in `reduce.wgsl`, a thread per prior): the soft term
/// of each selected row (positive or mined) into `row_soft`, 0 elsewhere.
///
/// # Panics
/// If the slices do not agree on P and C.
pub fn reduce_rows(
    student_conf: &[f32],
    teacher_conf: &[f32],
    conf_target: &[u32],
    neg_mask: &[u8],
    config: &LossConfig,
    row_soft: &mut [f64],
) {
    let num_classes = classes_of(student_conf.len(), conf_target.len());
    if num_classes == 0 {
        return;
    }
    let rows = student_conf
        .chunks_exact(num_classes)
        .zip(teacher_conf.chunks_exact(num_classes));
    for (p, (student_row, teacher_row)) in rows.enumerate() {
        let selected = conf_target[p] > 0 || neg_mask[p] != 0;
        row_soft[p] = if selected {
            soft_term(student_row, teacher_row, config)
        } else {
            0.0
        };
    }
}

/// A loop over one image's priors (`reduce_image` in `reduce.wgsl`, a workgroup per image):
/// the sums over its selected rows (soft term and cross-entropy) and over its positives
/// (smooth-L1, bounded L2), from `row_soft` and the prior-terms stage's `prior_loss`.
/// `num_pos` (match) and `num_neg` (mine) are kept, as the GPU keeps them in `image_sums`.
///
/// # Panics
/// If the slices do not agree on P.
pub fn reduce_image(
    conf_target: &[u32],
    neg_mask: &[u8],
    prior_loss: &[[f32; 4]],
    row_soft: &[f64],
    num_pos: u32,
    num_neg: u32,
) -> LossSums {
    let priors = 0..prior_loss.len();
    let rows = ImageRows {
        conf_target,
        neg_mask,
        prior_loss,
        row_soft,
    };
    reduce_priors(priors, &rows, num_pos, num_neg)
}

/// What [`reduce_image`] reads of one image, per prior.
#[derive(Clone, Copy, Debug)]
pub struct ImageRows<'a> {
    /// `[P]` labels (0 = background).
    pub conf_target: &'a [u32],
    /// `[P]` the mined negatives.
    pub neg_mask: &'a [u8],
    /// `[P]` the prior-terms stage's `(ce, smooth_l1, student_sq, bounded)`.
    pub prior_loss: &'a [[f32; 4]],
    /// `[P]` the selected rows' soft terms.
    pub row_soft: &'a [f64],
}

/// [`reduce_image`] over the priors `priors` only (ascending, and among them every
/// selected row): the same sums in the same order, bit for bit, since the other priors
/// add nothing. The host's fast path passes its list of selected rows.
///
/// # Panics
/// If a prior is out of the slices' range.
pub fn reduce_priors(
    priors: impl IntoIterator<Item = usize>,
    rows: &ImageRows<'_>,
    num_pos: u32,
    num_neg: u32,
) -> LossSums {
    let mut sums = LossSums {
        num_pos,
        num_neg,
        ..LossSums::default()
    };
    for p in priors {
        let loss = rows.prior_loss[p];
        let positive = rows.conf_target[p] > 0;
        if positive || rows.neg_mask[p] != 0 {
            sums.soft += rows.row_soft[p];
            sums.conf += f64::from(loss[0]);
        }
        if positive {
            sums.l2 += f64::from(loss[2]);
            sums.loc += f64::from(loss[1]);
            sums.num_bounded += loss[3] as u32;
        }
    }
    sums
}

/// The batch totals (`reduce_batch` in `reduce.wgsl`, one workgroup): the images' sums
/// added in image order.
#[must_use]
pub fn reduce_batch(images: &[LossSums]) -> LossSums {
    let mut sums = LossSums::default();
    for image in images {
        sums.add(image);
    }
    sums
}
