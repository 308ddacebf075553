//! The one module that talks to wgpu: adapter and device, the pipelines (created once, one
//! per row of [`KERNELS`]), buffers (cached per shape, a few shapes within a byte budget:
//! [`CacheBudget`]) and bind groups (kept by their batch, released with it or when the
//! shape they bind is evicted), and the execution of a [`Recording`] in one command encoder
//! and one submit, returning the downloaded bytes. Everything else in `gpu/` only
//! describes what to run.

use crate::batch::{Batch, BatchShape};
use crate::error::{Error, Result};
use crate::gpu::chunks::{Chunk, Layout};
use crate::gpu::kernels::KERNELS;
use crate::gpu::params::Params;
use crate::gpu::pipeline_cache::{pipeline_cache_file, store_pipeline_cache};
use crate::gpu::recording::{DeviceLimits, Recording};
#[cfg(test)]
use crate::gpu::resident::Live;
use crate::gpu::resident::{self, Bound, GpuBatch, GpuGradients, GpuSlice, GpuTensors, SliceRules};
use crate::gpu::resources::{Owner, Resource};
use crate::gpu::shader::{kernel_bindings, stage_source, Binding};
use ssdkd_core::Stage;
use std::num::NonZeroU64;
#[cfg(test)]
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};

static NEXT_WORKSPACE_ID: AtomicU64 = AtomicU64::new(1);

/// How much the GPU backend keeps between evaluations, per batch shape (B, P, C, M): the
/// per-prior and per-image buffers the kernels work in, the readback buffer and, for
/// batches uploaded from the host ([`crate::gpu::GpuBackend::evaluate`]), the input and
/// gradient buffers. The least recently used shapes are evicted, their buffers freed and
/// the bind groups that bind them dropped (a resident batch of an evicted shape is bound
/// again on its next evaluation), until at most `shapes` shapes and `bytes` bytes are
/// kept between evaluations. The shape of the latest evaluation is always kept, even alone
/// over `bytes`. Results do not depend on what was evicted (a shape evaluated again gets
/// new buffers, as on its first evaluation; `host/tests/gpu_cache.rs` compares the bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBudget {
    /// The most shapes kept (at least 1).
    pub shapes: usize,
    /// The most bytes of buffers kept, counted as [`CacheStats::bytes`].
    pub bytes: u64,
}

impl CacheBudget {
    /// 4 shapes and 256 MiB: a training loop's full and last partial batch, for
    /// SSD300 with B = 32 (about 125 MiB per shape uploaded from the host), fit.
    pub const DEFAULT: Self = Self {
        shapes: 4,
        bytes: 256 << 20,
    };
}

impl Default for CacheBudget {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What the GPU backend's shape cache holds now ([`crate::gpu::GpuBackend::cache_stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// Shapes cached.
    pub shapes: usize,
    /// Bytes of the buffers they hold: workspaces, readback buffers, uploaded batches' inputs
    /// and gradients, and the `Params` uniforms of the bind-group sets that bind them.
    pub bytes: u64,
    /// Bind-group sets alive over the cached shapes' buffers (one per batch evaluated since
    /// it was made or rebound, while its shape stays cached).
    pub bound_sets: usize,
    /// Shapes evicted so far.
    pub evictions: u64,
    /// The budget they are kept within.
    pub budget: CacheBudget,
}

/// The bind-group slot of a batch ([`GpuBatch::bound`]), as the cache sees it: dropped with
/// the batch, emptied when the shape it binds is evicted.
type BoundSlot = Weak<Mutex<Option<Bound>>>;

/// A compiled kernel and the layout of its bind group.
struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    /// The storage buffers it binds, reflected from its WGSL.
    bindings: &'static [Binding],
}

/// What is cached for one shape: the per-prior and per-image buffers (one per
/// [`Owner::Workspace`] resource), the readback staging buffer, the batch that host
/// batches of this shape are uploaded into, and the slots of the bind-group sets made over
/// these buffers (emptied on eviction, so that no bind group keeps an evicted buffer).
struct Workspace {
    id: u64,
    shape: BatchShape,
    buffers: Vec<(Resource, wgpu::Buffer)>,
    staging: Option<wgpu::Buffer>,
    upload: Option<GpuBatch>,
    bound: Vec<BoundSlot>,
}

