//! What a run does, described without wgpu (the wgpu calls are all in `engine.rs`):
//! - the buffers ([`Resource`], each with one fixed `@binding` number in every shader) and
//!   the kernels ([`KERNELS`], the one table of stage, entry point, launch shape and
//!   bindings, in pipeline order);
//! - how a batch is split into chunks of images so that no storage binding exceeds the
//!   adapter's `max_storage_buffer_binding_size` ([`chunks`]);
//! - the [`Recording`] of one evaluation: per-chunk parameter uploads, dispatches already
//!   folded to `[x, y, 1]`, and the downloads with their layout, which
//!   [`Recording::decode`] turns back into sums, gradients and decisions.

use crate::batch::{BatchShape, Decisions, Gradients};
use crate::error::{Error, Result};
use crate::gpu::params::{GpuSums, Params, WindowBases, WORKGROUP_SIZE};
use ssdkd_core::{LossConfig, Stage};

/// A byte range of a buffer bound as one storage binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Window {
    /// Byte offset, a multiple of `min_storage_buffer_offset_alignment`.
    pub offset: u64,
    /// Byte size, a multiple of 4.
    pub size: u64,
}

/// The layouts a tensor can have, by the bytes one image takes in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Layout {
    /// `[B, P, C]` f32: the logits and their gradient.
    Conf,
    /// `[B, P, 4]` f32, bound as `array<vec4<f32>>`: offsets, their gradient, `prior_loss`.
    Loc,
    /// `[B, M, 5]` f32: the ground truth.
    Target,
    /// `[B, P]` u32 or f32: labels, negative mask, mining scores.
    Prior,
}

impl Layout {
    /// Bytes per image.
    pub fn image_bytes(self, shape: &BatchShape) -> u64 {
        let (p, c, m) = (
            shape.priors as u64,
            shape.classes as u64,
            shape.objects as u64,
        );
        match self {
            Layout::Conf => p * c * 4,
            Layout::Loc => p * 16,
            Layout::Target => m * 20,
            Layout::Prior => p * 4,
        }
    }

    /// Bytes of one element of the WGSL array it is bound as.
    pub fn element_bytes(self) -> u64 {
        match self {
            Layout::Loc => 16,
            _ => 4,
        }
    }

    /// The four layouts.
    pub const ALL: [Layout; 4] = [Layout::Conf, Layout::Loc, Layout::Target, Layout::Prior];
}

/// A run of consecutive images evaluated with one set of bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Chunk {
    /// The chunk's first image in the batch.
    pub first_image: usize,
    /// Images in the chunk.
    pub images: usize,
    /// Windows per layout, in the order of [`Layout::ALL`].
    pub windows: [Window; 4],
    /// Where the first image starts inside each window, in elements.
    pub bases: WindowBases,
}

impl Chunk {
    fn new(shape: &BatchShape, first_image: usize, images: usize, alignment: u64) -> Self {
        let mut windows = [Window { offset: 0, size: 0 }; 4];
        let mut bases = [0u32; 4];
        for (i, layout) in Layout::ALL.into_iter().enumerate() {
            let per_image = layout.image_bytes(shape);
            let start = first_image as u64 * per_image;
            let end = (first_image + images) as u64 * per_image;
            let offset = start - start % alignment;
            windows[i] = Window {
                offset,
                size: end - offset,
            };
            bases[i] = ((start - offset) / layout.element_bytes()) as u32;
        }
        Self {
            first_image,
            images,
            windows,
            bases: WindowBases {
                conf: bases[0],
                loc: bases[1],
                target: bases[2],
                prior: bases[3],
            },
        }
    }

    /// The window of `layout`.
    pub fn window(&self, layout: Layout) -> Window {
        self.windows[Layout::ALL.iter().position(|&l| l == layout).unwrap()]
    }
}

