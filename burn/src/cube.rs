//! The resident path: Burn's wgpu tensors evaluated where they are, on the slices of
//! Burn's pooled buffers, on Burn's own device and queue. Only the sums come back to the
//! host (and the four terms go up again as a `[4]` tensor); the gradients are written by
//! ssdkd's kernels straight into tensors Burn allocated.
//!
//! Sharing rules: Burn's queued work is flushed before ssdkd submits on the same queue;
//! the tensors and their storage handles are held until `evaluate_resident` returns, which
//! is after the GPU finished ssdkd's work.

use crate::backend::{batch_shape, LossPath, LossSpec, SsdkdBackend};
use crate::host;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::{AutoCompiler, CubeBackend, CubeTensor, WgpuDevice, WgpuResource};
use burn::backend::{CubeDevice, DispatchDevice, FloatDType, TensorMetadata};
use burn::tensor::{DType, Device};
use burn_cubecl::cubecl::wgpu::WgpuServer;
use ssdkd::gpu::{GpuBackend, GpuBatch, GpuGradients, GpuRequest, GpuSlice, GpuTensors};
use ssdkd::{with_teacher_rule, BatchShape, Tensors};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

type Server = WgpuServer<AutoCompiler>;

/// ssdkd's backend on one of Burn's wgpu devices, and the batches bound on it (one per
/// shape for losses, one per shape for gradients; their slices are rebound every call).
struct Shared {
    gpu: GpuBackend,
    losses: HashMap<BatchShape, GpuBatch>,
    gradients: HashMap<BatchShape, GpuBatch>,
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

/// Errors of registering a device with ssdkd.
fn not_wgpu(device: &Device) -> ssdkd::Error {
    ssdkd::Error::Gpu(format!("ssdkd-burn: {device:?} is not a Burn wgpu device"))
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
    let key = wgpu_of(device.as_dispatch()).ok_or_else(|| not_wgpu(device))?;
    if lock(registry()).contains_key(&key) {
        return Ok(());
    }
    let gpu = GpuBackend::from_device(wgpu_device, queue)?;
    lock(registry()).entry(key).or_insert_with(|| {
        Arc::new(Mutex::new(Shared {
            gpu,
            losses: HashMap::new(),
            gradients: HashMap::new(),
        }))
    });
    Ok(())
}

/// Bytes ssdkd has mapped back to the host from `device` so far ([`GpuBackend::bytes_read_back`]):
/// a few hundred bytes of sums per evaluation on the resident path. `None` when the device
/// was not shared with ssdkd.
#[must_use]
pub fn bytes_read_back(device: &Device) -> Option<u64> {
    let key = wgpu_of(device.as_dispatch())?;
    let shared = lock(registry()).get(&key).cloned()?;
    let bytes = lock(&shared).gpu.bytes_read_back();
    Some(bytes)
}

/// The adapter ssdkd runs on for `device`, when it was shared with ssdkd.
#[must_use]
pub fn adapter_name(device: &Device) -> Option<String> {
    let key = wgpu_of(device.as_dispatch())?;
    let shared = lock(registry()).get(&key).cloned()?;
    let name = lock(&shared).gpu.adapter_name();
    Some(name)
}

/// The ssdkd backend for a tensor on `device`, or `None` for the host path (another cubecl
/// runtime, or [`LossPath::Host`]).
///
/// # Panics
/// On a wgpu device that was not shared with ssdkd: naming how to share it.
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
struct Bound<R> {
    _tensor: CubeTensor,
    _resource: R,
    slice: GpuSlice,
}

impl<R> Bound<R> {
    fn slice(&self) -> GpuSlice {
        self.slice.clone()
    }
}

fn slice_of(resource: &WgpuResource) -> GpuSlice {
    GpuSlice::new(resource.buffer.clone(), resource.offset, resource.size)
}

/// Makes `tensor` bindable: contiguous f32 at an offset the device can bind (a tensor at
/// another offset is copied into a fresh allocation on the device, never through the host).
fn bind(tensor: CubeTensor, name: &str, alignment: u64) -> Bound<impl Sized> {
    assert!(
        tensor.dtype == DType::F32,
        "ssdkd-burn: `{name}` is {:?}; the loss takes f32 tensors",
        tensor.dtype
    );
    let resource_of = |tensor: &CubeTensor| {
        tensor
            .client
            .get_resource::<Server>(tensor.handle.clone())
            .unwrap_or_else(|e| panic!("ssdkd-burn: the buffer of `{name}`: {e:?}"))
    };
    let tensor = burn_cubecl::kernel::into_contiguous(tensor);
    let resource = resource_of(&tensor);
    if resource.resource().offset % alignment == 0 {
        let slice = slice_of(resource.resource());
        return Bound {
            _tensor: tensor,
            _resource: resource,
            slice,
        };
    }
    drop(resource);
    let copy = CubeBackend::float_mul_scalar(tensor.clone(), 1.0f32.into());
    let resource = resource_of(&copy);
    drop(tensor);
    let slice = slice_of(resource.resource());
    Bound {
        _tensor: copy,
        _resource: resource,
        slice,
    }
}

/// Binds the six inputs: the teacher slices are the student's for the plain loss.
fn bind_inputs(
    inputs: Tensors<CubeTensor>,
    spec: &LossSpec,
    alignment: u64,
) -> (Vec<Bound<impl Sized>>, GpuTensors) {
    let [sl, sc, tl, tc, tg, pr] = inputs.to_array();
    let mut bound = vec![
        bind(sl, "student_loc", alignment),
        bind(sc, "student_conf", alignment),
    ];
    if spec.has_teacher {
        bound.push(bind(tl, "teacher_loc", alignment));
        bound.push(bind(tc, "teacher_conf", alignment));
    }
    bound.push(bind(tg, "targets", alignment));
    bound.push(bind(pr, "priors", alignment));
    let slices: Vec<GpuSlice> = bound.iter().map(Bound::slice).collect();
    let (teacher_loc, teacher_conf, targets, priors) = if spec.has_teacher {
        (&slices[2], &slices[3], &slices[4], &slices[5])
    } else {
        (&slices[0], &slices[1], &slices[2], &slices[3])
    };
    let tensors = GpuTensors {
        student_loc: slices[0].clone(),
        student_conf: slices[1].clone(),
        teacher_loc: teacher_loc.clone(),
        teacher_conf: teacher_conf.clone(),
        targets: targets.clone(),
        priors: priors.clone(),
    };
    (bound, tensors)
}

/// Points the cached batch of `shape` at new slices, or binds a new one.
fn batch_for<'a>(
    gpu: &mut GpuBackend,
    cache: &'a mut HashMap<BatchShape, GpuBatch>,
    shape: BatchShape,
    tensors: GpuTensors,
    gradients: Option<GpuGradients>,
) -> ssdkd::Result<&'a GpuBatch> {
    if let Some(mut batch) = cache.remove(&shape) {
        gpu.rebind(&mut batch, tensors, gradients)?;
        return Ok(cache.entry(shape).or_insert(batch));
    }
    let batch = match gradients {
        Some(gradients) => gpu.wrap_with_gradients(shape, tensors, gradients)?,
        None => gpu.wrap(shape, tensors)?,
    };
    Ok(cache.entry(shape).or_insert(batch))
}

