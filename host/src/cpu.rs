//! The CPU backend: the core's per-image stages on every core (rayon), images summed in
//! image order so that the result does not depend on the thread count. The forward pass
//! takes the fast path of [`fast`] (the exact log-sum-exp only where it can change the
//! result, bounds from the vectorised kernels of `simd.rs` elsewhere), whose sums and
//! decisions are the core reference's, bit for bit.

pub mod fast;
pub mod matching;
mod rows;
mod simd;

use crate::batch::{Batch, BatchShape, Decisions, Evaluation, Gradients, Request};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use fast::{forward_matched, match_stage, FastScratch};
use matching::PriorColumns;
use rayon::prelude::*;
use rows::conf_grad_row;
use ssdkd_core::stages::grad::grad_loc as loc_gradients;
use ssdkd_core::stages::r#match::Offsets;
use ssdkd_core::stages::reduce::reduce_batch;
use ssdkd_core::{
    GradScale, ImageInputs, ImageTargets, ImageWorkspace, LossConfig, LossSums, LossWeights,
};
use std::mem::MaybeUninit;

/// At most this many workspaces are kept (about 0.3 MiB each for SSD300).
const MAX_POOLED: usize = 256;

/// The CPU backend. It owns the per-image workspaces of its last evaluations, so that a
/// training loop's repeated calls neither allocate nor zero-fill them again; dropping the
/// backend frees them. Each backend has its own: two never share state.
#[derive(Debug, Default)]
pub struct CpuBackend {
    workspaces: Vec<Workspace>,
    /// What the last evaluation's workspaces (the last B of `workspaces`) hold, for
    /// [`CpuBackend::gradients_of_last`]; `None` when they hold nothing usable.
    last: Option<Box<LastBatch>>,
}

/// The evaluation whose selected rows, labels and probabilities the pooled workspaces
/// hold: its tensors (by address and length), shape, config (weights aside: the gradient's
/// factors are all that they change) and N.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LastBatch {
    shape: BatchShape,
    tensors: [(usize, usize); 6],
    config: LossConfig,
    num_pos: u32,
}

impl LastBatch {
    fn of(batch: &Batch<'_>, config: &LossConfig, num_pos: u32) -> Self {
        let tensors = [
            batch.student_loc(),
            batch.student_conf(),
            batch.teacher_loc(),
            batch.teacher_conf(),
            batch.targets(),
            batch.priors(),
        ]
        .map(|t| (t.as_ptr() as usize, t.len()));
        let config = LossConfig {
            weights: LossWeights {
                soft: 0.0,
                conf: 0.0,
                l2: 0.0,
                loc: 0.0,
            },
            ..*config
        };
        Self {
            shape: batch.shape(),
            tensors,
            config,
            num_pos,
        }
    }
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
        self.run(batch, config, request, None).map(|(eval, _)| eval)
    }

    /// [`CpuBackend::evaluate`], then the checks of `Evaluation::check_finite` (the same
    /// error for the same evaluation) without scanning the gradients: the backward pass
    /// checked the rows it wrote, and the others are zeros.
    ///
    /// With `cancel`, each image of each pass first checks the token, and a cancelled
    /// evaluation returns [`Error::Cancelled`].
    ///
    /// # Errors
    /// As [`CpuBackend::evaluate`], [`Error::Numerical`] for a non-finite term or
    /// gradient element, and [`Error::Cancelled`].
    pub(crate) fn evaluate_checked(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
        request: Request,
        cancel: Option<&CancelToken>,
    ) -> Result<Evaluation> {
        let (mut eval, finite) = self.run(batch, config, request, cancel)?;
        let gradients = eval.gradients.take();
        eval.check_finite()?; // the terms
        if let Some(g) = &gradients {
            check_gradients(g, finite)?;
        }
        eval.gradients = gradients;
        Ok(eval)
    }

    /// The gradients of the last evaluation's batch for other weights (`config.weights`;
    /// every other setting as then), from what that evaluation kept in this backend's
    /// workspaces: the selected rows, their probabilities, the labels and N. No forward
    /// pass again — the backward of a training step whose forward already evaluated the
    /// losses (the Python wrapper's). The same bits as [`CpuBackend::evaluate`] with
    /// gradients asked for.
    ///
    /// `None` when the last evaluation on this backend was not of `batch` (the same
    /// tensors, by address and length, and shape) with the same settings, or kept nothing
    /// (it failed, or its batch had more images than the pool keeps); the caller then
    /// evaluates afresh. The tensors must not have changed since.
    ///
    /// # Errors
    /// [`Error::Numerical`] for a non-finite gradient element, as
    /// [`CpuBackend::evaluate`]'s caller would find it.
    pub fn gradients_of_last(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
    ) -> Option<Result<Gradients>> {
        let last = *self.last.as_deref()?;
        if last != LastBatch::of(batch, config, last.num_pos) {
            return None;
        }
        let shape = batch.shape();
        let start = self.workspaces.len().checked_sub(shape.batch)?;
        let workspaces = &mut self.workspaces[start..];
        let scale = GradScale::new(config, last.num_pos);
        if shape.priors == 0 {
            return None;
        }
        let (gradients, first_bad) = gradient_pass(batch, workspaces, |i, workspace, grads| {
            let (workspace, fast) = workspace;
            let (_, targets) = workspace.split();
            let image = batch.image(i);
            backward_rows(&image, config, &targets, &scale, fast, grads.0, grads.1)
        });
        let finite = finite_of(&first_bad, shape.priors, shape.classes);
        Some(check_gradients(&gradients, finite).map(|()| gradients))
    }

    /// One evaluation on the pooled workspaces; remembers what they then hold.
    fn run(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
        request: Request,
        cancel: Option<&CancelToken>,
    ) -> Result<(Evaluation, Finite)> {
        self.last = None;
        batch.check_cancellable(config, request.validate, cancel)?;
        let images = batch.shape().batch;
        let pooled = self.take_workspaces(images);
        let (eval, workspaces, finite) = evaluate_with(batch, config, request, pooled, cancel);
        let before = self.workspaces.len();
        self.return_workspaces(workspaces);
        // A cancelled evaluation skipped images: its results and workspaces mean nothing.
        cancel.map_or(Ok(()), CancelToken::check)?;
        if self.workspaces.len() - before == images {
            self.last = Some(Box::new(LastBatch::of(batch, config, eval.sums.num_pos)));
        }
        Ok((eval, finite))
    }
}

