//! Batches that live on the GPU: the caller's tensors as buffer slices ([`GpuSlice`]), the
//! gradient outputs (ssdkd's own buffers or the caller's slices), and the checks that a
//! slice can be bound for a shape. A slice that cannot be bound is an [`Error::Shape`]
//! naming the tensor, never a wrong number.

use crate::batch::BatchShape;
use crate::error::{Error, Result};
use crate::gpu::chunks::{Chunk, Layout};
use crate::gpu::resources::Resource;
use ssdkd_core::Tensors;
#[cfg(test)]
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A tensor in a GPU buffer: `size` bytes from byte `offset`, row-major `f32` laid out like
/// [`crate::Batch`]'s slices. Frameworks that pool their allocations (Burn, cubecl) hand
/// out tensors as such slices of larger pages.
#[derive(Clone, Debug)]
pub struct GpuSlice {
    /// The buffer, created on the backend's device with `STORAGE` usage.
    pub buffer: wgpu::Buffer,
    /// Where the tensor starts, in bytes: a multiple of the device's
    /// `min_storage_buffer_offset_alignment`.
    pub offset: u64,
    /// The tensor's bytes: at least what the shape needs (more is ignored).
    pub size: u64,
}

impl GpuSlice {
    /// `size` bytes of `buffer` from byte `offset`.
    #[must_use]
    pub fn new(buffer: wgpu::Buffer, offset: u64, size: u64) -> Self {
        Self {
            buffer,
            offset,
            size,
        }
    }

    /// The whole of `buffer`.
    #[must_use]
    pub fn whole(buffer: wgpu::Buffer) -> Self {
        let size = buffer.size();
        Self::new(buffer, 0, size)
    }

    /// Whether the two slices share bytes of one buffer.
    fn overlaps(&self, other: &GpuSlice) -> bool {
        self.buffer == other.buffer
            && self.offset < other.offset + other.size
            && other.offset < self.offset + self.size
    }
}

/// The input tensors of a batch (SPEC §1) as slices of the caller's GPU buffers, on the
/// backend's device ([`crate::gpu::GpuBackend::device`]): each `f32`, shaped as SPEC §1.
pub type GpuTensors = Tensors<GpuSlice>;

/// Each tensor of `tensors` with its name and the bytes `shape` needs of it.
fn named<'a>(
    tensors: &'a GpuTensors,
    shape: &BatchShape,
) -> [(&'static str, &'a GpuSlice, u64); 6] {
    let bytes = shape
        .dims()
        .map(|dims| dims.iter().product::<usize>() as u64 * 4);
    tensors
        .as_ref()
        .named()
        .zip(bytes)
        .to_array()
        .map(|((name, slice), bytes)| (name, slice, bytes))
}

/// Where an evaluation writes the gradients (SPEC §6): `[B, P, C]` ∂total/∂student_conf and
/// `[B, P, 4]` ∂total/∂student_loc, as slices of the caller's buffers (`STORAGE`; also
/// `COPY_SRC` to read them back, `COPY_DST` when they share a buffer with an input).
#[derive(Clone, Debug)]
pub struct GpuGradients {
    /// `[B, P, C]` f32.
    pub student_conf: GpuSlice,
    /// `[B, P, 4]` f32.
    pub student_loc: GpuSlice,
}

