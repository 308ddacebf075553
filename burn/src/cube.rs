//! The resident path: ssdkd's kernels on the slices of Burn's wgpu buffers, on Burn's queue;
//! the tensors and their storage are held until `evaluate_resident` returns (GPU done).

use crate::backend::{lock, LossInputs, LossPath, LossSpec, SsdkdBackend};
use crate::host::{self, batch_shape, Outputs};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::{AutoCompiler, CubeBackend, CubeTensor, WgpuDevice, WgpuResource};
use burn::backend::{CubeDevice, DispatchDevice, FloatDType, TensorMetadata};
use burn::tensor::Device;
use burn_cubecl::cubecl::wgpu::WgpuServer;
use ssdkd::gpu::{GpuBackend, GpuBatch, GpuCacheStats, GpuGradients, GpuRequest, GpuSlice};
use ssdkd::{with_teacher_rule, BatchShape, Evaluation, Tensors};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Bound batches kept per device, least recently used dropped first with their bind
/// groups (those evaluated without gradients have no gradient buffer: `wrap_terms`).
const BATCHES_KEPT: usize = 4;

/// ssdkd's backend on a Burn wgpu device, and the batches bound there by shape and whether
/// their gradients go to Burn's tensors (rebound to new slices every call).
struct Shared {
    gpu: GpuBackend,
    batches: Vec<((BatchShape, bool), GpuBatch)>,
}

fn registry() -> &'static Mutex<HashMap<WgpuDevice, Arc<Mutex<Shared>>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<WgpuDevice, Arc<Mutex<Shared>>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// The wgpu device a Burn device names (through autodiff), if any.
fn wgpu_of(device: &DispatchDevice) -> Option<WgpuDevice> {
    match device {
        DispatchDevice::Cube(CubeDevice::Wgpu(device)) => Some(device.clone()),
        DispatchDevice::Autodiff(device) => wgpu_of(&device.clone().inner()),
        _ => None,
    }
}

fn shared_of(device: &Device) -> Option<Arc<Mutex<Shared>>> {
    lock(registry()).get(&wgpu_of(device.as_dispatch())?).cloned()
}

/// Opens Burn's default wgpu device and shares it with ssdkd ([`share_wgpu_device`]): call
/// it before any tensor is made on that device, and `.autodiff()` what it returns to train.
///
/// # Errors
/// [`ssdkd::Error::NoAdapter`] when Burn finds no adapter or the default device was already
/// initialised; [`ssdkd::Error::Gpu`] when a pipeline fails to build.
pub fn wgpu_device() -> ssdkd::Result<Device> {
    let (device, setup) = Device::wgpu_options()
        .init_with_setup()
        .map_err(|e| ssdkd::Error::NoAdapter(format!("Burn's wgpu runtime: {e}")))?;
    share_wgpu_device(&device, setup.device, setup.queue)?;
    Ok(device)
}

/// Shares a Burn wgpu device with ssdkd, given the wgpu device and queue it was made from
/// (`Device::wgpu_options().init_with_setup()` returns them): Burn does not hand out the
/// queue of a device it opened on its own. Sharing a device twice keeps the first.
///
/// # Errors
/// [`ssdkd::Error::Gpu`] when `device` is not a wgpu device or a pipeline fails to build.
pub fn share_wgpu_device(
    device: &Device, wgpu_device: ssdkd::gpu::wgpu::Device, queue: ssdkd::gpu::wgpu::Queue,
) -> ssdkd::Result<()> {
    let not_wgpu = || ssdkd::Error::Gpu(format!("ssdkd-burn: {device:?} is not a wgpu device"));
    let key = wgpu_of(device.as_dispatch()).ok_or_else(not_wgpu)?;
    if !lock(registry()).contains_key(&key) {
        let shared =
            Shared { gpu: GpuBackend::from_device(wgpu_device, queue)?, batches: Vec::new() };
        lock(registry()).entry(key).or_insert_with(|| Arc::new(Mutex::new(shared)));
    }
    Ok(())
}

/// Bytes ssdkd has mapped back to the host from `device` (the sums: a few dozen bytes per
/// evaluation), if it was shared with ssdkd.
#[must_use]
pub fn bytes_read_back(device: &Device) -> Option<u64> {
    shared_of(device).map(|shared| lock(&shared).gpu.bytes_read_back())
}

/// The adapter ssdkd runs on for `device`, if it was shared with ssdkd.
#[must_use]
pub fn adapter_name(device: &Device) -> Option<String> {
    shared_of(device).map(|shared| lock(&shared).gpu.adapter_name())
}

/// The batches bound on `device` (at most 4) and ssdkd's per-shape buffers there (within
/// their byte budget), if it was shared with ssdkd.
#[must_use]
pub fn cache_stats(device: &Device) -> Option<(usize, GpuCacheStats)> {
    let stats = |shared: &Shared| (shared.batches.len(), shared.gpu.cache_stats());
    shared_of(device).map(|shared| stats(&lock(&shared)))
}

/// A tensor bound for ssdkd: contiguous, its storage held while ssdkd binds `slice`.
type Bound = (CubeTensor, Box<dyn Any>, GpuSlice);

