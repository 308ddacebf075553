//! The CUDA side of the shared buffers: the CUDA driver API, loaded at run time (cudarc's
//! dynamic loading; without libcuda every entry point reports why instead of failing to
//! load), and [`CudaShared`], the GPU backend on the Vulkan device of a CUDA device with
//! its batch buffers imported into CUDA and ordered with a caller's stream.

use super::vulkan::{
    missing_extension, uuid_hex, vulkan_adapters, Ordering, SharedBatch, SharedDevice,
    TimelineSemaphore, VulkanAdapter, NVIDIA_VENDOR_ID, SHARED_NAMES,
};
use crate::batch::with_teacher_rule;
use crate::batch::{teacher_pair, BatchShape, Evaluation};
use crate::error::{Error, Result};
use crate::gpu::GpuRequest;
use cudarc::driver::sys;
use ssdkd_core::LossConfig;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};

/// Batch shapes whose shared buffers are kept (imported into CUDA) at once; the least
/// recently used is released when another shape comes.
pub const SHAPES_KEPT: usize = 2;

fn cuda(what: &str, result: sys::CUresult) -> Result<()> {
    if result == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Gpu(format!("{what}: CUDA error {result:?}")))
    }
}

/// The reason given when the CUDA driver library cannot be loaded.
const NO_LIBCUDA: &str = "libcuda not found (the CUDA driver library could not be loaded)";

/// Loads the driver and initialises it.
fn init() -> Result<()> {
    // SAFETY: only tries to load the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoAdapter(NO_LIBCUDA.into()));
    }
    // SAFETY: the library is present; cuInit may be called any number of times.
    cuda("initialising CUDA", unsafe { sys::cuInit(0) })
        .map_err(|e| Error::NoAdapter(e.to_string()))
}

/// The CUDA device of `ordinal` (as CUDA numbers them, `CUDA_VISIBLE_DEVICES` applied)
/// and its UUID.
fn device(ordinal: usize) -> Result<(sys::CUdevice, [u8; 16])> {
    init()?;
    let mut device: sys::CUdevice = 0;
    let ordinal_c = i32::try_from(ordinal).unwrap_or(i32::MAX);
    // SAFETY: the driver is initialised; `device` is written on success.
    cuda("getting the device", unsafe {
        sys::cuDeviceGet(&mut device, ordinal_c)
    })
    .map_err(|e| Error::NoAdapter(format!("no CUDA device {ordinal}: {e}")))?;
    let mut uuid = sys::CUuuid_st { bytes: [0; 16] };
    // SAFETY: `device` is valid; `uuid` is written on success.
    cuda("getting the device UUID", unsafe {
        sys::cuDeviceGetUuid(&mut uuid, device)
    })?;
    Ok((device, uuid.bytes.map(|b| b as u8)))
}

/// The Vulkan adapter of CUDA device `ordinal`, checked for what sharing needs.
fn matching_adapter(
    ordinal: usize,
    uuid: [u8; 16],
    flags: wgpu::InstanceFlags,
) -> Result<VulkanAdapter> {
    let adapter = vulkan_adapters(flags)
        .into_iter()
        .find(|a| a.uuid == uuid)
        .ok_or_else(|| {
            Error::NoAdapter(format!(
                "no Vulkan adapter with the UUID of CUDA device {ordinal} ({})",
                uuid_hex(&uuid)
            ))
        })?;
    if adapter.vendor != NVIDIA_VENDOR_ID {
        return Err(Error::NoAdapter(format!(
            "not an NVIDIA GPU: the Vulkan adapter {} of CUDA device {ordinal} has vendor \
             id {:#06x}",
            adapter.name, adapter.vendor
        )));
    }
    if !adapter.external_memory {
        return Err(missing_extension(ash::khr::external_memory_fd::NAME));
    }
    Ok(adapter)
}

/// Why [`CudaShared::open`] cannot open CUDA device `ordinal`, or `None` when it can:
/// "libcuda not found", "no CUDA device N", "no Vulkan adapter with the UUID of CUDA
/// device N", "not an NVIDIA GPU", "missing Vulkan extension VK_…". Opens no device and
/// compiles nothing.
#[must_use]
pub fn cuda_unavailable_reason(ordinal: usize) -> Option<String> {
    let flags = wgpu::InstanceFlags::from_build_config().with_env();
    device(ordinal)
        .and_then(|(_, uuid)| matching_adapter(ordinal, uuid, flags))
        .err()
        .map(|e| match e {
            Error::NoAdapter(why) => why,
            other => other.to_string(),
        })
}

