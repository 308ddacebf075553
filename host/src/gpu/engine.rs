//! The one module that talks to wgpu: adapter and device, the pipelines (created once),
//! buffers and bind groups (cached per shape and per batch), and the execution of a
//! [`Recording`] in one command encoder and one submit. Everything else in `gpu/` only
//! describes what to run.

use crate::batch::{Batch, BatchShape, Decisions, Gradients};
use crate::error::{Error, Result};
use crate::gpu::params::{GpuSums, Params};
use crate::gpu::plan::{Chunk, Kernel, Layout, Recording, Resource};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// A stage's WGSL: the shared include, any further includes, then the stage's own file.
macro_rules! stage_source {
    ($($file:literal),+) => {
        concat!(
            include_str!("../../../shaders/shared.wgsl"),
            $(include_str!(concat!("../../../shaders/", $file))),+
        )
    };
}

/// The WGSL of a stage (`shaders/<stage>.wgsl` after `shaders/shared.wgsl`, and after
/// `shaders/logits.wgsl` for the stages that read the logits).
pub(crate) fn stage_source(stage: &str) -> &'static str {
    match stage {
        "match" => stage_source!("match.wgsl"),
        "prior_terms" => stage_source!("logits.wgsl", "prior_terms.wgsl"),
        "mine" => stage_source!("mine.wgsl"),
        "reduce" => stage_source!("logits.wgsl", "reduce.wgsl"),
        "grad" => stage_source!("logits.wgsl", "grad.wgsl"),
        other => unreachable!("no stage {other}"),
    }
}

/// Workspaces (per-prior buffers) kept for this many recent shapes.
const WORKSPACES_KEPT: usize = 2;
/// Bind-group sets kept per workspace (one per recent batch).
const BINDINGS_KEPT: usize = 4;

static NEXT_BATCH_ID: AtomicU64 = AtomicU64::new(1);

/// The input tensors of a batch (SPEC §1) in the caller's GPU buffers, each starting at
/// offset 0 of its buffer, laid out like [`Batch`]'s slices, and created with
/// `wgpu::BufferUsages::STORAGE` on the backend's device ([`crate::gpu::GpuBackend::device`]).
#[derive(Clone, Debug)]
pub struct GpuTensors {
    /// `[B, P, 4]` f32.
    pub student_loc: wgpu::Buffer,
    /// `[B, P, C]` f32.
    pub student_conf: wgpu::Buffer,
    /// `[B, P, 4]` f32.
    pub teacher_loc: wgpu::Buffer,
    /// `[B, P, C]` f32.
    pub teacher_conf: wgpu::Buffer,
    /// `[B, M, 5]` f32.
    pub targets: wgpu::Buffer,
    /// `[P, 4]` f32.
    pub priors: wgpu::Buffer,
}

/// A batch resident on the GPU: its input tensors and the buffers its gradients are
/// written to. Evaluate it with [`crate::gpu::GpuBackend::evaluate_resident`]; bind groups
/// are cached per `GpuBatch`, so keep it and rewrite its buffers rather than making a new one.
#[derive(Debug)]
pub struct GpuBatch {
    id: u64,
    shape: BatchShape,
    tensors: GpuTensors,
    grad_student_conf: wgpu::Buffer,
    grad_student_loc: wgpu::Buffer,
}

impl GpuBatch {
    /// The dimensions.
    #[must_use]
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// The input buffers.
    #[must_use]
    pub fn tensors(&self) -> &GpuTensors {
        &self.tensors
    }

    /// `[B, P, C]` f32 ∂total/∂student_conf, written by an evaluation that computes
    /// gradients (`STORAGE | COPY_SRC`).
    #[must_use]
    pub fn grad_student_conf(&self) -> &wgpu::Buffer {
        &self.grad_student_conf
    }

    /// `[B, P, 4]` f32 ∂total/∂student_loc, written by an evaluation that computes
    /// gradients (`STORAGE | COPY_SRC`).
    #[must_use]
    pub fn grad_student_loc(&self) -> &wgpu::Buffer {
        &self.grad_student_loc
    }
}

