//! Prior presets (SPEC §2): counts, first and last boxes, and equality with the priors the
//! golden files were made with.

use ssdkd_core::prior::{FeatureMap, PriorConfig, PriorPreset};
use ssdkd_tests::{golden_files, load_golden};

#[test]
fn preset_counts() {
    let counts = PriorPreset::ALL.map(|p| p.config().num_priors());
    assert_eq!(counts, [8732, 8732, 24656, 3000]);
    for preset in PriorPreset::ALL {
        assert_eq!(preset.config().priors().len(), preset.config().num_priors());
        assert_eq!(PriorPreset::from_name(preset.name()), Some(preset));
    }
    assert_eq!(PriorPreset::from_name("ssd301"), None);
}

#[test]
fn first_and_last_boxes() {
    // First box of every preset: cell (0, 0) of the first map, size s_k = min_size / S.
    for (preset, f_k, s) in [
        (PriorPreset::Ssd300, 38.0, 300.0),
        (PriorPreset::Ssd300Strided, 300.0 / 8.0, 300.0),
        (PriorPreset::Ssd512, 64.0, 512.0),
        (PriorPreset::Mobilenet300, 19.0, 300.0),
    ] {
        let priors = preset.config().priors();
        let c = (0.5f64 / f_k) as f32;
        let s_k = (30.0f64 / s) as f32;
        assert_eq!(priors[0], [c, c, s_k, s_k], "{} first box", preset.name());
        // Second box: s'_k = sqrt(s_k · max_size / S).
        let s_prime = ((30.0f64 / s) * (60.0 / s)).sqrt() as f32;
        assert_eq!(
            priors[1],
            [c, c, s_prime, s_prime],
            "{} second box",
            preset.name()
        );
        // Last box: the last map's last cell, the last ratio's tall box, clipped to [0, 1].
        let maps = preset.config().feature_maps;
        let last = maps[maps.len() - 1];
        let f = f64::from(last.size);
        let f_last = last.step.map_or(f, |step| s / f64::from(step));
        let centre = ((f - 0.5) / f_last) as f32;
        let s_last = 264.0 / s;
        let ar = f64::from(*last.aspect_ratios.last().unwrap()).sqrt();
        let expected = [
            centre,
            centre,
            (s_last / ar) as f32,
            ((s_last * ar) as f32).min(1.0),
        ];
        assert_eq!(
            *priors.last().unwrap(),
            expected,
            "{} last box",
            preset.name()
        );
    }
}

#[test]
fn presets_equal_the_golden_priors() {
    for path in golden_files() {
        let case = load_golden(&path);
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let header = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1;
        let preset_name = header.metadata().as_ref().unwrap()["prior_preset"].clone();
        let preset = PriorPreset::from_name(&preset_name).unwrap();
        let golden: Vec<f32> = st
            .tensor("priors")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let ours = preset.config().priors();
        let ours: &[f32] = bytemuck::cast_slice(&ours);
        assert_eq!(ours.len(), golden.len(), "{}", case.name);
        for (i, (a, b)) in ours.iter().zip(&golden).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "{} prior value {i}: {a} vs {b}",
                case.name
            );
        }
    }
}

#[test]
fn custom_configuration() {
    let maps = [
        FeatureMap {
            size: 2,
            step: None,
            min_size: 50.0,
            max_size: 100.0,
            aspect_ratios: &[],
        },
        FeatureMap {
            size: 1,
            step: Some(200.0),
            min_size: 100.0,
            max_size: 180.0,
            aspect_ratios: &[4.0],
        },
    ];
    let config = PriorConfig {
        image_size: 200.0,
        feature_maps: &maps,
        clip: false,
    };
    assert_eq!(config.num_priors(), 2 * 2 * 2 + 4);
    let priors = config.priors();
    // Row-major cells: (i = 0, j = 1) is the third and fourth box.
    assert_eq!(priors[2], [0.75, 0.25, 0.25, 0.25]);
    assert_eq!(priors[3][0..2], [0.75, 0.25]);
    // Unclipped tall box of ratio 4: (s_k / 2, s_k · 2) with s_k = 0.5.
    assert_eq!(priors[11], [0.5, 0.5, 0.25, 1.0]);
    assert_eq!(priors[10], [0.5, 0.5, 1.0, 0.25]);
}
