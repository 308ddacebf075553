//! How a batch is split into chunks of whole images so that no storage binding exceeds the
//! adapter's `max_storage_buffer_binding_size` ([`chunks`]), and the windows each chunk
//! binds of every tensor layout.

use crate::batch::BatchShape;
use crate::error::{Error, Result};
use crate::gpu::params::{GpuSums, WindowBases};

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
}
