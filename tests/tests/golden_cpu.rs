//! Every golden file through the CPU backend, to SPEC §7.

use ssdkd::Request;
use ssdkd_tests::{check_golden, golden_files, load_golden};

#[test]
fn golden_files_match_on_cpu() {
    for path in golden_files() {
        let case = load_golden(&path);
        let batch = case.file.batch();
        let eval = ssdkd::cpu::evaluate(
            &batch,
            &case.file.config,
            Request {
                gradients: true,
                decisions: true,
                ..Request::default()
            },
        )
        .unwrap();
        check_golden(&case, &eval);
        eprintln!("{}: ok", case.name);
    }
}
