//! Box maths, matching edge cases and padding rows.

use ssdkd::{Batch, BatchShape, LossConfig, Request};
use ssdkd_core::boxes::{decode, encode, CenterBox, CornerBox, Overlap};
use ssdkd_core::stages::r#match::{match_image, ObjectScratch, Offsets};
use ssdkd_core::PriorPreset;
use ssdkd_tests::{golden_files, load_golden};

fn corner(r: [f32; 4]) -> CornerBox {
    CornerBox::from_row(&r)
}

#[test]
fn iou_of_known_boxes() {
    let unit = corner([0.0, 0.0, 1.0, 1.0]);
    // Half-overlapping: intersection 0.5, union 1.5.
    let o = Overlap::of(unit, corner([0.5, 0.0, 1.5, 1.0]));
    assert_eq!((o.inter, o.union), (0.5, 1.5));
    assert!((o.iou() - 1.0 / 3.0).abs() < 1e-7);
    // Disjoint and touching boxes: 0.
    assert_eq!(Overlap::of(unit, corner([2.0, 2.0, 3.0, 3.0])).inter, 0.0);
    assert_eq!(Overlap::of(unit, corner([1.0, 0.0, 2.0, 1.0])).inter, 0.0);
    // Contained quarter: 0.25.
    assert_eq!(
        Overlap::of(unit, corner([0.25, 0.25, 0.75, 0.75])).iou(),
        0.25
    );
    // Identical: 1, and at any threshold up to 1.
    let same = Overlap::of(unit, unit);
    assert_eq!(same.iou(), 1.0);
    assert!(same.reaches(1.0));
    assert!(Overlap::of(unit, corner([0.5, 0.0, 1.5, 1.0]))
        .beats(Overlap::of(unit, corner([0.75, 0.0, 1.75, 1.0]))));
}

#[test]
fn encode_decode_round_trip() {
    let variance = [0.1, 0.2];
    for prior in PriorPreset::Ssd300.config().priors().iter().step_by(97) {
        let prior = CenterBox::from_row(*prior);
        let truth = corner([0.21, 0.3, 0.64, 0.9]);
        let offsets = encode(truth, prior, variance);
        let back = decode(offsets, prior, variance).to_row();
        for (a, b) in back.iter().zip(truth.to_row()) {
            assert!((a - b).abs() < 2e-6, "{back:?} vs {truth:?}");
        }
    }
    // A truth equal to its prior encodes to zero (up to the corner round trip's rounding).
    let prior = CenterBox::from_row([0.5, 0.5, 0.2, 0.4]);
    let zero = encode(prior.to_corners(), prior, variance);
    assert!(zero.iter().all(|v| v.abs() < 1e-6), "{zero:?}");
}

/// Matches `targets` against the SSD300 priors (threshold 0.5, variance (0.1, 0.2)) into
/// outputs pre-filled with `fill`, so that a test sees every value the stage writes.
fn match_on_ssd300(targets: &[[f32; 5]], fill: (u32, f32)) -> (u32, Vec<u32>, Vec<[f32; 4]>) {
    let priors = PriorPreset::Ssd300.config().priors();
    let mut objects = vec![ObjectScratch::default(); targets.len()];
    let mut conf_target = vec![fill.0; priors.len()];
    let mut loc_target = vec![[fill.1; 4]; priors.len()];
    let num_pos = match_image(
        targets,
        &priors,
        0.5,
        [0.1, 0.2],
        Offsets::All,
        &mut objects,
        &mut conf_target,
        &mut loc_target,
    );
    (num_pos, conf_target, loc_target)
}

#[test]
fn image_without_objects_is_all_background() {
    let targets = [[0.0, 0.0, 0.0, 0.0, -1.0f32]; 3];
    let (num_pos, conf_target, loc_target) = match_on_ssd300(&targets, (7, 1.0));
    assert_eq!(num_pos, 0);
    assert!(conf_target.iter().all(|&l| l == 0));
    assert!(loc_target.iter().all(|&t| t == [0.0; 4]));
}

#[test]
fn every_object_gets_its_best_prior() {
    // A tiny object overlaps no prior by 0.5, yet its best prior is forced positive.
    let targets = [[0.40, 0.40, 0.41, 0.41, 4.0f32]];
    let (num_pos, conf_target, _) = match_on_ssd300(&targets, (0, 0.0));
    assert_eq!(num_pos, 1);
    assert_eq!(conf_target.iter().filter(|&&l| l == 5).count(), 1);
}

