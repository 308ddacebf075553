//! The CPU backend: the core's per-image stages on every core (rayon), images summed in
//! image order so that the result does not depend on the thread count.

use crate::batch::{Batch, Decisions, Evaluation, Gradients, Request};
use crate::error::Result;
use rayon::prelude::*;
use ssdkd_core::stages::r#match::Offsets;
use ssdkd_core::stages::reduce::reduce_batch;
use ssdkd_core::{backward_image, forward_image, GradScale, ImageWorkspace, LossConfig, LossSums};
use std::sync::Mutex;

/// Workspaces kept between evaluations, so that a training loop's repeated calls neither
/// allocate nor zero-fill them again.
static WORKSPACES: Mutex<Vec<ImageWorkspace>> = Mutex::new(Vec::new());

/// At most this many workspaces are kept (about 0.3 MiB each for SSD300).
const MAX_POOLED: usize = 256;

fn take_workspaces(count: usize) -> Vec<ImageWorkspace> {
    let mut pool = WORKSPACES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let keep = pool.len().saturating_sub(count);
    let mut taken = pool.split_off(keep);
    taken.resize_with(count, ImageWorkspace::default);
    taken
}

fn return_workspaces(workspaces: Vec<ImageWorkspace>) {
    let mut pool = WORKSPACES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let room = MAX_POOLED.saturating_sub(pool.len());
    pool.extend(workspaces.into_iter().take(room));
}

/// Evaluates the loss of `batch` (and what `request` asks for) on the CPU.
///
/// # Errors
/// What [`Batch::check`] finds (the value scan only when `request.validate`).
pub fn evaluate(batch: &Batch<'_>, config: &LossConfig, request: Request) -> Result<Evaluation> {
    batch.check(config, request.validate)?;
    let shape = batch.shape();
    let (p, c) = (shape.priors, shape.classes);
    let mut pooled = take_workspaces(shape.batch);
    let (per_image, mut workspaces): (Vec<LossSums>, Vec<ImageWorkspace>) = (0..shape.batch)
        .into_par_iter()
        .zip(pooled.par_drain(..))
        .map(|(i, mut workspace)| {
            workspace.resize(p, shape.objects);
            let (mut scratch, mut targets) = workspace.split();
            let offsets = if request.decisions {
                Offsets::All
            } else {
                Offsets::Positives
            };
            let sums = forward_image(&batch.image(i), config, offsets, &mut scratch, &mut targets);
            (sums, workspace)
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
            .for_each(|(i, ((grad_conf, grad_loc), workspace))| {
                let (_, targets) = workspace.split();
                backward_image(
                    &batch.image(i),
                    config,
                    &targets,
                    &scale,
                    grad_conf,
                    bytemuck::cast_slice_mut(grad_loc),
                    true, // vec![0.0; n] is zeroed (and untouched pages stay unmapped)
                );
            });
        grads
    });

    let decisions = request.decisions.then(|| {
        let mut decisions = Decisions::default();
        for workspace in &mut workspaces {
            let (_, targets) = workspace.split();
            decisions.conf_target.extend_from_slice(targets.conf_target);
            decisions
                .loc_target
                .extend_from_slice(bytemuck::cast_slice(targets.loc_target));
            decisions.neg_mask.extend_from_slice(targets.neg_mask);
        }
        decisions
    });

    return_workspaces(workspaces);
    Ok(Evaluation {
        terms: sums.finish(config),
        sums,
        gradients,
        decisions,
    })
}
