//! The CPU backend's passes over the images: the match stage on every image, then the
//! rest of the forward pass and the image's gradients at once, in parallel (rayon), the
//! images' sums reduced in image order so that the result does not depend on the thread
//! count; and where the gradients it wrote first hold a non-finite element.

use super::buffer::zeroed_per_image;
use super::fast::{forward_matched, match_stage, FastScratch};
use super::matching::PriorColumns;
use super::pool::Workspace;
use super::rows::conf_grad_kept;
use crate::batch::{Batch, Decisions, Evaluation, Gradients, Request};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use rayon::prelude::*;
use ssdkd_core::stages::grad::grad_loc as loc_gradients;
use ssdkd_core::stages::r#match::Offsets;
use ssdkd_core::stages::reduce::reduce_batch;
use ssdkd_core::{GradScale, ImageInputs, ImageTargets, LossConfig, LossSums};

/// The [`Error::Numerical`] of the first non-finite gradient element (`finite`, found by
/// the passes that wrote them), as `Evaluation::check_finite` names it.
pub(super) fn check_gradients(g: &Gradients, finite: Finite) -> Result<()> {
    let found = [
        ("grad_student_conf", finite.conf, &g.student_conf),
        ("grad_student_loc", finite.loc, &g.student_loc),
    ];
    for (what, index, values) in found {
        if let Some(i) = index {
            return Err(Error::Numerical {
                what,
                index: Some(i),
                value: f64::from(values[i]),
            });
        }
    }
    Ok(())
}

