//! Size limits checked before allocating (SPEC §9.6): the estimate of what an
//! evaluation holds, the memory-available figure, and `demo`, `bench` and `eval` refusing
//! at once (exit 2, naming the flags and the estimate) what would not fit.

use ssdkd::limits::{check, parse_bytes, Estimate};
use ssdkd::{BatchShape, Error, Request};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/voc_default_b4.safetensors")
}

/// Runs the binary with `SSDKD_MEMORY_LIMIT` set (or not), timing it.
fn ssdkd(args: &[&str], limit: Option<&str>) -> (Output, Duration) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ssdkd"));
    command
        .args(args)
        .env_remove(ssdkd::limits::MEMORY_LIMIT_VAR);
    if let Some(limit) = limit {
        command.env(ssdkd::limits::MEMORY_LIMIT_VAR, limit);
    }
    let start = Instant::now();
    let output = command.output().expect("ssdkd runs");
    (output, start.elapsed())
}

#[test]
fn the_estimate_counts_the_tensors_of_spec_section_1() {
    // B = 2, P = 3, C = 5, M = 4.
    let shape = BatchShape {
        batch: 2,
        priors: 3,
        classes: 5,
        objects: 4,
    };
    let losses = Estimate::evaluation(&shape, &Request::losses());
    // student/teacher loc [2, 3, 4] and conf [2, 3, 5]: 2 × 6 × 9 floats; targets [2, 4, 5];
    // priors [3, 4]; 4 bytes each.
    assert_eq!(losses.inputs, 4 * (2 * 6 * 9 + 40 + 12));
    assert_eq!(losses.outputs, 0);
    // Per image: 37 bytes per prior and 64 per object row.
    assert_eq!(losses.workspaces, 2 * (3 * 37 + 4 * 64));
    // Gradients [2, 3, 5] and [2, 3, 4].
    let gradients = Estimate::evaluation(&shape, &Request::with_gradients());
    assert_eq!(gradients.outputs, 4 * 6 * 9);
    // Two evaluations held at once (`--backend both`) hold two gradient sets.
    let both = Estimate::evaluations(&shape, &Request::with_gradients(), 2);
    assert_eq!(both.outputs, 2 * gradients.outputs);
    assert_eq!(both.inputs, gradients.inputs);
    // Decisions: conf_target, loc_target, neg_mask.
    let decisions = Request {
        decisions: true,
        ..Request::losses()
    };
    assert_eq!(Estimate::evaluation(&shape, &decisions).outputs, 6 * 21);
    // A synthetic batch counts its inputs twice.
    assert_eq!(gradients.generated().inputs, 2 * gradients.inputs);
    assert_eq!(
        gradients.total(),
        gradients.inputs + gradients.outputs + gradients.workspaces
    );
}

#[test]
fn the_estimate_saturates_instead_of_overflowing() {
    let shape = BatchShape {
        batch: usize::MAX,
        priors: usize::MAX,
        classes: 2,
        objects: 1,
    };
    assert_eq!(
        Estimate::evaluation(&shape, &Request::with_gradients()).total(),
        u64::MAX
    );
}

#[test]
fn byte_sizes_parse_with_binary_suffixes() {
    assert_eq!(parse_bytes("4096"), Some(4096));
    assert_eq!(parse_bytes("512M"), Some(512 << 20));
    assert_eq!(parse_bytes("4G"), Some(4 << 30));
    assert_eq!(parse_bytes("1.5k"), Some(1536));
    assert_eq!(parse_bytes(" 2 T "), Some(2 << 40));
    assert_eq!(parse_bytes("lots"), None);
    assert_eq!(parse_bytes("-1G"), None);
    assert_eq!(parse_bytes(""), None);
}

#[test]
fn the_library_check_refuses_what_the_machine_cannot_hold() {
    let small = BatchShape {
        batch: 2,
        priors: 8732,
        classes: 21,
        objects: 6,
    };
    check(&small, &Request::with_gradients()).unwrap();
    // bench's largest flags: 4096 × ssd512's 24656 priors × 1024 classes, about 1 TB.
    let huge = BatchShape {
        batch: 4096,
        priors: 24656,
        classes: 1024,
        objects: 6,
    };
    let needed = Estimate::evaluation(&huge, &Request::with_gradients()).total();
    match ssdkd::limits::available() {
        Some(available) if available.bytes < needed => {
            let err = check(&huge, &Request::with_gradients()).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains("B = 4096 × P = 24656 × C = 1024"), "{text}");
            assert!(text.contains("this machine has"), "{text}");
        }
        other => eprintln!("skipped: refusal of a 1 TB batch ({other:?} available)"),
    }
}

#[test]
fn demo_with_a_batch_too_large_refuses_at_once() {
    let (output, elapsed) = ssdkd(&["demo", "--batch", "4096", "--backend", "cpu"], Some("4G"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert!(
        stderr.contains("--batch 4096 × ssd300's 8732 priors × 21 classes needs ~"),
        "{stderr}"
    );
    assert!(
        stderr.contains("this machine has 4.3 GB available (SSDKD_MEMORY_LIMIT)"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
    // A batch that fits runs.
    let (output, _) = ssdkd(&["demo", "--batch", "2", "--backend", "cpu"], Some("4G"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn bench_with_flags_multiplying_to_terabytes_refuses_at_once() {
    // No override: the machine's own figure (no machine here has 2 TB).
    let (output, elapsed) = ssdkd(
        &[
            "bench",
            "--batch",
            "8,4096",
            "--classes",
            "1024",
            "--preset",
            "ssd512",
            "--backend",
            "cpu",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    if ssdkd::limits::available().is_none() {
        eprintln!("skipped: no memory figure on this machine");
        return;
    }
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert!(
        stderr.contains("--batch 4096 × ssd512's 24656 priors × 1024 classes needs ~"),
        "{stderr}"
    );
    // Refused before timing the batch sizes that fit: nothing printed.
    assert!(output.stdout.is_empty());
}

#[test]
fn eval_checks_the_file_tensors_and_gradients_before_reading() {
    let path = golden();
    let path = path.to_str().unwrap();
    // The golden batch: 7 MB of tensors read, 3.5 MB of gradients.
    let (output, elapsed) = ssdkd(
        &["eval", path, "--backend", "cpu", "--grad-out", "/dev/null"],
        Some("1M"),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    // /dev/null is refused first (a device), before the file is read.
    assert!(stderr.contains("a character device"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grads.safetensors");
    let out = out.to_str().unwrap();
    let (output, _) = ssdkd(
        &["eval", path, "--backend", "cpu", "--grad-out", out],
        Some("1M"),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the batch (B = 4 × P = 8732 × C = 21) with gradients needs ~"),
        "{stderr}"
    );
    assert!(!Path::new(out).exists());
    // Enough memory: it runs.
    let (output, _) = ssdkd(
        &["eval", path, "--backend", "cpu", "--grad-out", out],
        Some("1G"),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(Path::new(out).exists());
}