/// Splits a batch by images so that every window fits in `binding_limit` bytes; windows
/// start at multiples of `alignment` bytes (a power of two).
///
/// # Errors
/// [`Error::GpuUnsupported`] when a single image, or the priors, do not fit in one binding.
pub(crate) fn chunks(shape: &BatchShape, binding_limit: u64, alignment: u64) -> Result<Vec<Chunk>> {
    let alignment = alignment.max(4);
    let priors_bytes = shape.priors as u64 * 16;
    let sums_bytes = shape.batch as u64 * std::mem::size_of::<GpuSums>() as u64;
    if priors_bytes > binding_limit || sums_bytes > binding_limit {
        return Err(Error::GpuUnsupported(format!(
            "the priors ({priors_bytes} bytes) or the per-image sums ({sums_bytes} bytes) \
             exceed the adapter's storage binding limit of {binding_limit} bytes"
        )));
    }
    let widest = Layout::ALL
        .iter()
        .map(|l| l.image_bytes(shape))
        .max()
        .unwrap_or(0)
        .max(1);
    let whole = shape.batch as u64 * widest <= binding_limit;
    let per_chunk = if whole {
        shape.batch
    } else {
        // A window may start up to alignment − 4 bytes before its first image.
        let usable = binding_limit.saturating_sub(alignment - 4);
        (usable / widest) as usize
    };
    if per_chunk == 0 {
        return Err(Error::GpuUnsupported(format!(
            "one image needs {widest} bytes in a storage binding, over the adapter's limit of \
             {binding_limit} bytes"
        )));
    }
    Ok((0..shape.batch)
        .step_by(per_chunk)
        .map(|first| Chunk::new(shape, first, per_chunk.min(shape.batch - first), alignment))
        .collect())
}

/// A buffer the kernels bind: declared here once, with its `@binding` number (the same in
/// every shader that declares it), its WGSL name, its layout and who owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Resource {
    StudentConf,
    TeacherConf,
    StudentLoc,
    TeacherLoc,
    Targets,
    Priors,
    ConfTarget,
    LocTarget,
    NegMask,
    MiningScore,
    PriorLoss,
    RowSoft,
    ImageSums,
    BatchSums,
    GradStudentConf,
    GradStudentLoc,
}

/// Who holds a [`Resource`]'s buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The batch's input tensors ([`crate::gpu::GpuTensors`]).
    Input,
    /// The batch's gradient buffers.
    Gradient,
    /// The engine's per-shape workspace.
    Workspace,
}

impl Resource {
    /// Every resource, in binding order (binding 0 is the `Params` uniform).
    pub const ALL: [Resource; 16] = [
        Resource::StudentConf,
        Resource::TeacherConf,
        Resource::StudentLoc,
        Resource::TeacherLoc,
        Resource::Targets,
        Resource::Priors,
        Resource::ConfTarget,
        Resource::LocTarget,
        Resource::NegMask,
        Resource::MiningScore,
        Resource::PriorLoss,
        Resource::RowSoft,
        Resource::ImageSums,
        Resource::BatchSums,
        Resource::GradStudentConf,
        Resource::GradStudentLoc,
    ];

    /// Its `@group(0) @binding(n)` in every shader: its place in [`Resource::ALL`] + 1.
    pub fn binding(self) -> u32 {
        Resource::ALL.iter().position(|&r| r == self).unwrap_or(0) as u32 + 1
    }

