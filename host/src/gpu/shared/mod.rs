//! Batch buffers that another API on the same GPU can use: Vulkan memory allocated by
//! ssdkd as exportable (`VK_KHR_external_memory_fd`, opaque file descriptors), wrapped as
//! wgpu buffers so that the GPU backend binds them as it binds a caller's slices
//! ([`crate::gpu::GpuBackend::wrap_with_gradients`]), and exported to CUDA
//! ([`CudaShared`]). The kernels, and so the results, are those of every other GPU
//! evaluation (SPEC §3–§6).
//!
//! - `vulkan.rs`: the Vulkan side — the adapter picked by its device UUID, a device opened
//!   with the external-semaphore extension where the driver has it, exportable buffers
//!   and timeline semaphores (ash, through wgpu's hal), the batch of one shape in such
//!   buffers;
//! - `cuda.rs`: the CUDA side (the driver API loaded at run time) and [`CudaShared`],
//!   which ties both to a caller's CUDA stream.

mod cuda;
mod vulkan;

/// The ash (Vulkan) crate wgpu's Vulkan backend is built with, for callers that import
/// the exported memory into a Vulkan device of their own.
pub use ash;
pub use cuda::{cuda_unavailable_reason, CudaInputs, CudaShared, SHAPES_KEPT};
pub use vulkan::{
    uuid_hex, vulkan_adapters, ExportableBuffer, Ordering, SharedBatch, SharedDevice,
    TimelineSemaphore, VulkanAdapter, NVIDIA_VENDOR_ID, SHARED_NAMES,
};