/// One resident evaluation of `inputs` (gradients into `gradients` when given).
fn evaluate(
    shared: &Mutex<Shared>,
    inputs: Tensors<CubeTensor>,
    spec: &LossSpec,
    gradients: Option<[&CubeTensor; 2]>,
) -> ssdkd::Evaluation {
    let client = inputs.student_loc.client.clone();
    let shape = batch_shape(&inputs.student_conf.shape(), &inputs.targets.shape());
    let mut guard = lock(shared);
    let Shared {
        gpu,
        losses,
        gradients: gradient_batches,
    } = &mut *guard;
    let alignment = gpu.device().limits().min_storage_buffer_offset_alignment as u64;
    let (bound, tensors) = bind_inputs(inputs, spec, alignment);
    let outputs = gradients.map(|[conf, loc]| {
        [
            bind(conf.clone(), "grad_student_conf", alignment),
            bind(loc.clone(), "grad_student_loc", alignment),
        ]
    });
    // Burn's queued work (what made the inputs) runs before ssdkd's submit.
    client
        .flush()
        .unwrap_or_else(|e| panic!("ssdkd-burn: flushing Burn's queue: {e:?}"));
    let result = with_teacher_rule(spec.has_teacher, &spec.config, |config| match &outputs {
        Some([conf, loc]) => {
            let slices = GpuGradients {
                student_conf: conf.slice(),
                student_loc: loc.slice(),
            };
            let request = GpuRequest {
                gradients: true,
                ..GpuRequest::default()
            };
            batch_for(gpu, gradient_batches, shape, tensors, Some(slices))
                .and_then(|batch| gpu.evaluate_resident(batch, config, request))
        }
        None => batch_for(gpu, losses, shape, tensors, None)
            .and_then(|batch| gpu.evaluate_resident(batch, config, GpuRequest::default())),
    });
    // ssdkd's work is done (evaluate_resident waits for it): Burn may reuse the storage now.
    drop(outputs);
    drop(bound);
    result.unwrap_or_else(|e| panic!("ssdkd-burn: {e}"))
}

impl SsdkdBackend for CubeBackend {
    fn ssdkd_terms(
        student_loc: FloatTensor<Self>,
        student_conf: FloatTensor<Self>,
        teacher_loc: FloatTensor<Self>,
        teacher_conf: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        priors: FloatTensor<Self>,
        spec: LossSpec,
    ) -> FloatTensor<Self> {
        let inputs = Tensors {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        };
        let device = inputs.student_loc.device.clone();
        match shared_for(&device, &spec) {
            Some(shared) => {
                let eval = evaluate(&shared, inputs, &spec, None);
                host::terms_tensor::<Self>(&eval, &device)
            }
            None => host::terms::<Self>(inputs, &spec),
        }
    }

    fn ssdkd_gradients(
        student_loc: FloatTensor<Self>,
        student_conf: FloatTensor<Self>,
        teacher_loc: FloatTensor<Self>,
        teacher_conf: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        priors: FloatTensor<Self>,
        spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let inputs = Tensors {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        };
        let device = inputs.student_loc.device.clone();
        match shared_for(&device, &spec) {
            Some(shared) => {
                let conf = Self::float_empty(inputs.student_conf.shape(), &device, FloatDType::F32);
                let loc = Self::float_empty(inputs.student_loc.shape(), &device, FloatDType::F32);
                evaluate(&shared, inputs, &spec, Some([&conf, &loc]));
                (conf, loc)
            }
            None => host::gradients::<Self>(inputs, &spec),
        }
    }
}
