//! The gradient buffers of the CPU backend's gradient pass, and all of the host's `unsafe`
//! buffer code: a buffer is allocated without being zeroed, each image's chunk is zeroed
//! on whichever core takes the image (streaming stores, or a fresh mapping the kernel has
//! zeroed), and the buffer becomes a `Vec<f32>` once every chunk was zeroed.
//! [`zeroed_per_image`] is the one safe entry point.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// From this many bytes on, glibc's allocator maps every allocation afresh (its largest
/// mmap threshold, 32 MiB on 64-bit) and hands it back to the system when freed.
const FRESH_MAPPING: usize = 32 << 20;

/// Two fresh gradient buffers of `items.len()` chunks each, of `conf_len` and of
/// `loc_len` values: each item's pair of chunks is zeroed ([`zeroed`]) and handed, with
/// the item's index and the item, to `each` on whichever core takes it. Returns both
/// buffers (zeros wherever `each` wrote nothing) and `each`'s results in item order.
///
/// # Panics
/// When `conf_len` or `loc_len` is 0.
pub(super) fn zeroed_per_image<T: Send, R: Send>(
    items: &mut [T],
    conf_len: usize,
    loc_len: usize,
    each: impl Fn(usize, &mut T, &mut [f32], &mut [f32]) -> R + Sync,
) -> (Vec<f32>, Vec<f32>, Vec<R>) {
    assert!(conf_len > 0 && loc_len > 0, "empty gradient chunks");
    let mut conf = GradientBuffer::new(items.len() * conf_len);
    let mut loc = GradientBuffer::new(items.len() * loc_len);
    let (conf_fresh, loc_fresh) = (conf.fresh, loc.fresh);
    let results = items
        .par_iter_mut()
        .zip(conf.slots().par_chunks_mut(conf_len))
        .zip(loc.slots().par_chunks_mut(loc_len))
        .enumerate()
        .map(|(i, ((item, conf), loc))| {
            each(i, item, zeroed(conf, conf_fresh), zeroed(loc, loc_fresh))
        })
        .collect();
    // SAFETY: each buffer holds exactly `items.len()` chunks, the zip visited every item
    // once, and `zeroed` initialised each item's chunks.
    let buffers = unsafe { (conf.finish(), loc.finish()) };
    (buffers.0, buffers.1, results)
}

/// A gradient buffer of `n` values that the gradient pass zeroes image by image
/// ([`zeroed`]) before writing the selected rows:
/// - below [`FRESH_MAPPING`] bytes, uninitialised capacity, zeroed with streaming stores
///   ([`zero_streaming`]) by whichever core takes the image (the heap's recycled memory is
///   not zero, and a `vec![0.0; n]` would be zeroed by one thread up front);
/// - from it on (`fresh`), `vec![0.0; n]` (calloc), whose fresh mapping the kernel zeroes
///   page by page when first written (no second zeroing), with 2 MiB pages asked for on
///   Linux ([`advise_huge_pages`]) so that a large batch takes few page faults.
struct GradientBuffer {
    values: Vec<f32>,
    len: usize,
    fresh: bool,
}

impl GradientBuffer {
    fn new(len: usize) -> Self {
        if len * 4 >= FRESH_MAPPING {
            let values = vec![0.0; len];
            advise_huge_pages(&values);
            Self {
                values,
                len,
                fresh: true,
            }
        } else {
            Self {
                values: Vec::with_capacity(len),
                len,
                fresh: false,
            }
        }
    }

    /// The buffer's `len` values, each to be passed through [`zeroed`].
    fn slots(&mut self) -> &mut [MaybeUninit<f32>] {
        if self.fresh {
            let values = self.values.as_mut_slice();
            // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and nothing writes an
            // uninitialised value through the view (`zeroed` only writes zeros).
            unsafe { &mut *(std::ptr::from_mut(values) as *mut [MaybeUninit<f32>]) }
        } else {
            &mut self.values.spare_capacity_mut()[..self.len]
        }
    }

    /// The values.
    ///
    /// # Safety
    /// Every slot of [`GradientBuffer::slots`] went through [`zeroed`].
    unsafe fn finish(mut self) -> Vec<f32> {
        // SAFETY: the capacity is at least `len`, and the caller initialised every value.
        unsafe { self.values.set_len(self.len) };
        self.values
    }
}

