//! The backend extension: the two operations ssdkd adds to a Burn backend, routed by Burn's
//! dispatch to the implementation of the tensors' backend (`cube.rs` on wgpu, `host.rs` on
//! NdArray and on other cubecl runtimes, `autodiff.rs` for the backward pass; Burn's
//! `Fusion` wrapper defers them like any other operation and runs them on resolved tensors).

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend};
use burn::tensor::DType;
use ssdkd::{BatchShape, LossConfig, LossWeights};

/// Where the loss of a wgpu tensor is evaluated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossPath {
    /// On Burn's wgpu device, on the slices of Burn's own buffers (no host copy); through
    /// ssdkd's CPU backend on every other backend.
    #[default]
    Auto,
    /// Always through host memory: the tensors are read to the host, evaluated by ssdkd's
    /// CPU backend and the gradients uploaded again (what the benchmark compares against).
    Host,
}

/// Everything an evaluation needs besides the tensors: the configuration (whose
/// `weights` are the gradient's weights), whether the teacher tensors are real, and the
/// path.
#[derive(Clone, Debug)]
pub struct LossSpec {
    /// SPEC §8's configuration; for [`SsdkdBackend::ssdkd_gradients`] its `weights` are the
    /// incoming gradients of the four terms.
    pub config: LossConfig,
    /// `false` for the plain MultiBox loss: the teacher arguments are then the student's
    /// tensors, the soft and L2 terms are 0 and get no weight
    /// ([`ssdkd::with_teacher_rule`]).
    pub has_teacher: bool,
    /// Where a wgpu tensor's loss is evaluated.
    pub path: LossPath,
}

impl LossSpec {
    /// This spec with the gradient weighted by `weights` (soft, l2, conf, loc: the order
    /// of [`TERMS`]).
    #[must_use]
    pub fn weighted(&self, weights: [f32; 4]) -> Self {
        let mut spec = self.clone();
        spec.config.weights = LossWeights {
            soft: weights[0],
            l2: weights[1],
            conf: weights[2],
            loc: weights[3],
        };
        spec
    }
}

/// The order of the four terms in the `[4]` tensor [`SsdkdBackend::ssdkd_terms`] returns,
/// the seed code base's return order.
pub const TERMS: [&str; 4] = ["soft_loss", "l2_loss", "loss_c", "loss_l"];

/// The shape of a batch from its student tensors and targets (checked before dispatch).
pub(crate) fn batch_shape(student_conf: &[usize], targets: &[usize]) -> BatchShape {
    BatchShape {
        batch: student_conf[0],
        priors: student_conf[1],
        classes: student_conf[2],
        objects: targets[1],
    }
}

fn terms_meta(
    student_loc: &TensorSpec,
    _student_conf: &TensorSpec,
    _teacher_loc: &TensorSpec,
    _teacher_conf: &TensorSpec,
    _targets: &TensorSpec,
    _priors: &TensorSpec,
    _spec: &LossSpec,
) -> TensorSpec {
    TensorSpec::new([4].into(), student_loc.dtype)
}

fn gradients_meta(
    student_loc: &TensorSpec,
    student_conf: &TensorSpec,
    _teacher_loc: &TensorSpec,
    _teacher_conf: &TensorSpec,
    _targets: &TensorSpec,
    _priors: &TensorSpec,
    _spec: &LossSpec,
) -> (TensorSpec, TensorSpec) {
    (
        TensorSpec::new(student_conf.shape.clone(), DType::F32),
        TensorSpec::new(student_loc.shape.clone(), DType::F32),
    )
}

/// A Burn backend that evaluates ssdkd's loss. Implemented for Burn's wgpu backend (the
/// resident path), for NdArray (ssdkd's CPU backend on host data), for the `Fusion`
/// wrapper (deferred like any operation, run on the resolved tensors) and for `Autodiff`
/// (the backward pass is ssdkd's analytic gradient). Tensors: `student_loc` `[B, P, 4]`,
/// `student_conf` `[B, P, C]`, the teacher's alike, `targets` `[B, M, 5]`, `priors`
/// `[P, 4]`, all f32 (SPEC §1).
#[backend_extension(Cube, NdArray, Autodiff, Fusion)]
pub trait SsdkdBackend: Backend {
    /// The four terms as one `[4]` tensor in the order of [`TERMS`].
    #[fusion(meta = terms_meta)]
    fn ssdkd_terms(
        student_loc: FloatTensor<Self>,
        student_conf: FloatTensor<Self>,
        teacher_loc: FloatTensor<Self>,
        teacher_conf: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        priors: FloatTensor<Self>,
        spec: LossSpec,
    ) -> FloatTensor<Self>;

    /// ∂total/∂student_conf `[B, P, C]` and ∂total/∂student_loc `[B, P, 4]`, the total
    /// weighted by `spec.config.weights` (SPEC §6). Not differentiable.
    #[fusion(meta = gradients_meta)]
    fn ssdkd_gradients(
        student_loc: FloatTensor<Self>,
        student_conf: FloatTensor<Self>,
        teacher_loc: FloatTensor<Self>,
        teacher_conf: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        priors: FloatTensor<Self>,
        spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}
