//! How a batch is split into chunks of images so that no storage binding exceeds the
//! adapter's `max_storage_buffer_binding_size`, and what runs for each chunk. Pure
//! arithmetic and descriptions: the wgpu calls are all in `engine.rs`.

use crate::batch::BatchShape;
use crate::error::{Error, Result};
use crate::gpu::params::{GpuSums, WindowBases, WORKGROUP_SIZE};

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
/// [`Error::Gpu`] when a single image, or the priors, do not fit in one binding.
pub(crate) fn chunks(shape: &BatchShape, binding_limit: u64, alignment: u64) -> Result<Vec<Chunk>> {
    let alignment = alignment.max(4);
    let priors_bytes = shape.priors as u64 * 16;
    let sums_bytes = shape.batch as u64 * std::mem::size_of::<GpuSums>() as u64;
    if priors_bytes > binding_limit || sums_bytes > binding_limit {
        return Err(Error::Gpu(format!(
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
        return Err(Error::Gpu(format!(
            "one image needs {widest} bytes in a storage binding, over the adapter's limit of \
             {binding_limit} bytes"
        )));
    }
    Ok((0..shape.batch)
        .step_by(per_chunk)
        .map(|first| Chunk::new(shape, first, per_chunk.min(shape.batch - first), alignment))
        .collect())
}

/// A kernel of the pipeline: one WGSL entry point of one stage file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// `match.wgsl` `match_priors`: one thread per prior (each prior's best object).
    MatchPriors,
    /// `match.wgsl` `match_objects`: one workgroup per object row (its best prior, forced).
    MatchObjects,
    /// `match.wgsl` `match_finish`: one workgroup per image (labels, offsets, num_pos).
    MatchFinish,
    /// `prior_terms.wgsl` `prior_terms`: one thread per prior.
    PriorTerms,
    /// `mine.wgsl` `mine`: one workgroup per image.
    Mine,
    /// `reduce.wgsl` `reduce_rows`: one thread per prior (the soft term of selected rows).
    ReduceRows,
    /// `reduce.wgsl` `reduce_image`: one workgroup per image.
    ReduceImage,
    /// `reduce.wgsl` `reduce_batch`: one workgroup for the batch.
    ReduceBatch,
    /// `grad.wgsl` `grad_conf`: one thread per prior.
    GradConf,
    /// `grad.wgsl` `grad_loc`: one thread per prior.
    GradLoc,
}

/// The buffers a kernel binds, by name; each has a fixed layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Resource {
    StudentConf,
    StudentLoc,
    TeacherConf,
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

impl Resource {
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
}

/// How a kernel binds a resource: `@binding(n)` (binding 0 is always the `Params`
/// uniform), and whether it writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Binding {
    pub binding: u32,
    pub resource: Resource,
    pub writes: bool,
}

const fn read(binding: u32, resource: Resource) -> Binding {
    Binding {
        binding,
        resource,
        writes: false,
    }
}

const fn write(binding: u32, resource: Resource) -> Binding {
    Binding {
        binding,
        resource,
        writes: true,
    }
}

/// How many workgroups a kernel launches for a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Launch {
    PerImage,
    PerPrior,
    PerObjectRow,
    Single,
}

impl Kernel {
    /// Every kernel, in pipeline order.
    pub const ALL: [Kernel; 10] = [
        Kernel::MatchPriors,
        Kernel::MatchObjects,
        Kernel::MatchFinish,
        Kernel::PriorTerms,
        Kernel::Mine,
        Kernel::ReduceRows,
        Kernel::ReduceImage,
        Kernel::ReduceBatch,
        Kernel::GradConf,
        Kernel::GradLoc,
    ];