/// Moving padding rows anywhere in `targets` changes nothing: same losses, same bits.
#[test]
fn padding_rows_anywhere() {
    let case = load_golden(
        &golden_files()
            .into_iter()
            .find(|p| p.ends_with("voc_default_b4.safetensors"))
            .unwrap(),
    );
    let t = &case.file.tensors;
    let s = t.shape();
    let padding = [0.3f32, 0.7, 0.1, 0.2, -1.0];
    // Interleave a padding row before every object row of every image.
    let mut padded = Vec::new();
    for image in t.targets().chunks_exact(s.objects * 5) {
        for row in image.chunks_exact(5) {
            padded.extend_from_slice(&padding);
            padded.extend_from_slice(row);
        }
    }
    let padded_shape = BatchShape {
        objects: s.objects * 2,
        ..s
    };
    // The padding row is degenerate (xmax < xmin): validation must ignore padding rows.
    let batch = Batch::new(
        padded_shape,
        t.student_loc(),
        t.student_conf(),
        t.teacher_loc(),
        t.teacher_conf(),
        &padded,
        t.priors(),
    )
    .unwrap();
    let config = LossConfig { ..case.file.config };
    let request = Request {
        gradients: true,
        decisions: true,
        ..Request::default()
    };
    let with_padding = ssdkd::cpu::evaluate(&batch, &config, request).unwrap();
    let plain = ssdkd::cpu::evaluate(&case.file.batch(), &config, request).unwrap();
    assert_eq!(with_padding, plain);
    ssdkd_tests::check_golden(&case, &with_padding);
}

/// Encoding only the positives (the loss's fast path) changes no loss, count or gradient.
#[test]
fn positives_only_offsets_change_nothing() {
    for path in golden_files() {
        let case = load_golden(&path);
        let batch = case.file.batch();
        let config = &case.file.config;
        let all = ssdkd::cpu::evaluate(
            &batch,
            config,
            Request {
                gradients: true,
                decisions: true,
                ..Request::default()
            },
        )
        .unwrap();
        let fast = ssdkd::cpu::evaluate(&batch, config, Request::with_gradients()).unwrap();
        assert_eq!(
            (all.terms, all.sums, &all.gradients),
            (fast.terms, fast.sums, &fast.gradients),
            "{}",
            case.name
        );
    }
}

/// The core's per-image path over caller scratch, as a microcontroller would run it: dirty
/// gradient buffers (`already_zero = false`) come out equal to the batch API's gradients.
#[test]
fn per_image_path_with_dirty_buffers() {
    use ssdkd_core::{backward_image, forward_image, GradScale, ImageWorkspace, LossSums};
    let case = load_golden(
        &golden_files()
            .into_iter()
            .find(|p| p.ends_with("voc_unweighted_t2_b2.safetensors"))
            .unwrap(),
    );
    let batch = case.file.batch();
    let config = &case.file.config;
    let s = batch.shape();
    let mut workspaces: Vec<ImageWorkspace> = (0..s.batch)
        .map(|_| ImageWorkspace::new(s.priors, s.objects))
        .collect();
    let mut sums = LossSums::default();
    for (i, workspace) in workspaces.iter_mut().enumerate() {
        let (mut scratch, mut targets) = workspace.split();
        sums.add(&forward_image(
            &batch.image(i),
            config,
            Offsets::Positives,
            &mut scratch,
            &mut targets,
        ));
    }
    let scale = GradScale::new(config, sums.num_pos);
    let mut grad_conf = vec![f32::NAN; s.batch * s.priors * s.classes];
    let mut grad_loc = vec![[f32::NAN; 4]; s.batch * s.priors];
    for (i, workspace) in workspaces.iter_mut().enumerate() {
        let (_, targets) = workspace.split();
        let conf = &mut grad_conf[i * s.priors * s.classes..(i + 1) * s.priors * s.classes];
        let loc = &mut grad_loc[i * s.priors..(i + 1) * s.priors];
        backward_image(&batch.image(i), config, &targets, &scale, conf, loc, false);
    }
    let reference = ssdkd::cpu::evaluate(&batch, config, Request::with_gradients()).unwrap();
    assert_eq!(sums, reference.sums);
    let grads = reference.gradients.unwrap();
    assert_eq!(grad_conf, grads.student_conf);
    assert_eq!(grad_loc.as_flattened(), grads.student_loc.as_slice());
}