impl Workspace {
    fn buffer(&self, resource: Resource) -> Option<&wgpu::Buffer> {
        self.buffers
            .iter()
            .find(|(r, _)| *r == resource)
            .map(|(_, b)| b)
    }

    /// The live bind-group sets over this workspace: what each slot holds, when it is a
    /// set bound here.
    fn live_sets(&self) -> impl Iterator<Item = Arc<Mutex<Option<Bound>>>> + '_ {
        self.bound.iter().filter_map(Weak::upgrade)
    }

    /// The bytes of every buffer this shape holds (see [`CacheStats::bytes`]).
    fn bytes(&self) -> u64 {
        let own = self.buffers.iter().map(|(_, b)| b.size()).sum::<u64>();
        let staging = self.staging.as_ref().map_or(0, wgpu::Buffer::size);
        let upload = self.upload.as_ref().map_or(0, |batch| {
            let t = &batch.tensors;
            let g = &batch.gradients;
            [
                &t.student_loc,
                &t.student_conf,
                &t.teacher_loc,
                &t.teacher_conf,
                &t.targets,
                &t.priors,
                &g.student_conf,
                &g.student_loc,
            ]
            .iter()
            .map(|s| s.buffer.size())
            .sum::<u64>()
        });
        let params = self
            .live_sets()
            .map(|slot| {
                let bound = slot.lock().unwrap_or_else(|p| p.into_inner());
                bound
                    .as_ref()
                    .filter(|b| b.workspace_id == self.id)
                    .map_or(0, |b| b.params.iter().map(wgpu::Buffer::size).sum::<u64>())
            })
            .sum::<u64>();
        own + staging + upload + params
    }

    /// Drops the bind-group sets bound over this workspace (their batches bind again on
    /// their next evaluation), so that dropping the workspace frees its buffers.
    fn unbind_all(&mut self) {
        for slot in self.live_sets() {
            let mut bound = slot.lock().unwrap_or_else(|p| p.into_inner());
            if bound.as_ref().is_some_and(|b| b.workspace_id == self.id) {
                *bound = None;
            }
        }
        self.bound.clear();
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.unbind_all();
    }
}

/// Adapter, device, queue, pipelines and caches.
pub(crate) struct Engine {
    /// The adapter the device was opened on.
    info: wgpu::AdapterInfo,
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// One per row of [`KERNELS`].
    pipelines: Vec<Pipeline>,
    /// Errors reported outside any error scope, and device loss.
    failures: Arc<Mutex<Vec<String>>>,
    /// How the errors of ssdkd's own work are caught.
    catch: Catch,
    /// The shape cache, least recently used first.
    workspaces: Vec<Workspace>,
    budget: CacheBudget,
    evictions: u64,
    /// Bind-group sets alive (held by batches).
    #[cfg(test)]
    live_bound: Arc<AtomicUsize>,
    /// Bytes mapped back to the host so far.
    bytes_read_back: u64,
}

fn gpu_error(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Gpu(format!("{what}: {error}"))
}

/// The adapter: the one whose name contains `WGPU_ADAPTER_NAME` when that is set, else the
/// high-performance one; backends from `WGPU_BACKEND`.
async fn pick_adapter(instance: &wgpu::Instance) -> Result<wgpu::Adapter> {
    if let Ok(name) = std::env::var("WGPU_ADAPTER_NAME") {
        let wanted = name.to_lowercase();
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let adapters = instance.enumerate_adapters(backends).await;
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&wanted))
            .ok_or_else(|| {
                Error::NoAdapter(format!(
                    "WGPU_ADAPTER_NAME={name:?} matches none of the adapters found: {names:?}"
                ))
            });
    }
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        })
        .await
        .map_err(|e| Error::NoAdapter(e.to_string()))
}

/// A terms-only batch over `tensors` (not checked here): see [`GpuBatch::terms_only`].
fn terms_batch(shape: BatchShape, tensors: GpuTensors) -> GpuBatch {
    GpuBatch {
        shape,
        gradients: placeholder_gradients(&tensors),
        tensors,
        owns_gradients: false,
        gradients_out: None,
        terms_only: true,
        bound: Arc::new(Mutex::new(None)),
    }
}