/// What an evaluation brings back to the host.
#[derive(Debug)]
pub(crate) struct Output {
    pub sums: GpuSums,
    pub gradients: Option<Gradients>,
    pub decisions: Option<Decisions>,
}

/// A compiled kernel and the layout of its bind group.
struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Every pipeline, named like the stages' entry points (`match` and `reduce` have three,
/// `grad` two).
struct Pipelines {
    match_priors: Pipeline,
    match_objects: Pipeline,
    match_finish: Pipeline,
    prior_terms: Pipeline,
    mine: Pipeline,
    reduce_rows: Pipeline,
    reduce_image: Pipeline,
    reduce_batch: Pipeline,
    grad_conf: Pipeline,
    grad_loc: Pipeline,
}

impl Pipelines {
    fn get(&self, kernel: Kernel) -> &Pipeline {
        match kernel {
            Kernel::MatchPriors => &self.match_priors,
            Kernel::MatchObjects => &self.match_objects,
            Kernel::MatchFinish => &self.match_finish,
            Kernel::PriorTerms => &self.prior_terms,
            Kernel::Mine => &self.mine,
            Kernel::ReduceRows => &self.reduce_rows,
            Kernel::ReduceImage => &self.reduce_image,
            Kernel::ReduceBatch => &self.reduce_batch,
            Kernel::GradConf => &self.grad_conf,
            Kernel::GradLoc => &self.grad_loc,
        }
    }
}

/// The bind groups of one batch split into chunks: per chunk, its `Params` uniform and
/// one bind group per kernel (in [`Kernel::ALL`] order).
struct Bound {
    batch_id: u64,
    chunks: Vec<Chunk>,
    params: Vec<wgpu::Buffer>,
    groups: Vec<Vec<wgpu::BindGroup>>,
}

/// The per-prior and per-image buffers of one shape, the readback staging buffer, and
/// the bind groups of the batches evaluated with them.
struct Workspace {
    shape: BatchShape,
    conf_target: wgpu::Buffer,
    loc_target: wgpu::Buffer,
    neg_mask: wgpu::Buffer,
    mining_score: wgpu::Buffer,
    prior_loss: wgpu::Buffer,
    row_soft: wgpu::Buffer,
    image_sums: wgpu::Buffer,
    batch_sums: wgpu::Buffer,
    staging: Option<wgpu::Buffer>,
    bound: Vec<Bound>,
}

/// Adapter, device, queue, pipelines and caches.
pub(crate) struct Engine {
    adapter: wgpu::Adapter,
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipelines: Pipelines,
    /// Errors reported outside any error scope, and device loss.
    failures: Arc<Mutex<Vec<String>>>,
    workspaces: Vec<Workspace>,
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

impl Engine {
    /// Picks the adapter, opens a device with the adapter's own limits, and creates every
    /// pipeline.
    pub fn new() -> Result<Self> {
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
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ssdkd"),
            required_features: wgpu::Features::empty(),
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

        let pipelines = scoped(&device, || Ok(create_pipelines(&device)))
            .map_err(|e| Error::Gpu(format!("creating the pipelines: {e}")))?;
        let engine = Self {
            adapter,
            device,
            queue,
            pipelines,
            failures,
            workspaces: Vec::new(),
        };
        engine.check_failures()?;
        Ok(engine)
    }

