//! The backend extension: the two operations ssdkd adds to a Burn backend, routed by Burn's
//! dispatch to the tensors' backend. Their default bodies are the host path (`host.rs`),
//! what Flex and every cubecl runtime but wgpu run; `cube.rs` overrides them on wgpu (the
//! resident path), `autodiff.rs` adds the backward pass, and Burn's `Fusion` wrapper defers
//! them like any other operation.

use crate::host;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, ExtensionType};
use ssdkd::{LossConfig, LossWeights, Tensors};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where the loss of a wgpu tensor is evaluated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossPath {
    /// On Burn's wgpu device, on the slices of Burn's own buffers (no host copy); through
    /// ssdkd's CPU backend on every other backend.
    #[default]
    Auto,
    /// Always through host memory: the tensors are read to the host, evaluated by ssdkd's
    /// CPU backend and the results uploaded again (what the benchmark compares against).
    Host,
}

/// The order of the four terms in the `[4]` tensor [`SsdkdBackend::ssdkd_terms`] returns,
/// the seed code base's return order.
pub const TERMS: [&str; 4] = ["soft_loss", "l2_loss", "loss_c", "loss_l"];

/// The six tensors of an evaluation (SPEC §1, all f32): `student_loc` `[B, P, 4]`,
/// `student_conf` `[B, P, C]`, the teacher's alike (the student's again for the plain
/// loss), `targets` `[B, M, 5]`, `priors` `[P, 4]`. The library's [`Tensors`] in the form
/// Burn's dispatch maps from one backend to another.
#[derive(Clone, Debug, ExtensionType)]
#[extension_type(fusion)]
#[allow(missing_docs)] // the fields are SPEC §1's tensors, named as in `ssdkd::Tensors`
pub struct LossInputs<B: Backend> {
    pub student_loc: FloatTensor<B>,
    pub student_conf: FloatTensor<B>,
    pub teacher_loc: FloatTensor<B>,
    pub teacher_conf: FloatTensor<B>,
    pub targets: FloatTensor<B>,
    pub priors: FloatTensor<B>,
}

impl<B: Backend> From<Tensors<FloatTensor<B>>> for LossInputs<B> {
    fn from(t: Tensors<FloatTensor<B>>) -> Self {
        let [student_loc, student_conf, teacher_loc, teacher_conf, targets, priors] = t.to_array();
        Self {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        }
    }
}

impl<B: Backend> From<LossInputs<B>> for Tensors<FloatTensor<B>> {
    fn from(i: LossInputs<B>) -> Self {
        Tensors {
            student_loc: i.student_loc,
            student_conf: i.student_conf,
            teacher_loc: i.teacher_loc,
            teacher_conf: i.teacher_conf,
            targets: i.targets,
            priors: i.priors,
        }
    }
}

/// What one loss object keeps across its evaluations: the weights its forward evaluates
/// the gradient with, and how many evaluations it ran.
#[derive(Debug, Default)]
pub(crate) struct LossState {
    /// The incoming weights of the last backward (the configuration's before any).
    predicted: Mutex<Option<[f32; 4]>>,
    evaluations: AtomicU64,
}

/// Everything an evaluation needs besides the tensors: the configuration (whose
/// `weights` are the gradient's weights), whether the teacher tensors are real, the path,
/// and where an input error found while evaluating is reported.
#[derive(Clone, Debug)]
pub struct LossSpec {
    /// SPEC §8's configuration; its `weights` weight the gradient.
    pub config: LossConfig,
    /// `false` for the plain MultiBox loss: the teacher arguments are then the student's
    /// tensors, the soft and L2 terms are 0 and get no weight
    /// ([`ssdkd::with_teacher_rule`]).
    pub has_teacher: bool,
    /// Where a wgpu tensor's loss is evaluated.
    pub path: LossPath,
    state: Arc<LossState>,
    /// The first error of an evaluation with this spec: a Burn operation cannot return
    /// one, so it returns NaN terms and leaves the error here for `forward` to return.
    error: Arc<Mutex<Option<ssdkd::Error>>>,
}

impl LossSpec {
    /// A spec of its own (no prediction shared with a loss object).
    #[must_use]
    pub fn new(config: LossConfig, has_teacher: bool, path: LossPath) -> Self {
        Self {
            config,
            has_teacher,
            path,
            state: Arc::default(),
            error: Arc::default(),
        }
    }