    /// Its variable name in the WGSL, and its buffer's label `"ssdkd.<name>"`.
    pub fn name(self) -> &'static str {
        use Resource::*;
        match self {
            StudentConf => "student_conf",
            TeacherConf => "teacher_conf",
            StudentLoc => "student_loc",
            TeacherLoc => "teacher_loc",
            Targets => "targets",
            Priors => "priors",
            ConfTarget => "conf_target",
            LocTarget => "loc_target",
            NegMask => "neg_mask",
            MiningScore => "mining_score",
            PriorLoss => "prior_loss",
            RowSoft => "row_soft",
            ImageSums => "image_sums",
            BatchSums => "batch_sums",
            GradStudentConf => "grad_student_conf",
            GradStudentLoc => "grad_student_loc",
        }
    }

    /// Who holds its buffer.
    pub fn owner(self) -> Owner {
        use Resource::*;
        match self {
            StudentConf | TeacherConf | StudentLoc | TeacherLoc | Targets | Priors => Owner::Input,
            GradStudentConf | GradStudentLoc => Owner::Gradient,
            _ => Owner::Workspace,
        }
    }

    /// The window layout it is bound with, or `None` when bound whole.
    pub fn layout(self) -> Option<Layout> {
        use Resource::*;
        match self {
            StudentConf | TeacherConf | GradStudentConf => Some(Layout::Conf),
            StudentLoc | TeacherLoc | LocTarget | PriorLoss | GradStudentLoc => Some(Layout::Loc),
            Targets => Some(Layout::Target),
            ConfTarget | NegMask | MiningScore | RowSoft => Some(Layout::Prior),
            Priors | ImageSums | BatchSums => None,
        }
    }

    /// The bytes its buffer holds for a batch of `shape`.
    pub fn bytes(self, shape: &BatchShape) -> u64 {
        let sums = std::mem::size_of::<GpuSums>() as u64;
        match (self, self.layout()) {
            (_, Some(layout)) => layout.image_bytes(shape) * shape.batch as u64,
            (Resource::Priors, None) => shape.priors as u64 * 16,
            (Resource::ImageSums, None) => sums * shape.batch as u64,
            _ => sums,
        }
    }
}

/// How a kernel binds a resource (at [`Resource::binding`]) and whether it writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Binding {
    pub resource: Resource,
    pub writes: bool,
}

const fn read(resource: Resource) -> Binding {
    Binding {
        resource,
        writes: false,
    }
}

const fn write(resource: Resource) -> Binding {
    Binding {
        resource,
        writes: true,
    }
}

/// How many workgroups a kernel launches over a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Launch {
    /// One thread per prior of every image.
    PerPrior,
    /// One workgroup per object row of every image.
    PerObjectRow,
    /// One workgroup per image.
    PerImage,
    /// One workgroup for the whole batch.
    Single,
}

/// When a kernel runs in an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Once per chunk, before the batch reduce.
    Forward,
    /// Once, over every image of the batch (all chunks).
    Batch,
    /// Once per chunk after the batch reduce, when gradients are asked for.
    Backward,
}

/// A kernel: one WGSL entry point of one stage file, with its CPU twin of the same name
/// in `ssdkd_core::stages::<stage>`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    pub stage: Stage,
    pub entry_point: &'static str,
    pub launch: Launch,
    pub phase: Phase,
    /// The storage buffers it binds, as its WGSL declares them.
    pub bindings: &'static [Binding],
    /// An upper bound on the loop iterations one invocation runs over a batch of this
    /// shape: every loop of the entry point and the functions it calls, on every path,
    /// added up (a SIMD group of invocations that diverge runs the loops of both paths).
    pub iterations: fn(&BatchShape) -> u64,
}

/// The most loop iterations one invocation may run. llvmpipe (lavapipe) silently stops
/// the loops of a SIMD group of invocations after 65,535 iterations in all, and the kernel
/// then returns wrong numbers (seen: gradients from C ≈ 7000, mined rows from P ≈ 1.85 M);
/// the limit is checked on every adapter, so that what the GPU backend accepts does not
/// depend on the driver. Shapes over it are refused with
/// [`Error::GpuUnsupported`] (README "GPU limits").
pub(crate) const MAX_LOOP_ITERATIONS: u64 = 65_535;

/// The largest temperature the GPU backend takes: above it, f32 cannot give the gradient
/// of the soft term to SPEC §7 where a student and its teacher nearly agree (`p − q` then
/// loses its digits, and `T` scales the loss); the CPU backend computes those rows in f64.
pub(crate) const MAX_TEMPERATURE: f32 = 20.0;

/// Iterations kept free of the counted loops: each loop's exit test and the like count
/// too on llvmpipe (measured: `grad_conf` at C = 6553 ran about 19 past its 10 C − 1).
pub(crate) const LOOP_SLACK: u64 = 256;

/// Rounds of a fixed pairwise tree over a workgroup (`log2 WORKGROUP_SIZE`).
const TREE_ROUNDS: u64 = WORKGROUP_SIZE.trailing_zeros() as u64;

/// Iterations of a loop that strides over P by the workgroup size.
fn strided_priors(s: &BatchShape) -> u64 {
    (s.priors as u64).div_ceil(u64::from(WORKGROUP_SIZE))
}

