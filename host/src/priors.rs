//! Prior boxes of a configuration given field by field (SPEC §2), checked before any box is
//! made: what a binding hands on from its caller.

use crate::error::{Error, Result};
use ssdkd_core::PriorConfig;

/// The most priors a custom configuration may emit (a bound on the allocation).
pub const MAX_PRIORS: usize = 1 << 24;

/// The priors of `config` in centre form (SPEC §2), after checking that it can give boxes:
/// a finite image size > 0, at least one feature map, each of size ≥ 1 with finite steps,
/// sizes and aspect ratios > 0, and at most [`MAX_PRIORS`] priors in all.
///
/// # Errors
/// [`Error::Config`] naming the field: `image_size`, `feature_maps`, `steps`, `min_sizes`,
/// `max_sizes` or `aspect_ratios` (the per-map fields name the map too).
pub fn checked(config: &PriorConfig<'_>) -> Result<Vec<[f32; 4]>> {
    let bad = |key: &str, problem: String| Error::Config {
        key: key.to_owned(),
        problem,
    };
    let positive = |v: f32| v.is_finite() && v > 0.0;
    if !positive(config.image_size) {
        return Err(bad(
            "image_size",
            format!("{} is not > 0", config.image_size),
        ));
    }
    if config.feature_maps.is_empty() {
        return Err(bad("feature_maps", "no feature map".into()));
    }
    let mut total = 0usize;
    for (k, map) in config.feature_maps.iter().enumerate() {
        let fields = [
            ("steps", map.step.unwrap_or(1.0)),
            ("min_sizes", map.min_size),
            ("max_sizes", map.max_size),
        ];
        let ratio = map
            .aspect_ratios
            .iter()
            .find(|&&a| !positive(a))
            .map(|&a| ("aspect_ratios", a));
        if let Some((key, v)) = fields.into_iter().find(|(_, v)| !positive(*v)).or(ratio) {
            return Err(bad(key, format!("map {k}: {v} is not > 0")));
        }
        let size = map.size as usize;
        let per_cell = 2 + 2 * map.aspect_ratios.len();
        total = size
            .checked_mul(size)
            .and_then(|n| n.checked_mul(per_cell)?.checked_add(total))
            .unwrap_or(usize::MAX);
        if size == 0 || total > MAX_PRIORS {
            let problem =
                format!("map {k}: sizes must be ≥ 1 and give at most {MAX_PRIORS} priors");
            return Err(bad("feature_maps", problem));
        }
    }
    Ok(config.priors())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssdkd_core::{FeatureMap, PriorPreset};

    fn map(size: u32, min_size: f32, aspect_ratios: &[f32]) -> FeatureMap<'_> {
        FeatureMap {
            size,
            step: None,
            min_size,
            max_size: 60.0,
            aspect_ratios,
        }
    }

    /// A preset's own configuration passes and gives the preset's priors.
    #[test]
    fn a_presets_configuration_gives_its_priors() {
        let config = PriorPreset::Ssd300.config();
        assert_eq!(checked(&config).unwrap(), config.priors());
    }

    /// Each field that cannot give boxes is refused, naming the field.
    #[test]
    fn bad_fields_are_config_errors_naming_the_field() {
        let ratios = [2.0];
        let cases: [(&str, PriorConfig<'_>); 5] = [
            (
                "image_size",
                PriorConfig {
                    image_size: 0.0,
                    feature_maps: &[map(10, 30.0, &ratios)],
                    clip: true,
                },
            ),
            (
                "feature_maps",
                PriorConfig {
                    image_size: 300.0,
                    feature_maps: &[],
                    clip: true,
                },
            ),
            (
                "feature_maps",
                PriorConfig {
                    image_size: 300.0,
                    feature_maps: &[map(0, 30.0, &ratios)],
                    clip: true,
                },
            ),
            (
                "feature_maps",
                PriorConfig {
                    image_size: 300.0,
                    // 2100² cells × 4 boxes = 17 640 000 > 2^24.
                    feature_maps: &[map(2100, 30.0, &ratios)],
                    clip: true,
                },
            ),
            (
                "min_sizes",
                PriorConfig {
                    image_size: 300.0,
                    feature_maps: &[map(10, f32::NAN, &ratios)],
                    clip: true,
                },
            ),
        ];
        for (key, config) in cases {
            match checked(&config) {
                Err(Error::Config { key: got, .. }) => assert_eq!(got, key, "{config:?}"),
                other => panic!("{config:?}: {other:?}"),
            }
        }
        let negative = [-2.0];
        let config = PriorConfig {
            image_size: 300.0,
            feature_maps: &[map(10, 30.0, &negative)],
            clip: true,
        };
        assert!(
            matches!(checked(&config), Err(Error::Config { key, .. }) if key == "aspect_ratios")
        );
    }
}
