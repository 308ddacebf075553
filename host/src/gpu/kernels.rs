//! The kernel table ([`KERNELS`]): a row per entry point, named as the core's row of the
//! same kernel (`ssdkd_core::KERNELS`) and with its stage, and what the GPU needs of it —
//! launch shape, phase and loop budget — in pipeline order; and the limits the loop
//! budgets set.

use crate::batch::BatchShape;
use crate::gpu::params::WORKGROUP_SIZE;
use ssdkd_core::stages::{RADIX, RADIX_BITS};
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

impl Launch {
    /// The `@workgroup_size` every launch shape assumes, `(WORKGROUP_SIZE, 1, 1)`: a
    /// thread per prior or row covers `WORKGROUP_SIZE` of them per workgroup
    /// ([`Kernel::workgroups`]), and a workgroup per object row, image or batch strides its
    /// loops and sums its pairwise tree over `WORKGROUP_SIZE` invocations (the loop
    /// budgets below).
    pub const fn workgroup_size(self) -> [u32; 3] {
        match self {
            Launch::PerPrior
            | Launch::PerRow
            | Launch::PerObjectRow
            | Launch::PerImage
            | Launch::Single => [WORKGROUP_SIZE, 1, 1],
        }
    }
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
/// `mine`: the strided loop of k = 0; else a radix round per digit of the 64-bit key, each
/// of (histogram clear, strided priors, up to `RADIX` digits), the final strided loop, and
/// the rounds themselves.
fn mine_iterations(s: &BatchShape) -> u64 {
    let rounds = u64::from(64 / RADIX_BITS);
    strided_priors(s)
        + rounds
            * (u64::from(RADIX.div_ceil(WORKGROUP_SIZE)) + strided_priors(s) + u64::from(RADIX))
        + strided_priors(s)
        + rounds
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

/// Every kernel, in pipeline order (the order [`Phase`]'s launches dispatch in): a row per
/// row of `ssdkd_core::KERNELS`, named by its entry point and stage as the core's row (its
/// WGSL entry point in `shaders/<stage>.wgsl` and its CPU twin), with what the GPU needs of
/// it — launch shape, phase and loop budget. Its bindings are read from its WGSL
/// (`shader.rs`). Adding a kernel is one row in the core's table, one here, its WGSL entry
/// point and its CPU twin; the tests below hold the rows to the core's by name and to the
/// shaders' entry points and workgroup sizes.
#[rustfmt::skip] // A table: a row a line.
pub(crate) const KERNELS: &[Kernel] = {
    const fn row(
        stage: Stage,
        entry_point: &'static str,
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
    use Stage as S;
    &[
        row(S::Validate, "validate_rows", PerRow, Validate, validate_rows_iterations),
        row(S::Validate, "validate_report", Single, Report, validate_report_iterations),
        row(S::Match, "match_priors", PerPrior, Forward, match_priors_iterations),
        row(S::Match, "match_objects", PerObjectRow, Forward, match_objects_iterations),
        row(S::Match, "match_finish", PerImage, Forward, match_finish_iterations),
        row(S::PriorTerms, "prior_terms", PerPrior, Forward, prior_terms_iterations),
        row(S::Mine, "mine", PerImage, Forward, mine_iterations),
        row(S::Reduce, "reduce_rows", PerPrior, Forward, reduce_rows_iterations),
        row(S::Reduce, "reduce_image", PerImage, Forward, reduce_image_iterations),
        row(S::Reduce, "reduce_batch", Single, Batch, reduce_batch_iterations),
        row(S::Grad, "grad_conf", PerPrior, Backward, grad_conf_iterations),
        row(S::Grad, "grad_loc", PerPrior, Backward, no_loop),
    ]
};

/// The index in [`KERNELS`] of the row named `entry_point`.
#[cfg(test)]
pub(crate) fn index_of(entry_point: &str) -> Option<usize> {
    KERNELS.iter().position(|k| k.entry_point == entry_point)
}

impl Kernel {
    /// The debug label of its pipeline and bind groups: `"ssdkd.<stage>.<entry point>"`.
    pub fn label(&self) -> String {
        format!("ssdkd.{}.{}", self.stage.name(), self.entry_point)
    }

    /// Workgroups it launches over `images` images of `shape`.
    pub fn workgroups(&self, shape: &BatchShape, images: usize) -> u64 {
        let images = images as u64;
        let threads = u64::from(self.launch.workgroup_size()[0]);
        match self.launch {
            Launch::PerImage => images,
            Launch::PerObjectRow => images * shape.objects as u64,
            Launch::PerPrior => (images * shape.priors as u64).div_ceil(threads),
            Launch::PerRow => (images * shape.priors.max(shape.objects) as u64).div_ceil(threads),
            Launch::Single => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::shader;
    use std::path::Path;
    use wgpu::naga;

    /// Every row of the core's table has exactly one row here of the same entry point and
    /// stage, every row here has its row there, and the rows come in the core's pipeline
    /// order (the order the recording dispatches each phase's kernels in).
    #[test]
    fn every_core_kernel_has_one_row_of_its_name_and_stage() {
        for &(stage, name) in ssdkd_core::KERNELS {
            let rows: Vec<&Kernel> = KERNELS.iter().filter(|k| k.entry_point == name).collect();
            assert_eq!(rows.len(), 1, "{name}: {} host rows, not 1", rows.len());
            assert_eq!(rows[0].stage, stage, "{name}: the host's stage");
        }
        for kernel in KERNELS {
            assert!(
                ssdkd_core::KERNELS
                    .iter()
                    .any(|&(_, name)| name == kernel.entry_point),
                "{}: no row in ssdkd_core::KERNELS (no CPU twin)",
                kernel.label()
            );
        }
        let host: Vec<&str> = KERNELS.iter().map(|k| k.entry_point).collect();
        let core: Vec<&str> = ssdkd_core::KERNELS.iter().map(|&(_, n)| n).collect();
        assert_eq!(host, core, "pipeline order");
    }

    /// The modules of every file of `shaders/`, with its stage: a stage's file as the host
    /// compiles it (`shader::module`), an include after `shared.wgsl` (as every stage
    /// reads it) with none.
    fn shader_files() -> Vec<(String, Option<Stage>, naga::Module)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
        let shared = std::fs::read_to_string(dir.join("shared.wgsl")).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
            .collect();
        files.sort();
        assert!(files.len() > Stage::ALL.len(), "{files:?}");
        files
            .iter()
            .map(|path| {
                let file = path.file_name().unwrap().to_string_lossy().into_owned();
                let stem = path.file_stem().unwrap().to_string_lossy();
                let stage = Stage::ALL.into_iter().find(|s| s.name() == stem);
                let module = match stage {
                    Some(stage) => shader::module(stage).unwrap_or_else(|e| panic!("{e}")).0,
                    None => {
                        let mut source = shared.clone();
                        if file != "shared.wgsl" {
                            source += &std::fs::read_to_string(path).unwrap();
                        }
                        naga::front::wgsl::parse_str(&source)
                            .unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(&source)))
                    }
                };
                (file, stage, module)
            })
            .collect()
    }

    /// Every `@compute` entry point naga finds in `shaders/` is in a stage's file and has
    /// the row of its name and that stage, and naga's `@workgroup_size` of it is what the
    /// row's launch shape assumes; and every row is such an entry point.
    #[test]
    fn every_entry_point_has_its_row_and_its_launch_workgroup_size() {
        let mut found = Vec::new();
        let mut failures = Vec::new();
        for (file, stage, module) in shader_files() {
            for entry in &module.entry_points {
                let name = entry.name.as_str();
                found.push(name.to_string());
                let kernel = KERNELS.iter().find(|k| k.entry_point == name);
                let failure = if entry.stage != naga::ShaderStage::Compute {
                    format!("{:?}, not a compute entry point", entry.stage)
                } else if stage.is_none() {
                    "an entry point in no stage's file".into()
                } else if let Some(kernel) = kernel.filter(|k| Some(k.stage) != stage) {
                    format!("its row's stage is {:?}", kernel.stage)
                } else if entry.workgroup_size_overrides.is_some() {
                    "an overridable @workgroup_size".into()
                } else if let Some(kernel) = kernel {
                    let assumed = kernel.launch.workgroup_size();
                    if entry.workgroup_size == assumed {
                        continue;
                    }
                    format!(
                        "@workgroup_size {:?}, but its {:?} launch assumes {assumed:?}",
                        entry.workgroup_size, kernel.launch
                    )
                } else {
                    "no kernel row of its name".into()
                };
                failures.push(format!("{file} {name}: {failure}"));
            }
        }
        for kernel in KERNELS {
            if !found.iter().any(|name| name == kernel.entry_point) {
                failures.push(format!("{}: no entry point in shaders/", kernel.label()));
            }
        }
        found.sort();
        if let Some(twice) = found.windows(2).find(|w| w[0] == w[1]) {
            failures.push(format!("{}: two entry points of that name", twice[0]));
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
        assert_eq!(found.len(), KERNELS.len());
    }
}
