//! The host path: the tensors read to the host, evaluated by ssdkd's CPU backend, the
//! terms and gradients made into tensors of the same backend again. What NdArray uses, what
//! a cubecl runtime other than wgpu uses, and what [`crate::LossPath::Host`] forces.

use crate::backend::{batch_shape, LossSpec};
use burn::backend::tensor::FloatTensor;
use burn::backend::{read_sync, Backend, TensorData, TensorMetadata};
use ssdkd::cpu::CpuBackend;
use ssdkd::{Batch, Evaluation, Request};
use std::sync::{Mutex, OnceLock};

/// One CPU backend for the process, so that its per-image workspaces are reused from one
/// training step to the next.
fn cpu() -> &'static Mutex<ssdkd::Backend> {
    static CPU: OnceLock<Mutex<ssdkd::Backend>> = OnceLock::new();
    CPU.get_or_init(|| Mutex::new(ssdkd::Backend::Cpu(CpuBackend::new())))
}

/// The tensor's values as host `f32`s (converted from another float dtype).
pub(crate) fn read_f32<B: Backend>(tensor: FloatTensor<B>) -> Vec<f32> {
    let data = read_sync(B::float_into_data(tensor))
        .unwrap_or_else(|e| panic!("ssdkd-burn: reading a tensor to the host failed: {e:?}"));
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_else(|e| panic!("ssdkd-burn: tensor data as f32: {e:?}"))
}

/// The six tensors on the host.
pub(crate) struct HostTensors {
    pub shape: ssdkd::BatchShape,
    pub student_loc: Vec<f32>,
    pub student_conf: Vec<f32>,
    pub teacher_loc: Vec<f32>,
    pub teacher_conf: Vec<f32>,
    pub targets: Vec<f32>,
    pub priors: Vec<f32>,
}

impl HostTensors {
    /// Reads the six tensors (the teacher's only when `spec.has_teacher`).
    pub(crate) fn read<B: Backend>(inputs: [FloatTensor<B>; 6], spec: &LossSpec) -> Self {
        let [student_loc, student_conf, teacher_loc, teacher_conf, targets, priors] = inputs;
        let shape = batch_shape(&student_conf.shape(), &targets.shape());
        let (teacher_loc, teacher_conf) = if spec.has_teacher {
            (read_f32::<B>(teacher_loc), read_f32::<B>(teacher_conf))
        } else {
            (Vec::new(), Vec::new())
        };
        Self {
            shape,
            student_loc: read_f32::<B>(student_loc),
            student_conf: read_f32::<B>(student_conf),
            teacher_loc,
            teacher_conf,
            targets: read_f32::<B>(targets),
            priors: read_f32::<B>(priors),
        }
    }

    /// Evaluates them with ssdkd's CPU backend.
    ///
    /// # Panics
    /// On an ssdkd error (bad input values, a config that cannot work), with its message:
    /// inside a Burn operation there is no other way to fail.
    pub(crate) fn evaluate(&self, spec: &LossSpec, gradients: bool) -> Evaluation {
        let batch = if spec.has_teacher {
            Batch::new(
                self.shape,
                &self.student_loc,
                &self.student_conf,
                &self.teacher_loc,
                &self.teacher_conf,
                &self.targets,
                &self.priors,
            )
        } else {
            Batch::without_teacher(
                self.shape,
                &self.student_loc,
                &self.student_conf,
                &self.targets,
                &self.priors,
            )
        };
        let request = Request {
            gradients,
            ..Request::default()
        };
        let config = spec.effective_config();
        batch
            .and_then(|batch| {
                cpu()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .evaluate(&batch, &config, request)
            })
            .unwrap_or_else(|e| panic!("ssdkd-burn: {e}"))
    }
}

/// The `[4]` terms tensor of an evaluation (soft, l2, conf, loc), on `device`.
pub(crate) fn terms_tensor<B: Backend>(
    eval: &Evaluation,
    spec: &LossSpec,
    device: &burn::backend::tensor::Device<B>,
) -> FloatTensor<B> {
    let t = &eval.terms;
    let values = if spec.has_teacher {
        [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l]
    } else {
        [0.0, 0.0, t.loss_c, t.loss_l]
    };
    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    B::float_from_data(TensorData::new(values, [4]), device)
}

/// [`crate::SsdkdBackend::ssdkd_terms`] through host memory.
pub(crate) fn terms<B: Backend>(inputs: [FloatTensor<B>; 6], spec: &LossSpec) -> FloatTensor<B> {
    let device = inputs[0].device();
    let host = HostTensors::read::<B>(inputs, spec);
    let eval = host.evaluate(spec, false);
    terms_tensor::<B>(&eval, spec, &device)
}

/// [`crate::SsdkdBackend::ssdkd_gradients`] through host memory: (conf, loc).
pub(crate) fn gradients<B: Backend>(
    inputs: [FloatTensor<B>; 6],
    spec: &LossSpec,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let device = inputs[0].device();
    let conf_shape = inputs[1].shape();
    let loc_shape = inputs[0].shape();
    let host = HostTensors::read::<B>(inputs, spec);
    let eval = host.evaluate(spec, true);
    let grads = eval.gradients.expect("gradients were requested");
    (
        B::float_from_data(TensorData::new(grads.student_conf, conf_shape), &device),
        B::float_from_data(TensorData::new(grads.student_loc, loc_shape), &device),
    )
}