    /// The stage it belongs to, as the WGSL file and the core module are named.
    pub fn stage(self) -> &'static str {
        match self {
            Kernel::MatchPriors | Kernel::MatchObjects | Kernel::MatchFinish => "match",
            Kernel::PriorTerms => "prior_terms",
            Kernel::Mine => "mine",
            Kernel::ReduceRows | Kernel::ReduceImage | Kernel::ReduceBatch => "reduce",
            Kernel::GradConf | Kernel::GradLoc => "grad",
        }
    }

    /// The debug label of its pipeline: `"ssdkd.<stage>"`, plus the entry point where the
    /// stage has two.
    pub fn label(self) -> &'static str {
        match self {
            Kernel::MatchPriors => "ssdkd.match.match_priors",
            Kernel::MatchObjects => "ssdkd.match.match_objects",
            Kernel::MatchFinish => "ssdkd.match.match_finish",
            Kernel::PriorTerms => "ssdkd.prior_terms",
            Kernel::Mine => "ssdkd.mine",
            Kernel::ReduceRows => "ssdkd.reduce.reduce_rows",
            Kernel::ReduceImage => "ssdkd.reduce.reduce_image",
            Kernel::ReduceBatch => "ssdkd.reduce.reduce_batch",
            Kernel::GradConf => "ssdkd.grad.grad_conf",
            Kernel::GradLoc => "ssdkd.grad.grad_loc",
        }
    }

    /// The WGSL entry point.
    pub fn entry_point(self) -> &'static str {
        match self {
            Kernel::MatchPriors => "match_priors",
            Kernel::MatchObjects => "match_objects",
            Kernel::MatchFinish => "match_finish",
            Kernel::PriorTerms => "prior_terms",
            Kernel::Mine => "mine",
            Kernel::ReduceRows => "reduce_rows",
            Kernel::ReduceImage => "reduce_image",
            Kernel::ReduceBatch => "reduce_batch",
            Kernel::GradConf => "grad_conf",
            Kernel::GradLoc => "grad_loc",
        }
    }

    /// Its launch shape.
    pub fn launch(self) -> Launch {
        match self {
            Kernel::MatchFinish | Kernel::Mine | Kernel::ReduceImage => Launch::PerImage,
            Kernel::MatchPriors
            | Kernel::PriorTerms
            | Kernel::ReduceRows
            | Kernel::GradConf
            | Kernel::GradLoc => Launch::PerPrior,
            Kernel::MatchObjects => Launch::PerObjectRow,
            Kernel::ReduceBatch => Launch::Single,
        }
    }

    /// The storage buffers it binds, as its WGSL declares them.
    pub fn bindings(self) -> &'static [Binding] {
        use Resource::*;
        const MATCH: &[Binding] = &[
            read(1, Targets),
            read(2, Priors),
            write(3, ConfTarget),
            write(4, LocTarget),
            write(5, ImageSums),
        ];
        const PRIOR_TERMS: &[Binding] = &[
            read(1, StudentConf),
            read(9, StudentLoc),
            read(3, TeacherLoc),
            read(4, ConfTarget),
            read(5, LocTarget),
            write(6, MiningScore),
            write(7, PriorLoss),
        ];
        const MINE: &[Binding] = &[read(1, MiningScore), write(2, ImageSums), write(3, NegMask)];
        const REDUCE_ROWS: &[Binding] = &[
            read(1, StudentConf),
            read(2, TeacherConf),
            read(3, ConfTarget),
            read(4, NegMask),
            write(8, RowSoft),
        ];
        const REDUCE_IMAGE: &[Binding] = &[
            read(3, ConfTarget),
            read(4, NegMask),
            read(5, PriorLoss),
            write(6, ImageSums),
            write(8, RowSoft),
        ];
        const REDUCE_BATCH: &[Binding] = &[write(6, ImageSums), write(7, BatchSums)];
        const GRAD_CONF: &[Binding] = &[
            read(1, StudentConf),
            read(2, TeacherConf),
            read(3, ConfTarget),
            read(4, NegMask),
            read(5, BatchSums),
            write(6, GradStudentConf),
        ];
        const GRAD_LOC: &[Binding] = &[
            read(3, ConfTarget),
            read(5, BatchSums),
            read(7, StudentLoc),
            read(8, LocTarget),
            read(9, PriorLoss),
            write(10, GradStudentLoc),
        ];
        match self {
            Kernel::MatchPriors | Kernel::MatchObjects | Kernel::MatchFinish => MATCH,
            Kernel::PriorTerms => PRIOR_TERMS,
            Kernel::Mine => MINE,
            Kernel::ReduceRows => REDUCE_ROWS,
            Kernel::ReduceImage => REDUCE_IMAGE,
            Kernel::ReduceBatch => REDUCE_BATCH,
            Kernel::GradConf => GRAD_CONF,
            Kernel::GradLoc => GRAD_LOC,
        }
    }

    /// Workgroups it launches over `images` images of `shape`.
    pub fn workgroups(self, shape: &BatchShape, images: usize) -> u32 {
        match self.launch() {
            Launch::PerImage => images as u32,
            Launch::PerObjectRow => (images * shape.objects) as u32,
            Launch::PerPrior => (images * shape.priors).div_ceil(WORKGROUP_SIZE as usize) as u32,
            Launch::Single => 1,
        }
    }
}

