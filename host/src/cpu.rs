//! The CPU backend: the core's per-image stages on every core (rayon), images summed in
//! image order so that the result does not depend on the thread count. The forward pass
//! takes the fast path of [`fast`] (the exact log-sum-exp only where it can change the
//! result, bounds from the vectorised kernels of `simd.rs` elsewhere), whose sums and
//! decisions are the core reference's, bit for bit.

pub mod fast;
pub mod matching;
mod rows;
mod simd;

use crate::batch::{Batch, Decisions, Evaluation, Gradients, Request};
use crate::error::Result;
use rayon::prelude::*;
use ssdkd_core::stages::r#match::Offsets;
use ssdkd_core::stages::reduce::reduce_batch;
use fast::{forward_image_fast, FastScratch};
use matching::PriorColumns;
use rows::conf_grad_row;
use ssdkd_core::stages::grad::grad_loc as loc_gradients;
use ssdkd_core::{GradScale, ImageInputs, ImageTargets, ImageWorkspace, LossConfig, LossSums};

/// At most this many workspaces are kept (about 0.3 MiB each for SSD300).
const MAX_POOLED: usize = 256;

/// The CPU backend. It owns the per-image workspaces of its last evaluations, so that a
/// training loop's repeated calls neither allocate nor zero-fill them again; dropping the
/// backend frees them. Each backend has its own: two never share state.
#[derive(Debug, Default)]
pub struct CpuBackend {
    workspaces: Vec<Workspace>,
}

/// One image's core workspace and the fast path's scratch.
type Workspace = (ImageWorkspace, FastScratch);

impl CpuBackend {
    /// A CPU backend with no workspaces yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many workspaces this backend holds for its next evaluation.
    #[must_use]
    pub fn pooled(&self) -> usize {
        self.workspaces.len()
    }

    fn take_workspaces(&mut self, count: usize) -> Vec<Workspace> {
        let keep = self.workspaces.len().saturating_sub(count);
        let mut taken = self.workspaces.split_off(keep);
        taken.resize_with(count, Workspace::default);
        taken
    }

    fn return_workspaces(&mut self, workspaces: Vec<Workspace>) {
        let room = MAX_POOLED.saturating_sub(self.workspaces.len());
        self.workspaces.extend(workspaces.into_iter().take(room));
    }

    /// Evaluates the loss of `batch` (and what `request` asks for) on the CPU, reusing
    /// this backend's workspaces.
    ///
    /// # Errors
    /// What [`Batch::check`] finds (the value scan only when `request.validate`).
    pub fn evaluate(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
        request: Request,
    ) -> Result<Evaluation> {
        batch.check(config, request.validate)?;
        let pooled = self.take_workspaces(batch.shape().batch);
        let (eval, workspaces) = evaluate_with(batch, config, request, pooled);
        self.return_workspaces(workspaces);
        Ok(eval)
    }
}

/// Evaluates the loss of `batch` on the CPU with a fresh [`CpuBackend`] (nothing kept
/// for later calls; a loop should keep a backend instead).
///
/// # Errors
/// What [`Batch::check`] finds (the value scan only when `request.validate`).
pub fn evaluate(batch: &Batch<'_>, config: &LossConfig, request: Request) -> Result<Evaluation> {
    CpuBackend::new().evaluate(batch, config, request)
}

/// [`ssdkd_core::backward_image`] into zeroed buffers (`vec![0.0; n]`, whose untouched
/// pages stay unmapped): only the selected rows' conf gradients (by [`rows::conf_grad_row`]
/// from the probabilities the forward pass kept in `kept`) and the positives' loc gradients
/// (the core's [`loc_gradients`]) are written.
fn backward_rows(
    inputs: &ImageInputs<'_>,
    config: &LossConfig,
    targets: &ImageTargets<'_>,
    scale: &GradScale,
    kept: &[f64],
    grad_conf: &mut [f32],
    grad_loc: &mut [[f32; 4]],
) {
    let classes = grad_conf.len() / targets.conf_target.len().max(1);
    if classes > 0 {
        let mut kept = kept.chunks_exact(2 * classes);
        let rows = inputs
            .student_conf
            .chunks_exact(classes)
            .zip(grad_conf.chunks_exact_mut(classes))
            .zip(targets.conf_target.iter().zip(targets.neg_mask.iter()));
        for ((student, out), (&label, &mined)) in rows {
            if label > 0 || mined != 0 {
                let row_kept = kept.next().expect("the forward pass kept every selected row");
                conf_grad_row(student, label, scale, config, row_kept, out);
            }
        }
    }
    loc_gradients(
        inputs.student_loc,
        inputs.teacher_loc,
        targets.conf_target,
        targets.loc_target,
        scale,
        config,
        grad_loc,
        true,
    );
}

