//! Property tests of the reference (proptest): loss terms are finite and non-negative,
//! object order does not matter when no two objects tie, the soft term scales with the
//! temperature, and the gradients agree with central finite differences.

use proptest::prelude::*;
use ssdkd::{BatchShape, Evaluation, LossConfig, OwnedBatch, Request};
use ssdkd_core::boxes::{CenterBox, CornerBox, Overlap};
use ssdkd_core::prior::{FeatureMap, PriorConfig};
use ssdkd_core::stages::reduce::soft_term;

/// 4×4 and 2×2 maps with one extra ratio: 80 small and large priors.
fn priors() -> Vec<[f32; 4]> {
    let maps = [
        FeatureMap {
            size: 4,
            step: None,
            min_size: 60.0,
            max_size: 110.0,
            aspect_ratios: &[2.0],
        },
        FeatureMap {
            size: 2,
            step: None,
            min_size: 130.0,
            max_size: 220.0,
            aspect_ratios: &[2.0],
        },
    ];
    PriorConfig {
        image_size: 300.0,
        feature_maps: &maps,
        clip: true,
    }
    .priors()
}

/// Evaluates a generated batch on the CPU.
fn evaluate(t: &OwnedBatch, config: &LossConfig, request: Request) -> Evaluation {
    ssdkd::cpu::evaluate(&t.batch(), config, request).unwrap()
}

/// An object inside quadrant `cell` of the image (so objects of one image never overlap).
fn object_in(cell: usize, u: [f32; 4], label: u32) -> [f32; 5] {
    let (x0, y0) = ((cell % 2) as f32 * 0.5, (cell / 2) as f32 * 0.5);
    let (w, h) = (0.1 + 0.3 * u[0], 0.1 + 0.3 * u[1]);
    let (x, y) = (x0 + 0.02 + (0.46 - w) * u[2], y0 + 0.02 + (0.46 - h) * u[3]);
    [x, y, x + w, y + h, label as f32]
}

prop_compose! {
    /// B images (1..=2), C classes (3..=5), up to 4 objects each in distinct quadrants, padded to 4 rows.
    fn tensors()(b in 1usize..=2, c in 3usize..=5)
        (b in Just(b), c in Just(c),
         objects in prop::collection::vec((0usize..=4, prop::array::uniform4(0.0f32..1.0), prop::array::uniform4(0u32..16)), b),
         conf in prop::collection::vec(-4.0f32..4.0, 2 * b * 80 * c),
         loc in prop::collection::vec(-1.5f32..1.5, 2 * b * 80 * 4))
        -> OwnedBatch
    {
        let priors = priors();
        let p = priors.len();
        let mut targets = Vec::new();
        for (count, u, labels) in &objects {
            for (slot, label) in labels.iter().enumerate().take(4) {
                if slot < *count {
                    targets.extend(object_in(slot, *u, label % (c as u32 - 1)));
                } else {
                    targets.extend([0.0, 0.0, 0.0, 0.0, -1.0]);
                }
            }
        }
        let (student_conf, teacher_conf) = conf.split_at(b * p * c);
        let (student_loc, teacher_loc) = loc.split_at(b * p * 4);
        OwnedBatch::new(
            BatchShape { batch: b, priors: p, classes: c, objects: 4 },
            student_loc.to_vec(),
            student_conf.to_vec(),
            teacher_loc.to_vec(),
            teacher_conf.to_vec(),
            targets,
            bytemuck::cast_slice(&priors).to_vec(),
        ).unwrap()
    }
}

fn config_for(temperature: f32, weighted: bool) -> LossConfig {
    // The class-weighted form is a divergence (>= 0) only with equal class weights.
    let (pos_w, neg_w) = if weighted { (1.5, 1.5) } else { (1.0, 1.0) };
    LossConfig {
        temperature,
        pos_w,
        neg_w,
        ..LossConfig::DEFAULT
    }
}