impl GpuGradients {
    /// Each gradient with its name and the bytes `shape` needs of it.
    fn named(&self, shape: &BatchShape) -> [(&'static str, &GpuSlice, u64); 2] {
        let b = shape.batch as u64;
        [
            (
                "grad_student_conf",
                &self.student_conf,
                Layout::Conf.image_bytes(shape) * b,
            ),
            (
                "grad_student_loc",
                &self.student_loc,
                Layout::Loc.image_bytes(shape) * b,
            ),
        ]
    }
}

/// A batch resident on the GPU: its input slices and where its gradients go. Evaluate it
/// with [`crate::gpu::GpuBackend::evaluate_resident`]. Its bind groups are made on its
/// first evaluation and kept while its slices stay the same and its shape stays in the
/// backend's cache ([`crate::gpu::GpuCacheBudget`]; an evicted shape's are dropped and made
/// again on the next evaluation): keep it and change its slices with
/// [`crate::gpu::GpuBackend::rebind`] (which drops them) rather than making a new one.
#[derive(Debug)]
pub struct GpuBatch {
    pub(crate) shape: BatchShape,
    pub(crate) tensors: GpuTensors,
    /// What the gradient kernels write.
    pub(crate) gradients: GpuGradients,
    /// Whether `gradients` are ssdkd's own buffers.
    pub(crate) owns_gradients: bool,
    /// The caller's gradient slices when they share a buffer with an input (a storage
    /// buffer cannot be bound read-only and read-write in one dispatch): the kernels then
    /// write `gradients`, ssdkd's own, and the run copies them here on the device.
    pub(crate) gradients_out: Option<GpuGradients>,
    /// Made by [`crate::gpu::GpuBackend::wrap_terms`] and not rebound with gradient slices:
    /// no gradient buffer exists; `gradients` holds the student's own slices as
    /// placeholders, bound by the gradient kernels, which never run for it.
    pub(crate) terms_only: bool,
    /// Its bind groups, made on its first evaluation and dropped with it, or when the
    /// engine evicts the shape whose buffers they bind (the engine holds a weak reference).
    pub(crate) bound: Arc<Mutex<Option<Bound>>>,
}

impl GpuBatch {
    /// The dimensions.
    #[must_use]
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// The input slices.
    #[must_use]
    pub fn tensors(&self) -> &GpuTensors {
        &self.tensors
    }

    /// `[B, P, C]` f32 ∂total/∂student_conf, written by an evaluation that computes
    /// gradients: the caller's slice when one was given, else ssdkd's buffer
    /// (`STORAGE | COPY_SRC`); for a batch wrapped for terms only
    /// ([`crate::gpu::GpuBackend::wrap_terms`]), which has none, `student_conf`'s slice.
    #[must_use]
    pub fn grad_student_conf(&self) -> &GpuSlice {
        let out = self.gradients_out.as_ref().unwrap_or(&self.gradients);
        &out.student_conf
    }

    /// `[B, P, 4]` f32 ∂total/∂student_loc, as [`GpuBatch::grad_student_conf`].
    #[must_use]
    pub fn grad_student_loc(&self) -> &GpuSlice {
        let out = self.gradients_out.as_ref().unwrap_or(&self.gradients);
        &out.student_loc
    }

    /// The slice of an input or gradient resource (the gradients as the kernels write them).
    pub(crate) fn slice(&self, resource: Resource) -> Option<&GpuSlice> {
        let t = &self.tensors;
        Some(match resource {
            Resource::StudentConf => &t.student_conf,
            Resource::TeacherConf => &t.teacher_conf,
            Resource::StudentLoc => &t.student_loc,
            Resource::TeacherLoc => &t.teacher_loc,
            Resource::Targets => &t.targets,
            Resource::Priors => &t.priors,
            Resource::GradStudentConf => &self.gradients.student_conf,
            Resource::GradStudentLoc => &self.gradients.student_loc,
            _ => return None,
        })
    }

    /// Whether the batch was wrapped for terms only and has no gradient buffer.
    #[must_use]
    pub fn terms_only(&self) -> bool {
        self.terms_only
    }