// Loop counts per kernel, read off its WGSL (C = classes, M = object rows):
/// `match_priors`: first_object, the maximum and the lowest tied row, M each.
fn match_priors_iterations(s: &BatchShape) -> u64 {
    3 * s.objects as u64
}
/// `match_objects`: two strided loops over the priors and the tree.
fn match_objects_iterations(s: &BatchShape) -> u64 {
    2 * strided_priors(s) + TREE_ROUNDS
}
/// `match_finish`: first_object (M) and a strided loop over the priors.
fn match_finish_iterations(s: &BatchShape) -> u64 {
    s.objects as u64 + strided_priors(s)
}
/// `prior_terms`: one log-sum-exp (two loops over C).
fn prior_terms_iterations(s: &BatchShape) -> u64 {
    2 * s.classes as u64
}
/// `mine`: the strided loop of k = 0; else 8 radix rounds of (histogram clear, strided
/// priors, up to 256 digits), the final strided loop, and the rounds themselves.
fn mine_iterations(s: &BatchShape) -> u64 {
    let radix = 256;
    strided_priors(s)
        + 8 * (u64::from(radix / WORKGROUP_SIZE).max(1) + strided_priors(s) + u64::from(radix))
        + strided_priors(s)
        + 8
}
/// `reduce_rows`: two log-sum-exps (four loops over C) and the sum over C of either form.
fn reduce_rows_iterations(s: &BatchShape) -> u64 {
    6 * s.classes as u64
}
/// `reduce_image`: a strided loop over the priors and the tree.
fn reduce_image_iterations(s: &BatchShape) -> u64 {
    strided_priors(s) + TREE_ROUNDS
}
/// `reduce_batch`: a strided loop over the images and the tree.
fn reduce_batch_iterations(s: &BatchShape) -> u64 {
    (s.batch as u64).div_ceil(u64::from(WORKGROUP_SIZE)) + TREE_ROUNDS
}
/// `grad_conf`: the zeroing of an unselected row (C); the top class (C), three
/// log-sum-exps (6 C) and two passes over C of a selected one.
fn grad_conf_iterations(s: &BatchShape) -> u64 {
    10 * s.classes as u64
}
/// `grad_loc`: no loop.
fn no_loop(_: &BatchShape) -> u64 {
    0
}

/// Every kernel, in pipeline order (the order of `ssdkd_core::KERNELS`, checked by a
/// test): adding a kernel is one row here plus its WGSL entry point and CPU twin.
pub(crate) const KERNELS: [Kernel; 10] = {
    use Resource::*;
    const fn kernel(
        stage: Stage,
        entry_point: &'static str,
        launch: Launch,
        phase: Phase,
        bindings: &'static [Binding],
        iterations: fn(&BatchShape) -> u64,
    ) -> Kernel {
        Kernel {
            stage,
            entry_point,
            launch,
            phase,
            bindings,
            iterations,
        }
    }
    const MATCH: &[Binding] = &[
        read(Targets),
        read(Priors),
        write(ConfTarget),
        write(LocTarget),
        write(ImageSums),
    ];
    use Launch::*;
    use Phase::*;
    [
        kernel(
            Stage::Match,
            "match_priors",
            PerPrior,
            Forward,
            MATCH,
            match_priors_iterations,
        ),
        kernel(
            Stage::Match,
            "match_objects",
            PerObjectRow,
            Forward,
            MATCH,
            match_objects_iterations,
        ),
        kernel(
            Stage::Match,
            "match_finish",
            PerImage,
            Forward,
            MATCH,
            match_finish_iterations,
        ),
        kernel(
            Stage::PriorTerms,
            "prior_terms",
            PerPrior,
            Forward,
            &[
                read(StudentConf),
                read(StudentLoc),
                read(TeacherLoc),
                read(ConfTarget),
                read(LocTarget),
                write(MiningScore),
                write(PriorLoss),
            ],
            prior_terms_iterations,
        ),
        kernel(
            Stage::Mine,
            "mine",
            PerImage,
            Forward,
            &[read(MiningScore), write(ImageSums), write(NegMask)],
            mine_iterations,
        ),
        kernel(
            Stage::Reduce,
            "reduce_rows",
            PerPrior,
            Forward,
            &[
                read(StudentConf),
                read(TeacherConf),
                read(ConfTarget),
                read(NegMask),
                write(RowSoft),
            ],
            reduce_rows_iterations,
        ),
        kernel(
            Stage::Reduce,
            "reduce_image",
            PerImage,
            Forward,
            &[
                read(ConfTarget),
                read(NegMask),
                read(PriorLoss),
                write(ImageSums),
                write(RowSoft),
            ],
            reduce_image_iterations,
        ),
        kernel(
            Stage::Reduce,
            "reduce_batch",
            Single,
            Batch,
            &[write(ImageSums), write(BatchSums)],
            reduce_batch_iterations,
        ),
        kernel(
            Stage::Grad,
            "grad_conf",
            PerPrior,
            Backward,
            &[
                read(StudentConf),
                read(TeacherConf),
                read(ConfTarget),
                read(NegMask),
                read(BatchSums),
                write(GradStudentConf),
            ],
            grad_conf_iterations,
        ),
        kernel(
            Stage::Grad,
            "grad_loc",
            PerPrior,
            Backward,
            &[
                read(StudentLoc),
                read(ConfTarget),
                read(LocTarget),
                read(PriorLoss),
                read(BatchSums),
                write(GradStudentLoc),
            ],
            no_loop,
        ),
    ]
};

