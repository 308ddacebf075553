//! The GPU backend: the five stages as WGSL compute kernels (`shaders/<stage>.wgsl`, each
//! the twin of `ssdkd_core::stages::<stage>`), dispatched by wgpu.
//!
//! - `params.rs`: the uniform shared with the WGSL, and the sums record;
//! - `resources.rs`: the buffers the kernels bind; `kernels.rs`: the kernel table with
//!   each kernel's launch shape, phase, bindings and loop budget; `chunks.rs`: how a batch
//!   is split into chunks of images and the windows they bind;
//! - `recording.rs`: the `Recording` of an evaluation — parameter uploads, dispatches
//!   folded to `[x, y, 1]`, downloads with their layout — and its decoding;
//! - `resident.rs`: the public types of batches on the GPU (`GpuSlice`, `GpuTensors`,
//!   `GpuGradients`, `GpuBatch`) and the checks of the caller's slices;
//! - `pipeline_cache.rs`: the per-user pipeline cache's file;
//! - `shared/` (feature `cuda`, Linux): batch buffers in exportable Vulkan memory shared
//!   with CUDA, ordered with a caller's CUDA stream;
//! - `shader.rs`: the WGSL of each stage and, by naga's reflection, the buffers each
//!   kernel binds;
//! - `engine.rs`: every wgpu call — device, pipelines (through a per-user pipeline
//!   cache), buffers cached per shape within a budget ([`GpuCacheBudget`]), bind groups
//!   kept by their batch, the execution of a recording in one command encoder and one
//!   submit, returning the downloaded bytes.
//!
//! One evaluation records, in one command encoder submitted once, where the host did not
//! scan the values (resident batches, `validate: false`) the validate stage over every
//! chunk (`shaders/validate.wgsl`: its first finding is read back with the sums and
//! becomes the host scan's [`Error::Input`]), then every chunk forward
//! (match → prior terms → mine → per-image reduce), the batch reduce (which gives N), then
//! every chunk's gradients. A batch whose tensors exceed the adapter's
//! `max_storage_buffer_binding_size` is bound as windows of whole images (chunks) of the
//! same buffers, so it still takes one submit; the per-image sums of every chunk are added
//! by one batch reduce, so results do not depend on the chunking. Only the batch sums are
//! read back (and the validate stage's finding, 48 bytes), plus the gradients and decisions
//! when asked.

mod chunks;
mod engine;
mod kernels;
mod params;
mod pipeline_cache;
mod recording;
mod resident;
mod resources;
mod shader;
#[cfg(all(feature = "cuda", target_os = "linux"))]
pub mod shared;

pub use engine::{CacheBudget as GpuCacheBudget, CacheStats as GpuCacheStats};
pub use resident::{GpuBatch, GpuGradients, GpuSlice, GpuTensors};
/// The wgpu this backend is built with, for callers that make their own buffers.
pub use wgpu;

use crate::batch::{Batch, BatchShape, Evaluation, Request};
use crate::error::{Error, Result};
use engine::Engine;
use params::GpuFinding;
use recording::{Recording, Wanted};
use ssdkd_core::{LossConfig, LossSums};

/// What a resident evaluation computes and reads back beyond the losses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuRequest {
    /// Compute both gradients into the batch's gradient buffers
    /// ([`GpuBatch::grad_student_conf`], [`GpuBatch::grad_student_loc`]).
    pub gradients: bool,
    /// Also read the gradients back into [`Evaluation::gradients`] (implies `gradients`).
    pub read_gradients: bool,
    /// Read the per-prior decisions back into [`Evaluation::decisions`].
    pub decisions: bool,
}

/// A GPU context: adapter, device, queue and every pipeline, created once; buffers cached
/// for a few recent shapes within a byte budget ([`GpuCacheBudget`],
/// [`GpuBackend::cache_stats`]), bind groups kept by their batch.
pub struct GpuBackend {
    engine: Engine,
    /// A cap on the bytes of one storage binding below the adapter's limit, if set.
    binding_cap: Option<u64>,
}

impl GpuBackend {
    /// Picks an adapter (high performance; `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` respected),
    /// opens a device with the adapter's own limits and creates every pipeline.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when no adapter is found (or none matches `WGPU_ADAPTER_NAME`);
    /// [`Error::Gpu`] when the device cannot be opened or a pipeline fails to build.
    pub fn new() -> Result<Self> {
        Ok(Self {
            engine: Engine::new(false)?,
            binding_cap: None,
        })
    }