    /// The adapter's name.
    pub fn adapter_name(&self) -> String {
        self.adapter.get_info().name
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// `(max_storage_buffer_binding_size, min_storage_buffer_offset_alignment,
    /// max_buffer_size)` of the device.
    pub fn binding_limits(&self) -> (u64, u64, u64) {
        let limits = self.device.limits();
        (
            limits.max_storage_buffer_binding_size,
            u64::from(limits.min_storage_buffer_offset_alignment),
            limits.max_buffer_size,
        )
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

    /// Runs `f` inside error scopes, turning what they catch, or any uncaptured error or
    /// device loss reported meanwhile, into [`Error::Gpu`].
    fn guarded<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_failures()?;
        let result = scoped(&self.device, f).map_err(|e| match e {
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
            return Err(Error::Gpu(format!(
                "tensor `{tensor}` takes {bytes} bytes, over the adapter's max_buffer_size of {max}"
            )));
        }
        Ok(())
    }

    /// New input and gradient buffers for a batch of `shape` (contents undefined until
    /// written with [`Engine::write_batch`]).
    pub fn create_batch(&self, shape: BatchShape) -> Result<GpuBatch> {
        let conf = Layout::Conf.image_bytes(&shape) * shape.batch as u64;
        let loc = Layout::Loc.image_bytes(&shape) * shape.batch as u64;
        self.check_buffer_size("student_conf", conf)?;
        self.check_buffer_size("student_loc", loc)?;
        let input = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        self.guarded("allocating the batch", || {
            let tensors = GpuTensors {
                student_loc: self.buffer("ssdkd.student_loc", loc, input),
                student_conf: self.buffer("ssdkd.student_conf", conf, input),
                teacher_loc: self.buffer("ssdkd.teacher_loc", loc, input),
                teacher_conf: self.buffer("ssdkd.teacher_conf", conf, input),
                targets: self.buffer(
                    "ssdkd.targets",
                    Layout::Target.image_bytes(&shape) * shape.batch as u64,
                    input,
                ),
                priors: self.buffer("ssdkd.priors", shape.priors as u64 * 16, input),
            };
            Ok(self.with_gradient_buffers(shape, tensors))
        })
    }

    fn with_gradient_buffers(&self, shape: BatchShape, tensors: GpuTensors) -> GpuBatch {
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        GpuBatch {
            id: NEXT_BATCH_ID.fetch_add(1, Ordering::Relaxed),
            shape,
            tensors,
            grad_student_conf: self.buffer(
                "ssdkd.grad_student_conf",
                Layout::Conf.image_bytes(&shape) * shape.batch as u64,
                usage,
            ),
            grad_student_loc: self.buffer(
                "ssdkd.grad_student_loc",
                Layout::Loc.image_bytes(&shape) * shape.batch as u64,
                usage,
            ),
        }
    }

    /// A batch over the caller's buffers, checked for size and usage; gradient buffers are
    /// allocated for it.
    pub fn wrap_batch(&self, shape: BatchShape, tensors: GpuTensors) -> Result<GpuBatch> {
        let b = shape.batch as u64;
        let checks: [(&'static str, &wgpu::Buffer, u64); 6] = [
            (
                "student_loc",
                &tensors.student_loc,
                Layout::Loc.image_bytes(&shape) * b,
            ),
            (
                "student_conf",
                &tensors.student_conf,
                Layout::Conf.image_bytes(&shape) * b,
            ),
            (
                "teacher_loc",
                &tensors.teacher_loc,
                Layout::Loc.image_bytes(&shape) * b,
            ),
            (
                "teacher_conf",
                &tensors.teacher_conf,
                Layout::Conf.image_bytes(&shape) * b,
            ),
            (
                "targets",
                &tensors.targets,
                Layout::Target.image_bytes(&shape) * b,
            ),
            ("priors", &tensors.priors, shape.priors as u64 * 16),
        ];
        for (tensor, buffer, needed) in checks {
            if buffer.size() < needed {
                return Err(Error::Shape {
                    tensor,
                    problem: format!(
                        "GPU buffer of {} bytes where the shape needs {needed}",
                        buffer.size()
                    ),
                });
            }
            if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::Shape {
                    tensor,
                    problem: "GPU buffer without STORAGE usage".into(),
                });
            }
        }
        self.guarded("allocating the gradient buffers", || {
            Ok(self.with_gradient_buffers(shape, tensors))
        })
    }

    /// Copies `batch`'s tensors into `gpu`'s buffers (the shapes must agree; the caller checks).
    pub fn write_batch(&self, gpu: &GpuBatch, batch: &Batch<'_>) -> Result<()> {
        self.guarded("uploading the batch", || {
            let t = &gpu.tensors;
            for (buffer, data) in [
                (&t.student_loc, batch.student_loc()),
                (&t.student_conf, batch.student_conf()),
                (&t.teacher_loc, batch.teacher_loc()),
                (&t.teacher_conf, batch.teacher_conf()),
                (&t.targets, batch.targets()),
                (&t.priors, batch.priors()),
            ] {
                self.queue
                    .write_buffer(buffer, 0, bytemuck::cast_slice(data));
            }
            Ok(())
        })
    }

    fn create_workspace(&self, shape: BatchShape) -> Workspace {
        let b = shape.batch as u64;
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let prior = Layout::Prior.image_bytes(&shape) * b;
        let loc = Layout::Loc.image_bytes(&shape) * b;
        let sums = std::mem::size_of::<GpuSums>() as u64;
        Workspace {
            shape,
            conf_target: self.buffer("ssdkd.conf_target", prior, usage),
            loc_target: self.buffer("ssdkd.loc_target", loc, usage),
            neg_mask: self.buffer("ssdkd.neg_mask", prior, usage),
            mining_score: self.buffer("ssdkd.mining_score", prior, usage),
            prior_loss: self.buffer("ssdkd.prior_loss", loc, usage),
            row_soft: self.buffer("ssdkd.row_soft", prior, usage),
            image_sums: self.buffer("ssdkd.image_sums", sums * b, usage),
            batch_sums: self.buffer("ssdkd.batch_sums", sums, usage),
            staging: None,
            bound: Vec::new(),
        }
    }

    /// The cached workspace of `shape` (created when new), moved to the back.
    fn workspace(&mut self, shape: BatchShape) -> usize {
        if let Some(i) = self.workspaces.iter().position(|w| w.shape == shape) {
            let workspace = self.workspaces.remove(i);
            self.workspaces.push(workspace);
        } else {
            if self.workspaces.len() >= WORKSPACES_KEPT {
                self.workspaces.remove(0);
            }
            let workspace = self.create_workspace(shape);
            self.workspaces.push(workspace);
        }
        self.workspaces.len() - 1
    }

    /// Runs `recording` over `batch` split into `chunks` (one `Params` per chunk): one
    /// command encoder, one submit, then the readback of the batch sums and whatever
    /// `recording.read_back` asks for.
    pub fn run(
        &mut self,
        batch: &GpuBatch,
        chunks: &[Chunk],
        params: &[Params],
        recording: &Recording,
    ) -> Result<Output> {
        self.check_failures()?;
        let device = self.device.clone();
        let index = scoped(&device, || Ok(self.workspace(batch.shape)))?;
        let result = scoped(&device, || {
            self.record_and_read(index, batch, chunks, params, recording)
        });
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

    fn record_and_read(
        &mut self,
        index: usize,
        batch: &GpuBatch,
        chunks: &[Chunk],
        params: &[Params],
        recording: &Recording,
    ) -> Result<Output> {
        let Self {
            device,
            queue,
            pipelines,
            workspaces,
            ..
        } = self;
        let workspace = &mut workspaces[index];
        let bound = bind(device, pipelines, workspace, batch, chunks);
        let bound = &workspace.bound[bound];
        for (buffer, p) in bound.params.iter().zip(params) {
            queue.write_buffer(buffer, 0, bytemuck::bytes_of(p));
        }

        // What comes back, packed one after another in the staging buffer.
        let shape = batch.shape;
        let b = shape.batch as u64;
        let sums_bytes = std::mem::size_of::<GpuSums>() as u64;
        let mut sources: Vec<(&wgpu::Buffer, u64)> = vec![(&workspace.batch_sums, sums_bytes)];
        if recording.read_back.gradients {
            sources.push((
                &batch.grad_student_conf,
                Layout::Conf.image_bytes(&shape) * b,
            ));
            sources.push((&batch.grad_student_loc, Layout::Loc.image_bytes(&shape) * b));
        }
        if recording.read_back.decisions {
            sources.push((
                &workspace.conf_target,
                Layout::Prior.image_bytes(&shape) * b,
            ));
            sources.push((&workspace.loc_target, Layout::Loc.image_bytes(&shape) * b));
            sources.push((&workspace.neg_mask, Layout::Prior.image_bytes(&shape) * b));
        }
        let total: u64 = sources.iter().map(|(_, size)| size).sum();
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

        let max_groups = device.limits().max_compute_workgroups_per_dimension.max(1);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("ssdkd.evaluate"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("ssdkd.evaluate"),
                timestamp_writes: None,
            });
            for dispatch in &recording.dispatches {
                let kernel = Kernel::ALL
                    .iter()
                    .position(|&k| k == dispatch.kernel)
                    .unwrap();
                let x = dispatch.workgroups.clamp(1, max_groups);
                let y = dispatch.workgroups.div_ceil(x);
                if y > max_groups {
                    return Err(Error::Gpu(format!(
                        "{} needs {} workgroups, over the adapter's {max_groups}²",
                        dispatch.kernel.label(),
                        dispatch.workgroups
                    )));
                }
                pass.set_pipeline(&pipelines.get(dispatch.kernel).pipeline);
                pass.set_bind_group(0, &bound.groups[dispatch.chunk][kernel], &[]);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        let mut offset = 0;
        for (source, size) in &sources {
            encoder.copy_buffer_to_buffer(source, 0, staging, offset, *size);
            offset += size;
        }
        queue.submit([encoder.finish()]);

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
            let mut parts = Vec::with_capacity(sources.len());
            let mut offset = 0usize;
            for (_, size) in &sources {
                parts.push(&view[offset..offset + *size as usize]);
                offset += *size as usize;
            }
            let f32s = |bytes: &[u8]| -> Vec<f32> { bytemuck::pod_collect_to_vec(bytes) };
            let u32s = |bytes: &[u8]| -> Vec<u32> { bytemuck::pod_collect_to_vec(bytes) };
            let sums: GpuSums = bytemuck::pod_read_unaligned(parts[0]);
            let mut next = 1;
            let gradients = recording.read_back.gradients.then(|| {
                next += 2;
                Gradients {
                    student_conf: f32s(parts[next - 2]),
                    student_loc: f32s(parts[next - 1]),
                }
            });
            let decisions = recording.read_back.decisions.then(|| Decisions {
                conf_target: u32s(parts[next]),
                loc_target: f32s(parts[next + 1]),
                neg_mask: u32s(parts[next + 2]).into_iter().map(|m| m as u8).collect(),
            });
            Output {
                sums,
                gradients,
                decisions,
            }
        };
        staging.unmap();
        Ok(output)
    }
}

/// Runs `f` inside out-of-memory, validation and internal error scopes of `device`; the
/// first error they catch becomes [`Error::Gpu`].
fn scoped<T>(device: &wgpu::Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let result = f();
    let caught = [internal.pop(), validation.pop(), out_of_memory.pop()]
        .into_iter()
        .filter_map(pollster::block_on)
        .map(|e| e.to_string())
        .collect::<Vec<_>>();
    if !caught.is_empty() {
        return Err(Error::Gpu(caught.join("; ")));
    }
    result
}

fn create_pipelines(device: &wgpu::Device) -> Pipelines {
    let modules: Vec<(&str, wgpu::ShaderModule)> =
        ["match", "prior_terms", "mine", "reduce", "grad"]
            .into_iter()
            .map(|stage| {
                let label = format!("ssdkd.{stage}");
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&label),
                    source: wgpu::ShaderSource::Wgsl(stage_source(stage).into()),
                });
                (stage, module)
            })
            .collect();
    let pipeline = |kernel: Kernel| {
        let module = &modules
            .iter()
            .find(|(stage, _)| *stage == kernel.stage())
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
        entries.extend(
            kernel
                .bindings()
                .iter()
                .map(|b| wgpu::BindGroupLayoutEntry {
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
                }),
        );
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(kernel.label()),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(kernel.label()),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.label()),
            layout: Some(&pipeline_layout),
            module,
            entry_point: Some(kernel.entry_point()),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        Pipeline { pipeline, layout }
    };
    Pipelines {
        match_priors: pipeline(Kernel::MatchPriors),
        match_objects: pipeline(Kernel::MatchObjects),
        match_finish: pipeline(Kernel::MatchFinish),
        prior_terms: pipeline(Kernel::PriorTerms),
        mine: pipeline(Kernel::Mine),
        reduce_rows: pipeline(Kernel::ReduceRows),
        reduce_image: pipeline(Kernel::ReduceImage),
        reduce_batch: pipeline(Kernel::ReduceBatch),
        grad_conf: pipeline(Kernel::GradConf),
        grad_loc: pipeline(Kernel::GradLoc),
    }
}

