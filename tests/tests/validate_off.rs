//! `validate: false` skips the scan of the logits and offsets, never a check whose absence
//! could change a result silently: the labels (and the rest of the targets and the
//! priors) are always checked, so that a label out of range, not an integer, or beyond
//! u32 is the scan's `InputError`, never a changed loss or a panic — on the CPU and on
//! the GPU.

use ssdkd::{Backend, Error, OwnedBatch, Request};
use ssdkd_tests::{golden_dir, load_golden};

const SKIP_SCAN: Request = Request {
    gradients: true,
    decisions: false,
    validate: false,
};

/// The golden batch (C = 21) with `label` at `image`'s first object, and with `label` on
/// a whole-image box at `image`'s first padding row.
fn with_label(label: f32, whole_image: bool) -> (OwnedBatch, ssdkd::LossConfig) {
    let case = load_golden(&golden_dir().join("voc_default_b4.safetensors"));
    let (mut batch, config) = (case.file.tensors, case.file.config);
    assert_eq!(batch.shape().classes, 21);
    let m = batch.shape().objects;
    let image = 1;
    let rows = &mut batch.targets_mut()[image * m * 5..(image + 1) * m * 5];
    let row = (0..m)
        .find(|&o| (rows[o * 5 + 4] < 0.0) == whole_image)
        .expect("the golden image has such a row");
    if whole_image {
        rows[row * 5..row * 5 + 4].copy_from_slice(&[0.0, 0.0, 1.0, 1.0]);
    }
    rows[row * 5 + 4] = label;
    (batch, config)
}

fn labels() -> Vec<(f32, bool)> {
    let mut cases = Vec::new();
    for label in [25.0, 3.7, 3e9, 21.0, f32::NAN] {
        for whole_image in [false, true] {
            cases.push((label, whole_image));
        }
    }
    cases
}

fn check(backend: &mut Backend, what: &str) {
    for (label, whole_image) in labels() {
        let (batch, config) = with_label(label, whole_image);
        let got = backend.evaluate(&batch.batch(), &config, SKIP_SCAN);
        let Err(Error::Input(got)) = got else {
            panic!("{what}: label {label} (whole-image box {whole_image}): {got:?}");
        };
        let Err(Error::Input(scan)) = batch.batch().check(&config, true) else {
            panic!("the scan refuses label {label}");
        };
        assert_eq!(
            format!("{got:?}"),
            format!("{scan:?}"),
            "{what}: label {label}"
        );
        // A NaN label is a non-finite target, which the targets' value check finds first.
        let bad_label = matches!(
            got,
            ssdkd::InputError::BadLabel {
                image: 1,
                num_classes: 21,
                ..
            }
        );
        assert!(bad_label || label.is_nan(), "{got:?}");
    }
}

#[test]
fn labels_are_checked_on_the_cpu_without_the_scan() {
    check(&mut Backend::cpu(), "CPU");
}

#[test]
fn labels_are_checked_on_the_gpu_without_the_scan() {
    let Some(gpu) = ssdkd_tests::gpu::backend("labels_are_checked_on_the_gpu_without_the_scan")
    else {
        return;
    };
    check(&mut Backend::Gpu(Box::new(gpu), None), "GPU");
}

/// The values the CPU does not scan either reach a term, which is then refused as
/// `Error::Numerical`, or do not reach the result at all: a NaN logit row of a
/// negative prior (of either NaN sign) is mined first and refused, rather than dropping
/// out of the mining; a NaN `teacher_loc` at a positive cannot decide the teacher bound
/// and is refused, rather than leaving the prior out of the L2 term.
#[test]
fn unscanned_non_finite_values_are_refused_on_the_cpu() {
    let case = load_golden(&golden_dir().join("voc_default_b4.safetensors"));
    let (clean, config) = (case.file.tensors, case.file.config);
    let ssdkd::BatchShape {
        priors: p,
        classes: c,
        ..
    } = clean.shape();
    let mut cpu = Backend::cpu();
    let decisions = Request {
        decisions: true,
        ..Request::default()
    };
    let labels = cpu
        .evaluate(&clean.batch(), &config, decisions)
        .unwrap()
        .decisions
        .unwrap()
        .conf_target;
    let image = 2;
    let positive = (0..p).find(|&q| labels[image * p + q] > 0).unwrap();
    let negative = (0..p).find(|&q| labels[image * p + q] == 0).unwrap();
    let negative_nan = f32::from_bits(0xffc0_0000);
    for (what, value) in [("NaN", f32::NAN), ("negative NaN", negative_nan)] {
        let mut batch = clean.clone();
        let row = (image * p + negative) * c;
        batch.student_conf_mut()[row..row + c].fill(value);
        let got = cpu.evaluate(&batch.batch(), &config, SKIP_SCAN);
        assert!(
            matches!(got, Err(Error::Numerical { .. })),
            "{what} student logits on a negative: {got:?}"
        );
    }
    let mut batch = clean.clone();
    batch.teacher_loc_mut()[(image * p + positive) * 4 + 1] = f32::NAN;
    let got = cpu.evaluate(&batch.batch(), &config, SKIP_SCAN);
    assert!(
        matches!(got, Err(Error::Numerical { .. })),
        "NaN teacher_loc on a positive: {got:?}"
    );
    // The clean batch without the scan is the scanned evaluation, bit for bit.
    let scanned = cpu.evaluate(&clean.batch(), &config, Request::with_gradients());
    let unscanned = cpu.evaluate(&clean.batch(), &config, SKIP_SCAN);
    assert_eq!(scanned.unwrap(), unscanned.unwrap());
}
