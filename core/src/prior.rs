//! Prior (default) boxes, SPEC §2.

use crate::math;

/// One feature map of an SSD head (SPEC §2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FeatureMap<'a> {
    /// f: the map is f × f cells.
    pub size: u32,
    /// Explicit step in pixels; `f_k = S / step` when given, else `f_k = f`.
    pub step: Option<f32>,
    /// Minimum box size in pixels (`s_k = min_size / S`).
    pub min_size: f32,
    /// Maximum box size in pixels (`s'_k = sqrt(s_k · max_size / S)`).
    pub max_size: f32,
    /// Aspect ratios beyond 1; each adds two boxes per cell.
    pub aspect_ratios: &'a [f32],
}

impl FeatureMap<'_> {
    /// Boxes emitted per cell: 2 + 2 per aspect ratio.
    #[must_use]
    pub fn boxes_per_cell(&self) -> usize {
        2 + 2 * self.aspect_ratios.len()
    }

    /// Boxes emitted by the whole map.
    #[must_use]
    pub fn num_priors(&self) -> usize {
        let f = self.size as usize;
        f * f * self.boxes_per_cell()
    }
}

/// A whole prior-box configuration: any sizes, maps, steps, ratios and clip (SPEC §2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PriorConfig<'a> {
    /// S, the image size in pixels.
    pub image_size: f32,
    /// The feature maps, in order.
    pub feature_maps: &'a [FeatureMap<'a>],
    /// Clamp every coordinate to [0, 1] afterwards.
    pub clip: bool,
}

/// The named presets of SPEC §2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PriorPreset {
    /// SSD300 (VOC/COCO): 8732 priors.
    Ssd300,
    /// SSD300 with explicit steps: 8732 priors.
    Ssd300Strided,
    /// SSD512: 24656 priors.
    Ssd512,
    /// MobileNet-SSD 300: 3000 priors.
    Mobilenet300,
}

const MIN_SIZES: [f32; 6] = [30.0, 60.0, 111.0, 162.0, 213.0, 264.0];
const MAX_SIZES: [f32; 6] = [60.0, 111.0, 162.0, 213.0, 264.0, 315.0];
const AR_2: &[f32] = &[2.0];
const AR_23: &[f32] = &[2.0, 3.0];
const SSD_RATIOS: [&[f32]; 6] = [AR_2, AR_23, AR_23, AR_23, AR_2, AR_2];