impl Kernel {
    /// The debug label of its pipeline and bind groups: `"ssdkd.<stage>.<entry point>"`.
    pub fn label(&self) -> String {
        format!("ssdkd.{}.{}", self.stage.name(), self.entry_point)
    }

    /// Workgroups it launches over `images` images of `shape`.
    pub fn workgroups(&self, shape: &BatchShape, images: usize) -> u64 {
        let images = images as u64;
        match self.launch {
            Launch::PerImage => images,
            Launch::PerObjectRow => images * shape.objects as u64,
            Launch::PerPrior => (images * shape.priors as u64).div_ceil(u64::from(WORKGROUP_SIZE)),
            Launch::Single => 1,
        }
    }
}

/// What the plan needs to know of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceLimits {
    /// The most bytes one storage binding may hold (after any cap).
    pub binding_limit: u64,
    /// `min_storage_buffer_offset_alignment`.
    pub alignment: u64,
    /// `max_compute_workgroups_per_dimension`.
    pub max_workgroups: u32,
}

/// One kernel launch over one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dispatch {
    /// Index into [`KERNELS`].
    pub kernel: usize,
    /// Index into the recording's chunks (chunk 0 for a [`Phase::Batch`] kernel).
    pub chunk: usize,
    /// Workgroups, folded to `[x, y, 1]` within the device's per-dimension limit (the
    /// kernels unfold them: `thread_index`, `workgroup_index` in `shared.wgsl`).
    pub workgroups: [u32; 3],
}

/// What a download brings back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readback {
    /// The batch sums.
    Sums,
    /// ∂total/∂student_conf.
    GradConf,
    /// ∂total/∂student_loc.
    GradLoc,
    /// The labels.
    ConfTarget,
    /// The encoded offsets.
    LocTarget,
    /// The negative mask (u32 per prior on the GPU).
    NegMask,
}

impl Readback {
    /// The buffer it copies.
    pub fn resource(self) -> Resource {
        match self {
            Readback::Sums => Resource::BatchSums,
            Readback::GradConf => Resource::GradStudentConf,
            Readback::GradLoc => Resource::GradStudentLoc,
            Readback::ConfTarget => Resource::ConfTarget,
            Readback::LocTarget => Resource::LocTarget,
            Readback::NegMask => Resource::NegMask,
        }
    }
}

/// A buffer read back once the work is done, the whole of it, in recording order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Download {
    pub what: Readback,
    pub bytes: u64,
}

impl Download {
    /// The buffer it copies.
    pub fn resource(&self) -> Resource {
        self.what.resource()
    }
}