/// The evaluation itself, on `pooled` workspaces (one per image), which it hands back.
fn evaluate_with(
    batch: &Batch<'_>,
    config: &LossConfig,
    request: Request,
    mut pooled: Vec<Workspace>,
) -> (Evaluation, Vec<Workspace>) {
    let shape = batch.shape();
    let (p, c) = (shape.priors, shape.classes);
    let columns = PriorColumns::new(bytemuck::cast_slice(batch.priors()));
    let (per_image, mut workspaces): (Vec<LossSums>, Vec<Workspace>) = (0..shape.batch)
        .into_par_iter()
        .zip(pooled.par_drain(..))
        .map(|(i, (mut workspace, mut fast))| {
            workspace.resize(p, shape.objects);
            let (mut scratch, mut targets) = workspace.split();
            let offsets = if request.decisions {
                Offsets::All
            } else {
                Offsets::Positives
            };
            let sums = forward_image_fast(
                &batch.image(i),
                config,
                offsets,
                &mut scratch,
                &mut targets,
                &columns,
                request.gradients,
                &mut fast,
            );
            (sums, (workspace, fast))
        })
        .unzip();
    let sums = reduce_batch(&per_image);

    let gradients = request.gradients.then(|| {
        let scale = GradScale::new(config, sums.num_pos);
        let mut grads = Gradients {
            student_conf: vec![0.0; shape.batch * p * c],
            student_loc: vec![0.0; shape.batch * p * 4],
        };
        grads
            .student_conf
            .par_chunks_mut(p * c)
            .zip(grads.student_loc.par_chunks_mut(p * 4))
            .zip(workspaces.par_iter_mut())
            .enumerate()
            .for_each(|(i, ((grad_conf, grad_loc), (workspace, fast)))| {
                let (_, targets) = workspace.split();
                backward_rows(
                    &batch.image(i),
                    config,
                    &targets,
                    &scale,
                    &fast.kept,
                    grad_conf,
                    bytemuck::cast_slice_mut(grad_loc),
                );
            });
        grads
    });

    let decisions = request.decisions.then(|| {
        let mut decisions = Decisions::default();
        for (workspace, _) in &mut workspaces {
            let (_, targets) = workspace.split();
            decisions.conf_target.extend_from_slice(targets.conf_target);
            decisions
                .loc_target
                .extend_from_slice(bytemuck::cast_slice(targets.loc_target));
            decisions.neg_mask.extend_from_slice(targets.neg_mask);
        }
        decisions
    });

    let eval = Evaluation {
        terms: sums.finish(config),
        sums,
        gradients,
        decisions,
    };
    (eval, workspaces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{synthetic_batch, SyntheticSpec};

    #[test]
    fn each_backend_owns_its_workspaces_and_reuses_them() {
        let tensors = synthetic_batch(&SyntheticSpec::demo(3));
        let batch = tensors.batch();
        let config = LossConfig::DEFAULT;
        let mut first = CpuBackend::new();
        let second = CpuBackend::new();
        assert_eq!(first.pooled(), 0);
        let a = first.evaluate(&batch, &config, Request::with_gradients());
        let a = a.unwrap();
        // One workspace per image is kept by the backend that ran, none by the other.
        assert_eq!(first.pooled(), 3);
        assert_eq!(second.pooled(), 0);
        // A second run reuses them (still 3) and gives the same bits.
        let b = first.evaluate(&batch, &config, Request::with_gradients());
        let b = b.unwrap();
        assert_eq!(first.pooled(), 3);
        assert_eq!(a.sums, b.sums);
        assert_eq!(a.gradients, b.gradients);
        // The free function keeps nothing between calls and agrees bit for bit.
        let c = evaluate(&batch, &config, Request::with_gradients()).unwrap();
        assert_eq!(a.gradients, c.gradients);
    }
}
