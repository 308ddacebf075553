//! The validate stage on the GPU (SPEC §1.3, §8.3: the accepted ranges): batches whose
//! values the host does not scan — resident batches, and host batches evaluated with
//! `validate: false` — are refused with the host scan's own `InputError`, naming the same
//! tensor, image and index, one chunk or several. Skipped loudly without an adapter.

use ssdkd::gpu::{GpuBackend, GpuRequest};
use ssdkd::{BatchShape, Error, LossConfig, OwnedBatch, Request};
use ssdkd_tests::{golden_dir, load_golden};

fn golden() -> (OwnedBatch, LossConfig) {
    let case = load_golden(&golden_dir().join("voc_default_b4.safetensors"));
    (case.file.tensors, case.file.config)
}

/// The first real object row of `image` (a label ≥ 0).
fn object(batch: &OwnedBatch, image: usize) -> usize {
    let m = batch.shape().objects;
    (0..m)
        .find(|&o| batch.targets()[(image * m + o) * 5 + 4] >= 0.0)
        .expect("the golden image has an object")
}

/// Sets column `column` of `image`'s first object row.
fn set_target(batch: &mut OwnedBatch, image: usize, column: usize, value: f32) {
    let (m, o) = (batch.shape().objects, object(batch, image));
    batch.targets_mut()[(image * m + o) * 5 + column] = value;
}

/// Sets `[image, prior, column]` of a `[B, P, C]` tensor.
fn set_conf(batch: &mut OwnedBatch, teacher: bool, at: [usize; 3], value: f32) {
    let BatchShape {
        priors, classes, ..
    } = batch.shape();
    let i = (at[0] * priors + at[1]) * classes + at[2];
    let values = if teacher {
        batch.teacher_conf_mut()
    } else {
        batch.student_conf_mut()
    };
    values[i] = value;
}

type Corruption = (&'static str, fn(&mut OwnedBatch));

/// Bad inputs of every rule, and pairs of them (the first in the scan's order wins).
const CORRUPTIONS: [Corruption; 15] = [
    ("NaN target", |b| set_target(b, 2, 1, f32::NAN)),
    ("label 25 (C = 21)", |b| set_target(b, 1, 4, 25.0)),
    ("label 3.7", |b| set_target(b, 3, 4, 3.7)),
    ("label 3e9", |b| set_target(b, 0, 4, 3e9)),
    ("degenerate box", |b| {
        let xmin = b.targets()[(b.shape().objects * 2 + object(b, 2)) * 5];
        set_target(b, 2, 2, xmin);
    }),
    ("box beyond [0, 1]", |b| set_target(b, 1, 3, 1.5)),
    ("+inf student logit", |b| {
        set_conf(b, false, [3, 4000, 7], f32::INFINITY)
    }),
    ("NaN teacher logit", |b| {
        set_conf(b, true, [1, 8731, 20], f32::NAN)
    }),
    ("student logit 2e15", |b| {
        set_conf(b, false, [2, 17, 0], -2e15)
    }),
    ("teacher offset 2e12", |b| {
        b.teacher_loc_mut()[(3 * 8732 + 5) * 4 + 2] = 2e12
    }),
    ("-inf student offset", |b| {
        b.student_loc_mut()[8000 * 4 + 3] = f32::NEG_INFINITY
    }),
    ("NaN prior", |b| b.priors_mut()[4 * 8000 + 1] = f32::NAN),
    ("prior of width 0", |b| b.priors_mut()[4 * 10 + 2] = 0.0),
    ("logit in image 1, label in image 3", |b| {
        set_target(b, 3, 4, 25.0);
        set_conf(b, false, [1, 9, 3], f32::NAN);
    }),
    (
        "label and logit in image 2, NaN teacher in image 2 row 0",
        |b| {
            set_target(b, 2, 4, 3.5);
            set_conf(b, false, [2, 8000, 3], f32::INFINITY);
            set_conf(b, true, [2, 0, 1], f32::NAN);
        },
    ),
];

fn debug<T: std::fmt::Debug>(result: &ssdkd::Result<T>) -> String {
    match result {
        Ok(_) => "Ok".to_owned(),
        Err(e) => format!("{e:?}"),
    }
}

/// Every corruption: the resident path and `validate: false` on the GPU give the host
/// scan's `InputError` (compared field by field, NaN included); a clean batch of the same
/// shape evaluated after them gives the same numbers as before (the findings are cleared).
fn refuses_like_the_host_scan(gpu: &mut GpuBackend, what: &str) {
    let (clean, config) = golden();
    let resident = GpuRequest {
        gradients: true,
        ..GpuRequest::default()
    };
    let skip_scan = Request {
        gradients: true,
        decisions: false,
        validate: false,
    };
    let clean_gpu = gpu.upload(&clean.batch()).unwrap();
    let before = gpu
        .evaluate_resident(&clean_gpu, &config, resident)
        .unwrap();
    for (name, corrupt) in CORRUPTIONS {
        let mut batch = clean.clone();
        corrupt(&mut batch);
        let host = batch.batch().check(&config, true);
        assert!(
            matches!(host, Err(Error::Input(_))),
            "{name}: the host scan refuses it: {host:?}"
        );
        let expected = debug(&host);
        let uploaded = gpu.upload(&batch.batch()).unwrap();
        let got = gpu.evaluate_resident(&uploaded, &config, resident);
        assert_eq!(debug(&got), expected, "{what}, {name}: resident");
        // Without the scan the host still checks priors and targets first (so that, with
        // several faults, a target's may come first); the rest is the GPU's.
        let got = gpu.evaluate(&batch.batch(), &config, skip_scan);
        if name.contains(" in image ") {
            assert!(
                matches!(got, Err(Error::Input(_))),
                "{what}, {name}: {got:?}"
            );
        } else {
            assert_eq!(debug(&got), expected, "{what}, {name}: validate false");
        }
    }
    let after = gpu
        .evaluate_resident(&clean_gpu, &config, resident)
        .unwrap();
    assert_eq!(
        after, before,
        "{what}: a clean batch after the refused ones"
    );
    assert!(before.terms.total.is_finite() && before.sums.num_pos > 0);
}

#[test]
fn the_gpu_refuses_what_the_host_scan_refuses() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("the_gpu_refuses_what_the_host_scan_refuses")
    else {
        return;
    };
    refuses_like_the_host_scan(&mut gpu, "one chunk");
}

/// With a binding cap of about one image's logits, the four images are four chunks: the
/// finding in a later chunk is reported by that chunk, and the first finding is still the
/// scan's.
#[test]
fn the_gpu_refuses_what_the_host_scan_refuses_across_chunks() {
    let Some(mut gpu) =
        ssdkd_tests::gpu::backend("the_gpu_refuses_what_the_host_scan_refuses_across_chunks")
    else {
        return;
    };
    gpu.set_binding_cap(Some(8732 * 21 * 4 + 4096));
    refuses_like_the_host_scan(&mut gpu, "chunks of one image");
}