/// Everything one evaluation runs, recorded into one command encoder and submitted once:
/// the chunks' bindings and their `Params` uploads, every chunk forward, the batch reduce
/// (so N is known), then every chunk's gradients; then the downloads.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Recording {
    /// The chunks the batch is bound as.
    pub chunks: Vec<Chunk>,
    /// The `Params` uniform of each chunk.
    pub uploads: Vec<Params>,
    pub dispatches: Vec<Dispatch>,
    pub downloads: Vec<Download>,
}

/// What a run brings back, decoded.
#[derive(Debug)]
pub(crate) struct Output {
    pub sums: GpuSums,
    pub gradients: Option<Gradients>,
    pub decisions: Option<Decisions>,
}

/// What to compute and read back beyond the sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub gradients: bool,
    pub read_gradients: bool,
    pub decisions: bool,
}

/// Folds `workgroups` into `[x, y, 1]` with `x, y ≤ max`.
///
/// # Errors
/// [`Error::GpuUnsupported`] when even `max²` workgroups are too few.
fn fold(kernel: &Kernel, workgroups: u64, max: u32) -> Result<[u32; 3]> {
    let max = u64::from(max.max(1));
    let x = workgroups.clamp(1, max);
    let y = workgroups.div_ceil(x).max(1);
    if y > max {
        return Err(Error::GpuUnsupported(format!(
            "{} needs {workgroups} workgroups, over the adapter's {max}²",
            kernel.label()
        )));
    }
    Ok([x as u32, y as u32, 1])
}

impl Recording {
    /// The recording of one evaluation of a batch of `shape`.
    ///
    /// # Errors
    /// [`Error::GpuUnsupported`] when the batch cannot be bound or launched within
    /// `limits`, or a kernel would loop more than [`MAX_LOOP_ITERATIONS`] times.
    pub fn evaluation(
        shape: &BatchShape,
        config: &LossConfig,
        limits: &DeviceLimits,
        wanted: Wanted,
    ) -> Result<Self> {
        if config.temperature > MAX_TEMPERATURE {
            return Err(Error::GpuUnsupported(format!(
                "temperature {} is over the GPU backend's {MAX_TEMPERATURE} \
                 (README \"GPU limits\")",
                config.temperature
            )));
        }
        let chunks = chunks(shape, limits.binding_limit, limits.alignment)?;
        let uploads = chunks
            .iter()
            .map(|c| Params::new(shape, config, c.first_image, c.images, c.bases))
            .collect();
        let mut dispatches = Vec::new();
        let mut launch = |phase: Phase, chunk: usize, images: usize| -> Result<()> {
            for (index, kernel) in KERNELS.iter().enumerate() {
                if kernel.phase == phase {
                    let iterations = (kernel.iterations)(shape) + LOOP_SLACK;
                    if iterations > MAX_LOOP_ITERATIONS {
                        return Err(Error::GpuUnsupported(format!(
                            "{} would loop {iterations} times in one invocation at B = {}, \
                             P = {}, C = {}, M = {}, over the limit of {MAX_LOOP_ITERATIONS} \
                             (README \"GPU limits\")",
                            kernel.label(),
                            shape.batch,
                            shape.priors,
                            shape.classes,
                            shape.objects
                        )));
                    }
                    dispatches.push(Dispatch {
                        kernel: index,
                        chunk,
                        workgroups: fold(
                            kernel,
                            kernel.workgroups(shape, images),
                            limits.max_workgroups,
                        )?,
                    });
                }
            }
            Ok(())
        };
        for (i, chunk) in chunks.iter().enumerate() {
            launch(Phase::Forward, i, chunk.images)?;
        }
        launch(Phase::Batch, 0, shape.batch)?;
        if wanted.gradients || wanted.read_gradients {
            for (i, chunk) in chunks.iter().enumerate() {
                launch(Phase::Backward, i, chunk.images)?;
            }
        }
        let mut downloads = vec![Readback::Sums];
        if wanted.read_gradients {
            downloads.extend([Readback::GradConf, Readback::GradLoc]);
        }
        if wanted.decisions {
            downloads.extend([Readback::ConfTarget, Readback::LocTarget, Readback::NegMask]);
        }
        let downloads = downloads
            .into_iter()
            .map(|what| Download {
                what,
                bytes: what.resource().bytes(shape),
            })
            .collect();
        Ok(Self {
            chunks,
            uploads,
            dispatches,
            downloads,
        })
    }