/// CUDA's primary context of a device, retained while this lives.
struct Context {
    device: sys::CUdevice,
    context: sys::CUcontext,
}

impl Context {
    fn retain(device: sys::CUdevice) -> Result<Self> {
        let mut context = std::ptr::null_mut();
        // SAFETY: `device` is valid; `context` is written on success.
        cuda("retaining the primary context", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut context, device)
        })?;
        Ok(Self { device, context })
    }

    /// Runs `f` with the context current on this thread, restoring the previous one.
    fn current<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        with_current(self.context, f)
    }
}

/// Runs `f` with `context` (retained) current on this thread, restoring the previous one.
fn with_current<T>(context: sys::CUcontext, f: impl FnOnce() -> Result<T>) -> Result<T> {
    // SAFETY: the caller keeps the context retained.
    cuda("making the context current", unsafe {
        sys::cuCtxPushCurrent_v2(context)
    })?;
    let result = f();
    let mut popped = std::ptr::null_mut();
    // SAFETY: pops what was pushed above.
    let pop = cuda("restoring the context", unsafe {
        sys::cuCtxPopCurrent_v2(&mut popped)
    });
    result.and_then(|t| pop.map(|()| t))
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: releases the retain of `Context::retain`.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}

/// An exported Vulkan allocation imported into CUDA, and its mapping.
struct ImportedMemory {
    external: sys::CUexternalMemory,
    pointer: sys::CUdeviceptr,
}

impl ImportedMemory {
    /// Imports `fd` (an opaque fd of a dedicated allocation of `allocation_size` bytes)
    /// and maps its first `bytes`. CUDA owns `fd` once the import succeeds.
    fn import(fd: OwnedFd, allocation_size: u64, bytes: u64) -> Result<Self> {
        // SAFETY: plain C structs, zero meaning "none" for every field not set.
        let mut handle: sys::CUDA_EXTERNAL_MEMORY_HANDLE_DESC = unsafe { std::mem::zeroed() };
        handle.type_ = sys::CUexternalMemoryHandleType::CU_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD;
        handle.handle.fd = fd.as_raw_fd();
        handle.size = allocation_size;
        // A dedicated Vulkan allocation must be imported as one.
        handle.flags = sys::CUDA_EXTERNAL_MEMORY_DEDICATED;
        let mut external = std::ptr::null_mut();
        // SAFETY: `handle` describes a live fd; `external` is written on success.
        cuda("importing Vulkan memory into CUDA", unsafe {
            sys::cuImportExternalMemory(&mut external, &handle)
        })?;
        // The import took the descriptor over.
        let _ = fd.into_raw_fd();
        // SAFETY: as above.
        let mut buffer: sys::CUDA_EXTERNAL_MEMORY_BUFFER_DESC = unsafe { std::mem::zeroed() };
        buffer.offset = 0;
        buffer.size = bytes;
        let mut pointer = 0;
        // SAFETY: `external` is live; the range lies within the allocation.
        let mapped = cuda("mapping imported memory", unsafe {
            sys::cuExternalMemoryGetMappedBuffer(&mut pointer, external, &buffer)
        });
        if let Err(e) = mapped {
            // SAFETY: nothing maps it.
            unsafe { sys::cuDestroyExternalMemory(external) };
            return Err(e);
        }
        Ok(Self { external, pointer })
    }

    /// Frees the mapping, then the imported memory: CUDA must be done with it.
    fn release(self) {
        // SAFETY: the owner synchronised with every use; the mapping goes before the
        // external memory it maps.
        unsafe {
            sys::cuMemFree_v2(self.pointer);
            sys::cuDestroyExternalMemory(self.external);
        }
    }
}

/// A timeline semaphore of the Vulkan device imported into CUDA.
struct ImportedSemaphore {
    vulkan: TimelineSemaphore,
    cuda: sys::CUexternalSemaphore,
    /// The last value signalled by either side.
    value: u64,
}

