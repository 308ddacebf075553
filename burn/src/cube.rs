//! The resident path: Burn's wgpu tensors evaluated where they are, on the slices of
//! Burn's pooled buffers, on Burn's own device and queue. Only the sums come back to the
//! host (and the four terms go up again as a `[4]` tensor); the gradients are written by
//! ssdkd's kernels straight into tensors Burn allocated.
//!
//! Sharing rules: Burn's queued work is flushed before ssdkd submits on the same queue;
//! the tensors and their storage handles are held until `evaluate_resident` returns, which
//! is after the GPU finished ssdkd's work.

use crate::backend::{LossInputs, LossPath, LossSpec, SsdkdBackend};
use crate::host::{self, batch_shape, Outputs};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::{AutoCompiler, CubeBackend, CubeTensor, WgpuDevice, WgpuResource};
use burn::backend::{CubeDevice, DispatchDevice, FloatDType, TensorMetadata};
use burn::tensor::{DType, Device};
use burn_cubecl::cubecl::wgpu::WgpuServer;
use ssdkd::gpu::{GpuBackend, GpuBatch, GpuCacheStats, GpuGradients, GpuRequest, GpuSlice};
use ssdkd::{with_teacher_rule, BatchShape, Evaluation, Tensors};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

type Server = WgpuServer<AutoCompiler>;

/// Bound batches kept per device, most recently used last: a training loop's shapes, with
/// and without gradients. Older ones are dropped with their bind groups (and ssdkd's own
/// gradient buffers, for batches evaluated without gradients).
const BATCHES_KEPT: usize = 4;

/// A batch bound for a shape, with or without Burn's gradient tensors.
type Key = (BatchShape, bool);

/// ssdkd's backend on one of Burn's wgpu devices, and the batches bound on it (their
/// slices are rebound every call).
struct Shared {
    gpu: GpuBackend,
    batches: Vec<(Key, GpuBatch)>,
}

type Registry = Mutex<HashMap<WgpuDevice, Arc<Mutex<Shared>>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
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
    let key = wgpu_of(device.as_dispatch())?;
    lock(registry()).get(&key).cloned()
}

/// Opens Burn's default wgpu device and shares it with ssdkd: the device the resident path
/// needs (a wgpu device Burn opened on its own does not hand out its queue). Call it once,
/// before any tensor is made on the default wgpu device, and clone the device it returns;
/// `.autodiff()` it to train. ssdkd's pipelines are compiled here.
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
/// (`Device::wgpu_options().init_with_setup()` returns them; so does registering your own
/// with `Device::wgpu_options().setup(..)`). Builds ssdkd's backend on them once
/// ([`GpuBackend::from_device`], no device callbacks installed). Sharing a device twice
/// keeps the first.
///
/// # Errors
/// [`ssdkd::Error::Gpu`] when `device` is not a wgpu device or a pipeline fails to build.
pub fn share_wgpu_device(
    device: &Device,
    wgpu_device: ssdkd::gpu::wgpu::Device,
    queue: ssdkd::gpu::wgpu::Queue,
) -> ssdkd::Result<()> {
    let key = wgpu_of(device.as_dispatch()).ok_or_else(|| {
        ssdkd::Error::Gpu(format!("ssdkd-burn: {device:?} is not a Burn wgpu device"))
    })?;
    if lock(registry()).contains_key(&key) {
        return Ok(());
    }
    let gpu = GpuBackend::from_device(wgpu_device, queue)?;
    let batches = Vec::new();
    lock(registry())
        .entry(key)
        .or_insert_with(|| Arc::new(Mutex::new(Shared { gpu, batches })));
    Ok(())
}

/// Bytes ssdkd has mapped back to the host from `device` so far ([`GpuBackend::bytes_read_back`]):
/// a few hundred bytes of sums per evaluation on the resident path. `None` when the device
/// was not shared with ssdkd.
#[must_use]
pub fn bytes_read_back(device: &Device) -> Option<u64> {
    shared_of(device).map(|shared| lock(&shared).gpu.bytes_read_back())
}

/// The adapter ssdkd runs on for `device`, when it was shared with ssdkd.
#[must_use]
pub fn adapter_name(device: &Device) -> Option<String> {
    shared_of(device).map(|shared| lock(&shared).gpu.adapter_name())
}

/// What ssdkd keeps on `device`, when it was shared with ssdkd: the batches bound (at most
/// 4) and its per-shape buffers ([`GpuBackend::cache_stats`], within its byte budget).
#[must_use]
pub fn cache_stats(device: &Device) -> Option<(usize, GpuCacheStats)> {
    shared_of(device).map(|shared| {
        let shared = lock(&shared);
        (shared.batches.len(), shared.gpu.cache_stats())
    })
}

/// The ssdkd backend for a tensor on `device`, or `None` for the host path (another cubecl
/// runtime, or [`LossPath::Host`]).
///
/// # Panics
/// On a wgpu device that was not shared with ssdkd (Burn's trait cannot return the error):
/// naming how to share it.
fn shared_for(device: &CubeDevice, spec: &LossSpec) -> Option<Arc<Mutex<Shared>>> {
    let CubeDevice::Wgpu(key) = device else {
        return None;
    };
    if spec.path == LossPath::Host {
        return None;
    }
    let shared = lock(registry()).get(key).cloned();
    Some(shared.unwrap_or_else(|| {
        panic!(
            "ssdkd-burn: the wgpu device {key:?} was not shared with ssdkd; open it with \
             ssdkd_burn::wgpu_device() (or share your own with ssdkd_burn::share_wgpu_device), \
             or use LossPath::Host"
        )
    }))
}