    /// Whether the caller's gradient slices are written through a copy from ssdkd's own.
    #[must_use]
    pub fn gradients_copied(&self) -> bool {
        self.gradients_out.is_some()
    }
}

/// Counts the bind-group sets alive, for the test that dropped batches release theirs.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Live(Arc<AtomicUsize>);

#[cfg(test)]
impl Live {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

#[cfg(test)]
impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The bind groups of one batch bound as `chunks` over the workspace `workspace_id`: per
/// chunk, its `Params` uniform and one bind group per kernel (in `KERNELS` order).
#[derive(Debug)]
pub(crate) struct Bound {
    pub workspace_id: u64,
    pub chunks: Vec<Chunk>,
    pub params: Vec<wgpu::Buffer>,
    pub groups: Vec<Vec<wgpu::BindGroup>>,
    #[cfg(test)]
    pub _live: Option<Live>,
}

/// What a slice must satisfy on a device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SliceRules {
    /// `min_storage_buffer_offset_alignment`.
    pub alignment: u64,
}

fn refuse(tensor: &'static str, problem: String) -> Error {
    Error::Shape { tensor, problem }
}

/// Checks one slice: in its buffer, aligned, as large as `needed`, with `usage`.
fn check_slice(
    rules: SliceRules,
    tensor: &'static str,
    slice: &GpuSlice,
    needed: u64,
    usage: wgpu::BufferUsages,
) -> Result<()> {
    let alignment = rules.alignment.max(4);
    if slice.offset % alignment != 0 {
        return Err(refuse(
            tensor,
            format!(
                "GPU slice at byte offset {}, not a multiple of the device's \
                 min_storage_buffer_offset_alignment {alignment}",
                slice.offset
            ),
        ));
    }
    let end = slice.offset.checked_add(slice.size);
    if end.is_none_or(|end| end > slice.buffer.size()) {
        return Err(refuse(
            tensor,
            format!(
                "GPU slice of {} bytes at offset {} runs past its buffer of {} bytes",
                slice.size,
                slice.offset,
                slice.buffer.size()
            ),
        ));
    }
    if slice.size < needed {
        return Err(refuse(
            tensor,
            format!(
                "GPU slice of {} bytes where the shape needs {needed}",
                slice.size
            ),
        ));
    }
    if !slice.buffer.usage().contains(usage) {
        return Err(refuse(
            tensor,
            format!(
                "GPU buffer with usage {:?}, without {usage:?}",
                slice.buffer.usage()
            ),
        ));
    }
    Ok(())
}

/// Checks the input slices for `shape`.
pub(crate) fn check_tensors(
    rules: SliceRules,
    shape: &BatchShape,
    tensors: &GpuTensors,
) -> Result<()> {
    for (tensor, slice, needed) in named(tensors, shape) {
        check_slice(rules, tensor, slice, needed, wgpu::BufferUsages::STORAGE)?;
    }
    Ok(())
}

/// Checks the caller's gradient slices for `shape` against the inputs. Returns whether
/// they share a buffer with an input (and must then be written by a copy).
pub(crate) fn check_gradients(
    rules: SliceRules,
    shape: &BatchShape,
    tensors: &GpuTensors,
    gradients: &GpuGradients,
) -> Result<bool> {
    let inputs = named(tensors, shape);
    let mut shared = false;
    for (tensor, slice, needed) in gradients.named(shape) {
        check_slice(rules, tensor, slice, needed, wgpu::BufferUsages::STORAGE)?;
        let written = GpuSlice::new(slice.buffer.clone(), slice.offset, needed);
        for (input, other, other_needed) in inputs {
            let read = GpuSlice::new(other.buffer.clone(), other.offset, other_needed);
            if written.overlaps(&read) {
                return Err(refuse(
                    tensor,
                    format!("GPU slice overlaps the input `{input}`"),
                ));
            }
            shared |= written.buffer == read.buffer;
        }
    }
    let [(_, conf, conf_bytes), (_, loc, loc_bytes)] = gradients.named(shape);
    if GpuSlice::new(conf.buffer.clone(), conf.offset, conf_bytes).overlaps(&GpuSlice::new(
        loc.buffer.clone(),
        loc.offset,
        loc_bytes,
    )) {
        return Err(refuse(
            "grad_student_loc",
            "GPU slice overlaps grad_student_conf".into(),
        ));
    }
    if shared {
        for (tensor, slice, _) in gradients.named(shape) {
            if !slice.buffer.usage().contains(wgpu::BufferUsages::COPY_DST) {
                return Err(refuse(
                    tensor,
                    "GPU buffer shared with an input but without COPY_DST usage (the \
                     gradient is then written by a copy)"
                        .into(),
                ));
            }
        }
    }
    Ok(shared)
}