const fn preset_maps(
    sizes: [u32; 6],
    steps: Option<[f32; 6]>,
    ratios: [&'static [f32]; 6],
) -> [FeatureMap<'static>; 6] {
    let mut maps = [FeatureMap {
        size: 0,
        step: None,
        min_size: 0.0,
        max_size: 0.0,
        aspect_ratios: AR_2,
    }; 6];
    let mut k = 0;
    while k < 6 {
        maps[k] = FeatureMap {
            size: sizes[k],
            step: match steps {
                Some(s) => Some(s[k]),
                None => None,
            },
            min_size: MIN_SIZES[k],
            max_size: MAX_SIZES[k],
            aspect_ratios: ratios[k],
        };
        k += 1;
    }
    maps
}

static SSD300_MAPS: [FeatureMap<'static>; 6] = preset_maps([38, 19, 10, 5, 3, 1], None, SSD_RATIOS);
static SSD300_STRIDED_MAPS: [FeatureMap<'static>; 6] = preset_maps(
    [38, 19, 10, 5, 3, 1],
    Some([8.0, 16.0, 32.0, 64.0, 100.0, 300.0]),
    SSD_RATIOS,
);
static SSD512_MAPS: [FeatureMap<'static>; 6] = preset_maps([64, 32, 16, 8, 6, 4], None, SSD_RATIOS);
static MOBILENET300_MAPS: [FeatureMap<'static>; 6] =
    preset_maps([19, 10, 5, 3, 2, 1], None, [AR_23; 6]);

/// A preset's priors in centre form, in SPEC §2 order (what a loss taking
/// `impl Into<Vec<[f32; 4]>>` accepts).
#[cfg(feature = "alloc")]
impl From<PriorPreset> for alloc::vec::Vec<[f32; 4]> {
    fn from(preset: PriorPreset) -> Self {
        preset.config().priors()
    }
}

/// A configuration's priors in centre form, in SPEC §2 order.
#[cfg(feature = "alloc")]
impl From<&PriorConfig<'_>> for alloc::vec::Vec<[f32; 4]> {
    fn from(config: &PriorConfig<'_>) -> Self {
        config.priors()
    }
}

impl PriorPreset {
    /// Every preset, in SPEC order.
    pub const ALL: [PriorPreset; 4] = [
        PriorPreset::Ssd300,
        PriorPreset::Ssd300Strided,
        PriorPreset::Ssd512,
        PriorPreset::Mobilenet300,
    ];

    /// The preset's name as SPEC §2 and the command line spell it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            PriorPreset::Ssd300 => "ssd300",
            PriorPreset::Ssd300Strided => "ssd300-strided",
            PriorPreset::Ssd512 => "ssd512",
            PriorPreset::Mobilenet300 => "mobilenet300",
        }
    }

    /// Looks a preset up by its name; `None` for an unknown name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The preset's configuration.
    #[must_use]
    pub fn config(self) -> PriorConfig<'static> {
        let (image_size, feature_maps): (f32, &'static [FeatureMap<'static>]) = match self {
            PriorPreset::Ssd300 => (300.0, &SSD300_MAPS),
            PriorPreset::Ssd300Strided => (300.0, &SSD300_STRIDED_MAPS),
            PriorPreset::Ssd512 => (512.0, &SSD512_MAPS),
            PriorPreset::Mobilenet300 => (300.0, &MOBILENET300_MAPS),
        };
        PriorConfig {
            image_size,
            feature_maps,
            clip: true,
        }
    }
}

impl PriorConfig<'_> {
    /// P, the number of priors this configuration emits.
    #[must_use]
    pub fn num_priors(&self) -> usize {
        self.feature_maps.iter().map(FeatureMap::num_priors).sum()
    }

    /// Writes the priors in centre form `[cx, cy, w, h]`, in SPEC §2 order, into `out`.
    /// Computed in f64 and rounded once to f32, like the Python reference.
    ///
    /// # Panics
    /// If `out.len() != self.num_priors()`.
    pub fn write_priors(&self, out: &mut [[f32; 4]]) {
        assert_eq!(out.len(), self.num_priors(), "prior buffer length");
        let s = f64::from(self.image_size);
        let mut slots = out.iter_mut();
        let mut emit = |b: [f64; 4]| {
            let slot = slots.next().expect("length checked above");
            *slot = b.map(|v| {
                let v = if self.clip { v.clamp(0.0, 1.0) } else { v };
                v as f32
            });
        };
        for map in self.feature_maps {
            let f_k = match map.step {
                Some(step) => s / f64::from(step),
                None => f64::from(map.size),
            };
            let s_k = f64::from(map.min_size) / s;
            let s_k_prime = math::sqrt_f64(s_k * (f64::from(map.max_size) / s));
            for i in 0..map.size {
                for j in 0..map.size {
                    let cx = (f64::from(j) + 0.5) / f_k;
                    let cy = (f64::from(i) + 0.5) / f_k;
                    emit([cx, cy, s_k, s_k]);
                    emit([cx, cy, s_k_prime, s_k_prime]);
                    for &ar in map.aspect_ratios {
                        let r = math::sqrt_f64(f64::from(ar));
                        emit([cx, cy, s_k * r, s_k / r]);
                        emit([cx, cy, s_k / r, s_k * r]);
                    }
                }
            }
        }
    }

    /// The priors in centre form, in SPEC §2 order.
    #[cfg(feature = "alloc")]
    #[must_use]
    pub fn priors(&self) -> alloc::vec::Vec<[f32; 4]> {
        let mut out = alloc::vec![[0.0; 4]; self.num_priors()];
        self.write_priors(&mut out);
        out
    }
}
