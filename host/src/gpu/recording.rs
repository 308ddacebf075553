//! The [`Recording`] of one evaluation, described without wgpu (the wgpu calls are all in
//! `engine.rs`): per-chunk parameter uploads, dispatches already folded to `[x, y, 1]`,
//! and the downloads with their layout, which [`Recording::decode`] turns back into sums,
//! gradients and decisions.

use crate::batch::{BatchShape, Decisions, Gradients};
use crate::error::{Error, Result};
use crate::gpu::chunks::{chunks, Chunk};
use crate::gpu::kernels::{
    Kernel, Phase, GPU_MAX_TEMPERATURE, KERNELS, LOOP_SLACK, MAX_LOOP_ITERATIONS,
};
use crate::gpu::params::{GpuFinding, GpuSums, Params};
use crate::gpu::resources::Resource;
use ssdkd_core::stages::validate::ROW_BITS;
use ssdkd_core::LossConfig;
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
    /// The validate stage's first finding.
    Finding,
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
            Readback::Finding => Resource::Finding,
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
    /// The validate stage's first finding, when it ran.
    pub finding: Option<GpuFinding>,
    pub gradients: Option<Gradients>,
    pub decisions: Option<Decisions>,
}

/// What to compute and read back beyond the sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// Validate the inputs on the GPU (the validate stage) and read its finding back.
    pub validate: bool,
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
        if config.temperature > GPU_MAX_TEMPERATURE {
            return Err(Error::GpuUnsupported(format!(
                "temperature {} is over the GPU backend's {GPU_MAX_TEMPERATURE} \
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
        if wanted.validate {
            if shape.priors.max(shape.objects) >= 1 << ROW_BITS {
                return Err(Error::GpuUnsupported(format!(
                    "P = {} and M = {}: the validate stage numbers rows below 2^{ROW_BITS}",
                    shape.priors, shape.objects
                )));
            }
            for phase in [Phase::Validate, Phase::Report] {
                for (i, chunk) in chunks.iter().enumerate() {
                    launch(phase, i, chunk.images)?;
                }
            }
        }
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
        if wanted.validate {
            downloads.push(Readback::Finding);
        }
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
            finding: None,
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
                Readback::Finding => output.finding = Some(bytemuck::pod_read_unaligned(part)),
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
    use ssdkd_core::Stage;

    fn shape(batch: usize) -> BatchShape {
        BatchShape {
            batch,
            priors: 8732,
            classes: 21,
            objects: 7,
        }
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

    /// With validation, every chunk's `validate_rows` comes first, then every chunk's
    /// `validate_report`, then the forward; the finding is read back after the sums.
    #[test]
    fn validation_comes_before_the_forward() {
        let shape = shape(183);
        let wanted = Wanted {
            validate: true,
            ..Wanted::default()
        };
        let config = LossConfig::DEFAULT;
        let recording = Recording::evaluation(&shape, &config, &limits(64 << 20), wanted).unwrap();
        let n = recording.chunks.len();
        assert!(n > 1, "the batch is split into chunks");
        let names: Vec<(&str, usize)> = recording
            .dispatches
            .iter()
            .map(|d| (KERNELS[d.kernel].entry_point, d.chunk))
            .collect();
        let expected: Vec<(&str, usize)> = (0..n)
            .map(|c| ("validate_rows", c))
            .chain((0..n).map(|c| ("validate_report", c)))
            .collect();
        assert_eq!(names[..2 * n], expected[..]);
        assert!(names[2 * n..]
            .iter()
            .all(|(name, _)| !name.starts_with("validate")));
        let downloads: Vec<Readback> = recording.downloads.iter().map(|d| d.what).collect();
        assert_eq!(downloads, [Readback::Sums, Readback::Finding]);
        assert_eq!(
            recording.downloads[1].bytes,
            std::mem::size_of::<GpuFinding>() as u64
        );
    }

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
            validate: false,
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
}