/// `chunk` as zeros: zeroed here ([`zero_streaming`]) unless it is a fresh mapping's
/// (`fresh`, already zero).
fn zeroed(chunk: &mut [MaybeUninit<f32>], fresh: bool) -> &mut [f32] {
    if !fresh {
        zero_streaming(chunk);
    }
    // SAFETY: every value of `chunk` is initialised: written just now, or zero already.
    unsafe { &mut *(std::ptr::from_mut(chunk) as *mut [f32]) }
}

/// Writes zeros over `chunk` with non-temporal (streaming) stores on x86-64: the lines go
/// to memory without being read first (a plain store reads each line it writes, so the
/// zeroing moved the gradient's bytes twice) and without evicting the caches. Elsewhere,
/// plain writes.
fn zero_streaming(chunk: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_setzero_ps, _mm_sfence, _mm_stream_ps};
        let len = chunk.len();
        let head = chunk.as_ptr().align_offset(16).min(len);
        let body = (len - head) / 4 * 4;
        for value in &mut chunk[..head] {
            value.write(0.0);
        }
        let aligned = chunk[head..].as_mut_ptr().cast::<f32>();
        // SAFETY: `aligned` is 16-byte aligned and `aligned + j .. aligned + j + 4` lies
        // inside `chunk` for every `j < body` (a multiple of 4 at most `len - head`); the
        // fence orders the streaming stores before anything this thread does next (rayon's
        // join then publishes them to the other threads).
        unsafe {
            let zero = _mm_setzero_ps();
            for j in (0..body).step_by(4) {
                _mm_stream_ps(aligned.add(j), zero);
            }
            _mm_sfence();
        }
        for value in &mut chunk[head + body..] {
            value.write(0.0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for value in chunk {
        value.write(0.0);
    }
}

/// Asks Linux for transparent huge pages (2 MiB) over the whole pages inside `values`
/// (`madvise(MADV_HUGEPAGE)`; advice only: where the system has them off, nothing
/// changes).
#[cfg(target_os = "linux")]
fn advise_huge_pages(values: &[f32]) {
    const HUGE_PAGE: usize = 2 << 20;
    let start = values.as_ptr() as usize;
    let end = start + std::mem::size_of_val(values);
    let aligned = start.next_multiple_of(HUGE_PAGE);
    if end > aligned + HUGE_PAGE {
        let len = (end - aligned) / HUGE_PAGE * HUGE_PAGE;
        // SAFETY: advice on whole pages inside the live allocation `values`; it changes
        // no contents.
        unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    }
}

/// Elsewhere, nothing to ask.
#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: &[f32]) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kinds of gradient buffer give `n` zeros once every chunk went through
    /// `zeroed`: the heap's (below the fresh-mapping size, after a freed buffer of NaNs
    /// that the allocator may hand back) and the fresh mapping's.
    #[test]
    fn gradient_buffers_are_zeros_below_and_above_the_fresh_mapping_size() {
        for n in [1000, (FRESH_MAPPING / 4) - 1, FRESH_MAPPING / 4 + 12345] {
            drop(vec![f32::NAN; n]);
            let mut buffer = GradientBuffer::new(n);
            assert_eq!(buffer.fresh, n * 4 >= FRESH_MAPPING);
            let fresh = buffer.fresh;
            buffer.slots().par_chunks_mut(4099).for_each(|chunk| {
                zeroed(chunk, fresh);
            });
            // SAFETY: every chunk went through `zeroed` just above.
            let zeros = unsafe { buffer.finish() };
            assert_eq!(zeros.len(), n);
            assert!(zeros.iter().all(|&z| z.to_bits() == 0), "n = {n}");
        }
    }

    /// `zeroed_per_image` hands each item its own chunks, zeroed, and keeps what `each`
    /// wrote; the results come in item order.
    #[test]
    fn each_image_gets_its_own_zeroed_chunks() {
        drop(vec![f32::NAN; 7 * 5 * 3]);
        let mut items: Vec<usize> = (0..7).collect();
        let (conf, loc, results) = zeroed_per_image(&mut items, 5, 3, |i, item, conf, loc| {
            assert!(conf.iter().chain(loc.iter()).all(|&z| z.to_bits() == 0));
            conf[0] = i as f32;
            loc[2] = *item as f32 + 0.5;
            10 * i
        });
        assert_eq!(results, (0..7).map(|i| 10 * i).collect::<Vec<_>>());
        for i in 0..7 {
            assert_eq!(conf[5 * i..5 * i + 5], [i as f32, 0.0, 0.0, 0.0, 0.0]);
            assert_eq!(loc[3 * i..3 * i + 3], [0.0, 0.0, i as f32 + 0.5]);
        }
    }
}