/// The [`Error::Numerical`] of the first non-finite gradient element (`finite`, found by
/// the passes that wrote them), as `Evaluation::check_finite` names it.
fn check_gradients(g: &Gradients, finite: Finite) -> Result<()> {
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

/// Evaluates the loss of `batch` on the CPU with a fresh [`CpuBackend`] (nothing kept
/// for later calls; a loop should keep a backend instead).
///
/// # Errors
/// What [`Batch::check`] finds (the value scan only when `request.validate`).
pub fn evaluate(batch: &Batch<'_>, config: &LossConfig, request: Request) -> Result<Evaluation> {
    CpuBackend::new().evaluate(batch, config, request)
}

/// [`ssdkd_core::backward_image`] into an image's zeroed gradients ([`zeroed`]): only the
/// selected rows' conf gradients (`fast.selected`, in prior order, by
/// [`rows::conf_grad_row`] from the probabilities the forward pass kept in `fast.kept`) and the positives' loc gradients
/// (the core's [`loc_gradients`]) are written. Returns the first non-finite element of
/// each that it wrote.
fn backward_rows(
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
            conf_grad_row(
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
/// of the gradient buffers zeroed (or found zero, [`GradientBuffer`]) and only the selected
/// rows and the positives written ([`backward_rows`]).
fn evaluate_with(
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
/// ([`GradientBuffer`], [`zeroed`]), each handed with the image's index and workspace to
/// `each` on whichever core takes the image; returns the buffers and `each`'s results in
/// image order. P must be positive.
fn gradient_pass<R: Send>(
    batch: &Batch<'_>,
    workspaces: &mut [Workspace],
    each: impl Fn(usize, &mut Workspace, (&mut [f32], &mut [[f32; 4]])) -> R + Sync,
) -> (Gradients, Vec<R>) {
    let shape = batch.shape();
    let (p, c) = (shape.priors, shape.classes);
    let mut conf = GradientBuffer::new(shape.batch * p * c);
    let mut loc = GradientBuffer::new(shape.batch * p * 4);
    let (conf_fresh, loc_fresh) = (conf.fresh, loc.fresh);
    let results = workspaces
        .par_iter_mut()
        .zip(conf.slots().par_chunks_mut(p * c))
        .zip(loc.slots().par_chunks_mut(p * 4))
        .enumerate()
        .map(|(i, ((workspace, grad_conf), grad_loc))| {
            let grad_conf = zeroed(grad_conf, conf_fresh);
            let grad_loc = bytemuck::cast_slice_mut(zeroed(grad_loc, loc_fresh));
            each(i, workspace, (grad_conf, grad_loc))
        })
        .collect();
    // SAFETY: the images' chunks cover both buffers (B chunks of P·C and of P·4), and
    // `zeroed` initialised each.
    let grads = unsafe {
        Gradients {
            student_conf: conf.finish(),
            student_loc: loc.finish(),
        }
    };
    (grads, results)
}

/// Where the passes that wrote the gradients found their first non-finite element,
/// as flat indices (images in order, each image's first).
fn finite_of(first_bad: &[FirstBad], p: usize, c: usize) -> Finite {
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
struct Finite {
    conf: Option<usize>,
    loc: Option<usize>,
}

/// The first non-finite element one image's backward pass wrote, per gradient.
#[derive(Clone, Copy, Debug, Default)]
struct FirstBad {
    conf: Option<usize>,
    loc: Option<usize>,
}

/// From this many bytes on, glibc's allocator maps every allocation afresh (its largest
/// mmap threshold, 32 MiB on 64-bit) and hands it back to the system when freed.
const FRESH_MAPPING: usize = 32 << 20;

/// A gradient buffer of `n` values that the gradient pass zeroes image by image
/// ([`zeroed`]) before writing the selected rows:
/// - below [`FRESH_MAPPING`] bytes, uninitialised capacity, zeroed with streaming stores
///   ([`zero_streaming`]) by whichever core takes the image (the heap's recycled memory is
///   not zero, and a `vec![0.0; n]` would be zeroed by one thread up front);
/// - from it on (`fresh`), `vec![0.0; n]` (calloc), whose fresh mapping the kernel zeroes
///   page by page when first written (no second zeroing), with 2 MiB pages asked for on
///   Linux ([`advise_huge_pages`]) so that a large batch takes few page faults.
struct GradientBuffer {
    values: Vec<f32>,
    len: usize,
    fresh: bool,
}

impl GradientBuffer {
    fn new(len: usize) -> Self {
        if len * 4 >= FRESH_MAPPING {
            let values = vec![0.0; len];
            advise_huge_pages(&values);
            Self {
                values,
                len,
                fresh: true,
            }
        } else {
            Self {
                values: Vec::with_capacity(len),
                len,
                fresh: false,
            }
        }
    }

    /// The buffer's `len` values, each to be passed through [`zeroed`].
    fn slots(&mut self) -> &mut [MaybeUninit<f32>] {
        if self.fresh {
            let values = self.values.as_mut_slice();
            // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and nothing writes an
            // uninitialised value through the view (`zeroed` only writes zeros).
            unsafe { &mut *(std::ptr::from_mut(values) as *mut [MaybeUninit<f32>]) }
        } else {
            &mut self.values.spare_capacity_mut()[..self.len]
        }
    }

    /// The values.
    ///
    /// # Safety
    /// Every slot of [`GradientBuffer::slots`] went through [`zeroed`].
    unsafe fn finish(mut self) -> Vec<f32> {
        // SAFETY: the capacity is at least `len`, and the caller initialised every value.
        unsafe { self.values.set_len(self.len) };
        self.values
    }
}

/// `chunk` as zeros: zeroed here ([`zero_streaming`]) unless it is a fresh mapping's
/// (`fresh`, already zero).
fn zeroed(chunk: &mut [MaybeUninit<f32>], fresh: bool) -> &mut [f32] {
    if !fresh {
        zero_streaming(chunk);
    }
    // SAFETY: every value of `chunk` is initialised: written just now, or zero already.
    unsafe { &mut *(std::ptr::from_mut(chunk) as *mut [f32]) }
}

/// Writes zeros over `chunk` with non-temporal (streaming) stores on x86-64: the lines go
/// to memory without being read first (a plain store reads each line it writes, so the
/// zeroing moved the gradient's bytes twice) and without evicting the caches. Elsewhere,
/// plain writes.
fn zero_streaming(chunk: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_setzero_ps, _mm_sfence, _mm_stream_ps};
        let len = chunk.len();
        let head = chunk.as_ptr().align_offset(16).min(len);
        let body = (len - head) / 4 * 4;
        for value in &mut chunk[..head] {
            value.write(0.0);
        }
        let aligned = chunk[head..].as_mut_ptr().cast::<f32>();
        // SAFETY: `aligned` is 16-byte aligned and `aligned + j .. aligned + j + 4` lies
        // inside `chunk` for every `j < body` (a multiple of 4 at most `len - head`); the
        // fence orders the streaming stores before anything this thread does next (rayon's
        // join then publishes them to the other threads).
        unsafe {
            let zero = _mm_setzero_ps();
            for j in (0..body).step_by(4) {
                _mm_stream_ps(aligned.add(j), zero);
            }
            _mm_sfence();
        }
        for value in &mut chunk[head + body..] {
            value.write(0.0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for value in chunk {
        value.write(0.0);
    }
}

/// Asks Linux for transparent huge pages (2 MiB) over the whole pages inside `values`
/// (`madvise(MADV_HUGEPAGE)`; advice only: where the system has them off, nothing
/// changes).
#[cfg(target_os = "linux")]
fn advise_huge_pages(values: &[f32]) {
    const HUGE_PAGE: usize = 2 << 20;
    let start = values.as_ptr() as usize;
    let end = start + std::mem::size_of_val(values);
    let aligned = start.next_multiple_of(HUGE_PAGE);
    if end > aligned + HUGE_PAGE {
        let len = (end - aligned) / HUGE_PAGE * HUGE_PAGE;
        // SAFETY: advice on whole pages inside the live allocation `values`; it changes
        // no contents.
        unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    }
}

/// Elsewhere, nothing to ask.
#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: &[f32]) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{synthetic_batch, SyntheticSpec};

    /// Both kinds of gradient buffer give `n` zeros once every chunk went through
    /// `zeroed`: the heap's (below the fresh-mapping size, after a freed buffer of NaNs
    /// that the allocator may hand back) and the fresh mapping's.
    #[test]
    fn gradient_buffers_are_zeros_below_and_above_the_fresh_mapping_size() {
        for n in [1000, (FRESH_MAPPING / 4) - 1, FRESH_MAPPING / 4 + 12345] {
            drop(vec![f32::NAN; n]);
            let mut buffer = GradientBuffer::new(n);
            assert_eq!(buffer.fresh, n * 4 >= FRESH_MAPPING);
            let fresh = buffer.fresh;
            buffer.slots().par_chunks_mut(4099).for_each(|chunk| {
                zeroed(chunk, fresh);
            });
            // SAFETY: every chunk went through `zeroed` just above.
            let zeros = unsafe { buffer.finish() };
            assert_eq!(zeros.len(), n);
            assert!(zeros.iter().all(|&z| z.to_bits() == 0), "n = {n}");
        }
    }

    /// After an evaluation, `gradients_of_last` gives the gradients of an evaluation with
    /// gradients, bit for bit, for other weights and either reduction of T, without a
    /// forward pass; for another batch, other settings, or after a failed evaluation,
    /// `None`.
    #[test]
    fn gradients_of_last_are_an_evaluations_gradients() {
        let tensors = synthetic_batch(&SyntheticSpec::demo(3));
        let batch = tensors.batch();
        for temperature in [1.0, 2.0] {
            let config = LossConfig {
                temperature,
                ..LossConfig::DEFAULT
            };
            let mut backend = CpuBackend::new();
            let forward = backend
                .evaluate(&batch, &config, Request::default())
                .unwrap();
            assert!(forward.gradients.is_none());
            for weights in [
                config.weights,
                LossWeights {
                    soft: 2.5,
                    conf: -1.0,
                    l2: 0.0,
                    loc: 3.0,
                },
            ] {
                let weighted = LossConfig { weights, ..config };
                let again = backend
                    .gradients_of_last(&batch, &weighted)
                    .unwrap()
                    .unwrap();
                let want = evaluate(&batch, &weighted, Request::with_gradients()).unwrap();
                assert_eq!(Some(again), want.gradients, "T = {temperature}");
            }
            // Other settings, or another batch (a copy: other addresses): nothing kept for them.
            let other = LossConfig {
                overlap_threshold: 0.4,
                ..config
            };
            assert!(backend.gradients_of_last(&batch, &other).is_none());
            let copy = tensors.clone();
            assert!(backend.gradients_of_last(&copy.batch(), &config).is_none());
            // A failed evaluation forgets the last one.
            let bad = LossConfig {
                temperature: -1.0,
                ..config
            };
            assert!(backend.evaluate(&batch, &bad, Request::default()).is_err());
            assert!(backend.gradients_of_last(&batch, &config).is_none());
        }
    }

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
