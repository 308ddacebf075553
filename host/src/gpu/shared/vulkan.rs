//! The Vulkan side of the shared buffers: the adapter picked by its device UUID, a device
//! opened with the external-semaphore extension where the driver has it, exportable
//! buffers and timeline semaphores (ash, through wgpu's hal), the batch of one shape in
//! such buffers.
//!
//! wgpu's own `create_buffer` sub-allocates memory that cannot be exported, so each
//! exportable buffer is a dedicated allocation made here; wgpu frees it with the buffer
//! (`from_raw_managed`), after the GPU is done with it.

use crate::batch::BatchShape;
use crate::error::{Error, Result};
use crate::gpu::chunks::Layout;
use crate::gpu::{GpuBackend, GpuBatch, GpuGradients, GpuSlice, GpuTensors};
use ash::vk;
use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd};
use wgpu::hal::api::Vulkan;

/// NVIDIA's PCI vendor id, as Vulkan reports it.
pub const NVIDIA_VENDOR_ID: u32 = 0x10de;

/// How the caller's CUDA stream and ssdkd's Vulkan submit are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ordering {
    /// A timeline semaphore shared by both: the submit waits for the value the stream
    /// signals after its copies in, and the stream waits for the value the submit signals
    /// before its copies out. Needs `VK_KHR_external_semaphore_fd` and exportable timeline
    /// semaphores.
    TimelineSemaphore,
    /// The stream is synchronised before the submit, and the device polled until the
    /// submit is done before the stream goes on: where semaphores cannot be exported.
    FullSync,
}

impl Ordering {
    /// `"timeline-semaphore"` or `"full-sync"`, as reported to the caller.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Ordering::TimelineSemaphore => "timeline-semaphore",
            Ordering::FullSync => "full-sync",
        }
    }
}

/// A Vulkan adapter and its device UUID (`VkPhysicalDeviceIDProperties::deviceUUID`, the
/// UUID CUDA reports for the same GPU).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VulkanAdapter {
    /// The adapter's name.
    pub name: String,
    /// The device UUID.
    pub uuid: [u8; 16],
    /// The PCI vendor id ([`NVIDIA_VENDOR_ID`] for NVIDIA).
    pub vendor: u32,
    /// Whether it runs on the CPU (lavapipe) or is a GPU.
    pub device_type: wgpu::DeviceType,
    /// Whether the driver has `VK_KHR_external_memory_fd` (needed).
    pub external_memory: bool,
    /// Whether the driver has `VK_KHR_external_semaphore_fd` and exports timeline
    /// semaphores ([`Ordering::TimelineSemaphore`]; else [`Ordering::FullSync`]).
    pub external_semaphores: bool,
}

/// `uuid` as 32 lowercase hex digits.
#[must_use]
pub fn uuid_hex(uuid: &[u8; 16]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

fn vk_error(what: &str, e: vk::Result) -> Error {
    Error::Gpu(format!("{what}: {e}"))
}

fn vulkan_instance(flags: wgpu::InstanceFlags) -> wgpu::Instance {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    descriptor.backends = wgpu::Backends::VULKAN;
    descriptor.flags = flags;
    wgpu::Instance::new(descriptor)
}

/// The Vulkan instance and physical device under a wgpu adapter.
fn raw_adapter(adapter: &wgpu::Adapter) -> Option<(ash::Instance, vk::PhysicalDevice)> {
    // SAFETY: the hal adapter is only read, while `adapter` keeps it alive.
    let hal = unsafe { adapter.as_hal::<Vulkan>() }?;
    Some((
        hal.shared_instance().raw_instance().clone(),
        hal.raw_physical_device(),
    ))
}

/// The device UUID of a Vulkan physical device.
fn device_uuid(instance: &ash::Instance, physical: vk::PhysicalDevice) -> [u8; 16] {
    let mut id = vk::PhysicalDeviceIDProperties::default();
    let mut properties = vk::PhysicalDeviceProperties2::default().push_next(&mut id);
    // SAFETY: `physical` belongs to `instance`, which wgpu created with Vulkan ≥ 1.1 (the
    // version wgpu-hal needs).
    unsafe { instance.get_physical_device_properties2(physical, &mut properties) };
    id.device_uuid
}

/// The Vulkan adapters wgpu finds (instance `flags`), with their device UUIDs.
#[must_use]
pub fn vulkan_adapters(flags: wgpu::InstanceFlags) -> Vec<VulkanAdapter> {
    let instance = vulkan_instance(flags);
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN))
        .iter()
        .filter_map(|adapter| {
            let (raw, physical) = raw_adapter(adapter)?;
            let (external_memory, external_semaphores) = extensions(adapter)?;
            let info = adapter.get_info();
            Some(VulkanAdapter {
                name: info.name,
                uuid: device_uuid(&raw, physical),
                vendor: info.vendor,
                device_type: info.device_type,
                external_memory,
                external_semaphores: external_semaphores
                    && exports_timeline_semaphores(&raw, physical),
            })
        })
        .collect()
}

