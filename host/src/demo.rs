//! Deterministic synthetic batches: the `demo` batch (SSD300/VOC-like) and the batches
//! `bench` times. Objects are random boxes; the teacher's outputs lie closer to the truth
//! than the student's.

use crate::batch::{BatchShape, OwnedBatch};
use crate::error::{Error, Result};
use ssdkd_core::stages::r#match::{match_image, ObjectScratch, Offsets};
use ssdkd_core::{LossConfig, PriorPreset, Tensors};

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// B, images.
    pub batch: usize,
    /// C, classes including background.
    pub classes: usize,
    /// The prior preset (P follows from it).
    pub preset: PriorPreset,
    /// M, object rows per image.
    pub objects: usize,
    /// Whether images have between 1 and M objects (padding rows after them) rather than M.
    pub vary_objects: bool,
    /// Seed of the generator: same seed, same batch.
    pub seed: u64,
}

impl SyntheticSpec {
    /// The `demo` batch: SSD300 priors, VOC's 21 classes, up to 6 objects per image.
    #[must_use]
    pub fn demo(batch: usize) -> Self {
        Self {
            batch,
            classes: 21,
            preset: PriorPreset::Ssd300,
            objects: 6,
            vary_objects: true,
            seed: 2017,
        }
    }

    /// A `bench` batch: `objects` real objects in every image.
    #[must_use]
    pub fn bench(batch: usize, classes: usize, preset: PriorPreset) -> Self {
        Self {
            batch,
            classes,
            preset,
            objects: 6,
            vary_objects: false,
            seed: 300,
        }
    }
}

impl SyntheticSpec {
    /// The largest B, C and M a synthetic batch is made with (a bound on the allocation
    /// for callers that take them from a user).
    pub const MAX_DIMENSION: usize = 4096;

    /// Checks that B, C and M are in range: B ≥ 1, C ≥ 2, M ≥ 1, none over
    /// [`SyntheticSpec::MAX_DIMENSION`] (what [`synthetic_batch`] needs).
    ///
    /// # Errors
    /// [`Error::Config`] naming `batch`, `classes` or `objects`.
    pub fn check(&self) -> Result<()> {
        let ranges = [
            ("batch", self.batch, 1),
            ("classes", self.classes, 2),
            ("objects", self.objects, 1),
        ];
        let max = Self::MAX_DIMENSION;
        match ranges
            .into_iter()
            .find(|&(_, v, low)| !(low..=max).contains(&v))
        {
            Some((key, v, low)) => Err(Error::Config {
                key: key.into(),
                problem: format!("{v} is not in {low}..={max}"),
            }),
            None => Ok(()),
        }
    }
}

/// SplitMix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let u = self.uniform().max(1e-7);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// Generates the batch `spec` describes.
///
/// # Panics
/// When `spec` has no image or fewer than two classes ([`SyntheticSpec::check`] finds
/// them first).
#[must_use]
pub fn synthetic_batch(spec: &SyntheticSpec) -> OwnedBatch {
    let priors_rows = spec.preset.config().priors();
    let (b, p, c, m) = (
        spec.batch,
        priors_rows.len(),
        spec.classes,
        spec.objects.max(1),
    );
    let mut rng = Rng(spec.seed);
    let config = LossConfig::DEFAULT;
    assert!(b > 0 && c >= 2, "a synthetic batch needs B > 0 and C >= 2");
    let mut out = Tensors::<Vec<f32>>::default();
    let mut objects = vec![ObjectScratch::default(); m];
    let mut conf_target = vec![0u32; p];
    let mut loc_target = vec![[0.0f32; 4]; p];
    for _ in 0..b {
        let count = if spec.vary_objects {
            1 + (rng.next_u64() % m as u64) as usize
        } else {
            m
        };
        let mut targets = vec![[0.0, 0.0, 0.0, 0.0, -1.0f32]; m];
        for row in targets.iter_mut().take(count) {
            let (w, h) = (rng.range(0.1, 0.6), rng.range(0.1, 0.6));
            let (cx, cy) = (
                rng.range(w / 2.0, 1.0 - w / 2.0),
                rng.range(h / 2.0, 1.0 - h / 2.0),
            );
            let label = (rng.next_u64() % (c as u64 - 1)) as f32;
            *row = [
                cx - w / 2.0,
                cy - h / 2.0,
                cx + w / 2.0,
                cy + h / 2.0,
                label,
            ];
        }
        match_image(
            &targets,
            &priors_rows,
            config.overlap_threshold,
            config.variance,
            Offsets::All,
            &mut objects,
            &mut conf_target,
            &mut loc_target,
        );
        for (&label, offsets) in conf_target.iter().zip(&loc_target) {
            for &t in offsets {
                out.teacher_loc.push(t + 0.15 * rng.normal());
                out.student_loc.push(t + 0.6 * rng.normal());
            }
            for class in 0..c as u32 {
                let hit = if class == label { 1.0 } else { 0.0 };
                out.teacher_conf.push(3.0 * hit + rng.normal());
                out.student_conf.push(1.5 * hit + 1.2 * rng.normal());
            }
        }
        out.targets.extend(targets.iter().flatten());
    }
    let shape = BatchShape {
        batch: b,
        priors: p,
        classes: c,
        objects: m,
    };
    out.priors = bytemuck::cast_slice(&priors_rows).to_vec();
    let [student_loc, student_conf, teacher_loc, teacher_conf, targets, priors] = out.to_array();
    OwnedBatch::new(
        shape,
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        priors,
    )
    .expect("the lengths follow from the shape")
}