/// Makes `tensor` bindable: contiguous, at a bindable offset (else copied on the device).
fn bind(tensor: CubeTensor, name: &str, alignment: u64) -> ssdkd::Result<Bound> {
    let resource = |t: &CubeTensor| {
        let held = t.client.get_resource::<WgpuServer<AutoCompiler>>(t.handle.clone());
        held.map_err(|e| ssdkd::Error::Gpu(format!("the buffer of `{name}`: {e:?}")))
    };
    let mut tensor = burn_cubecl::kernel::into_contiguous(tensor);
    let mut held = resource(&tensor)?;
    if held.resource().offset % alignment != 0 {
        drop(held);
        tensor = CubeBackend::float_mul_scalar(tensor, 1.0f32.into());
        held = resource(&tensor)?;
    }
    let WgpuResource { buffer, offset, size, .. } = held.resource();
    let slice = GpuSlice::new(buffer.clone(), *offset, *size);
    Ok((tensor, Box::new(held), slice))
}

/// One resident evaluation of `inputs`, gradients into `gradients`.
fn evaluate(
    shared: &Mutex<Shared>, inputs: Tensors<CubeTensor>, spec: &LossSpec,
    gradients: Option<&[CubeTensor; 2]>,
) -> ssdkd::Result<Evaluation> {
    let client = inputs.student_loc.client.clone();
    let shape = batch_shape(&inputs.student_conf.shape(), &inputs.targets.shape());
    let mut shared = lock(shared);
    let Shared { gpu, batches } = &mut *shared;
    let alignment = u64::from(gpu.device().limits().min_storage_buffer_offset_alignment);
    let bound = inputs.named().try_map(|(name, tensor)| bind(tensor, name, alignment))?;
    let grad = |t: &CubeTensor, name| bind(t.clone(), name, alignment);
    let outputs = match gradients {
        Some([c, l]) => Some([grad(c, "grad_student_conf")?, grad(l, "grad_student_loc")?]),
        None => None,
    };
    // Burn's queued work (what made the inputs) runs before ssdkd's submit.
    client.flush().map_err(|e| ssdkd::Error::Gpu(format!("flushing Burn's queue: {e:?}")))?;
    let slices = bound.as_ref().map(|b| b.2.clone());
    let out = outputs
        .as_ref()
        .map(|[c, l]| GpuGradients { student_conf: c.2.clone(), student_loc: l.2.clone() });
    let key = (shape, out.is_some());
    let batch = match (batches.iter().position(|(k, _)| *k == key), out) {
        (Some(i), out) => {
            let (_, mut batch) = batches.remove(i);
            gpu.rebind(&mut batch, slices, out)?;
            batch
        }
        (None, Some(out)) => gpu.wrap_with_gradients(shape, slices, out)?,
        (None, None) => gpu.wrap_terms(shape, slices)?,
    };
    if batches.len() == BATCHES_KEPT {
        batches.remove(0);
    }
    batches.push((key, batch));
    let request = GpuRequest { gradients: gradients.is_some(), ..GpuRequest::default() };
    let batch = &batches[batches.len() - 1].1;
    with_teacher_rule(spec.has_teacher, &spec.config, |config| {
        gpu.evaluate_resident(batch, config, request)
    })
}

/// The resident path's outputs on a wgpu device shared with ssdkd, the host path's elsewhere.
///
/// # Panics
/// On a wgpu device that was not shared with ssdkd (an operation cannot return the error).
fn outputs(
    inputs: LossInputs<CubeBackend>, spec: &LossSpec, gradients: bool,
) -> Outputs<CubeBackend> {
    let device = inputs.student_loc.device.clone();
    let shared = match &device {
        CubeDevice::Wgpu(key) if spec.path == LossPath::Auto => lock(registry()).get(key).cloned(),
        _ => return host::evaluate::<CubeBackend>(inputs.into(), spec, gradients),
    };
    let fix = "open it with ssdkd_burn::wgpu_device() or share_wgpu_device, or use LossPath::Host";
    let shared =
        shared.unwrap_or_else(|| panic!("ssdkd-burn: {device:?} is not shared with ssdkd; {fix}"));
    let shapes = gradients.then(|| [inputs.student_conf.shape(), inputs.student_loc.shape()]);
    let empty = |shape| CubeBackend::float_empty(shape, &device, FloatDType::F32);
    let grads = shapes.clone().map(|s| s.map(empty));
    let result = evaluate(&shared, inputs.into(), spec, grads.as_ref());
    host::finish::<CubeBackend>(result.map(|eval| (eval, grads)), spec, &device, shapes)
}

impl SsdkdBackend for CubeBackend {
    fn ssdkd_terms(inputs: LossInputs<Self>, spec: LossSpec) -> FloatTensor<Self> {
        outputs(inputs, &spec, false).0
    }

    fn ssdkd_evaluate(
        inputs: LossInputs<Self>, spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (terms, gradients) = outputs(inputs, &spec, true);
        let [conf, loc] = gradients.expect("asked for");
        (terms, conf, loc)
    }
}