/// Whether the adapter's driver has `VK_KHR_external_memory_fd` and
/// `VK_KHR_external_semaphore_fd`.
fn extensions(adapter: &wgpu::Adapter) -> Option<(bool, bool)> {
    // SAFETY: read only, while `adapter` is alive.
    let hal = unsafe { adapter.as_hal::<Vulkan>() }?;
    let caps = hal.physical_device_capabilities();
    Some((
        caps.supports_extension(ash::khr::external_memory_fd::NAME),
        caps.supports_extension(ash::khr::external_semaphore_fd::NAME),
    ))
}

/// Whether timeline semaphores of this physical device can be exported as opaque fds.
fn exports_timeline_semaphores(instance: &ash::Instance, physical: vk::PhysicalDevice) -> bool {
    let mut timeline =
        vk::SemaphoreTypeCreateInfo::default().semaphore_type(vk::SemaphoreType::TIMELINE);
    let info = vk::PhysicalDeviceExternalSemaphoreInfo::default()
        .handle_type(vk::ExternalSemaphoreHandleTypeFlags::OPAQUE_FD)
        .push_next(&mut timeline);
    let mut properties = vk::ExternalSemaphoreProperties::default();
    // SAFETY: a query on a physical device of `instance` (Vulkan ≥ 1.1).
    unsafe {
        instance.get_physical_device_external_semaphore_properties(
            physical,
            &info,
            &mut properties,
        );
    }
    properties
        .external_semaphore_features
        .contains(vk::ExternalSemaphoreFeatureFlags::EXPORTABLE)
}

/// A Vulkan device opened for sharing: the GPU backend on it, and what exporting needs.
pub struct SharedDevice {
    backend: GpuBackend,
    /// ash's view of the device wgpu opened (the same `VkDevice`).
    raw: ash::Device,
    memory_fd: ash::khr::external_memory_fd::Device,
    /// Present when the device was opened with `VK_KHR_external_semaphore_fd` and exports
    /// timeline semaphores.
    semaphore_fd: Option<ash::khr::external_semaphore_fd::Device>,
    memory: vk::PhysicalDeviceMemoryProperties,
    adapter: VulkanAdapter,
}

impl std::fmt::Debug for SharedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDevice")
            .field("adapter", &self.adapter)
            .field("ordering", &self.ordering())
            .finish_non_exhaustive()
    }
}