/// [`ssdkd_core::backward_image`] into an image's zeroed gradients: only the
/// selected rows' conf gradients (`fast.selected`, in prior order, by
/// [`conf_grad_kept`] from the probabilities the forward pass kept in `fast.kept`) and the
/// positives' loc gradients
/// (the core's [`loc_gradients`]) are written. Returns the first non-finite element of
/// each that it wrote.
pub(super) fn backward_rows(
    inputs: &ImageInputs<'_>,
    config: &LossConfig,
    targets: &ImageTargets<'_>,
    scale: &GradScale,
    fast: &FastScratch,
    grad_conf: &mut [f32],
    grad_loc: &mut [[f32; 4]],
) -> FirstBad {
    let mut first_bad = FirstBad::default();
    let classes = grad_conf.len() / targets.conf_target.len().max(1);
    if classes > 0 {
        let rows = fast
            .selected
            .iter()
            .zip(fast.kept.chunks_exact(2 * classes));
        for (&p, row_kept) in rows {
            let p = p as usize;
            let span = p * classes..(p + 1) * classes;
            let out = &mut grad_conf[span.clone()];
            let label = targets.conf_target[p];
            conf_grad_kept(
                &inputs.student_conf[span],
                label,
                scale,
                config,
                row_kept,
                out,
            );
            if first_bad.conf.is_none() {
                if let Some(c) = out.iter().position(|g| !g.is_finite()) {
                    first_bad.conf = Some(p * classes + c);
                }
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
    first_bad.loc = targets
        .conf_target
        .iter()
        .zip(grad_loc.iter())
        .enumerate()
        .filter(|(_, (&label, _))| label > 0)
        .find_map(|(p, (_, row))| row.iter().position(|g| !g.is_finite()).map(|i| 4 * p + i));
    first_bad
}

/// The evaluation itself, on `pooled` workspaces (one per image), which it hands back.
///
/// Two passes over the images: the match stage (which gives each image's positives, so
/// the batch's N and the gradients' factors), then the rest of the forward pass and, when
/// asked for, the image's gradients at once, while its rows are still in cache: its part
/// of the gradient buffers zeroed ([`zeroed_per_image`]) and only the selected
/// rows and the positives written ([`backward_rows`]).
pub(super) fn evaluate_with(
    batch: &Batch<'_>,
    config: &LossConfig,
    request: Request,
    mut workspaces: Vec<Workspace>,
    cancel: Option<&CancelToken>,
) -> (Evaluation, Vec<Workspace>, Finite) {
    // Checked before each image of each pass; once cancelled, every later image is skipped.
    let cancelled = || cancel.is_some_and(CancelToken::is_cancelled);
    let shape = batch.shape();
    let (p, c) = (shape.priors, shape.classes);
    let columns = PriorColumns::new(bytemuck::cast_slice(batch.priors()));
    let offsets = if request.decisions {
        Offsets::All
    } else {
        Offsets::Positives
    };
    let num_pos: Vec<u32> = workspaces
        .par_iter_mut()
        .enumerate()
        .map(|(i, (workspace, fast))| {
            if cancelled() {
                return 0;
            }
            workspace.resize(p, shape.objects);
            let (mut scratch, mut targets) = workspace.split();
            let image = batch.image(i);
            match_stage(
                &image,
                config,
                offsets,
                &mut scratch,
                &mut targets,
                &columns,
                fast,
            )
        })
        .collect();
    let scale = GradScale::new(config, num_pos.iter().sum());

    let rest = |i: usize,
                (workspace, fast): &mut Workspace,
                grads: Option<(&mut [_], &mut [_])>| {
        if cancelled() {
            return (LossSums::default(), FirstBad::default());
        }
        let (mut scratch, mut targets) = workspace.split();
        let image = batch.image(i);
        // The selected rows' probabilities are kept even without gradients, for a
        // later `CpuBackend::gradients_of_last` (a few kB per image).
        let sums = forward_matched(&image, config, num_pos[i], &mut scratch, &mut targets, fast);
        let bad = grads.map_or_else(FirstBad::default, |(grad_conf, grad_loc)| {
            backward_rows(&image, config, &targets, &scale, fast, grad_conf, grad_loc)
        });
        (sums, bad)
    };
    let (per_image, first_bad, gradients): (Vec<LossSums>, Vec<FirstBad>, _) =
        if request.gradients && p > 0 {
            let (grads, results) = gradient_pass(batch, &mut workspaces, |i, workspace, grads| {
                rest(i, workspace, Some(grads))
            });
            let (per_image, first_bad) = results.into_iter().unzip();
            (per_image, first_bad, Some(grads))
        } else {
            let (per_image, first_bad) = workspaces
                .par_iter_mut()
                .enumerate()
                .map(|(i, workspace)| rest(i, workspace, None))
                .unzip();
            let empty = request.gradients.then(|| Gradients {
                student_conf: Vec::new(),
                student_loc: Vec::new(),
            });
            (per_image, first_bad, empty)
        };
    let sums = reduce_batch(&per_image);

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
    // Only the rows `backward_rows` wrote can hold a non-finite element; the rest are zeros.
    let finite = finite_of(&first_bad, p, c);
    (eval, workspaces, finite)
}

/// The images' conf and loc gradient slices of fresh gradient buffers, zeroed
/// ([`zeroed_per_image`]), each handed with the image's index and workspace to `each` on
/// whichever core takes the image; returns the buffers and `each`'s results in image
/// order. P must be positive.
pub(super) fn gradient_pass<R: Send>(
    batch: &Batch<'_>,
    workspaces: &mut [Workspace],
    each: impl Fn(usize, &mut Workspace, (&mut [f32], &mut [[f32; 4]])) -> R + Sync,
) -> (Gradients, Vec<R>) {
    let shape = batch.shape();
    let (p, c) = (shape.priors, shape.classes);
    let (student_conf, student_loc, results) = zeroed_per_image(
        workspaces,
        p * c,
        p * 4,
        |i, workspace, grad_conf, grad_loc| {
            each(
                i,
                workspace,
                (grad_conf, bytemuck::cast_slice_mut(grad_loc)),
            )
        },
    );
    let grads = Gradients {
        student_conf,
        student_loc,
    };
    (grads, results)
}

/// Where the passes that wrote the gradients found their first non-finite element,
/// as flat indices (images in order, each image's first).
pub(super) fn finite_of(first_bad: &[FirstBad], p: usize, c: usize) -> Finite {
    let non_finite = |pick: fn(&FirstBad) -> Option<usize>, per_image: usize| {
        first_bad
            .iter()
            .enumerate()
            .find_map(|(i, bad)| pick(bad).map(|index| i * per_image + index))
    };
    Finite {
        conf: non_finite(|bad| bad.conf, p * c),
        loc: non_finite(|bad| bad.loc, p * 4),
    }
}

/// Where an evaluation's gradients first hold a non-finite element (flat indices), as
/// `Evaluation::check_finite` would find it by scanning them.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Finite {
    conf: Option<usize>,
    loc: Option<usize>,
}

/// The first non-finite element one image's backward pass wrote, per gradient.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FirstBad {
    conf: Option<usize>,
    loc: Option<usize>,
}