/// The index in `workspace.bound` of the bind groups of `batch` split into `chunks`,
/// created (with a `Params` uniform per chunk) when not cached.
fn bind(
    device: &wgpu::Device,
    pipelines: &Pipelines,
    workspace: &mut Workspace,
    batch: &GpuBatch,
    chunks: &[Chunk],
) -> usize {
    if let Some(i) = workspace
        .bound
        .iter()
        .position(|b| b.batch_id == batch.id && b.chunks == chunks)
    {
        return i;
    }
    if workspace.bound.len() >= BINDINGS_KEPT {
        workspace.bound.remove(0);
    }
    let shape = batch.shape;
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
            Kernel::ALL
                .iter()
                .map(|&kernel| {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: params.as_entire_binding(),
                    }];
                    for b in kernel.bindings() {
                        let buffer = match b.resource {
                            Resource::StudentConf => &batch.tensors.student_conf,
                            Resource::StudentLoc => &batch.tensors.student_loc,
                            Resource::TeacherConf => &batch.tensors.teacher_conf,
                            Resource::TeacherLoc => &batch.tensors.teacher_loc,
                            Resource::Targets => &batch.tensors.targets,
                            Resource::Priors => &batch.tensors.priors,
                            Resource::ConfTarget => &workspace.conf_target,
                            Resource::LocTarget => &workspace.loc_target,
                            Resource::NegMask => &workspace.neg_mask,
                            Resource::MiningScore => &workspace.mining_score,
                            Resource::PriorLoss => &workspace.prior_loss,
                            Resource::RowSoft => &workspace.row_soft,
                            Resource::ImageSums => &workspace.image_sums,
                            Resource::BatchSums => &workspace.batch_sums,
                            Resource::GradStudentConf => &batch.grad_student_conf,
                            Resource::GradStudentLoc => &batch.grad_student_loc,
                        };
                        let (offset, size) = match b.resource.layout() {
                            Some(layout) => {
                                let window = chunk.window(layout);
                                (window.offset, window.size)
                            }
                            None if b.resource == Resource::Priors => (0, shape.priors as u64 * 16),
                            None => (0, buffer.size()),
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
                        label: Some(kernel.label()),
                        layout: &pipelines.get(kernel).layout,
                        entries: &entries,
                    })
                })
                .collect()
        })
        .collect();
    workspace.bound.push(Bound {
        batch_id: batch.id,
        chunks: chunks.to_vec(),
        params,
        groups,
    });
    workspace.bound.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::naga;

    /// Every stage's WGSL parses and validates (no adapter needed).
    #[test]
    fn every_stage_compiles() {
        for stage in ["match", "prior_terms", "mine", "reduce", "grad"] {
            let module = naga::front::wgsl::parse_str(stage_source(stage)).unwrap_or_else(|e| {
                panic!("{stage}.wgsl: {}", e.emit_to_string(stage_source(stage)))
            });
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::default(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{stage}.wgsl: {}", e.emit_to_string(stage_source(stage))));
        }
    }

    /// Every kernel's entry point exists in its stage's WGSL, and every binding the host
    /// describes is declared there with the same access.
    #[test]
    fn bindings_match_the_wgsl() {
        for kernel in Kernel::ALL {
            let source = stage_source(kernel.stage());
            let module = naga::front::wgsl::parse_str(source).unwrap();
            assert!(
                module
                    .entry_points
                    .iter()
                    .any(|e| e.name == kernel.entry_point()),
                "{}: entry point {}",
                kernel.label(),
                kernel.entry_point()
            );
            for b in kernel.bindings() {
                let (_, global) = module
                    .global_variables
                    .iter()
                    .find(|(_, g)| {
                        g.binding
                            .as_ref()
                            .is_some_and(|r| r.group == 0 && r.binding == b.binding)
                    })
                    .unwrap_or_else(|| panic!("{}: binding {}", kernel.label(), b.binding));
                let writes = matches!(global.space, naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE));
                assert_eq!(
                    writes,
                    b.writes,
                    "{}: binding {} access",
                    kernel.label(),
                    b.binding
                );
            }
        }
    }
}
