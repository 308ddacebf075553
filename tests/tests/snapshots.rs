//! `insta` snapshots of the four terms and the total (`SNAPSHOT_DIGITS` significant digits) for every golden
//! file and the demo batch. Every backend asserts the same snapshot names, so the GPU must
//! reproduce the CPU's text.

use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::{LossConfig, Request};
use ssdkd_tests::{golden_files, load_golden, snapshot_text};

#[test]
fn cpu_snapshots() {
    for path in golden_files() {
        let case = load_golden(&path);
        let eval =
            ssdkd::cpu::evaluate(&case.file.batch(), &case.file.config, Request::losses()).unwrap();
        insta::assert_snapshot!(format!("golden_{}", case.name), snapshot_text(&eval));
    }
    let demo = synthetic_batch(&SyntheticSpec::demo(8));
    let eval =
        ssdkd::cpu::evaluate(&demo.batch(), &LossConfig::DEFAULT, Request::losses()).unwrap();
    insta::assert_snapshot!("demo_b8", snapshot_text(&eval));
}

/// The GPU asserts the CPU's snapshots, by the same names (skipped loudly without an adapter).
#[test]
fn gpu_snapshots() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("gpu_snapshots") else {
        return;
    };
    for path in golden_files() {
        let case = load_golden(&path);
        let eval = gpu
            .evaluate(&case.file.batch(), &case.file.config, Request::losses())
            .unwrap();
        insta::assert_snapshot!(format!("golden_{}", case.name), snapshot_text(&eval));
    }
    let demo = synthetic_batch(&SyntheticSpec::demo(8));
    let eval = gpu
        .evaluate(&demo.batch(), &LossConfig::DEFAULT, Request::losses())
        .unwrap();
    insta::assert_snapshot!("demo_b8", snapshot_text(&eval));
}