/// The student's own slices, which a terms-only batch's gradient kernels bind but never run.
fn placeholder_gradients(tensors: &GpuTensors) -> GpuGradients {
    GpuGradients {
        student_conf: tensors.student_conf.clone(),
        student_loc: tensors.student_loc.clone(),
    }
}

impl Engine {
    /// Picks the adapter, opens a device with the adapter's own limits, and creates every
    /// pipeline (through the per-user pipeline cache where the adapter supports one). With
    /// `hardware_only`, a software adapter (wgpu `DeviceType::Cpu`, such as lavapipe) is
    /// refused with [`Error::NoAdapter`] naming it, before any shader is compiled.
    pub fn new(hardware_only: bool) -> Result<Self> {
        let instance = |backends: Option<wgpu::Backends>| {
            let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
            if let Some(backends) = backends {
                descriptor.backends = backends;
            }
            wgpu::Instance::new(descriptor)
        };
        // Without WGPU_BACKEND: Vulkan, Metal or DX12 first, GL only when none is found, so
        // that probing GL (EGL) does not run, and complain, on machines that need it not.
        let adapter = if wgpu::Backends::from_env().is_some() {
            pollster::block_on(pick_adapter(&instance(None)))?
        } else {
            pollster::block_on(pick_adapter(&instance(Some(wgpu::Backends::PRIMARY)))).or_else(
                |_| pollster::block_on(pick_adapter(&instance(Some(wgpu::Backends::GL)))),
            )?
        };
        let info = adapter.get_info();
        if hardware_only && info.device_type == wgpu::DeviceType::Cpu {
            return Err(Error::NoAdapter(format!(
                "only the software adapter {} ({:?}) was found, passed over as slower than \
                 the CPU backend",
                info.name, info.backend
            )));
        }
        let cache_file = pipeline_cache_file(&info)
            .filter(|_| adapter.features().contains(wgpu::Features::PIPELINE_CACHE));
        let features = if cache_file.is_some() {
            wgpu::Features::PIPELINE_CACHE
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ssdkd"),
            required_features: features,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| gpu_error("requesting a device", e))?;

        let failures = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&failures);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.to_string());
        }));
        let sink = Arc::clone(&failures);
        device.set_device_lost_callback(move |reason, message| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("device lost: {message}"));
            }
        });
        Self::with_device(device, queue, failures, true)
    }

    /// An engine on a device someone else opened (and owns the callbacks of): no device
    /// callbacks are installed, errors are caught by error scopes around ssdkd's own work,
    /// and the pipeline cache is used only where the device was opened with the feature.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Self::with_device(device, queue, Arc::new(Mutex::new(Vec::new())), false)
    }

    /// Creates every pipeline on `device` (through the per-user pipeline cache where the
    /// device has the feature). `failures` is where the device's callbacks, if any, report.
    fn with_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        failures: Arc<Mutex<Vec<String>>>,
        callbacks: bool,
    ) -> Result<Self> {
        let info = device.adapter_info();
        let cache_file = pipeline_cache_file(&info)
            .filter(|_| device.features().contains(wgpu::Features::PIPELINE_CACHE));
        let cached = cache_file.as_ref().and_then(|f| std::fs::read(f).ok());
        let cache = cache_file.as_ref().map(|_| {
            // SAFETY: the data was written by `PipelineCache::get_data` below (wgpu checks
            // its header against this adapter and driver; `fallback` starts an empty cache
            // on any mismatch).
            unsafe {
                device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                    label: Some("ssdkd"),
                    data: cached.as_deref(),
                    fallback: true,
                })
            }
        });
        let bindings = kernel_bindings()?;
        let catch = if callbacks {
            Catch::Sink(Arc::clone(&failures))
        } else {
            Catch::Scopes(device.clone())
        };
        let pipelines = catch
            .run(|| Ok(create_pipelines(&device, cache.as_ref(), bindings)))
            .map_err(|e| Error::Gpu(format!("creating the pipelines: {e}")))?;
        if let (Some(file), Some(data)) = (&cache_file, cache.and_then(|c| c.get_data())) {
            if cached.as_deref() != Some(&data[..]) {
                store_pipeline_cache(file, &data);
            }
        }
        let engine = Self {
            info,
            device,
            queue,
            pipelines,
            catch,
            failures,
            workspaces: Vec::new(),
            budget: CacheBudget::DEFAULT,
            evictions: 0,
            #[cfg(test)]
            live_bound: Arc::new(AtomicUsize::new(0)),
            bytes_read_back: 0,
        };
        engine.check_failures()?;
        Ok(engine)
    }

    /// The adapter's name.
    pub fn adapter_name(&self) -> String {
        self.info.name.clone()
    }

    /// Bytes mapped back to the host by every evaluation so far.
    pub fn bytes_read_back(&self) -> u64 {
        self.bytes_read_back
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// What the plan needs of the device's limits, the binding size capped at `cap`.
    pub fn limits(&self, cap: Option<u64>) -> DeviceLimits {
        let limits = self.device.limits();
        // Element indices in the kernels are u32: keep windows under 2 GiB.
        let binding = limits.max_storage_buffer_binding_size.min(1 << 31);
        DeviceLimits {
            binding_limit: cap.map_or(binding, |cap| cap.min(binding)),
            alignment: u64::from(limits.min_storage_buffer_offset_alignment),
            max_workgroups: limits.max_compute_workgroups_per_dimension,
        }
    }

    /// Bind-group sets alive (each held by a batch, released when it is dropped).
    #[cfg(test)]
    pub fn live_bind_group_sets(&self) -> usize {
        self.live_bound.load(Ordering::Relaxed)
    }

    fn check_failures(&self) -> Result<()> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.is_empty() {
            Ok(())
        } else {
            let message = failures.join("; ");
            failures.clear();
            Err(Error::Gpu(message))
        }
    }

    /// Runs `f`, turning the errors it causes (see [`Catch`]), or any uncaptured error or
    /// device loss reported meanwhile, into [`Error::Gpu`].
    fn guarded<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_failures()?;
        let result = self.catch.run(f).map_err(|e| match e {
            Error::Gpu(message) => Error::Gpu(format!("{what}: {message}")),
            other => other,
        });
        self.check_failures()?;
        result
    }

    fn buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(4),
            usage,
            mapped_at_creation: false,
        })
    }

    fn check_buffer_size(&self, tensor: &'static str, bytes: u64) -> Result<()> {
        let max = self.device.limits().max_buffer_size;
        if bytes > max {
            return Err(Error::GpuUnsupported(format!(
                "tensor `{tensor}` takes {bytes} bytes, over the adapter's max_buffer_size of {max}"
            )));
        }
        Ok(())
    }

    /// What a slice must satisfy on this device.
    fn slice_rules(&self) -> SliceRules {
        SliceRules {
            alignment: u64::from(self.device.limits().min_storage_buffer_offset_alignment),
        }
    }

    /// New input and gradient buffers for a batch of `shape` (contents undefined until
    /// written with [`Engine::write_batch`]).
    pub fn create_batch(&self, shape: BatchShape) -> Result<GpuBatch> {
        let conf = Layout::Conf.image_bytes(&shape) * shape.batch as u64;
        let loc = Layout::Loc.image_bytes(&shape) * shape.batch as u64;
        self.check_buffer_size("student_conf", conf)?;
        self.check_buffer_size("student_loc", loc)?;
        let input = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let whole = |label, bytes| GpuSlice::whole(self.buffer(label, bytes, input));
        self.guarded("allocating the batch", || {
            let tensors = GpuTensors {
                student_loc: whole("ssdkd.student_loc", loc),
                student_conf: whole("ssdkd.student_conf", conf),
                teacher_loc: whole("ssdkd.teacher_loc", loc),
                teacher_conf: whole("ssdkd.teacher_conf", conf),
                targets: whole(
                    "ssdkd.targets",
                    Layout::Target.image_bytes(&shape) * shape.batch as u64,
                ),
                priors: whole("ssdkd.priors", shape.priors as u64 * 16),
            };
            Ok(GpuBatch {
                shape,
                tensors,
                gradients: self.gradient_buffers(shape),
                owns_gradients: true,
                gradients_out: None,
                terms_only: false,
                bound: Arc::new(Mutex::new(None)),
            })
        })
    }

    /// ssdkd's own gradient buffers for `shape`.
    fn gradient_buffers(&self, shape: BatchShape) -> GpuGradients {
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let b = shape.batch as u64;
        GpuGradients {
            student_conf: GpuSlice::whole(self.buffer(
                "ssdkd.grad_student_conf",
                Layout::Conf.image_bytes(&shape) * b,
                usage,
            )),
            student_loc: GpuSlice::whole(self.buffer(
                "ssdkd.grad_student_loc",
                Layout::Loc.image_bytes(&shape) * b,
                usage,
            )),
        }
    }

    /// A batch over the caller's slices, checked for alignment, size and usage. The
    /// gradients go to `gradients` when given (through ssdkd's own buffers and a copy on
    /// the device when they share a buffer with an input), else to buffers allocated here.
    pub fn wrap_batch(
        &self,
        shape: BatchShape,
        tensors: GpuTensors,
        gradients: Option<GpuGradients>,
    ) -> Result<GpuBatch> {
        // `rebind` checks the slices.
        let mut batch = terms_batch(shape, tensors.clone());
        self.rebind(&mut batch, tensors, Some(gradients))?;
        Ok(batch)
    }

    /// A batch over the caller's slices for evaluations without gradients: no gradient
    /// buffer is allocated (see [`GpuBatch::terms_only`]).
    pub fn wrap_terms_batch(&self, shape: BatchShape, tensors: GpuTensors) -> Result<GpuBatch> {
        resident::check_tensors(self.slice_rules(), &shape, &tensors)?;
        Ok(terms_batch(shape, tensors))
    }

    /// Points `batch` at new slices of the same shape and drops its bind groups. With
    /// `gradients` `None` its gradients keep going where they went (checked again against
    /// the new inputs; a terms-only batch stays one); `Some(None)` sends them to ssdkd's
    /// own buffers.
    pub fn rebind(
        &self,
        batch: &mut GpuBatch,
        tensors: GpuTensors,
        gradients: Option<Option<GpuGradients>>,
    ) -> Result<()> {
        let rules = self.slice_rules();
        let shape = batch.shape;
        resident::check_tensors(rules, &shape, &tensors)?;
        if batch.terms_only && gradients.is_none() {
            batch.gradients = placeholder_gradients(&tensors);
            batch.tensors = tensors;
            *batch.bound.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(());
        }
        let caller = match gradients {
            Some(given) => given,
            None if batch.owns_gradients => batch.gradients_out.clone(),
            None => Some(batch.gradients.clone()),
        };
        let shared = match &caller {
            Some(caller) => resident::check_gradients(rules, &shape, &tensors, caller)?,
            None => false,
        };
        let owns = caller.is_none() || shared;
        let (written, out) = match caller {
            Some(caller) if !shared => (caller, None),
            caller => {
                let own = if batch.owns_gradients {
                    batch.gradients.clone()
                } else {
                    self.guarded("allocating the gradient buffers", || {
                        Ok(self.gradient_buffers(shape))
                    })?
                };
                (own, caller)
            }
        };
        batch.owns_gradients = owns;
        batch.terms_only = false;
        batch.tensors = tensors;
        batch.gradients = written;
        batch.gradients_out = out;
        *batch.bound.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Copies `batch`'s tensors into `gpu`'s buffers (the shapes must agree; the caller checks).
    pub fn write_batch(&self, gpu: &GpuBatch, batch: &Batch<'_>) -> Result<()> {
        self.guarded("uploading the batch", || {
            let t = &gpu.tensors;
            for (slice, data) in [
                (&t.student_loc, batch.student_loc()),
                (&t.student_conf, batch.student_conf()),
                (&t.teacher_loc, batch.teacher_loc()),
                (&t.teacher_conf, batch.teacher_conf()),
                (&t.targets, batch.targets()),
                (&t.priors, batch.priors()),
            ] {
                self.queue
                    .write_buffer(&slice.buffer, slice.offset, bytemuck::cast_slice(data));
            }
            Ok(())
        })
    }

    fn create_workspace(&self, shape: BatchShape) -> Workspace {
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        Workspace {
            id: NEXT_WORKSPACE_ID.fetch_add(1, Ordering::Relaxed),
            shape,
            buffers: Resource::ALL
                .into_iter()
                .filter(|r| r.owner() == Owner::Workspace)
                .map(|r| {
                    let label = format!("ssdkd.{}", r.name());
                    (r, self.buffer(&label, r.bytes(&shape), usage))
                })
                .collect(),
            staging: None,
            upload: None,
            bound: Vec::new(),
        }
    }

    /// The cached workspace of `shape` (created when new), moved to the back (most
    /// recently used), the others evicted down to the budget.
    fn workspace(&mut self, shape: BatchShape) -> usize {
        if let Some(i) = self.workspaces.iter().position(|w| w.shape == shape) {
            let workspace = self.workspaces.remove(i);
            self.workspaces.push(workspace);
        } else {
            // Evict down to one shape short of the budget first, so that the old buffers
            // are freed before the new ones are allocated.
            self.evict_to(self.budget.shapes.saturating_sub(1), self.budget.bytes, 0);
            let workspace = self.create_workspace(shape);
            self.workspaces.push(workspace);
        }
        self.trim();
        self.workspaces.len() - 1
    }

    /// Evicts the least recently used shapes, never the latest `keep`, until at most
    /// `shapes` are kept and they hold at most `bytes`.
    fn evict_to(&mut self, shapes: usize, bytes: u64, keep: usize) {
        let mut held: u64 = self.workspaces.iter().map(Workspace::bytes).sum();
        while self.workspaces.len() > keep && (self.workspaces.len() > shapes || held > bytes) {
            let evicted = self.workspaces.remove(0);
            held = held.saturating_sub(evicted.bytes());
            self.evictions += 1;
            drop(evicted); // its bind-group sets emptied, its buffers freed
        }
    }

    /// Evicts down to the budget, keeping the latest shape.
    fn trim(&mut self) {
        self.evict_to(self.budget.shapes, self.budget.bytes, 1);
    }

    /// Sets the cache's budget, evicting what is over it now.
    pub fn set_cache_budget(&mut self, budget: CacheBudget) {
        self.budget = budget;
        self.trim();
    }

    /// What the shape cache holds now.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            shapes: self.workspaces.len(),
            bytes: self.workspaces.iter().map(Workspace::bytes).sum(),
            bound_sets: self
                .workspaces
                .iter()
                .map(|w| {
                    w.live_sets()
                        .filter(|slot| {
                            let bound = slot.lock().unwrap_or_else(|p| p.into_inner());
                            bound.as_ref().is_some_and(|b| b.workspace_id == w.id)
                        })
                        .count()
                })
                .sum(),
            evictions: self.evictions,
            budget: self.budget,
        }
    }

    /// The batch host batches of `shape` are uploaded into: the cached one (taken out of
    /// the cache while it is used; give it back with [`Engine::keep_upload`]), else a new
    /// one.
    pub fn take_upload(&mut self, shape: BatchShape) -> Result<GpuBatch> {
        let cached = self
            .workspaces
            .iter_mut()
            .find(|w| w.shape == shape)
            .and_then(|w| w.upload.take());
        match cached {
            Some(batch) => Ok(batch),
            None => self.create_batch(shape),
        }
    }

    /// Caches `batch`, taken by [`Engine::take_upload`], with its shape's workspace; drops
    /// it (freeing its buffers) when that shape is no longer cached.
    pub fn keep_upload(&mut self, batch: GpuBatch) {
        if let Some(workspace) = self.workspaces.iter_mut().find(|w| w.shape == batch.shape) {
            workspace.upload = Some(batch);
            self.trim();
        }
    }

    /// Executes `recording` over `batch`: binds it (bind groups kept by the batch), uploads
    /// the chunks' `Params`, records every dispatch in one command encoder, copies the
    /// downloads one after another into the staging buffer, submits once, and hands the
    /// mapped bytes to `decode`.
    pub fn execute<T>(
        &mut self,
        batch: &GpuBatch,
        recording: &Recording,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        self.check_failures()?;
        let catch = self.catch.clone();
        let index = catch.run(|| Ok(self.workspace(batch.shape)))?;
        let result = catch.run(|| self.record_and_read(index, batch, recording, decode));
        if result.is_err() {
            // A failed run may have left the workspace half-made; start afresh next time.
            self.workspaces.remove(index);
        }
        let output = result.map_err(|e| match e {
            Error::Gpu(message) => Error::Gpu(format!("evaluating on the GPU: {message}")),
            other => other,
        });
        self.check_failures()?;
        output
    }

    fn record_and_read<T>(
        &mut self,
        index: usize,
        batch: &GpuBatch,
        recording: &Recording,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let Self {
            device,
            queue,
            pipelines,
            workspaces,
            #[cfg(test)]
            live_bound,
            bytes_read_back,
            ..
        } = self;
        let workspace = &mut workspaces[index];
        let mut bound = batch.bound.lock().unwrap_or_else(|p| p.into_inner());
        if bound
            .as_ref()
            .is_none_or(|b| b.workspace_id != workspace.id || b.chunks != recording.chunks)
        {
            *bound = None; // release the old set first
            let made = bind(device, pipelines, workspace, batch, &recording.chunks);
            workspace.bound.retain(|slot| slot.strong_count() > 0);
            let slot = Arc::downgrade(&batch.bound);
            if !workspace.bound.iter().any(|s| s.ptr_eq(&slot)) {
                workspace.bound.push(slot);
            }
            #[cfg(test)]
            let made = Bound {
                _live: Some(Live::new(live_bound)),
                ..made
            };
            *bound = Some(made);
        }
        let bound = bound.as_ref().expect("bound just made");
        for (buffer, params) in bound.params.iter().zip(&recording.uploads) {
            queue.write_buffer(buffer, 0, bytemuck::bytes_of(params));
        }

        let total = recording.download_bytes();
        if workspace.staging.as_ref().is_none_or(|s| s.size() < total) {
            workspace.staging = Some(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("ssdkd.staging"),
                size: total,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let staging = workspace
            .staging
            .as_ref()
            .expect("staging buffer just made");

        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("ssdkd.evaluate"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("ssdkd.evaluate"),
                timestamp_writes: None,
            });
            for dispatch in &recording.dispatches {
                let [x, y, z] = dispatch.workgroups;
                pass.set_pipeline(&pipelines[dispatch.kernel].pipeline);
                pass.set_bind_group(0, &bound.groups[dispatch.chunk][dispatch.kernel], &[]);
                pass.dispatch_workgroups(x, y, z);
            }
        }
        if recording.writes_gradients() {
            if let Some(out) = &batch.gradients_out {
                let own = &batch.gradients;
                let b = batch.shape.batch as u64;
                for (from, to, bytes) in [
                    (
                        &own.student_conf,
                        &out.student_conf,
                        Layout::Conf.image_bytes(&batch.shape) * b,
                    ),
                    (
                        &own.student_loc,
                        &out.student_loc,
                        Layout::Loc.image_bytes(&batch.shape) * b,
                    ),
                ] {
                    encoder.copy_buffer_to_buffer(
                        &from.buffer,
                        from.offset,
                        &to.buffer,
                        to.offset,
                        bytes,
                    );
                }
            }
        }
        let mut offset = 0;
        for download in &recording.downloads {
            let resource = download.resource();
            let (source, source_offset) = match batch.slice(resource) {
                Some(slice) => (&slice.buffer, slice.offset),
                None => (
                    workspace
                        .buffer(resource)
                        .ok_or_else(|| Error::Gpu(format!("no buffer for {}", resource.name())))?,
                    0,
                ),
            };
            encoder.copy_buffer_to_buffer(source, source_offset, staging, offset, download.bytes);
            offset += download.bytes;
        }
        queue.submit([encoder.finish()]);
        *bytes_read_back += total;

        let slice = staging.slice(..total);
        let (sender, receiver) = mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |result| {
            let _ = sender.send(result);
        });
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| gpu_error("waiting for the GPU", e))?;
        receiver
            .recv()
            .map_err(|e| gpu_error("reading back", e))?
            .map_err(|e| gpu_error("mapping the readback buffer", e))?;
        let output = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| gpu_error("reading the readback buffer", e))?;
            decode(&view)
        };
        staging.unmap();
        Ok(output)
    }
}

