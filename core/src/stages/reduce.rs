//! Stage **reduce** (SPEC §5): the sums over the selected rows of an image, the batch
//! totals, and their normalisation by N. Twin of `shaders/reduce.wgsl`.
//!
//! The CPU sums each image's f32 terms in f64 in prior order, then the images in image
//! order: a fixed order, so the result is deterministic.

use crate::config::LossConfig;
use crate::stages::prior_terms::{soft_term, LocSums};

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

/// Sums one image's selected rows: cross-entropy and the soft term over `positive ∪
/// negative`, plus the localisation sums already taken by the prior-terms stage.
///
/// # Panics
/// If the slices do not agree on P and C.
#[allow(clippy::too_many_arguments)] // one slice per tensor, as the shader binds them
pub fn reduce_image(
    student_conf: &[f32],
    teacher_conf: &[f32],
    conf_target: &[u32],
    neg_mask: &[u8],
    cross_entropy: &[f32],
    loc_sums: LocSums,
    num_neg: u32,
    config: &LossConfig,
) -> LossSums {
    let num_classes = config.num_classes as usize;
    let mut sums = LossSums {
        l2: loc_sums.l2,
        loc: loc_sums.loc,
        num_neg,
        num_bounded: loc_sums.num_bounded,
        ..LossSums::default()
    };
    let rows = student_conf
        .chunks_exact(num_classes)
        .zip(teacher_conf.chunks_exact(num_classes));
    for (p, (student_row, teacher_row)) in rows.enumerate() {
        let positive = conf_target[p] > 0;
        sums.num_pos += u32::from(positive);
        if positive || neg_mask[p] != 0 {
            sums.conf += f64::from(cross_entropy[p]);
            sums.soft += soft_term(student_row, teacher_row, config);
        }
    }
    sums
}