fn terms(e: &Evaluation) -> [f64; 5] {
    let t = e.terms;
    [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l, t.total]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn terms_are_finite_and_non_negative(t in tensors(), temperature in 0.5f32..4.0, weighted: bool) {
        let e = evaluate(&t, &config_for(temperature, weighted), Request::losses());
        for v in terms(&e) {
            prop_assert!(v.is_finite());
        }
        // The soft term is a divergence, >= 0 up to f32 rounding of its rows.
        prop_assert!(e.terms.soft_loss >= -1e-5, "soft_loss {}", e.terms.soft_loss);
        prop_assert!(e.terms.l2_loss >= 0.0 && e.terms.loss_c >= 0.0 && e.terms.loss_l >= 0.0);
        // Unequal class weights: no sign, but finite.
        let config = LossConfig { neg_w: 2.0, pos_w: 0.5, ..config_for(temperature, true) };
        prop_assert!(terms(&evaluate(&t, &config, Request::losses())).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn object_order_does_not_matter_without_ties(t in tensors(), rotate in 1usize..4) {
        let priors = priors();
        // No tie: every prior's best object is unique (or it overlaps none), and the
        // objects' best priors are distinct.
        for image in t.targets().chunks_exact(4 * 5) {
            let objects: Vec<CornerBox> = image.chunks_exact(5).filter(|r| r[4] >= 0.0).map(CornerBox::from_row).collect();
            let mut best_priors = Vec::new();
            for object in &objects {
                let ious: Vec<f32> = priors.iter().map(|p| Overlap::of(*object, CenterBox::from_row(*p).to_corners()).iou()).collect();
                let best = ious.iter().cloned().fold(0.0, f32::max);
                best_priors.push(ious.iter().position(|&v| v == best).unwrap());
            }
            best_priors.sort();
            best_priors.dedup();
            prop_assume!(best_priors.len() == objects.len());
            for p in &priors {
                let mut ious: Vec<f32> = objects.iter().map(|o| Overlap::of(*o, CenterBox::from_row(*p).to_corners()).iou()).collect();
                ious.sort_by(|a, b| b.total_cmp(a));
                prop_assume!(ious.len() < 2 || ious[0] == 0.0 || ious[1] < ious[0] * 0.999);
            }
        }
        let config = config_for(1.0, true);
        let before = evaluate(&t, &config, Request::losses());
        let mut rotated = t.clone();
        for image in rotated.targets_mut().chunks_exact_mut(4 * 5) {
            image.rotate_left(5 * rotate);
        }
        let after = evaluate(&rotated, &config, Request::losses());
        prop_assert_eq!(before.sums.num_pos, after.sums.num_pos);
        for (a, b) in terms(&before).iter().zip(terms(&after)) {
            prop_assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn soft_term_scales_with_temperature(
        student in prop::collection::vec(-6.0f32..6.0, 5),
        teacher in prop::collection::vec(-6.0f32..6.0, 5),
        temperature in 0.5f32..4.0,
        factor in 0.25f32..4.0,
        weighted: bool,
    ) {
        let config = LossConfig { temperature, neg_w: if weighted { 1.5 } else { 1.0 }, ..LossConfig::DEFAULT };
        let scaled = LossConfig { temperature: temperature * factor, ..config };
        let s2: Vec<f32> = student.iter().map(|v| v * factor).collect();
        let t2: Vec<f32> = teacher.iter().map(|v| v * factor).collect();
        let base = soft_term(&student, &teacher, &config) / f64::from(temperature).powi(2);
        let moved = soft_term(&s2, &t2, &scaled) / f64::from(temperature * factor).powi(2);
        prop_assert!((base - moved).abs() <= 1e-4 * base.abs() + 1e-6, "{base} vs {moved}");
    }

    #[test]
    fn batch_soft_loss_scales_with_temperature(t in tensors(), factor in 0.25f32..4.0, weighted: bool) {
        // No objects and k = P: every row is selected whatever the logits.
        let mut t = t;
        for row in t.targets_mut().chunks_exact_mut(5) {
            row[4] = -1.0;
        }
        let config = LossConfig { negatives_for_hard: t.shape().priors as u32, ..config_for(2.0, weighted) };
        let base = evaluate(&t, &config, Request::losses()).terms.soft_loss / 4.0;
        let mut s = t.clone();
        for v in s.student_conf_mut() {
            *v *= factor;
        }
        for v in s.teacher_conf_mut() {
            *v *= factor;
        }
        let scaled = LossConfig { temperature: 2.0 * factor, ..config };
        let moved = evaluate(&s, &scaled, Request::losses()).terms.soft_loss / f64::from(2.0 * factor).powi(2);
        prop_assert!((base - moved).abs() <= 1e-4 * base.abs() + 1e-6, "{base} vs {moved}");
    }

    #[test]
    fn gradients_match_central_differences(
        t in tensors(),
        temperature in 0.5f32..3.0,
        weighted: bool,
        picks in prop::collection::vec(any::<prop::sample::Index>(), 24),
    ) {
        let config = LossConfig { reg_m: 0.1, ..config_for(temperature, weighted) };
        let config = if weighted { LossConfig { pos_w: 0.8, neg_w: 2.0, ..config } } else { config };
        let request = Request { gradients: true, decisions: true, ..Request::default() };
        let e = evaluate(&t, &config, request);
        let grads = e.gradients.as_ref().unwrap();
        let decisions = e.decisions.as_ref().unwrap();
        let h = 1e-2f32;
        let same_decisions = |x: &Evaluation| {
            let d = x.decisions.as_ref().unwrap();
            d.neg_mask == decisions.neg_mask && d.conf_target == decisions.conf_target && x.sums.num_bounded == e.sums.num_bounded
        };
        let c = t.shape().classes;
        for (n, pick) in picks.iter().enumerate() {
            let conf = n % 2 == 0;
            let (len, width) = if conf { (t.student_conf().len(), c) } else { (t.student_loc().len(), 4) };
            let i = pick.index(len);
            let row = i / width;
            if !conf {
                // Skip the kink of smooth-L1 at |d| = 1.
                let d = t.student_loc()[i] - decisions.loc_target[i];
                if (d.abs() - 1.0).abs() < 2.0 * h {
                    continue;
                }
            }
            let at = |delta: f32| {
                let mut moved = t.clone();
                if conf { moved.student_conf_mut()[i] += delta } else { moved.student_loc_mut()[i] += delta }
                evaluate(&moved, &config, request)
            };
            let (plus, minus) = (at(h), at(-h));
            if !same_decisions(&plus) || !same_decisions(&minus) {
                continue; // the step crossed a mining or bound decision
            }
            let fd = (plus.terms.total - minus.terms.total) / f64::from(2.0 * h);
            let analytic = f64::from(if conf { grads.student_conf[i] } else { grads.student_loc[i] });
            prop_assert!(
                (fd - analytic).abs() <= 2e-3 + 2e-2 * analytic.abs(),
                "{} row {row} element {i}: finite difference {fd}, gradient {analytic}",
                if conf { "student_conf" } else { "student_loc" }
            );
        }
    }
}

/// The match stage against a direct transcription of SPEC §3 (two passes per argmax), on
/// grid-aligned boxes whose overlaps tie exactly or within the tolerance, nudged by a few
/// ulps so that maxima rise inside the tie band.
mod match_reference {
    use super::*;
    use ssdkd_core::stages::r#match::{match_image, ObjectScratch, Offsets};

    fn spec_labels(targets: &[[f32; 5]], priors: &[[f32; 4]], threshold: f32) -> Vec<u32> {
        let objects: Vec<[f32; 5]> = targets.iter().copied().filter(|r| r[4] >= 0.0).collect();
        if objects.is_empty() {
            return vec![0; priors.len()];
        }
        let overlap = |o: &[f32; 5], p: &[f32; 4]| {
            Overlap::of(CornerBox::from_row(o), CenterBox::from_row(*p).to_corners())
        };
        let first_tied = |values: &[Overlap]| {
            let max = values
                .iter()
                .copied()
                .fold(values[0], |m, v| if v.beats(m) { v } else { m });
            (values.iter().position(|v| v.ties_with(max)).unwrap(), max)
        };
        let mut best_object = Vec::new();
        let mut forced = vec![false; priors.len()];
        for p in priors {
            let values: Vec<Overlap> = objects.iter().map(|o| overlap(o, p)).collect();
            let (m, max) = first_tied(&values);
            best_object.push((m, max.reaches(threshold)));
        }
        for (m, o) in objects.iter().enumerate() {
            let values: Vec<Overlap> = priors.iter().map(|p| overlap(o, p)).collect();
            let (p, _) = first_tied(&values);
            best_object[p] = (m, true);
            forced[p] = true;
        }
        best_object
            .iter()
            .map(|&(m, positive)| {
                if positive {
                    objects[m][4] as u32 + 1
                } else {
                    0
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn match_follows_the_spec_tie_rules(
            cells in prop::collection::vec((0u32..8, 0u32..8, 1u32..4, 1u32..4, -3i32..=3), 12..40),
            boxes in prop::collection::vec((0u32..8, 0u32..8, 1u32..5, 1u32..5, 0u32..4, -2i32..=2, any::<bool>()), 1..5),
            threshold in prop::sample::select(vec![0.3f32, 0.5, 0.7]),
        ) {
            // Priors and objects on a 1/8 grid, a few ulps off it: exact and near ties.
            let nudge = |v: f32, ulps: i32| f32::from_bits((v.to_bits() as i32 + ulps) as u32);
            let priors: Vec<[f32; 4]> = cells
                .iter()
                .map(|&(i, j, w, h, u)| {
                    let (w, h) = (w as f32 / 8.0, h as f32 / 8.0);
                    [nudge(i as f32 / 8.0 + w / 2.0, u), j as f32 / 8.0 + h / 2.0, w, nudge(h, -u)]
                })
                .collect();
            let targets: Vec<[f32; 5]> = boxes
                .iter()
                .map(|&(i, j, w, h, label, u, padding)| {
                    let (x0, y0) = (i as f32 / 8.0, j as f32 / 8.0);
                    let label = if padding { -1.0 } else { label as f32 };
                    [x0, y0, nudge(x0 + w as f32 / 8.0, u), y0 + h as f32 / 8.0, label]
                })
                .collect();
            let mut objects = vec![ObjectScratch::default(); targets.len()];
            let mut labels = vec![0u32; priors.len()];
            let mut offsets = vec![[0.0f32; 4]; priors.len()];
            match_image(&targets, &priors, threshold, [0.1, 0.2], Offsets::Positives, &mut objects, &mut labels, &mut offsets);
            prop_assert_eq!(labels, spec_labels(&targets, &priors, threshold));
        }
    }
}