/// How the engine catches the wgpu errors of its own work.
#[derive(Clone)]
enum Catch {
    /// Out-of-memory, validation and internal error scopes, on a device whose callbacks
    /// belong to someone else ([`Engine::from_device`]). wgpu keeps a scope stack for every
    /// thread that ever pushed one, for the device's lifetime (a few hundred bytes each), so
    /// this suits a framework's long-lived threads, not a new thread per evaluation.
    Scopes(wgpu::Device),
    /// The uncaptured-error callback ssdkd installed on its own device ([`Engine::new`]),
    /// which wgpu calls as the error happens, on the calling thread: no state per thread,
    /// so that callers evaluating from a new thread each time (the Python package) do not
    /// grow the device's memory.
    Sink(Arc<Mutex<Vec<String>>>),
}

impl Catch {
    /// Runs `f`; the errors wgpu reports meanwhile become [`Error::Gpu`].
    fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let (result, caught) = match self {
            Catch::Scopes(device) => {
                let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
                let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
                let result = f();
                let caught = [internal.pop(), validation.pop(), out_of_memory.pop()]
                    .into_iter()
                    .filter_map(pollster::block_on)
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>();
                (result, caught)
            }
            Catch::Sink(sink) => {
                let result = f();
                let caught = std::mem::take(&mut *sink.lock().unwrap_or_else(|p| p.into_inner()));
                (result, caught)
            }
        };
        if caught.is_empty() {
            result
        } else {
            Err(Error::Gpu(caught.join("; ")))
        }
    }
}