impl ImportedSemaphore {
    fn new(device: &SharedDevice) -> Result<Self> {
        let (vulkan, fd) = device.timeline_semaphore()?;
        // SAFETY: plain C struct, zero meaning "none".
        let mut handle: sys::CUDA_EXTERNAL_SEMAPHORE_HANDLE_DESC = unsafe { std::mem::zeroed() };
        handle.type_ = sys::CUexternalSemaphoreHandleType::CU_EXTERNAL_SEMAPHORE_HANDLE_TYPE_TIMELINE_SEMAPHORE_FD;
        handle.handle.fd = fd.as_raw_fd();
        let mut cuda_semaphore = std::ptr::null_mut();
        // SAFETY: `handle` describes a live fd; written on success.
        cuda("importing a Vulkan semaphore into CUDA", unsafe {
            sys::cuImportExternalSemaphore(&mut cuda_semaphore, &handle)
        })?;
        let _ = fd.into_raw_fd();
        Ok(Self {
            vulkan,
            cuda: cuda_semaphore,
            value: 0,
        })
    }

    /// Signals `value` on `stream` after what is queued there.
    fn signal(&self, value: u64, stream: sys::CUstream) -> Result<()> {
        // SAFETY: plain C struct, zero meaning "none".
        let mut params: sys::CUDA_EXTERNAL_SEMAPHORE_SIGNAL_PARAMS = unsafe { std::mem::zeroed() };
        params.params.fence.value = value;
        // SAFETY: one live semaphore and its parameters.
        cuda("signalling the shared semaphore", unsafe {
            sys::cuSignalExternalSemaphoresAsync(&self.cuda, &params, 1, stream)
        })
    }

    /// Makes `stream` wait until the semaphore reaches `value`.
    fn wait(&self, value: u64, stream: sys::CUstream) -> Result<()> {
        // SAFETY: plain C struct, zero meaning "none".
        let mut params: sys::CUDA_EXTERNAL_SEMAPHORE_WAIT_PARAMS = unsafe { std::mem::zeroed() };
        params.params.fence.value = value;
        // SAFETY: one live semaphore and its parameters.
        cuda("waiting for the shared semaphore", unsafe {
            sys::cuWaitExternalSemaphoresAsync(&self.cuda, &params, 1, stream)
        })
    }
}

/// One shape's shared buffers, imported into CUDA, and an event recorded after the last
/// CUDA work on them.
struct SharedShape {
    shared: SharedBatch,
    /// In the order of [`SHARED_NAMES`].
    imported: Vec<ImportedMemory>,
    last_use: sys::CUevent,
}

impl SharedShape {
    fn new(device: &mut SharedDevice, shape: BatchShape) -> Result<Self> {
        let shared = device.shared_batch(shape)?;
        let bytes = SharedBatch::bytes(shape);
        let mut imported = Vec::with_capacity(SHARED_NAMES.len());
        for (buffer, bytes) in shared.buffers().iter().zip(bytes) {
            let fd = device.export_fd(buffer)?;
            match ImportedMemory::import(fd, buffer.allocation_size, bytes) {
                Ok(memory) => imported.push(memory),
                Err(e) => {
                    imported.into_iter().for_each(ImportedMemory::release);
                    return Err(e);
                }
            }
        }
        let mut last_use = std::ptr::null_mut();
        // SAFETY: the context is current (the caller's); written on success.
        let made = cuda("creating an event", unsafe {
            sys::cuEventCreate(
                &mut last_use,
                sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
            )
        });
        if let Err(e) = made {
            imported.into_iter().for_each(ImportedMemory::release);
            return Err(e);
        }
        Ok(Self {
            shared,
            imported,
            last_use,
        })
    }

    /// Releases the CUDA side once its last work is done (mappings, then the imported
    /// memory), then the wgpu buffers, which wgpu frees once the GPU is done with them.
    fn release(self) {
        // SAFETY: the event is live; waiting for it orders the releases after every use.
        unsafe {
            sys::cuEventSynchronize(self.last_use);
            sys::cuEventDestroy_v2(self.last_use);
        }
        self.imported.into_iter().for_each(ImportedMemory::release);
        drop(self.shared);
    }
}