    /// A backend on a device the caller already has (a training framework's, such as
    /// Burn's): its buffers can then be bound directly ([`GpuBackend::wrap`]). Installs no
    /// device callbacks (the device's owner keeps its own; ssdkd catches its errors with
    /// error scopes), uses the pipeline cache only where the device was opened with
    /// `Features::PIPELINE_CACHE`, and names the adapter from `device.adapter_info()`.
    /// The limits are the device's own.
    ///
    /// wgpu keeps the error-scope stack of every thread that ever pushed one for the
    /// device's lifetime (a few hundred bytes each): evaluate from long-lived threads, not a
    /// new thread per call ([`GpuBackend::new`]'s own device has no such cost).
    ///
    /// Work the caller has recorded but not submitted on `queue` is the caller's to submit
    /// first: ssdkd submits its own command buffer, which runs after what was submitted
    /// before it, and waits for it before returning.
    ///
    /// # Errors
    /// [`Error::Gpu`] when a pipeline fails to build.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Ok(Self {
            engine: Engine::from_device(device, queue)?,
            binding_cap: None,
        })
    }

    /// [`GpuBackend::new`], but refusing a software adapter (wgpu `DeviceType::Cpu`, such
    /// as lavapipe or llvmpipe), which is slower than the CPU backend: what
    /// [`crate::Backend::auto`] uses.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] also when the only adapter found is a software one (the
    /// message names it); else as [`GpuBackend::new`].
    pub fn hardware() -> Result<Self> {
        Ok(Self {
            engine: Engine::new(true)?,
            binding_cap: None,
        })
    }

    /// The adapter's name, as `eval --json` reports it.
    #[must_use]
    pub fn adapter_name(&self) -> String {
        self.engine.adapter_name()
    }

    /// The device, to create buffers for [`GpuBackend::wrap`] on.
    #[must_use]
    pub fn device(&self) -> &wgpu::Device {
        self.engine.device()
    }

    /// The queue.
    #[must_use]
    pub fn queue(&self) -> &wgpu::Queue {
        self.engine.queue()
    }

    /// The most bytes one storage binding may hold: the adapter's
    /// `max_storage_buffer_binding_size`, or less after [`GpuBackend::set_binding_cap`].
    /// Batches whose tensors exceed it are split by images into chunks.
    #[must_use]
    pub fn binding_limit(&self) -> u64 {
        self.engine.limits(self.binding_cap).binding_limit
    }

    /// Caps the bytes of one storage binding below the adapter's limit (`None` lifts the
    /// cap), so that smaller batches are split into chunks: for tests and tuning.
    pub fn set_binding_cap(&mut self, bytes: Option<u64>) {
        self.binding_cap = bytes;
    }

    /// Evaluates `batch` on the GPU: uploads it (into buffers cached for its shape), runs
    /// every stage and reads back the sums, and the gradients and decisions when requested.
    ///
    /// # Errors
    /// What [`Batch::check`] finds: without `request.validate`, the values are validated on
    /// the GPU instead (the validate stage, `shaders/validate.wgsl`), with the same
    /// [`Error::Input`] as the host's scan; [`Error::Numerical`] for a non-finite loss
    /// term; [`Error::GpuUnsupported`] for a batch over the GPU
    /// backend's limits (checked before anything is uploaded; a [`crate::Backend`] with a
    /// [`crate::Fallback`] then evaluates it on the CPU); [`Error::Gpu`] on out-of-memory,
    /// device loss or a validation error.
    pub fn evaluate(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
        request: Request,
    ) -> Result<Evaluation> {
        batch.check(config, request.validate)?;
        let gpu_request = GpuRequest {
            gradients: request.gradients,
            read_gradients: request.gradients,
            decisions: request.decisions,
        };
        // Values the host did not scan are validated on the GPU.
        self.evaluate_checked(batch, config, gpu_request, !request.validate)
    }

    fn evaluate_checked(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
        request: GpuRequest,
        validate: bool,
    ) -> Result<Evaluation> {
        let recording = self.record(batch.shape(), config, request, validate)?;
        let gpu = self.engine.take_upload(batch.shape())?;
        let result = self
            .engine
            .write_batch(&gpu, batch)
            .and_then(|()| self.execute(&gpu, config, &recording));
        self.engine.keep_upload(gpu);
        result
    }

    /// What the shape cache holds now: shapes, bytes of buffers and bind-group sets, within
    /// [`GpuCacheStats::budget`].
    #[must_use]
    pub fn cache_stats(&self) -> GpuCacheStats {
        self.engine.cache_stats()
    }

    /// Sets the shape cache's budget ([`GpuCacheBudget::DEFAULT`] until then), evicting
    /// the least recently used shapes now over it. The latest shape is always kept.
    pub fn set_cache_budget(&mut self, budget: GpuCacheBudget) {
        self.engine.set_cache_budget(budget);
    }

    /// Uploads `batch` into new GPU buffers, for [`GpuBackend::evaluate_resident`].
    ///
    /// # Errors
    /// [`Error::GpuUnsupported`] when a tensor exceeds the adapter's `max_buffer_size`;
    /// [`Error::Gpu`] when memory runs out.
    pub fn upload(&mut self, batch: &Batch<'_>) -> Result<GpuBatch> {
        let gpu = self.engine.create_batch(batch.shape())?;
        self.engine.write_batch(&gpu, batch)?;
        Ok(gpu)
    }

    /// Overwrites the buffers of `gpu` with `batch`, of the same shape.
    ///
    /// # Errors
    /// [`Error::Shape`] when the shapes differ; [`Error::Gpu`] on a GPU failure.
    pub fn write(&mut self, gpu: &GpuBatch, batch: &Batch<'_>) -> Result<()> {
        if gpu.shape() != batch.shape() {
            return Err(Error::Shape {
                tensor: "batch",
                problem: format!(
                    "shape {:?} where the GPU batch has {:?}",
                    batch.shape(),
                    gpu.shape()
                ),
            });
        }
        self.engine.write_batch(gpu, batch)
    }

    /// A batch over slices of buffers the caller already has on this backend's device (no
    /// upload); its gradients go to buffers allocated here.
    ///
    /// # Errors
    /// As [`BatchShape::check`] for `shape`; [`Error::Shape`] naming the tensor when a
    /// slice is shorter than `shape` needs, runs past its buffer, starts at an offset that
    /// is not a multiple of the device's `min_storage_buffer_offset_alignment`, or its
    /// buffer lacks `STORAGE` usage;
    /// [`Error::Gpu`] when the gradient buffers cannot be allocated.
    pub fn wrap(&mut self, shape: BatchShape, tensors: GpuTensors) -> Result<GpuBatch> {
        shape.check()?;
        self.engine.wrap_batch(shape, tensors, None)
    }

    /// [`GpuBackend::wrap`] for evaluations without gradients: no gradient buffer is
    /// allocated ([`GpuBatch::terms_only`]). An evaluation asking for gradients is refused
    /// until the batch is rebound with gradient slices ([`GpuBackend::rebind`]).
    ///
    /// # Errors
    /// As [`GpuBackend::wrap`], without the allocation.
    pub fn wrap_terms(&mut self, shape: BatchShape, tensors: GpuTensors) -> Result<GpuBatch> {
        shape.check()?;
        self.engine.wrap_terms_batch(shape, tensors)
    }

    /// [`GpuBackend::wrap`], with the gradients written into the caller's slices: in place,
    /// or, where a gradient slice shares a buffer with an input (a buffer cannot be bound
    /// read-only and read-write in one dispatch), into ssdkd's buffers and then copied there
    /// on the device in the same submit.
    ///
    /// # Errors
    /// As [`GpuBackend::wrap`], for the gradient slices too; [`Error::Shape`] when a
    /// gradient slice overlaps an input or the other gradient, or shares a buffer with an
    /// input and lacks `COPY_DST` usage.
    pub fn wrap_with_gradients(
        &mut self,
        shape: BatchShape,
        tensors: GpuTensors,
        gradients: GpuGradients,
    ) -> Result<GpuBatch> {
        shape.check()?;
        self.engine.wrap_batch(shape, tensors, Some(gradients))
    }

    /// Points `batch` at new slices of the same shape (a framework's next step), dropping
    /// its bind groups so that none binds the old slices. With `gradients` `None` the
    /// gradients keep their destination (ssdkd's buffers, or the caller's slices checked
    /// again against the new inputs; a batch wrapped for terms only stays one); with
    /// `Some`, they go to those slices from now on.
    ///
    /// # Errors
    /// As [`GpuBackend::wrap_with_gradients`]; on an error `batch` may be left half-updated
    /// and should be rebound or dropped.
    pub fn rebind(
        &mut self,
        batch: &mut GpuBatch,
        tensors: GpuTensors,
        gradients: Option<GpuGradients>,
    ) -> Result<()> {
        self.engine.rebind(batch, tensors, gradients.map(Some))
    }

    /// Bytes mapped back to the host by this backend's evaluations so far: the sums of
    /// each (a few hundred bytes), plus gradients and decisions when they were asked for.
    /// What a caller checks to see that a resident evaluation kept its tensors on the GPU.
    #[must_use]
    pub fn bytes_read_back(&self) -> u64 {
        self.engine.bytes_read_back()
    }

    /// Evaluates a batch already on the GPU. The config is checked on the host and the
    /// input values on the GPU (the validate stage, `shaders/validate.wgsl`, in the same
    /// submit: only its first finding, a few words, comes back with the sums). With
    /// `request.gradients` the gradients are left in the batch's gradient buffers and only
    /// read back with `request.read_gradients`; after an error they hold no meaningful
    /// values.
    ///
    /// # Errors
    /// [`Error::Config`] for a config that cannot work or disagrees with C;
    /// [`Error::Input`] for an input value the loss cannot take, naming the tensor, image
    /// and index as the host's scan ([`Batch::check`]) would; [`Error::Numerical`] for a
    /// non-finite loss term; [`Error::Gpu`] on out-of-memory, device loss or a validation
    /// error.
    pub fn evaluate_resident(
        &mut self,
        batch: &GpuBatch,
        config: &LossConfig,
        request: GpuRequest,
    ) -> Result<Evaluation> {
        batch.shape().check_config(config)?;
        if (request.gradients || request.read_gradients) && batch.terms_only() {
            return Err(Error::Shape {
                tensor: "grad_student_conf",
                problem: "the batch was wrapped for terms only (GpuBackend::wrap_terms); \
                          rebind it with gradient slices to evaluate gradients"
                    .into(),
            });
        }
        if request.read_gradients {
            for (tensor, slice) in [
                ("grad_student_conf", &batch.gradients.student_conf),
                ("grad_student_loc", &batch.gradients.student_loc),
            ] {
                if !slice.buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
                    return Err(Error::Shape {
                        tensor,
                        problem: "GPU buffer without COPY_SRC usage, so the gradients \
                                  cannot be read back"
                            .into(),
                    });
                }
            }
        }
        let recording = self.record(batch.shape(), config, request, true)?;
        self.execute(batch, config, &recording)
    }

    /// The recording of one evaluation of a batch of `shape`, validating its values on the
    /// GPU with `validate`.
    fn record(
        &self,
        shape: BatchShape,
        config: &LossConfig,
        request: GpuRequest,
        validate: bool,
    ) -> Result<Recording> {
        let wanted = Wanted {
            validate,
            gradients: request.gradients,
            read_gradients: request.read_gradients,
            decisions: request.decisions,
        };
        Recording::evaluation(
            &shape,
            config,
            &self.engine.limits(self.binding_cap),
            wanted,
        )
    }

    fn execute(
        &mut self,
        batch: &GpuBatch,
        config: &LossConfig,
        recording: &Recording,
    ) -> Result<Evaluation> {
        let output = self
            .engine
            .execute(batch, recording, |bytes| recording.decode(bytes))?;
        if let Some(finding) = output.finding.as_ref().and_then(GpuFinding::finding) {
            let classes = u32::try_from(batch.shape().classes).unwrap_or(u32::MAX);
            return Err(match finding.error(classes) {
                Some(input) => Error::Input(input),
                None => Error::Gpu(format!("the validate stage reported {finding:?}")),
            });
        }
        let sums = LossSums::from(output.sums);
        let evaluation = Evaluation {
            terms: sums.finish(config),
            sums,
            gradients: output.gradients,
            decisions: output.decisions,
        };
        evaluation.check_terms_finite()?;
        Ok(evaluation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's bind groups are released when it is dropped: after many batches, each
    /// evaluated and dropped, at most the live ones keep a set.
    #[test]
    fn dropped_batches_release_their_bind_groups() {
        let mut gpu = match GpuBackend::new() {
            Ok(gpu) => gpu,
            Err(Error::NoAdapter(why)) => {
                eprintln!("skipped: no GPU adapter ({why})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let shape = BatchShape {
            batch: 1,
            priors: 4,
            classes: 3,
            objects: 1,
        };
        let config = LossConfig::DEFAULT;
        // Valid values (zero priors would be refused): logits and offsets 0, one padding row.
        let owned = crate::batch::OwnedBatch::new(
            shape,
            vec![0.0; 16],
            vec![0.0; 12],
            vec![0.0; 16],
            vec![0.0; 12],
            vec![0.0, 0.0, 0.0, 0.0, -1.0],
            [0.5, 0.5, 0.2, 0.2].repeat(4),
        )
        .unwrap();
        let new_batch = |gpu: &mut GpuBackend| gpu.upload(&owned.batch()).unwrap();
        let kept = new_batch(&mut gpu);
        gpu.evaluate_resident(&kept, &config, GpuRequest::default())
            .unwrap();
        assert_eq!(gpu.engine.live_bind_group_sets(), 1);
        for _ in 0..20 {
            let batch = new_batch(&mut gpu);
            gpu.evaluate_resident(&batch, &config, GpuRequest::default())
                .unwrap();
            assert_eq!(gpu.engine.live_bind_group_sets(), 2);
            drop(batch);
            assert_eq!(gpu.engine.live_bind_group_sets(), 1);
        }
        drop(kept);
        assert_eq!(gpu.engine.live_bind_group_sets(), 0);
    }
}