    /// Whether it runs the gradient kernels (which write the gradient resources).
    pub fn writes_gradients(&self) -> bool {
        self.dispatches
            .iter()
            .any(|d| KERNELS[d.kernel].phase == Phase::Backward)
    }

    /// Total bytes of the downloads.
    pub fn download_bytes(&self) -> u64 {
        self.downloads.iter().map(|d| d.bytes).sum()
    }

    /// Decodes the downloads, packed one after another in `bytes`.
    pub fn decode(&self, bytes: &[u8]) -> Output {
        let mut output = Output {
            sums: GpuSums::default(),
            gradients: None,
            decisions: None,
        };
        let f32s = |bytes: &[u8]| -> Vec<f32> { bytemuck::pod_collect_to_vec(bytes) };
        let u32s = |bytes: &[u8]| -> Vec<u32> { bytemuck::pod_collect_to_vec(bytes) };
        let mut offset = 0usize;
        for download in &self.downloads {
            let part = &bytes[offset..offset + download.bytes as usize];
            offset += download.bytes as usize;
            match download.what {
                Readback::Sums => output.sums = bytemuck::pod_read_unaligned(part),
                Readback::GradConf => {
                    output
                        .gradients
                        .get_or_insert_with(Gradients::default)
                        .student_conf = f32s(part);
                }
                Readback::GradLoc => {
                    output
                        .gradients
                        .get_or_insert_with(Gradients::default)
                        .student_loc = f32s(part);
                }
                Readback::ConfTarget => {
                    output
                        .decisions
                        .get_or_insert_with(Decisions::default)
                        .conf_target = u32s(part);
                }
                Readback::LocTarget => {
                    output
                        .decisions
                        .get_or_insert_with(Decisions::default)
                        .loc_target = f32s(part);
                }
                Readback::NegMask => {
                    output
                        .decisions
                        .get_or_insert_with(Decisions::default)
                        .neg_mask = u32s(part).into_iter().map(|m| m as u8).collect();
                }
            }
        }
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize) -> BatchShape {
        BatchShape {
            batch,
            priors: 8732,
            classes: 21,
            objects: 7,
        }
    }

    #[test]
    fn one_chunk_when_everything_fits() {
        let chunks = chunks(&shape(4), 128 << 20, 256).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].images, 4);
        assert_eq!(chunks[0].bases, WindowBases::default());
        assert_eq!(chunks[0].window(Layout::Conf).size, 4 * 8732 * 21 * 4);
    }

    #[test]
    fn chunks_cover_the_batch_within_the_limit() {
        let shape = shape(183);
        let limit = 128 << 20;
        for alignment in [16, 256] {
            let chunks = chunks(&shape, limit, alignment).unwrap();
            assert!(chunks.len() >= 2);
            let mut next = 0;
            for chunk in &chunks {
                assert_eq!(chunk.first_image, next);
                next += chunk.images;
                for layout in Layout::ALL {
                    let w = chunk.window(layout);
                    assert!(w.size <= limit && w.offset % alignment == 0 && w.size % 4 == 0);
                    let start = chunk.first_image as u64 * layout.image_bytes(&shape);
                    assert!(w.offset <= start);
                    assert_eq!(
                        w.offset + w.size,
                        start + chunk.images as u64 * layout.image_bytes(&shape)
                    );
                }
                let conf = chunk.window(Layout::Conf);
                let start = chunk.first_image as u64 * Layout::Conf.image_bytes(&shape);
                assert_eq!(u64::from(chunk.bases.conf) * 4, start - conf.offset);
            }
            assert_eq!(next, 183);
        }
    }

    #[test]
    fn an_image_over_the_limit_is_an_error() {
        assert!(matches!(
            chunks(&shape(2), 512 << 10, 256),
            Err(Error::GpuUnsupported(_))
        ));
    }

    fn limits(binding_limit: u64) -> DeviceLimits {
        DeviceLimits {
            binding_limit,
            alignment: 256,
            max_workgroups: 65535,
        }
    }

    #[test]
    fn gradients_come_after_the_batch_reduce() {
        let shape = shape(183);
        let wanted = Wanted {
            gradients: true,
            ..Wanted::default()
        };
        let config = LossConfig::DEFAULT;
        let recording = Recording::evaluation(&shape, &config, &limits(64 << 20), wanted).unwrap();
        let chunks = &recording.chunks;
        assert_eq!(recording.uploads.len(), chunks.len());
        let name = |d: &Dispatch| KERNELS[d.kernel].entry_point;
        let reduce = recording
            .dispatches
            .iter()
            .position(|d| name(d) == "reduce_batch")
            .unwrap();
        assert!(recording.dispatches[..reduce]
            .iter()
            .all(|d| KERNELS[d.kernel].stage != Stage::Grad));
        assert!(recording.dispatches[reduce + 1..]
            .iter()
            .all(|d| KERNELS[d.kernel].stage == Stage::Grad));
        assert_eq!(recording.downloads.len(), 1);
        // Per chunk: three match kernels, prior terms, mine, reduce_rows, reduce_image and
        // two gradient kernels; then one batch reduce.
        assert_eq!(recording.dispatches.len(), chunks.len() * 9 + 1);
    }
}