fn create_pipelines(
    device: &wgpu::Device,
    cache: Option<&wgpu::PipelineCache>,
    bindings: &'static [Vec<Binding>],
) -> Vec<Pipeline> {
    let modules: Vec<(Stage, wgpu::ShaderModule)> = Stage::ALL
        .into_iter()
        .map(|stage| {
            let label = format!("ssdkd.{}", stage.name());
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(stage_source(stage).into()),
            });
            (stage, module)
        })
        .collect();
    KERNELS
        .iter()
        .zip(bindings)
        .map(|(kernel, bindings)| {
            let label = kernel.label();
            let module = &modules
                .iter()
                .find(|(stage, _)| *stage == kernel.stage)
                .expect("a module per stage")
                .1;
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: NonZeroU64::new(std::mem::size_of::<Params>() as u64),
                },
                count: None,
            }];
            entries.extend(bindings.iter().map(|b| wgpu::BindGroupLayoutEntry {
                binding: b.binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: !b.writes,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }));
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&label),
                entries: &entries,
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&label),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&pipeline_layout),
                module,
                entry_point: Some(kernel.entry_point),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache,
            });
            Pipeline {
                pipeline,
                layout,
                bindings,
            }
        })
        .collect()
}

/// The bind groups of `batch` bound as `chunks` over `workspace`, with a `Params` uniform
/// per chunk.
fn bind(
    device: &wgpu::Device,
    pipelines: &[Pipeline],
    workspace: &Workspace,
    batch: &GpuBatch,
    chunks: &[Chunk],
) -> Bound {
    let params: Vec<wgpu::Buffer> = chunks
        .iter()
        .map(|_| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("ssdkd.params"),
                size: std::mem::size_of::<Params>() as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
        .collect();
    let groups = chunks
        .iter()
        .zip(&params)
        .map(|(chunk, params)| {
            KERNELS
                .iter()
                .zip(pipelines)
                .map(|(kernel, pipeline)| {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: params.as_entire_binding(),
                    }];
                    for b in pipeline.bindings {
                        // A caller's slice starts at its base offset (aligned, as every
                        // window offset is); ssdkd's own buffers at 0.
                        let (buffer, base) = match batch.slice(b.resource) {
                            Some(slice) => (&slice.buffer, slice.offset),
                            None => (
                                workspace
                                    .buffer(b.resource)
                                    .expect("every resource has a buffer"),
                                0,
                            ),
                        };
                        let (offset, size) = match b.resource.layout() {
                            Some(layout) => {
                                let window = chunk.window(layout);
                                (base + window.offset, window.size)
                            }
                            None => (base, b.resource.bytes(&batch.shape).max(4)),
                        };
                        entries.push(wgpu::BindGroupEntry {
                            binding: b.binding,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer,
                                offset,
                                size: NonZeroU64::new(size),
                            }),
                        });
                    }
                    device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(&kernel.label()),
                        layout: &pipeline.layout,
                        entries: &entries,
                    })
                })
                .collect()
        })
        .collect();
    Bound {
        workspace_id: workspace.id,
        chunks: chunks.to_vec(),
        params,
        groups,
        #[cfg(test)]
        _live: None,
    }
}
