//! The host path: the tensors read to the host, evaluated by the library's CPU backend
//! ([`ssdkd::Backend::cpu`]), the terms and gradients made into tensors of the same
//! backend again. What Flex uses, what a cubecl runtime other than wgpu uses, and what
//! [`crate::LossPath::Host`] forces.

use crate::backend::LossSpec;
use burn::backend::tensor::{Device, FloatTensor};
use burn::backend::{read_sync, Backend, FloatDType, TensorData, TensorMetadata};
use burn::tensor::Shape;
use ssdkd::{with_teacher_rule, BatchShape, Evaluation, OwnedBatch, Request, Tensors};
use std::sync::{Mutex, OnceLock};

/// One CPU backend for the process, so that its per-image workspaces are reused from one
/// training step to the next.
fn cpu() -> &'static Mutex<ssdkd::Backend> {
    static CPU: OnceLock<Mutex<ssdkd::Backend>> = OnceLock::new();
    CPU.get_or_init(|| Mutex::new(ssdkd::Backend::cpu()))
}

/// The shape of a batch from its student tensors and targets (checked before dispatch).
pub(crate) fn batch_shape(student_conf: &[usize], targets: &[usize]) -> BatchShape {
    BatchShape {
        batch: student_conf[0],
        priors: student_conf[1],
        classes: student_conf[2],
        objects: targets[1],
    }
}

/// The tensor's values as host `f32`s.
pub(crate) fn read_f32<B: Backend>(tensor: FloatTensor<B>) -> ssdkd::Result<Vec<f32>> {
    let fail = |e: String| ssdkd::Error::Gpu(format!("reading a Burn tensor to the host: {e}"));
    read_sync(B::float_into_data(tensor))
        .map_err(|e| fail(format!("{e:?}")))?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| fail(format!("{e:?}")))
}

/// Evaluates the six tensors, read to the host, with the library's CPU backend (the
/// teacher's only read when `spec.has_teacher`).
fn evaluate_on_host<B: Backend>(
    inputs: Tensors<FloatTensor<B>>,
    spec: &LossSpec,
    gradients: bool,
) -> ssdkd::Result<Evaluation> {
    let shape = batch_shape(&inputs.student_conf.shape(), &inputs.targets.shape());
    let teacher = spec.has_teacher;
    let mut read = inputs.map(Some);
    if !teacher {
        (read.teacher_loc, read.teacher_conf) = (None, None);
    }
    let [sl, sc, tl, tc, tg, pr] = read.to_array().map(|t| match t {
        Some(t) => read_f32::<B>(t),
        None => Ok(Vec::new()),
    });
    let owned = if teacher {
        OwnedBatch::new(shape, sl?, sc?, tl?, tc?, tg?, pr?)?
    } else {
        OwnedBatch::without_teacher(shape, sl?, sc?, tg?, pr?)?
    };
    let request = Request {
        gradients,
        ..Request::default()
    };
    let mut cpu = cpu().lock().unwrap_or_else(|p| p.into_inner());
    with_teacher_rule(teacher, &spec.config, |config| {
        cpu.evaluate(&owned.batch(), config, request)
    })
}

/// What an evaluation gives Burn: the `[4]` terms (soft, l2, conf, loc) and, when asked
/// for, the gradients (student_conf's, student_loc's).
pub(crate) type Outputs<B> = (FloatTensor<B>, Option<[FloatTensor<B>; 2]>);

/// Burn's outputs of an evaluation with gradient tensors of `shapes`. An error is reported
/// to `spec` and gives NaN terms and zero gradients: no Burn operation panics on bad input.
pub(crate) fn finish<B: Backend>(
    result: ssdkd::Result<(Evaluation, Option<[FloatTensor<B>; 2]>)>,
    spec: &LossSpec,
    device: &Device<B>,
    shapes: Option<[Shape; 2]>,
) -> Outputs<B> {
    let (values, gradients) = match spec.finish(result) {
        Some((eval, gradients)) => {
            let t = &eval.terms;
            (
                [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l].map(|v| v as f32),
                gradients,
            )
        }
        None => {
            let zeros = |shape| B::float_zeros(shape, device, FloatDType::F32);
            ([f32::NAN; 4], shapes.map(|s| s.map(zeros)))
        }
    };
    let terms = B::float_from_data(TensorData::new(values.to_vec(), [4]), device);
    (terms, gradients)
}

/// The host path's evaluation (gradients when `gradients`).
pub(crate) fn evaluate<B: Backend>(
    inputs: Tensors<FloatTensor<B>>,
    spec: &LossSpec,
    gradients: bool,
) -> Outputs<B> {
    let device = inputs.student_loc.device();
    let shapes = gradients.then(|| [inputs.student_conf.shape(), inputs.student_loc.shape()]);
    let result = evaluate_on_host::<B>(inputs, spec, gradients).map(|mut eval| {
        let tensors = eval
            .gradients
            .take()
            .zip(shapes.clone())
            .map(|(g, [conf, loc])| {
                [(g.student_conf, conf), (g.student_loc, loc)].map(|(values, shape)| {
                    B::float_from_data(TensorData::new(values, shape), &device)
                })
            });
        (eval, tensors)
    });
    finish::<B>(result, spec, &device, shapes)
}