/// A tensor prepared for binding: contiguous f32, its storage held (`_resource`: cubecl
/// neither frees nor hands out again a bound allocation) while ssdkd binds `slice`.
struct Bound {
    _tensor: CubeTensor,
    _resource: Box<dyn std::any::Any>,
    slice: GpuSlice,
}

/// Makes `tensor` bindable: contiguous f32 at an offset the device can bind (a tensor at
/// another offset is copied into a fresh allocation on the device, never through the host).
fn bind(tensor: CubeTensor, name: &'static str, alignment: u64) -> ssdkd::Result<Bound> {
    if tensor.dtype != DType::F32 {
        let problem = format!("dtype {:?}, expected f32", tensor.dtype);
        return Err(ssdkd::Error::Shape {
            tensor: name,
            problem,
        });
    }
    let tensor = burn_cubecl::kernel::into_contiguous(tensor);
    let resource = |t: &CubeTensor| {
        t.client
            .get_resource::<Server>(t.handle.clone())
            .map_err(|e| ssdkd::Error::Gpu(format!("the buffer of `{name}`: {e:?}")))
    };
    let held = resource(&tensor)?;
    let (tensor, held) = if held.resource().offset % alignment == 0 {
        (tensor, held)
    } else {
        drop(held);
        let copy = CubeBackend::float_mul_scalar(tensor, 1.0f32.into());
        let held = resource(&copy)?;
        (copy, held)
    };
    let WgpuResource {
        buffer,
        offset,
        size,
        ..
    } = held.resource();
    let slice = GpuSlice::new(buffer.clone(), *offset, *size);
    Ok(Bound {
        _tensor: tensor,
        _resource: Box::new(held),
        slice,
    })
}

/// Points the kept batch of `key` at new slices, or binds a new one (dropping the least
/// recently used past [`BATCHES_KEPT`]); keeps it last.
fn batch_for<'a>(
    gpu: &mut GpuBackend,
    batches: &'a mut Vec<(Key, GpuBatch)>,
    key: Key,
    tensors: Tensors<GpuSlice>,
    gradients: Option<GpuGradients>,
) -> ssdkd::Result<&'a GpuBatch> {
    let batch = match batches.iter().position(|(k, _)| *k == key) {
        Some(i) => {
            let (_, mut batch) = batches.remove(i);
            gpu.rebind(&mut batch, tensors, gradients)?;
            batch
        }
        None => {
            if batches.len() == BATCHES_KEPT {
                batches.remove(0);
            }
            match gradients {
                Some(gradients) => gpu.wrap_with_gradients(key.0, tensors, gradients)?,
                None => gpu.wrap(key.0, tensors)?,
            }
        }
    };
    batches.push((key, batch));
    Ok(&batches[batches.len() - 1].1)
}

/// One resident evaluation of `inputs`, gradients into the tensors of `gradients`.
fn evaluate(
    shared: &Mutex<Shared>,
    inputs: Tensors<CubeTensor>,
    spec: &LossSpec,
    gradients: Option<&[CubeTensor; 2]>,
) -> ssdkd::Result<Evaluation> {
    let client = inputs.student_loc.client.clone();
    let shape = batch_shape(&inputs.student_conf.shape(), &inputs.targets.shape());
    let mut shared = lock(shared);
    let alignment = u64::from(
        shared
            .gpu
            .device()
            .limits()
            .min_storage_buffer_offset_alignment,
    );
    // The plain loss binds the student's tensors in the teacher's places.
    let inputs = match spec.has_teacher {
        true => inputs,
        false => Tensors {
            teacher_loc: inputs.student_loc.clone(),
            teacher_conf: inputs.student_conf.clone(),
            ..inputs
        },
    };
    let bound = inputs
        .named()
        .try_map(|(name, tensor)| bind(tensor, name, alignment))?;
    let outputs = match gradients {
        Some([conf, loc]) => Some([
            bind(conf.clone(), "grad_student_conf", alignment)?,
            bind(loc.clone(), "grad_student_loc", alignment)?,
        ]),
        None => None,
    };
    // Burn's queued work (what made the inputs) runs before ssdkd's submit.
    client
        .flush()
        .map_err(|e| ssdkd::Error::Gpu(format!("flushing Burn's queue: {e:?}")))?;
    let slices = outputs.as_ref().map(|[conf, loc]| GpuGradients {
        student_conf: conf.slice.clone(),
        student_loc: loc.slice.clone(),
    });
    let tensors = bound.as_ref().map(|b| b.slice.clone());
    let Shared { gpu, batches } = &mut *shared;
    let batch = batch_for(gpu, batches, (shape, slices.is_some()), tensors, slices)?;
    let request = GpuRequest {
        gradients: gradients.is_some(),
        ..GpuRequest::default()
    };
    // ssdkd's work is done when this returns: Burn may reuse the storage after `bound`.
    with_teacher_rule(spec.has_teacher, &spec.config, |config| {
        gpu.evaluate_resident(batch, config, request)
    })
}

/// The resident evaluation's outputs, or the host path's where it does not apply.
fn outputs(
    inputs: LossInputs<CubeBackend>,
    spec: &LossSpec,
    gradients: bool,
) -> Outputs<CubeBackend> {
    let device = inputs.student_loc.device.clone();
    let Some(shared) = shared_for(&device, spec) else {
        return host::evaluate::<CubeBackend>(inputs.into(), spec, gradients);
    };
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
        inputs: LossInputs<Self>,
        spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (terms, gradients) = outputs(inputs, &spec, true);
        let [conf, loc] = gradients.expect("asked for");
        (terms, conf, loc)
    }
}
