//! The host path (Flex, cubecl runtimes but wgpu, `LossPath::Host`): ssdkd's CPU backend on
//! host copies of the tensors.

use crate::backend::{lock, LossSpec};
use burn::backend::tensor::{Device, FloatTensor};
use burn::backend::{read_sync, Backend, FloatDType, TensorData, TensorMetadata};
use burn::tensor::Shape;
use ssdkd::{with_teacher_rule, BatchShape, Evaluation, OwnedBatch, Request, Tensors};
use std::sync::{Mutex, OnceLock};

/// The terms `[4]` and, when asked for, the gradients (student_conf's, student_loc's).
pub(crate) type Outputs<B> = (FloatTensor<B>, Option<[FloatTensor<B>; 2]>);

/// The shape of a batch from its student_conf and targets shapes (checked by `forward`).
pub(crate) fn batch_shape(conf: &[usize], targets: &[usize]) -> BatchShape {
    BatchShape { batch: conf[0], priors: conf[1], classes: conf[2], objects: targets[1] }
}

pub(crate) fn read_f32<B: Backend>(tensor: FloatTensor<B>) -> ssdkd::Result<Vec<f32>> {
    let data = read_sync(B::float_into_data(tensor)).map_err(|e| format!("{e:?}"));
    let values = data.and_then(|d| d.try_into_vec_as::<f32>().map_err(|e| format!("{e:?}")));
    values.map_err(|e| ssdkd::Error::Gpu(format!("reading a Burn tensor to the host: {e}")))
}

/// Evaluates the tensors with the library's CPU backend (one for the process, so that its
/// workspaces are reused from step to step); the teacher's are read only when real.
fn evaluate_on_host<B: Backend>(
    inputs: Tensors<FloatTensor<B>>, spec: &LossSpec, gradients: bool,
) -> ssdkd::Result<Evaluation> {
    static CPU: OnceLock<Mutex<ssdkd::Backend>> = OnceLock::new();
    let shape = batch_shape(&inputs.student_conf.shape(), &inputs.targets.shape());
    let teacher = spec.has_teacher;
    let mut read = inputs.map(Some);
    if !teacher {
        (read.teacher_loc, read.teacher_conf) = (None, None);
    }
    let read = read.try_map(|t| t.map_or(Ok(Vec::new()), read_f32::<B>))?;
    let [sl, sc, tl, tc, tg, pr] = read.to_array();
    let owned = match teacher {
        true => OwnedBatch::new(shape, sl, sc, tl, tc, tg, pr)?,
        false => OwnedBatch::without_teacher(shape, sl, sc, tg, pr)?,
    };
    let mut cpu = lock(CPU.get_or_init(|| Mutex::new(ssdkd::Backend::cpu())));
    let request = Request { gradients, ..Request::default() };
    with_teacher_rule(teacher, &spec.config, |config| cpu.evaluate(&owned.batch(), config, request))
}

/// Burn's outputs of an evaluation with gradient tensors of `shapes`. An error is reported
/// to `spec` and gives NaN terms and zero gradients: no Burn operation panics on bad input.
pub(crate) fn finish<B: Backend>(
    result: ssdkd::Result<(Evaluation, Option<[FloatTensor<B>; 2]>)>, spec: &LossSpec,
    device: &Device<B>, shapes: Option<[Shape; 2]>,
) -> Outputs<B> {
    let zeros = |shape| B::float_zeros(shape, device, FloatDType::F32);
    let (values, gradients) = match spec.finish(result) {
        Some((eval, gradients)) => {
            (std::array::from_fn(|i| eval.named_terms()[i].1 as f32), gradients)
        }
        None => ([f32::NAN; 4], shapes.map(|s| s.map(zeros))),
    };
    (B::float_from_data(TensorData::new(values.to_vec(), [4]), device), gradients)
}

/// The host path's evaluation (gradients when `gradients`).
pub(crate) fn evaluate<B: Backend>(
    inputs: Tensors<FloatTensor<B>>, spec: &LossSpec, gradients: bool,
) -> Outputs<B> {
    let device = inputs.student_loc.device();
    let shapes = gradients.then(|| [inputs.student_conf.shape(), inputs.student_loc.shape()]);
    let result = evaluate_on_host::<B>(inputs, spec, gradients).map(|mut eval| {
        let tensors = eval.gradients.take().zip(shapes.clone()).map(|(g, [conf, loc])| {
            [(g.student_conf, conf), (g.student_loc, loc)]
                .map(|(values, shape)| B::float_from_data(TensorData::new(values, shape), &device))
        });
        (eval, tensors)
    });
    finish::<B>(result, spec, &device, shapes)
}
