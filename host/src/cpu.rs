//! The CPU backend: the core's per-image stages on every core (rayon), images summed in
//! image order so that the result does not depend on the thread count. The forward pass
//! takes the fast path of `fast.rs` (the exact log-sum-exp only where it can change the
//! result, bounds from the vectorised kernels of `simd.rs` elsewhere), whose sums and
//! decisions are the core reference's, bit for bit.
//!
//! [`CpuBackend`] here; its workspace pool in `pool.rs`, the passes over the images in
//! `passes.rs`, and the gradient buffers (the host's `unsafe` buffer code) in `buffer.rs`.

mod buffer;
pub(crate) mod fast;
pub(crate) mod matching;
mod passes;
mod pool;
mod rows;
mod simd;

use crate::batch::{Batch, Evaluation, Gradients, Request};
use crate::cancel::CancelToken;
use crate::error::Result;
use passes::{backward_rows, check_gradients, evaluate_with, finite_of, gradient_pass, Finite};
use pool::Pool;
use ssdkd_core::{GradScale, LossConfig};

/// The CPU backend. It owns the per-image workspaces of its last evaluations, so that a
/// training loop's repeated calls neither allocate nor zero-fill them again; dropping the
/// backend frees them. Each backend has its own: two never share state.
#[derive(Debug, Default)]
pub struct CpuBackend {
    pool: Pool,
}

impl CpuBackend {
    /// A CPU backend with no workspaces yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many workspaces this backend holds for its next evaluation.
    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.pool.len()
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
    /// evaluation returns [`crate::Error::Cancelled`].
    ///
    /// # Errors
    /// As [`CpuBackend::evaluate`], [`crate::Error::Numerical`] for a non-finite term or
    /// gradient element, and [`crate::Error::Cancelled`].
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
    /// [`crate::Error::Numerical`] for a non-finite gradient element, as
    /// [`CpuBackend::evaluate`]'s caller would find it.
    pub fn gradients_of_last(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
    ) -> Option<Result<Gradients>> {
        let shape = batch.shape();
        if shape.priors == 0 {
            return None;
        }
        let (workspaces, num_pos) = self.pool.last_of(batch, config)?;
        let scale = GradScale::new(config, num_pos);
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
        self.pool.forget();
        batch.check_cancellable(config, request.validate, cancel)?;
        let pooled = self.pool.take(batch.shape().batch);
        let (eval, workspaces, finite) = evaluate_with(batch, config, request, pooled, cancel);
        let kept_all = self.pool.give_back(workspaces);
        // A cancelled evaluation skipped images: its results and workspaces mean nothing.
        cancel.map_or(Ok(()), CancelToken::check)?;
        if kept_all {
            self.pool.remember(batch, config, eval.sums.num_pos);
        }
        Ok((eval, finite))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{synthetic_batch, SyntheticSpec};
    use ssdkd_core::LossWeights;

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