    /// This spec with a fresh error slot (one per `forward`).
    pub(crate) fn for_call(&self) -> Self {
        Self {
            error: Arc::default(),
            ..self.clone()
        }
    }

    /// This spec with the gradient weighted by `weights` (soft, l2, conf, loc: the order
    /// of [`TERMS`]).
    #[must_use]
    pub fn weighted(&self, weights: [f32; 4]) -> Self {
        let [soft, l2, conf, loc] = weights;
        let mut spec = self.clone();
        spec.config.weights = LossWeights {
            soft,
            l2,
            conf,
            loc,
        };
        spec
    }

    /// The weights a backward is expected to bring: the last ones seen, else the
    /// configuration's.
    pub(crate) fn predicted(&self) -> [f32; 4] {
        let w = self.config.weights;
        let last = *self
            .state
            .predicted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.effective(last.unwrap_or([w.soft, w.l2, w.conf, w.loc]))
    }

    /// The weights that reach the gradient: without a teacher the soft and L2 terms are 0
    /// and their weights are not used ([`ssdkd::with_teacher_rule`]).
    pub(crate) fn effective(&self, [soft, l2, conf, loc]: [f32; 4]) -> [f32; 4] {
        match self.has_teacher {
            true => [soft, l2, conf, loc],
            false => [0.0, 0.0, conf, loc],
        }
    }

    /// Remembers the weights a backward brought, for the next forward.
    pub(crate) fn predict(&self, weights: [f32; 4]) {
        *self
            .state
            .predicted
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(weights);
    }

    /// Evaluations run with this spec's loss object so far.
    pub(crate) fn evaluations(&self) -> u64 {
        self.state.evaluations.load(Ordering::Relaxed)
    }

    /// Counts an evaluation, and keeps its error (the call's first) for `forward`.
    pub(crate) fn finish<T>(&self, result: ssdkd::Result<T>) -> Option<T> {
        self.state.evaluations.fetch_add(1, Ordering::Relaxed);
        result
            .map_err(|e| {
                let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
            })
            .ok()
    }

    /// The error an evaluation with this spec reported, if any.
    pub(crate) fn take_error(&self) -> Option<ssdkd::Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

fn terms_meta(inputs: &LossInputsMetadata, _spec: &LossSpec) -> TensorSpec {
    TensorSpec::new([4].into(), inputs.student_loc.dtype)
}

fn evaluation_meta(
    inputs: &LossInputsMetadata,
    spec: &LossSpec,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    let like = |t: &TensorSpec| TensorSpec::new(t.shape.clone(), t.dtype);
    (
        terms_meta(inputs, spec),
        like(&inputs.student_conf),
        like(&inputs.student_loc),
    )
}

/// A Burn backend that evaluates ssdkd's loss: on Burn's wgpu backend on its own buffers
/// (the resident path), on Flex and the other cubecl runtimes through ssdkd's CPU backend
/// (the default bodies), deferred by `Fusion`, differentiated by `Autodiff` (the backward
/// pass is ssdkd's analytic gradient). Neither operation panics on bad input values: they
/// return NaN and report the error to `spec` (see [`crate::MultiBoxLossKd::forward`]).
#[backend_extension(Cube, Flex, Autodiff, Fusion)]
pub trait SsdkdBackend: Backend {
    /// The four terms as one `[4]` tensor in the order of [`TERMS`].
    #[fusion(meta = terms_meta)]
    fn ssdkd_terms(
        #[extension_type] inputs: LossInputs<Self>,
        spec: LossSpec,
    ) -> FloatTensor<Self> {
        host::evaluate::<Self>(inputs.into(), &spec, false).0
    }

    /// The terms, then ∂total/∂student_conf `[B, P, C]` and ∂total/∂student_loc
    /// `[B, P, 4]` of the total weighted by `spec.config.weights` (SPEC §6), from one
    /// evaluation. Not differentiable.
    #[fusion(meta = evaluation_meta)]
    fn ssdkd_evaluate(
        #[extension_type] inputs: LossInputs<Self>,
        spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (terms, gradients) = host::evaluate::<Self>(inputs.into(), &spec, true);
        let [conf, loc] = gradients.expect("asked for");
        (terms, conf, loc)
    }
}
