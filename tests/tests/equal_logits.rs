//! Equal logits of any accepted magnitude give a cross-entropy of ln C per selected row on
//! both backends (SPEC §5): the row's maximum and the label's logit cancel before ln S is
//! added, so that ln C is not rounded away next to a large maximum.

use ssdkd::{Evaluation, LossConfig, OwnedBatch, Request};
use ssdkd_tests::{assert_loss_close, golden_dir, load_golden};

fn with_equal_logits(value: f32) -> OwnedBatch {
    let mut batch = load_golden(&golden_dir().join("voc_default_b4.safetensors"))
        .file
        .tensors;
    batch.student_conf_mut().fill(value);
    batch.teacher_conf_mut().fill(value);
    batch
}

/// loss_c = ln C · (selected rows) / N, with N the positives; no soft loss.
fn check(what: &str, eval: &Evaluation, classes: usize) {
    let s = eval.sums;
    assert!(s.num_pos > 0 && s.num_neg > 0, "{what}: {s:?}");
    let expected = (classes as f64).ln() * f64::from(s.num_pos + s.num_neg) / f64::from(s.num_pos);
    assert_loss_close(&format!("{what} loss_c"), eval.terms.loss_c, expected);
    assert_loss_close(&format!("{what} soft_loss"), eval.terms.soft_loss, 0.0);
}

const VALUES: [f32; 6] = [0.0, 1.0, -3.0e4, 1.0e6, 1.0e8, -1.0e8];

#[test]
fn equal_logits_give_ln_c_per_row_on_the_cpu() {
    for value in VALUES {
        let batch = with_equal_logits(value);
        let eval = ssdkd::cpu::evaluate(&batch.batch(), &LossConfig::default(), Request::default())
            .unwrap_or_else(|e| panic!("{value}: {e}"));
        check(
            &format!("CPU, logits {value}"),
            &eval,
            batch.shape().classes,
        );
    }
}

#[test]
fn equal_logits_give_ln_c_per_row_on_the_gpu() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("equal_logits_give_ln_c_per_row_on_the_gpu")
    else {
        return;
    };
    for value in VALUES {
        let batch = with_equal_logits(value);
        let eval = gpu
            .evaluate(&batch.batch(), &LossConfig::default(), Request::default())
            .unwrap_or_else(|e| panic!("{value}: {e}"));
        check(
            &format!("GPU, logits {value}"),
            &eval,
            batch.shape().classes,
        );
    }
}