/// One kernel launch over one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dispatch {
    pub kernel: Kernel,
    /// Index into the chunk list (chunk 0 for [`Kernel::ReduceBatch`]).
    pub chunk: usize,
    pub workgroups: u32,
}

/// What to read back to the host once the work is done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReadBack {
    pub gradients: bool,
    pub decisions: bool,
}

/// Everything one evaluation runs, in order, recorded into one command encoder and
/// submitted once: every chunk forward, the batch reduce (so N is known), then every
/// chunk's gradients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Recording {
    pub dispatches: Vec<Dispatch>,
    pub read_back: ReadBack,
}

impl Recording {
    /// The recording of one evaluation of a batch of `shape` split into `chunks`.
    pub fn evaluation(
        shape: &BatchShape,
        chunks: &[Chunk],
        gradients: bool,
        read_back: ReadBack,
    ) -> Self {
        let mut dispatches = Vec::new();
        let mut launch = |kernel: Kernel, chunk: usize, images: usize| {
            dispatches.push(Dispatch {
                kernel,
                chunk,
                workgroups: kernel.workgroups(shape, images),
            });
        };
        for (i, chunk) in chunks.iter().enumerate() {
            for kernel in [
                Kernel::MatchPriors,
                Kernel::MatchObjects,
                Kernel::MatchFinish,
                Kernel::PriorTerms,
                Kernel::Mine,
                Kernel::ReduceRows,
                Kernel::ReduceImage,
            ] {
                launch(kernel, i, chunk.images);
            }
        }
        launch(Kernel::ReduceBatch, 0, shape.batch);
        if gradients {
            for (i, chunk) in chunks.iter().enumerate() {
                launch(Kernel::GradConf, i, chunk.images);
                launch(Kernel::GradLoc, i, chunk.images);
            }
        }
        Self {
            dispatches,
            read_back,
        }
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
            Err(Error::Gpu(_))
        ));
    }

    #[test]
    fn gradients_come_after_the_batch_reduce() {
        let shape = shape(183);
        let chunks = chunks(&shape, 64 << 20, 256).unwrap();
        let recording = Recording::evaluation(&shape, &chunks, true, ReadBack::default());
        let reduce = recording
            .dispatches
            .iter()
            .position(|d| d.kernel == Kernel::ReduceBatch)
            .unwrap();
        assert!(recording.dispatches[..reduce]
            .iter()
            .all(|d| !matches!(d.kernel, Kernel::GradConf | Kernel::GradLoc)));
        // Per chunk: three match kernels, prior terms, mine, reduce_rows, reduce_image and
        // two gradient kernels; then one batch reduce.
        assert_eq!(recording.dispatches.len(), chunks.len() * 9 + 1);
    }
}