impl SharedDevice {
    /// Opens the Vulkan adapter whose device UUID is `uuid` (instance `flags`), with
    /// `VK_KHR_external_memory_fd` (which wgpu enables where the driver has it) and, where
    /// the driver has it and exports timeline semaphores, `VK_KHR_external_semaphore_fd`;
    /// then creates the GPU backend's pipelines on it.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when no Vulkan adapter has `uuid` ("no Vulkan adapter with the
    /// UUID …") or it lacks `VK_KHR_external_memory_fd` ("missing Vulkan extension …");
    /// [`Error::Gpu`] when the device cannot be opened or a pipeline fails to build.
    pub fn open(uuid: [u8; 16], flags: wgpu::InstanceFlags) -> Result<Self> {
        let instance = vulkan_instance(flags);
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
        let found = adapters.into_iter().find_map(|adapter| {
            let (raw, physical) = raw_adapter(&adapter)?;
            (device_uuid(&raw, physical) == uuid).then_some((adapter, raw, physical))
        });
        let Some((adapter, raw_instance, physical)) = found else {
            return Err(Error::NoAdapter(format!(
                "no Vulkan adapter with the UUID {}",
                uuid_hex(&uuid)
            )));
        };
        let info = adapter.get_info();
        let (memory_ext, semaphore_ext) =
            extensions(&adapter).ok_or_else(|| Error::NoAdapter("not a Vulkan adapter".into()))?;
        if !memory_ext {
            return Err(missing_extension(ash::khr::external_memory_fd::NAME));
        }
        // Asking for an extension the driver lacks panics inside wgpu-hal: only what the
        // driver lists is asked for.
        let semaphores = semaphore_ext && exports_timeline_semaphores(&raw_instance, physical);
        let features = adapter.features() & wgpu::Features::PIPELINE_CACHE;
        let limits = adapter.limits();
        let open = {
            // SAFETY: as above; the callback only adds an extension the driver supports.
            let hal = unsafe { adapter.as_hal::<Vulkan>() }
                .ok_or_else(|| Error::NoAdapter("not a Vulkan adapter".into()))?;
            let callback: Box<wgpu::hal::vulkan::CreateDeviceCallback<'_>> =
                Box::new(move |args| {
                    if semaphores
                        && !args
                            .extensions
                            .contains(&ash::khr::external_semaphore_fd::NAME)
                    {
                        args.extensions.push(ash::khr::external_semaphore_fd::NAME);
                    }
                });
            // SAFETY: the features and limits are the adapter's own; the callback only adds
            // a supported extension.
            unsafe {
                hal.open_with_callback(
                    features,
                    &limits,
                    &wgpu::MemoryHints::Performance,
                    Some(callback),
                )
            }
            .map_err(|e| Error::Gpu(format!("opening the Vulkan device: {e}")))?
        };
        // SAFETY: `open` was opened on this adapter's hal adapter with these features and
        // limits.
        let (device, queue) = unsafe {
            adapter.create_device_from_hal(
                open,
                &wgpu::DeviceDescriptor {
                    label: Some("ssdkd.shared"),
                    required_features: features,
                    required_limits: limits,
                    ..Default::default()
                },
            )
        }
        .map_err(|e| Error::Gpu(format!("opening the Vulkan device: {e}")))?;
        let raw = {
            // SAFETY: read only; the clone is used while `device` (in the backend) lives.
            let hal = unsafe { device.as_hal::<Vulkan>() }
                .ok_or_else(|| Error::Gpu("not a Vulkan device".into()))?;
            hal.raw_device().clone()
        };
        let memory_fd = ash::khr::external_memory_fd::Device::new(&raw_instance, &raw);
        let semaphore_fd =
            semaphores.then(|| ash::khr::external_semaphore_fd::Device::new(&raw_instance, &raw));
        // SAFETY: a query on the physical device the device was opened on.
        let memory = unsafe { raw_instance.get_physical_device_memory_properties(physical) };
        Ok(Self {
            backend: GpuBackend::from_device(device, queue)?,
            raw,
            memory_fd,
            semaphore_fd,
            memory,
            adapter: VulkanAdapter {
                name: info.name,
                uuid,
                vendor: info.vendor,
                device_type: info.device_type,
                external_memory: memory_ext,
                external_semaphores: semaphores,
            },
        })
    }

    /// The adapter the device was opened on.
    #[must_use]
    pub fn adapter(&self) -> &VulkanAdapter {
        &self.adapter
    }

    /// The ordering an evaluation with a CUDA stream uses on this device: timeline
    /// semaphores where the device was opened with them, else a full synchronisation.
    #[must_use]
    pub fn ordering(&self) -> Ordering {
        if self.semaphore_fd.is_some() {
            Ordering::TimelineSemaphore
        } else {
            Ordering::FullSync
        }
    }

    /// The GPU backend on this device, read only.
    pub(super) fn backend_ref(&self) -> &GpuBackend {
        &self.backend
    }

    /// The GPU backend on this device.
    pub fn backend(&mut self) -> &mut GpuBackend {
        &mut self.backend
    }