/// The inputs of an evaluation on CUDA: device pointers of contiguous float32 tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaInputs {
    /// SPEC §1's six tensors in its order (`student_loc`, `student_conf`, `teacher_loc`,
    /// `teacher_conf`, `targets`, `priors`); the teacher's both 0 for the plain MultiBox
    /// loss (SPEC §10.1).
    pub pointers: [u64; 6],
    /// B, P, C, M.
    pub shape: BatchShape,
    /// The caller's CUDA stream (0: the legacy default stream): every copy runs on it.
    pub stream: u64,
    /// Where ∂total/∂student_conf goes (`[B, P, C]` float32), 0 for nowhere.
    pub grad_conf: u64,
    /// Where ∂total/∂student_loc goes (`[B, P, 4]` float32), 0 for nowhere.
    pub grad_loc: u64,
}

impl CudaInputs {
    /// Checks what can be checked without reading the tensors: every dimension > 0 and
    /// C ≥ 2, the config (SPEC §8) for C, no null pointer but the teacher's, and the
    /// teacher's both given or both 0. Returns whether the teacher is given.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the tensor or the batch; [`Error::Config`] naming the key.
    pub fn check(&self, config: &LossConfig) -> Result<bool> {
        self.shape.check()?;
        self.shape.check_config(config)?;
        let p = self.pointers;
        for (i, name) in SHARED_NAMES[..6].iter().enumerate() {
            if p[i] == 0 && !(2..4).contains(&i) {
                return Err(Error::Shape {
                    tensor: name,
                    problem: "null CUDA pointer".into(),
                });
            }
        }
        let given = |i: usize| (p[i] != 0).then_some(p[i]);
        Ok(teacher_pair(given(2), given(3))?.is_some())
    }
}

/// The GPU backend on the Vulkan device of a CUDA device, evaluating tensors that live in
/// CUDA memory: each input is copied device to device on the caller's stream into
/// exportable buffers imported into CUDA (kept for [`SHAPES_KEPT`] shapes), the kernels
/// run on them as on any resident batch, and the gradients are copied device to device
/// into the caller's tensors on the stream. Only the sums reach the host.
pub struct CudaShared {
    /// Least recently used first.
    shapes: Vec<SharedShape>,
    semaphore: Option<ImportedSemaphore>,
    device: SharedDevice,
    context: Context,
    ordinal: usize,
}

// SAFETY: the CUDA handles are driver objects usable from any thread (every call makes the
// context current first); the rest is wgpu's and ash's, which are Send.
unsafe impl Send for CudaShared {}

impl std::fmt::Debug for CudaShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaShared")
            .field("ordinal", &self.ordinal)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl CudaShared {
    /// Opens CUDA device `ordinal` and the Vulkan adapter with its UUID (see
    /// [`SharedDevice::open`]), with timeline semaphores shared with CUDA where the
    /// driver exports them.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] with the reason of [`cuda_unavailable_reason`];
    /// [`Error::Gpu`] when a device cannot be opened.
    pub fn open(ordinal: usize) -> Result<Self> {
        let flags = wgpu::InstanceFlags::from_build_config().with_env();
        let (cuda_device, uuid) = device(ordinal)?;
        matching_adapter(ordinal, uuid, flags)?;
        let context = Context::retain(cuda_device)?;
        let device = SharedDevice::open(uuid, flags)?;
        let semaphore = match device.ordering() {
            Ordering::TimelineSemaphore => {
                Some(context.current(|| ImportedSemaphore::new(&device))?)
            }
            Ordering::FullSync => None,
        };
        Ok(Self {
            shapes: Vec::new(),
            semaphore,
            device,
            context,
            ordinal,
        })
    }

    /// Which ordering with the caller's stream runs.
    #[must_use]
    pub fn ordering(&self) -> Ordering {
        if self.semaphore.is_some() {
            Ordering::TimelineSemaphore
        } else {
            Ordering::FullSync
        }
    }

    /// The Vulkan adapter.
    #[must_use]
    pub fn adapter(&self) -> &VulkanAdapter {
        self.device.adapter()
    }

    /// Bytes mapped back to the host so far: the sums (and the validate stage's finding)
    /// of each evaluation.
    #[must_use]
    pub fn bytes_read_back(&self) -> u64 {
        self.device.backend_ref().bytes_read_back()
    }

    /// Evaluates the tensors of `inputs` with `config`. Their values are checked on the
    /// device by the validate stage (SPEC §1: finite, in range, labels below C), which
    /// refuses what the CPU backend's scan refuses, naming the same tensor and index; no
    /// input is read back to the host. Gradients are computed when a gradient pointer is given, and copied
    /// there on the stream; the returned evaluation holds the losses and counts only.
    ///
    /// # Errors
    /// [`Error::Shape`] for a zero dimension, C < 2, a null pointer or a teacher given
    /// half; [`Error::Config`] for a bad config; [`Error::Input`] for a bad value (with
    /// `validate`); [`Error::Gpu`] when CUDA or the GPU fails.
    pub fn evaluate(&mut self, inputs: &CudaInputs, config: &LossConfig) -> Result<Evaluation> {
        let shape = inputs.shape;
        let has_teacher = inputs.check(config)?;
        with_teacher_rule(has_teacher, config, |config| {
            with_current(self.context.context, || {
                let index = self.shape(shape)?;
                let Self {
                    shapes,
                    semaphore,
                    device,
                    ..
                } = self;
                let entry = &mut shapes[index];
                device.bind_teacher(&mut entry.shared, has_teacher)?;
                run(
                    device,
                    entry,
                    semaphore.as_mut(),
                    inputs,
                    config,
                    has_teacher,
                )
            })
        })
    }

    /// The index of `shape`'s buffers (made and imported when new, the least recently
    /// used released beyond [`SHAPES_KEPT`]), moved to the back.
    fn shape(&mut self, shape: BatchShape) -> Result<usize> {
        if let Some(i) = self.shapes.iter().position(|s| s.shared.shape() == shape) {
            let entry = self.shapes.remove(i);
            self.shapes.push(entry);
        } else {
            if self.shapes.len() >= SHAPES_KEPT {
                self.shapes.remove(0).release();
            }
            let entry = SharedShape::new(&mut self.device, shape)?;
            self.shapes.push(entry);
        }
        Ok(self.shapes.len() - 1)
    }
}

