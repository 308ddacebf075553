//! The host path: the tensors read to the host, evaluated by ssdkd's CPU backend, the
//! terms and gradients made into tensors of the same backend again. What NdArray uses, what
//! a cubecl runtime other than wgpu uses, and what [`crate::LossPath::Host`] forces.

use crate::backend::{batch_shape, LossSpec};
use burn::backend::tensor::FloatTensor;
use burn::backend::{read_sync, Backend, TensorData, TensorMetadata};
use ssdkd::{Evaluation, OwnedBatch, Request, Tensors};
use std::sync::{Mutex, OnceLock};

/// One CPU backend for the process, so that its per-image workspaces are reused from one
/// training step to the next.
fn cpu() -> &'static Mutex<ssdkd::Backend> {
    static CPU: OnceLock<Mutex<ssdkd::Backend>> = OnceLock::new();
    CPU.get_or_init(|| Mutex::new(ssdkd::Backend::cpu()))
}

/// The tensor's values as host `f32`s (converted from another float dtype).
pub(crate) fn read_f32<B: Backend>(tensor: FloatTensor<B>) -> Vec<f32> {
    let data = read_sync(B::float_into_data(tensor))
        .unwrap_or_else(|e| panic!("ssdkd-burn: reading a tensor to the host failed: {e:?}"));
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_else(|e| panic!("ssdkd-burn: tensor data as f32: {e:?}"))
}

/// Evaluates the six tensors, read to the host, with the library's CPU backend (the
/// teacher's only read when `spec.has_teacher`).
///
/// # Panics
/// On an ssdkd error (bad input values, a config that cannot work), with its message:
/// inside a Burn operation there is no other way to fail.
fn evaluate<B: Backend>(
    inputs: Tensors<FloatTensor<B>>,
    spec: &LossSpec,
    gradients: bool,
) -> Evaluation {
    let shape = batch_shape(&inputs.student_conf.shape(), &inputs.targets.shape());
    let Tensors {
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        priors,
    } = inputs.map(Some);
    let read = |t: Option<FloatTensor<B>>| t.map(read_f32::<B>).unwrap_or_default();
    let (student_loc, student_conf) = (read(student_loc), read(student_conf));
    let (targets, priors) = (read(targets), read(priors));
    let owned = if spec.has_teacher {
        OwnedBatch::new(
            shape,
            student_loc,
            student_conf,
            read(teacher_loc),
            read(teacher_conf),
            targets,
            priors,
        )
    } else {
        OwnedBatch::without_teacher(shape, student_loc, student_conf, targets, priors)
    };
    let request = Request {
        gradients,
        ..Request::default()
    };
    owned
        .and_then(|owned| {
            cpu().lock().unwrap_or_else(|p| p.into_inner()).evaluate(
                &owned.batch(),
                &spec.config,
                request,
            )
        })
        .unwrap_or_else(|e| panic!("ssdkd-burn: {e}"))
}

/// The `[4]` terms tensor of an evaluation (soft, l2, conf, loc), on `device`.
pub(crate) fn terms_tensor<B: Backend>(
    eval: &Evaluation,
    device: &burn::backend::tensor::Device<B>,
) -> FloatTensor<B> {
    let t = &eval.terms;
    let values = [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l].map(|v| v as f32);
    B::float_from_data(TensorData::new(values.to_vec(), [4]), device)
}

/// [`crate::SsdkdBackend::ssdkd_terms`] through host memory.
pub(crate) fn terms<B: Backend>(
    inputs: Tensors<FloatTensor<B>>,
    spec: &LossSpec,
) -> FloatTensor<B> {
    let device = inputs.student_loc.device();
    let eval = evaluate::<B>(inputs, spec, false);
    terms_tensor::<B>(&eval, &device)
}

/// [`crate::SsdkdBackend::ssdkd_gradients`] through host memory: (conf, loc).
pub(crate) fn gradients<B: Backend>(
    inputs: Tensors<FloatTensor<B>>,
    spec: &LossSpec,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let device = inputs.student_loc.device();
    let conf_shape = inputs.student_conf.shape();
    let loc_shape = inputs.student_loc.shape();
    let eval = evaluate::<B>(inputs, spec, true);
    let grads = eval.gradients.expect("gradients were requested");
    (
        B::float_from_data(TensorData::new(grads.student_conf, conf_shape), &device),
        B::float_from_data(TensorData::new(grads.student_loc, loc_shape), &device),
    )
}