    /// A new buffer of `size` bytes in its own exportable allocation (device-local where
    /// possible), usable by wgpu as `STORAGE | COPY_SRC | COPY_DST`; contents undefined.
    ///
    /// # Errors
    /// [`Error::Gpu`] when Vulkan refuses the buffer or the memory (out of memory, or no
    /// memory type for it).
    pub fn exportable_buffer(&self, label: &str, size: u64) -> Result<ExportableBuffer> {
        let size = size.max(4);
        let mut external = vk::ExternalMemoryBufferCreateInfo::default()
            .handle_types(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
        let info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut external);
        // SAFETY: a valid create info on the live device.
        let buffer = unsafe { self.raw.create_buffer(&info, None) }
            .map_err(|e| vk_error("creating an exportable buffer", e))?;
        let destroy_buffer = |e: Error| {
            // SAFETY: the buffer was made above and nothing uses it yet.
            unsafe { self.raw.destroy_buffer(buffer, None) };
            e
        };
        // SAFETY: `buffer` is live.
        let requirements = unsafe { self.raw.get_buffer_memory_requirements(buffer) };
        let memory_type = self
            .memory_type(requirements.memory_type_bits)
            .ok_or_else(|| destroy_buffer(Error::Gpu("no memory type for the buffer".into())))?;
        let mut export = vk::ExportMemoryAllocateInfo::default()
            .handle_types(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
        let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buffer);
        let allocate = vk::MemoryAllocateInfo::default()
            .allocation_size(requirements.size)
            .memory_type_index(memory_type)
            .push_next(&mut export)
            .push_next(&mut dedicated);
        // SAFETY: a valid allocate info for `buffer`'s requirements.
        let memory = unsafe { self.raw.allocate_memory(&allocate, None) }
            .map_err(|e| destroy_buffer(vk_error("allocating exportable memory", e)))?;
        // SAFETY: `memory` was allocated for `buffer` (dedicated), offset 0.
        if let Err(e) = unsafe { self.raw.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: neither is used by anything yet.
            unsafe { self.raw.free_memory(memory, None) };
            return Err(destroy_buffer(vk_error("binding exportable memory", e)));
        }
        // SAFETY: `buffer` is bound to the whole of `memory` at offset 0; wgpu owns both
        // from here and destroys them when the last handle of the wgpu buffer is dropped
        // and the GPU is done with it.
        let buffer = unsafe {
            let hal =
                wgpu::hal::vulkan::Buffer::from_raw_managed(buffer, memory, 0, requirements.size);
            self.backend.device().create_buffer_from_hal::<Vulkan>(
                hal,
                &wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                },
            )
        };
        Ok(ExportableBuffer {
            buffer,
            memory,
            allocation_size: requirements.size,
            memory_type,
        })
    }

    /// The index of a memory type in `bits`, device-local when one is.
    fn memory_type(&self, bits: u32) -> Option<u32> {
        let types = &self.memory.memory_types[..self.memory.memory_type_count as usize];
        let allowed = |i: usize| bits & (1 << i) != 0;
        let local = |i: usize| {
            types[i]
                .property_flags
                .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
        };
        let index = (0..types.len())
            .find(|&i| allowed(i) && local(i))
            .or_else(|| (0..types.len()).find(|&i| allowed(i)))?;
        u32::try_from(index).ok()
    }

    /// A new file descriptor of `buffer`'s memory (opaque fd). Whoever imports it owns it
    /// (CUDA and Vulkan take the descriptor over on a successful import).
    ///
    /// # Errors
    /// [`Error::Gpu`] when the driver refuses to export it.
    pub fn export_fd(&self, buffer: &ExportableBuffer) -> Result<OwnedFd> {
        let info = vk::MemoryGetFdInfoKHR::default()
            .memory(buffer.memory)
            .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
        // SAFETY: `buffer.memory` is alive while `buffer` holds its wgpu buffer.
        let fd = unsafe { self.memory_fd.get_memory_fd(&info) }
            .map_err(|e| vk_error("exporting memory", e))?;
        // SAFETY: the driver handed over a new descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// A new timeline semaphore (value 0) exportable as an opaque fd, with its fd.
    ///
    /// # Errors
    /// [`Error::Gpu`] when the device was opened without semaphore export
    /// ([`Ordering::FullSync`]) or Vulkan refuses.
    pub fn timeline_semaphore(&self) -> Result<(TimelineSemaphore, OwnedFd)> {
        let exporter = self.semaphore_fd.as_ref().ok_or_else(|| {
            Error::Gpu("the device was opened without VK_KHR_external_semaphore_fd".into())
        })?;
        let mut timeline = vk::SemaphoreTypeCreateInfo::default()
            .semaphore_type(vk::SemaphoreType::TIMELINE)
            .initial_value(0);
        let mut export = vk::ExportSemaphoreCreateInfo::default()
            .handle_types(vk::ExternalSemaphoreHandleTypeFlags::OPAQUE_FD);
        let info = vk::SemaphoreCreateInfo::default()
            .push_next(&mut timeline)
            .push_next(&mut export);
        // SAFETY: a valid create info on the live device.
        let raw = unsafe { self.raw.create_semaphore(&info, None) }
            .map_err(|e| vk_error("creating a timeline semaphore", e))?;
        let semaphore = TimelineSemaphore {
            raw,
            device: self.raw.clone(),
        };
        let get = vk::SemaphoreGetFdInfoKHR::default()
            .semaphore(raw)
            .handle_type(vk::ExternalSemaphoreHandleTypeFlags::OPAQUE_FD);
        // SAFETY: `raw` was just made exportable as an opaque fd.
        let fd = unsafe { exporter.get_semaphore_fd(&get) }
            .map_err(|e| vk_error("exporting a timeline semaphore", e))?;
        // SAFETY: the driver handed over a new descriptor.
        Ok((semaphore, unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes ssdkd's next submit wait until `semaphore` reaches `wait` and then set it to
    /// `signal`.
    pub(crate) fn order_next_submit(&self, semaphore: &TimelineSemaphore, wait: u64, signal: u64) {
        // SAFETY: the hal queue is only used to stage semaphores for the next submit.
        if let Some(queue) = unsafe { self.backend.queue().as_hal::<Vulkan>() } {
            queue.add_wait_semaphore(
                semaphore.raw,
                Some(wait),
                vk::PipelineStageFlags::ALL_COMMANDS,
            );
            queue.add_signal_semaphore(semaphore.raw, Some(signal));
        }
    }

    /// Takes the semaphores staged by [`SharedDevice::order_next_submit`] back off when
    /// no submit consumed them (an evaluation refused before submitting).
    pub(crate) fn unstage(&self, semaphore: &TimelineSemaphore) {
        // SAFETY: as above.
        if let Some(queue) = unsafe { self.backend.queue().as_hal::<Vulkan>() } {
            queue.remove_wait_semaphore(semaphore.raw);
            queue.remove_signal_semaphore(semaphore.raw);
        }
    }

    /// Waits until the device has finished all submitted work.
    ///
    /// # Errors
    /// [`Error::Gpu`] when the device is lost.
    pub fn wait_idle(&self) -> Result<()> {
        self.backend
            .device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))
    }

    /// The eight buffers of a batch of `shape` (SPEC §1's six inputs, the two gradients of
    /// SPEC §6), each in its own exportable allocation, and the batch bound over them.
    ///
    /// # Errors
    /// [`Error::Shape`] for a shape with a zero dimension or C < 2; [`Error::GpuUnsupported`]
    /// when a tensor exceeds the adapter's `max_buffer_size`; [`Error::Gpu`] when memory
    /// runs out.
    pub fn shared_batch(&mut self, shape: BatchShape) -> Result<SharedBatch> {
        let bytes = SharedBatch::bytes(shape);
        let max = self.backend.device().limits().max_buffer_size;
        for (name, size) in SHARED_NAMES.iter().zip(bytes) {
            if size > max {
                return Err(Error::GpuUnsupported(format!(
                    "tensor `{name}` takes {size} bytes, over the adapter's max_buffer_size \
                     of {max}"
                )));
            }
        }
        let mut buffers = Vec::with_capacity(SHARED_NAMES.len());
        for (name, size) in SHARED_NAMES.iter().zip(bytes) {
            buffers.push(self.exportable_buffer(&format!("ssdkd.shared.{name}"), size)?);
        }
        let slice = |i: usize| GpuSlice::new(buffers[i].buffer.clone(), 0, bytes[i]);
        let tensors = GpuTensors {
            student_loc: slice(0),
            student_conf: slice(1),
            teacher_loc: slice(2),
            teacher_conf: slice(3),
            targets: slice(4),
            priors: slice(5),
        };
        let gradients = GpuGradients {
            student_conf: slice(6),
            student_loc: slice(7),
        };
        let batch = self
            .backend
            .wrap_with_gradients(shape, tensors, gradients)?;
        let buffers: [ExportableBuffer; 8] = buffers
            .try_into()
            .map_err(|_| Error::Gpu("eight shared buffers".into()))?;
        Ok(SharedBatch {
            shape,
            buffers,
            batch,
            has_teacher: true,
        })
    }

    /// Points `shared`'s teacher inputs at its own buffers (`has_teacher`) or at the
    /// student's (a batch without teacher, SPEC §10.1: the student's tensors stand in).
    ///
    /// # Errors
    /// As [`GpuBackend::rebind`].
    pub fn bind_teacher(&mut self, shared: &mut SharedBatch, has_teacher: bool) -> Result<()> {
        if shared.has_teacher == has_teacher {
            return Ok(());
        }
        let mut tensors = shared.tensors();
        if !has_teacher {
            tensors.teacher_loc = tensors.student_loc.clone();
            tensors.teacher_conf = tensors.student_conf.clone();
        }
        self.backend.rebind(&mut shared.batch, tensors, None)?;
        shared.has_teacher = has_teacher;
        Ok(())
    }
}

pub(super) fn missing_extension(name: &CStr) -> Error {
    Error::NoAdapter(format!(
        "missing Vulkan extension {}",
        name.to_string_lossy()
    ))
}

/// The tensors of a [`SharedBatch`] in the order of its buffers: SPEC §1's six inputs,
/// then the gradients of SPEC §6.
pub const SHARED_NAMES: [&str; 8] = [
    "student_loc",
    "student_conf",
    "teacher_loc",
    "teacher_conf",
    "targets",
    "priors",
    "grad_student_conf",
    "grad_student_loc",
];

/// A buffer in its own exportable Vulkan allocation, wrapped as a wgpu buffer (which frees
/// the allocation when its last handle is dropped and the GPU is done with it).
#[derive(Debug)]
pub struct ExportableBuffer {
    /// The wgpu buffer over the allocation.
    pub buffer: wgpu::Buffer,
    memory: vk::DeviceMemory,
    /// The bytes of the allocation (at least the buffer's size): what an importer is told.
    pub allocation_size: u64,
    /// The Vulkan memory type index of the allocation: what a Vulkan importer on the same
    /// physical device allocates with.
    pub memory_type: u32,
}

/// A timeline semaphore made exportable by [`SharedDevice::timeline_semaphore`];
/// destroyed on drop, which must come after the GPU and every importer are done with it.
pub struct TimelineSemaphore {
    raw: vk::Semaphore,
    device: ash::Device,
}

impl std::fmt::Debug for TimelineSemaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TimelineSemaphore").field(&self.raw).finish()
    }
}