/// The copies in, the ordering, the kernels and the copies out of one evaluation.
fn run(
    device: &mut SharedDevice,
    entry: &SharedShape,
    semaphore: Option<&mut ImportedSemaphore>,
    inputs: &CudaInputs,
    config: &LossConfig,
    has_teacher: bool,
) -> Result<Evaluation> {
    let stream = inputs.stream as usize as sys::CUstream;
    let bytes = SharedBatch::bytes(inputs.shape);
    // The previous evaluation of this shape may have copied its gradients out on another
    // stream: nothing here overwrites the buffers before that is done.
    // SAFETY: a live event (one never recorded is complete) and the caller's stream.
    cuda("ordering after the last use", unsafe {
        sys::cuStreamWaitEvent(stream, entry.last_use, 0)
    })?;
    for (i, &size) in bytes[..6].iter().enumerate() {
        if (2..4).contains(&i) && !has_teacher {
            continue;
        }
        // SAFETY: both ranges are `size` long: the caller's tensor (the contract of
        // `CudaInputs`) and the mapping of the shared buffer.
        cuda("copying an input on the stream", unsafe {
            sys::cuMemcpyDtoDAsync_v2(
                entry.imported[i].pointer,
                inputs.pointers[i],
                size as usize,
                stream,
            )
        })?;
    }
    let gradients = inputs.grad_conf != 0 || inputs.grad_loc != 0;
    let request = GpuRequest {
        gradients,
        read_gradients: false,
        decisions: false,
    };
    let eval = match semaphore {
        Some(semaphore) => {
            let (ready, done) = (semaphore.value + 1, semaphore.value + 2);
            semaphore.signal(ready, stream)?;
            semaphore.value = ready;
            device.order_next_submit(&semaphore.vulkan, ready, done);
            let eval = device
                .backend()
                .evaluate_resident(entry.shared.batch(), config, request);
            // Whether or not a submit signalled `done`, the next values start above it
            // (a timeline only moves up).
            semaphore.value = done;
            if eval.is_err() {
                device.unstage(&semaphore.vulkan);
            }
            let eval = eval?;
            semaphore.wait(done, stream)?;
            eval
        }
        None => {
            // SAFETY: a stream of the current context (the caller's contract).
            cuda("synchronising the stream", unsafe {
                sys::cuStreamSynchronize(stream)
            })?;
            // Polls the device until the submit is done before returning.
            device
                .backend()
                .evaluate_resident(entry.shared.batch(), config, request)?
        }
    };
    for (to, from) in [(inputs.grad_conf, 6), (inputs.grad_loc, 7)] {
        if to != 0 {
            // SAFETY: as for the inputs: the caller's gradient tensor is `bytes[from]` long.
            cuda("copying a gradient on the stream", unsafe {
                sys::cuMemcpyDtoDAsync_v2(
                    to,
                    entry.imported[from].pointer,
                    bytes[from] as usize,
                    stream,
                )
            })?;
        }
    }
    // SAFETY: a live event and the caller's stream.
    cuda("recording the last use", unsafe {
        sys::cuEventRecord(entry.last_use, stream)
    })?;
    Ok(eval)
}

