//! The kernel table ([`KERNELS`]): each kernel of the core's table with its launch shape,
//! phase and loop budget, in pipeline order; and the limits the loop budgets set.

use crate::batch::BatchShape;
use crate::gpu::params::WORKGROUP_SIZE;
use ssdkd_core::Stage;
/// How many workgroups a kernel launches over a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Launch {
    /// One thread per prior of every image.
    PerPrior,
    /// One thread per row of every image: `max(P, M)` rows, a prior row and an object row.
    PerRow,
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
    /// Once per chunk, first, where the inputs are validated on the GPU.
    Validate,
    /// Once per chunk after every chunk's [`Phase::Validate`], where the inputs are
    /// validated on the GPU.
    Report,
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
pub(crate) const GPU_MAX_TEMPERATURE: f32 = 20.0;

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
/// `validate_rows`: two logit rows (C each), three rows of four and one of five values.
fn validate_rows_iterations(s: &BatchShape) -> u64 {
    2 * s.classes as u64 + 17
}
/// `validate_report`: two strided loops over the B + 1 slots, a logit row (C) or a row of
/// four or five values.
fn validate_report_iterations(s: &BatchShape) -> u64 {
    2 * (s.batch as u64 + 1).div_ceil(u64::from(WORKGROUP_SIZE)) + s.classes as u64 + 5
}
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

/// Every kernel, in pipeline order: each row of `ssdkd_core::KERNELS` (its stage and entry
/// point, the name of its CPU twin) with what the GPU needs of it — launch shape, phase and
/// loop budget. Its bindings are read from its WGSL (`shader.rs`). Adding a kernel is one
/// row in the core's table, one here, its WGSL entry point and its CPU twin.
pub(crate) const KERNELS: [Kernel; ssdkd_core::KERNELS.len()] = {
    const fn kernel(
        (stage, entry_point): (Stage, &'static str),
        launch: Launch,
        phase: Phase,
        iterations: fn(&BatchShape) -> u64,
    ) -> Kernel {
        Kernel {
            stage,
            entry_point,
            launch,
            phase,
            iterations,
        }
    }
    use Launch::*;
    use Phase::*;
    [
        kernel(
            ssdkd_core::KERNELS[0],
            PerRow,
            Validate,
            validate_rows_iterations,
        ),
        kernel(
            ssdkd_core::KERNELS[1],
            Single,
            Report,
            validate_report_iterations,
        ),
        kernel(
            ssdkd_core::KERNELS[2],
            PerPrior,
            Forward,
            match_priors_iterations,
        ),
        kernel(
            ssdkd_core::KERNELS[3],
            PerObjectRow,
            Forward,
            match_objects_iterations,
        ),
        kernel(
            ssdkd_core::KERNELS[4],
            PerImage,
            Forward,
            match_finish_iterations,
        ),
        kernel(
            ssdkd_core::KERNELS[5],
            PerPrior,
            Forward,
            prior_terms_iterations,
        ),
        kernel(ssdkd_core::KERNELS[6], PerImage, Forward, mine_iterations),
        kernel(
            ssdkd_core::KERNELS[7],
            PerPrior,
            Forward,
            reduce_rows_iterations,
        ),
        kernel(
            ssdkd_core::KERNELS[8],
            PerImage,
            Forward,
            reduce_image_iterations,
        ),
        kernel(
            ssdkd_core::KERNELS[9],
            Single,
            Batch,
            reduce_batch_iterations,
        ),
        kernel(
            ssdkd_core::KERNELS[10],
            PerPrior,
            Backward,
            grad_conf_iterations,
        ),
        kernel(ssdkd_core::KERNELS[11], PerPrior, Backward, no_loop),
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
            Launch::PerRow => (images * shape.priors.max(shape.objects) as u64)
                .div_ceil(u64::from(WORKGROUP_SIZE)),
            Launch::Single => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's kernel table is the core's, in the same order.
    #[test]
    fn the_kernel_table_follows_the_core() {
        let host: Vec<(Stage, &str)> = KERNELS.iter().map(|k| (k.stage, k.entry_point)).collect();
        assert_eq!(host, ssdkd_core::KERNELS);
    }
}