impl Drop for TimelineSemaphore {
    fn drop(&mut self) {
        // SAFETY: the owner waits for the device and the importer before dropping it.
        unsafe { self.device.destroy_semaphore(self.raw, None) };
    }
}

/// The batch of one shape in exportable buffers (see [`SharedDevice::shared_batch`]).
#[derive(Debug)]
pub struct SharedBatch {
    shape: BatchShape,
    /// In the order of [`SHARED_NAMES`].
    buffers: [ExportableBuffer; 8],
    batch: GpuBatch,
    has_teacher: bool,
}

impl SharedBatch {
    /// The bytes each tensor of a batch of `shape` takes, in the order of [`SHARED_NAMES`].
    #[must_use]
    pub fn bytes(shape: BatchShape) -> [u64; 8] {
        let b = shape.batch as u64;
        let loc = Layout::Loc.image_bytes(&shape) * b;
        let conf = Layout::Conf.image_bytes(&shape) * b;
        let targets = Layout::Target.image_bytes(&shape) * b;
        let priors = shape.priors as u64 * 16;
        [loc, conf, loc, conf, targets, priors, conf, loc]
    }

    /// The shape.
    #[must_use]
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// The buffers, in the order of [`SHARED_NAMES`].
    #[must_use]
    pub fn buffers(&self) -> &[ExportableBuffer; 8] {
        &self.buffers
    }

    /// The batch bound over the buffers, for [`GpuBackend::evaluate_resident`] (its
    /// gradients are written into the last two buffers).
    #[must_use]
    pub fn batch(&self) -> &GpuBatch {
        &self.batch
    }

    /// The six input slices, each over its own buffer.
    #[must_use]
    pub fn tensors(&self) -> GpuTensors {
        let bytes = Self::bytes(self.shape);
        let slice = |i: usize| GpuSlice::new(self.buffers[i].buffer.clone(), 0, bytes[i]);
        GpuTensors {
            student_loc: slice(0),
            student_conf: slice(1),
            teacher_loc: slice(2),
            teacher_conf: slice(3),
            targets: slice(4),
            priors: slice(5),
        }
    }
}