impl Drop for CudaShared {
    fn drop(&mut self) {
        // CUDA's side first (each shape waits for its last use), then the Vulkan device is
        // waited for, then the wgpu buffers and the semaphore go with the fields.
        let shapes = std::mem::take(&mut self.shapes);
        let semaphore = self.semaphore.take();
        let _ = self.context.current(|| {
            shapes.into_iter().for_each(SharedShape::release);
            if let Some(semaphore) = &semaphore {
                // SAFETY: no stream waits on or signals it past the shapes' last uses.
                unsafe { sys::cuDestroyExternalSemaphore(semaphore.cuda) };
            }
            Ok(())
        });
        let _ = self.device.wait_idle();
        drop(semaphore);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(pointers: [u64; 6]) -> CudaInputs {
        CudaInputs {
            pointers,
            shape: BatchShape {
                batch: 2,
                priors: 8,
                classes: 3,
                objects: 1,
            },
            stream: 0,
            grad_conf: 0,
            grad_loc: 0,
        }
    }

    fn refused_tensor(inputs: &CudaInputs, config: &LossConfig) -> &'static str {
        match inputs.check(config) {
            Err(Error::Shape { tensor, .. }) => tensor,
            other => panic!("{other:?}"),
        }
    }

    /// The checks made before any CUDA call: SPEC §1's tensors named, the teacher's both
    /// or neither, the shape and the config (SPEC §8).
    #[test]
    fn inputs_are_checked_before_any_cuda_call() {
        let config = LossConfig::DEFAULT;
        assert!(inputs([1, 2, 3, 4, 5, 6]).check(&config).unwrap());
        assert!(!inputs([1, 2, 0, 0, 5, 6]).check(&config).unwrap());
        assert_eq!(
            refused_tensor(&inputs([0, 2, 3, 4, 5, 6]), &config),
            "student_loc"
        );
        assert_eq!(
            refused_tensor(&inputs([1, 2, 3, 4, 0, 6]), &config),
            "targets"
        );
        assert_eq!(
            refused_tensor(&inputs([1, 2, 3, 4, 5, 0]), &config),
            "priors"
        );
        assert_eq!(
            refused_tensor(&inputs([1, 2, 3, 0, 5, 6]), &config),
            "teacher_conf"
        );
        assert_eq!(
            refused_tensor(&inputs([1, 2, 0, 4, 5, 6]), &config),
            "teacher_loc"
        );
        let mut one_class = inputs([1, 2, 3, 4, 5, 6]);
        one_class.shape.classes = 1;
        assert_eq!(refused_tensor(&one_class, &config), "student_conf");
        let mut bad = config;
        bad.temperature = 0.0;
        assert!(matches!(
            inputs([1, 2, 3, 4, 5, 6]).check(&bad),
            Err(Error::Config { key, .. }) if key == "temperature"
        ));
    }

    /// The shared buffers' inputs are SPEC §1's tensors, in its order.
    #[test]
    fn shared_names_start_with_the_tensor_names() {
        assert_eq!(SHARED_NAMES[..6], crate::TENSOR_NAMES);
    }

    /// Without libcuda every entry point says so instead of failing to load.
    #[test]
    fn without_libcuda_the_reason_is_given() {
        // SAFETY: only tries to load the library.
        if unsafe { sys::is_culib_present() } {
            eprintln!("skipped: libcuda is present here");
            return;
        }
        assert_eq!(cuda_unavailable_reason(0).as_deref(), Some(NO_LIBCUDA));
        match CudaShared::open(0) {
            Err(Error::NoAdapter(why)) => assert_eq!(why, NO_LIBCUDA),
            other => panic!("{other:?}"),
        }
    }
}
