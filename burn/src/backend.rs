//! The backend extension: two operations whose default bodies are the host path; `cube.rs`
//! overrides them on wgpu, `autodiff.rs` adds the backward, Burn's `Fusion` defers them.

use crate::host;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, ExtensionType};
use ssdkd::{LossConfig, LossWeights, Tensors};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Where the loss of a wgpu tensor is evaluated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossPath {
    /// On Burn's own buffers on wgpu; through ssdkd's CPU backend elsewhere.
    #[default]
    Auto,
    /// Through host memory and ssdkd's CPU backend (what the benchmark compares against).
    Host,
}

/// The library's [`Tensors`] (SPEC §1, all f32) as Burn's dispatch carries them.
#[derive(Clone, Debug, ExtensionType)]
#[extension_type(fusion)]
#[allow(missing_docs)] // as in `ssdkd::Tensors`
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
        Self { student_loc, student_conf, teacher_loc, teacher_conf, targets, priors }
    }
}

impl<B: Backend> From<LossInputs<B>> for Tensors<FloatTensor<B>> {
    fn from(i: LossInputs<B>) -> Self {
        Tensors::from_array([
            i.student_loc,
            i.student_conf,
            i.teacher_loc,
            i.teacher_conf,
            i.targets,
            i.priors,
        ])
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What an evaluation needs besides the tensors: the configuration (its `weights` weight
/// the gradient), whether the teacher tensors are real (else they are the student's and
/// [`ssdkd::with_teacher_rule`] applies) and the path. Shared by one loss object's calls:
/// the weights its next backward is expected to bring, and its evaluation count.
#[derive(Clone, Debug)]
#[allow(missing_docs)] // described above
pub struct LossSpec {
    pub config: LossConfig,
    pub has_teacher: bool,
    pub path: LossPath,
    pub(crate) predicted: Arc<Mutex<Option<[f32; 4]>>>,
    pub(crate) evaluations: Arc<AtomicU64>,
    /// The call's first error: an operation cannot return one, so it returns NaN terms and
    /// leaves the error here for `forward`.
    pub(crate) error: Arc<Mutex<Option<ssdkd::Error>>>,
}

impl LossSpec {
    pub(crate) fn new(config: LossConfig, has_teacher: bool, path: LossPath) -> Self {
        let (predicted, evaluations, error) = Default::default();
        Self { config, has_teacher, path, predicted, evaluations, error }
    }

    /// This spec with the gradient weighted by `[soft, l2, conf, loc]`.
    #[must_use]
    pub fn weighted(&self, [soft, l2, conf, loc]: [f32; 4]) -> Self {
        let config = LossConfig { weights: LossWeights { soft, l2, conf, loc }, ..self.config };
        Self { config, ..self.clone() }
    }

    /// The weights the next backward is expected to bring: the last one's, else the
    /// configuration's.
    pub(crate) fn predicted(&self) -> [f32; 4] {
        let w = self.config.weights;
        self.effective(lock(&self.predicted).unwrap_or([w.soft, w.l2, w.conf, w.loc]))
    }

    /// The weights that reach the gradient: without a teacher, not the soft and L2 ones.
    pub(crate) fn effective(&self, [soft, l2, conf, loc]: [f32; 4]) -> [f32; 4] {
        let [soft, l2] = [soft, l2].map(|w| if self.has_teacher { w } else { 0.0 });
        [soft, l2, conf, loc]
    }

    /// Counts an evaluation and keeps its error, if any, for `forward`.
    pub(crate) fn finish<T>(&self, result: ssdkd::Result<T>) -> Option<T> {
        self.evaluations.fetch_add(1, Ordering::Relaxed);
        let keep = |e| {
            lock(&self.error).get_or_insert(e);
        };
        result.map_err(keep).ok()
    }
}

fn terms_spec(inputs: &LossInputsMetadata) -> TensorSpec {
    TensorSpec::new([4].into(), inputs.student_loc.dtype)
}

/// A Burn backend that evaluates ssdkd's loss: on wgpu on Burn's own buffers, elsewhere
/// through ssdkd's CPU backend (the default bodies); deferred by `Fusion`, differentiated by
/// `Autodiff`. Bad input values never panic: the terms are NaN and `spec` holds the error.
#[backend_extension(Cube, Flex, Autodiff, Fusion)]
pub trait SsdkdBackend: Backend {
    /// The four terms as one `[4]` tensor in the order of [`ssdkd::agreement::TERM_NAMES`].
    #[fusion(meta = |i, _| terms_spec(i))]
    fn ssdkd_terms(
        #[extension_type] inputs: LossInputs<Self>, spec: LossSpec,
    ) -> FloatTensor<Self> {
        host::evaluate::<Self>(inputs.into(), &spec, false).0
    }

    /// The terms, ∂total/∂student_conf and ∂total/∂student_loc, the total weighted by
    /// `spec.config.weights` (SPEC §6), from one evaluation. Not differentiable.
    #[fusion(meta = |i, _| (terms_spec(i), i.student_conf.clone(), i.student_loc.clone()))]
    fn ssdkd_evaluate(
        #[extension_type] inputs: LossInputs<Self>, spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (terms, gradients) = host::evaluate::<Self>(inputs.into(), &spec, true);
        let [conf, loc] = gradients.expect("asked for");
        (terms, conf, loc)
    }
}
