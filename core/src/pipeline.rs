//! One image through the stages, forward (match → prior terms → mine → reduce) and
//! backward (grad), over caller-provided slices: no allocation, so it runs on a
//! microcontroller. Each stage runs its kernels in the GPU's order
//! ([`crate::stages::KERNELS`]); a batch is the images one after another (or in parallel)
//! with their [`LossSums`] added in image order by [`reduce_batch`](crate::stages::reduce::reduce_batch).

use crate::config::LossConfig;
use crate::stages::grad::{grad_conf, grad_loc, GradScale};
use crate::stages::mine::mine;
use crate::stages::prior_terms::prior_terms;
use crate::stages::r#match::{match_image, ObjectScratch, Offsets};
use crate::stages::reduce::{reduce_image, reduce_rows, LossSums};

/// One image's input tensors (SPEC §1), rows as arrays.
#[derive(Clone, Copy, Debug)]
pub struct ImageInputs<'a> {
    /// `[P, 4]` student box offsets.
    pub student_loc: &'a [[f32; 4]],
    /// `[P × C]` student logits, row-major.
    pub student_conf: &'a [f32],
    /// `[P, 4]` teacher box offsets.
    pub teacher_loc: &'a [[f32; 4]],
    /// `[P × C]` teacher logits, row-major.
    pub teacher_conf: &'a [f32],
    /// `[M, 5]` ground truth `xmin, ymin, xmax, ymax, label`; negative label = padding.
    pub targets: &'a [[f32; 5]],
    /// `[P, 4]` priors in centre form.
    pub priors: &'a [[f32; 4]],
}

/// What the forward pass decides per prior and the backward pass reuses.
#[derive(Debug)]
pub struct ImageTargets<'a> {
    /// `[P]` matched labels, 0 = background (SPEC §3).
    pub conf_target: &'a mut [u32],
    /// `[P, 4]` encoded offsets of each prior's matched object (SPEC §3).
    pub loc_target: &'a mut [[f32; 4]],
    /// `[P]` 1 where the prior's mining rank is < k (SPEC §4).
    pub neg_mask: &'a mut [u8],
}

/// Scratch of the forward pass: at least M objects, P of everything else.
#[derive(Debug)]
pub struct ImageScratch<'a> {
    /// One per `targets` row.
    pub objects: &'a mut [ObjectScratch],
    /// `[P]` per-prior loss record of the prior-terms stage: cross-entropy, smooth-L1,
    /// bounded `d_s`, bound flag.
    pub prior_loss: &'a mut [[f32; 4]],
    /// `[P]` soft term of each selected row (reduce stage).
    pub row_soft: &'a mut [f64],
    /// `[P]` mining score of each prior.
    pub mining_score: &'a mut [f32],
    /// `[P]` ranking keys of the mine stage.
    pub keys: &'a mut [u64],
}

/// Runs one image forward and returns its un-normalised sums and counts; `targets` receives
/// the labels, offsets (of every prior or of the positives only, per `offsets`) and the
/// negative mask.
///
/// # Panics
/// If the slices disagree on P, C or M.
pub fn forward_image(
    inputs: &ImageInputs<'_>,
    config: &LossConfig,
    offsets: Offsets,
    scratch: &mut ImageScratch<'_>,
    targets: &mut ImageTargets<'_>,
) -> LossSums {
    let num_pos = match_image(
        inputs.targets,
        inputs.priors,
        config.overlap_threshold,
        config.variance,
        offsets,
        scratch.objects,
        targets.conf_target,
        targets.loc_target,
    );
    prior_terms(
        inputs.student_conf,
        inputs.student_loc,
        inputs.teacher_loc,
        targets.conf_target,
        targets.loc_target,
        config,
        scratch.mining_score,
        scratch.prior_loss,
    );
    let num_neg = mine(
        scratch.mining_score,
        num_pos,
        config,
        scratch.keys,
        targets.neg_mask,
    );
    reduce_rows(
        inputs.student_conf,
        inputs.teacher_conf,
        targets.conf_target,
        targets.neg_mask,
        config,
        scratch.row_soft,
    );
    reduce_image(
        targets.conf_target,
        targets.neg_mask,
        scratch.prior_loss,
        scratch.row_soft,
        num_pos,
        num_neg,
    )
}

/// Writes one image's gradients (SPEC §6) from its forward decisions; `scale` comes from the
/// whole batch's positives ([`GradScale::new`]). With `already_zero` the caller promises
/// zeroed outputs, and only the selected rows and positive priors are written.
pub fn backward_image(
    inputs: &ImageInputs<'_>,
    config: &LossConfig,
    targets: &ImageTargets<'_>,
    scale: &GradScale,
    grad_student_conf: &mut [f32],
    grad_student_loc: &mut [[f32; 4]],
    already_zero: bool,
) {
    grad_conf(
        inputs.student_conf,
        inputs.teacher_conf,
        targets.conf_target,
        targets.neg_mask,
        scale,
        config,
        grad_student_conf,
        already_zero,
    );
    grad_loc(
        inputs.student_loc,
        inputs.teacher_loc,
        targets.conf_target,
        targets.loc_target,
        scale,
        config,
        grad_student_loc,
        already_zero,
    );
}

/// Owned scratch and per-prior decisions for images of P priors and M object rows.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default)]
pub struct ImageWorkspace {
    objects: alloc::vec::Vec<ObjectScratch>,
    prior_loss: alloc::vec::Vec<[f32; 4]>,
    row_soft: alloc::vec::Vec<f64>,
    mining_score: alloc::vec::Vec<f32>,
    keys: alloc::vec::Vec<u64>,
    conf_target: alloc::vec::Vec<u32>,
    loc_target: alloc::vec::Vec<[f32; 4]>,
    neg_mask: alloc::vec::Vec<u8>,
}

#[cfg(feature = "alloc")]
impl ImageWorkspace {
    /// A workspace sized for `num_priors` priors and `num_objects` target rows.
    #[must_use]
    pub fn new(num_priors: usize, num_objects: usize) -> Self {
        let mut workspace = Self::default();
        workspace.resize(num_priors, num_objects);
        workspace
    }

    /// Resizes for `num_priors` priors and `num_objects` target rows.
    pub fn resize(&mut self, num_priors: usize, num_objects: usize) {
        self.objects.resize(num_objects, ObjectScratch::default());
        self.prior_loss.resize(num_priors, [0.0; 4]);
        self.row_soft.resize(num_priors, 0.0);
        self.mining_score.resize(num_priors, 0.0);
        self.keys.resize(num_priors, 0);
        self.conf_target.resize(num_priors, 0);
        self.loc_target.resize(num_priors, [0.0; 4]);
        self.neg_mask.resize(num_priors, 0);
    }

    /// Borrows the scratch and the decisions.
    pub fn split(&mut self) -> (ImageScratch<'_>, ImageTargets<'_>) {
        (
            ImageScratch {
                objects: &mut self.objects,
                prior_loss: &mut self.prior_loss,
                row_soft: &mut self.row_soft,
                mining_score: &mut self.mining_score,
                keys: &mut self.keys,
            },
            ImageTargets {
                conf_target: &mut self.conf_target,
                loc_target: &mut self.loc_target,
                neg_mask: &mut self.neg_mask,
            },
        )
    }
}