#[cfg(test)]
mod recording_tests {
    use super::*;

    /// A launch over more workgroups than one dimension takes is folded into two, and one
    /// beyond max² is refused.
    #[test]
    fn dispatches_are_folded_within_the_dimension_limit() {
        let kernel = &KERNELS[0];
        assert_eq!(fold(kernel, 10, 65535).unwrap(), [10, 1, 1]);
        assert_eq!(fold(kernel, 0, 65535).unwrap(), [1, 1, 1]);
        assert_eq!(fold(kernel, 65536, 65535).unwrap(), [65535, 2, 1]);
        assert_eq!(fold(kernel, 60, 8).unwrap(), [8, 8, 1]);
        assert!(fold(kernel, 65, 8).is_err());
    }

    /// The downloads decode into the parts they were recorded for.
    #[test]
    fn downloads_decode_in_recording_order() {
        let shape = BatchShape {
            batch: 1,
            priors: 2,
            classes: 2,
            objects: 1,
        };
        let config = LossConfig::DEFAULT;
        let limits = DeviceLimits {
            binding_limit: 1 << 20,
            alignment: 256,
            max_workgroups: 65535,
        };
        let wanted = Wanted {
            gradients: true,
            read_gradients: true,
            decisions: true,
        };
        let recording = Recording::evaluation(&shape, &config, &limits, wanted).unwrap();
        let sums = GpuSums {
            soft: 1.5,
            num_pos: 3,
            ..GpuSums::default()
        };
        let mut bytes = bytemuck::bytes_of(&sums).to_vec();
        bytes.extend(bytemuck::cast_slice(&[1.0f32, 2.0, 3.0, 4.0])); // grad conf [1, 2, 2]
        bytes.extend(bytemuck::cast_slice(&[0.5f32; 8])); // grad loc
        bytes.extend(bytemuck::cast_slice(&[0u32, 7])); // conf_target
        bytes.extend(bytemuck::cast_slice(&[0.25f32; 8])); // loc_target
        bytes.extend(bytemuck::cast_slice(&[1u32, 0])); // neg_mask
        assert_eq!(bytes.len() as u64, recording.download_bytes());
        let output = recording.decode(&bytes);
        assert_eq!(output.sums, sums);
        let gradients = output.gradients.unwrap();
        assert_eq!(gradients.student_conf, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(gradients.student_loc, [0.5; 8]);
        let decisions = output.decisions.unwrap();
        assert_eq!(decisions.conf_target, [0, 7]);
        assert_eq!(decisions.neg_mask, [1, 0]);
    }

    /// The host's kernel table is the core's, in the same order.
    #[test]
    fn the_kernel_table_follows_the_core() {
        let host: Vec<(Stage, &str)> = KERNELS.iter().map(|k| (k.stage, k.entry_point)).collect();
        assert_eq!(host, ssdkd_core::KERNELS);
    }
}
