//! Every golden file through the GPU backend, to SPEC §7 (skipped loudly without an adapter).

use ssdkd::Request;
use ssdkd_tests::{check_golden, golden_files, load_golden};

#[test]
fn golden_files_match_on_gpu() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("golden_files_match_on_gpu") else {
        return;
    };
    for path in golden_files() {
        let case = load_golden(&path);
        let batch = case.file.batch();
        let eval = gpu
            .evaluate(
                &batch,
                &case.file.config,
                Request {
                    gradients: true,
                    decisions: true,
                    ..Request::default()
                },
            )
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        check_golden(&case, &eval);
        eprintln!("{}: ok", case.name);
    }
}
