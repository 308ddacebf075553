//! The binary at its edges (SPEC §7.3, §9.2, §9.4, §9.5): a failing stdout, negative flag
//! values, one-line messages with file names escaped, the missing-argument message, numerical
//! failures and the `--backend both` verdict.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn ssdkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ssdkd"))
        .args(args)
        .output()
        .expect("ssdkd runs")
}

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/voc_default_b4.safetensors")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Exit code and stderr: no panic (exit 101), at most one line.
fn one_line_failure(output: &Output, code: i32) -> String {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(code), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.lines().count() <= 1, "more than one line: {text}");
    text
}

#[test]
fn a_full_disk_on_stdout_is_an_error() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("skipped: no /dev/full");
        return;
    };
    for args in [
        vec![
            "eval",
            golden().to_str().unwrap(),
            "--backend",
            "cpu",
            "--json",
        ],
        vec!["demo", "--backend", "cpu", "--batch", "1"],
        vec!["priors", "--preset", "mobilenet300"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_ssdkd"))
            .args(&args)
            .stdout(full.try_clone().unwrap())
            .output()
            .unwrap();
        let text = one_line_failure(&output, 2);
        assert!(
            text.contains("<stdout>") && text.contains("No space left"),
            "{args:?}: {text}"
        );
    }
}

#[test]
fn a_closed_pipe_ends_quietly_without_a_panic() {
    for args in [
        vec!["demo", "--backend", "cpu", "--batch", "1"],
        vec![
            "eval",
            golden().to_str().unwrap(),
            "--backend",
            "cpu",
            "--json",
        ],
        vec!["priors", "--preset", "ssd512"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ssdkd"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the reading end before the child prints its results (as `| head -c0` does).
        drop(child.stdout.take());
        let mut text = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}: {text}");
        assert!(text.is_empty(), "{args:?}: {text}");
    }
}

#[test]
fn negative_numbers_are_flag_values() {
    let file = golden();
    let file = file.to_str().unwrap();
    let spaced = ssdkd(&[
        "eval",
        file,
        "--backend",
        "cpu",
        "--json",
        "--reg-m",
        "-0.2",
    ]);
    assert!(spaced.status.success(), "{}", stderr(&spaced));
    let joined = ssdkd(&["eval", file, "--backend", "cpu", "--json", "--reg-m=-0.2"]);
    let default = ssdkd(&["eval", file, "--backend", "cpu", "--json"]);
    let json = |o: &Output| -> serde_json::Value { serde_json::from_slice(&o.stdout).unwrap() };
    assert_eq!(json(&spaced)["l2_loss"], json(&joined)["l2_loss"]);
    // A negative margin loosens the teacher bound: a different l2 term than the default 0.
    assert_ne!(json(&spaced)["l2_loss"], json(&default)["l2_loss"]);

    // A negative list is taken as the value, then refused by validation naming key and flag.
    let output = ssdkd(&["eval", file, "--backend", "cpu", "--variance", "-0.1,0.2"]);
    let text = one_line_failure(&output, 2);
    assert!(
        text.contains("variance = -0.1") && text.contains("--variance"),
        "{text}"
    );
}

#[test]
fn file_names_with_control_characters_stay_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad\nname\t.safetensors");
    std::fs::write(&path, b"not a batch").unwrap();
    let output = ssdkd(&["eval", path.to_str().unwrap(), "--backend", "cpu"]);
    let text = one_line_failure(&output, 2);
    assert!(text.contains("bad\\nname\\t.safetensors"), "{text}");

    let missing = dir.path().join("gone\r\n.safetensors");
    let output = ssdkd(&["eval", missing.to_str().unwrap(), "--backend", "cpu"]);
    let text = one_line_failure(&output, 2);
    assert!(text.contains("gone\\r\\n.safetensors"), "{text}");
}

#[test]
fn the_missing_argument_is_named() {
    let text = one_line_failure(&ssdkd(&["eval"]), 2);
    assert!(text.contains("<FILE>"), "{text}");
    let text = one_line_failure(&ssdkd(&["priors"]), 2);
    assert!(text.contains("--preset"), "{text}");
}

/// A temperature of 1e19 with weights near f32's maximum overflows the f32 gradient (T² =
/// 1e38). Whatever validation makes of it, the run must not succeed with non-finite numbers.
#[test]
fn a_non_finite_result_is_a_numerical_failure() {
    let dir = tempfile::tempdir().unwrap();
    let grad_out = dir.path().join("grads.safetensors");
    let output = ssdkd(&[
        "eval",
        golden().to_str().unwrap(),
        "--backend",
        "cpu",
        "--json",
        "--weights",
        "3e38,3e38,3e38,3e38",
        "--temperature",
        "1e19",
        "--grad-out",
        grad_out.to_str().unwrap(),
    ]);
    let text = stderr(&output);
    match output.status.code() {
        Some(1) => assert!(
            text.contains("numerical failure") && text.contains("grad_student_"),
            "{text}"
        ),
        // Refused up front by a validated range: also no number escapes.
        Some(2) => assert!(
            text.contains("temperature") || text.contains("weights"),
            "{text}"
        ),
        other => panic!("exit {other:?}: {text}"),
    }
    assert!(output.stdout.is_empty(), "printed a result");
    assert!(!grad_out.exists(), "wrote gradients");
}

#[test]
fn numerical_failures_name_the_term_through_the_library() {
    let mut eval = ssdkd::Evaluation::default();
    assert!(eval.check_finite().is_ok());
    eval.gradients = Some(ssdkd::Gradients {
        student_conf: vec![0.0, f32::INFINITY],
        student_loc: vec![0.0; 4],
    });
    let e = eval.check_finite().unwrap_err();
    assert!(matches!(
        e,
        ssdkd::Error::Numerical {
            what: "grad_student_conf",
            index: Some(1),
            ..
        }
    ));
    eval.terms.soft_loss = f64::NAN;
    let e = eval.check_finite().unwrap_err();
    assert!(
        matches!(
            e,
            ssdkd::Error::Numerical {
                what: "soft_loss",
                index: None,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("numerical failure: soft_loss"));
}

/// `--backend both` on a golden file: the backends agree, exit 0, and the verdict names the
/// worst term and gradient element with its index.
#[test]
fn both_backends_agree_and_say_where_they_differ_most() {
    if ssdkd::Backend::gpu().is_err() {
        assert!(
            std::env::var("SSDKD_REQUIRE_GPU").map_or(true, |v| v != "1"),
            "SSDKD_REQUIRE_GPU=1 but no GPU adapter"
        );
        eprintln!("skipped: no GPU adapter");
        return;
    }
    let output = ssdkd(&[
        "eval",
        golden().to_str().unwrap(),
        "--backend",
        "both",
        "--json",
    ]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("agree to SPEC §7"), "{text}");
    assert!(
        text.contains("worst term") && text.contains("worst gradient element grad_student_"),
        "{text}"
    );
    assert!(text.contains('['), "no element index: {text}");
}

/// `ssdkd eval FILE >&-`: a result that cannot be written is an error (exit 2, one line
/// naming stdout), reported before any work, and no `--grad-out` file is written.
#[cfg(target_os = "linux")]
#[test]
fn a_closed_stdout_is_an_error_before_any_work() {
    use std::os::unix::process::CommandExt;
    let folder = std::env::temp_dir().join(format!("ssdkd-closed-stdout-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    let grad_out = folder.join("grads.safetensors");
    let file = golden();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ssdkd"));
    command.args([
        "eval",
        file.to_str().unwrap(),
        "--backend",
        "cpu",
        "--grad-out",
        grad_out.to_str().unwrap(),
    ]);
    // SAFETY: close(1) in the child between fork and exec is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::close(libc::STDOUT_FILENO);
            Ok(())
        });
    }
    let output = command.stderr(Stdio::piped()).output().unwrap();
    let text = one_line_failure(&output, 2);
    assert!(text.contains("<stdout>"), "{text}");
    assert!(!grad_out.exists(), "a gradient file was written");
    std::fs::remove_dir_all(&folder).unwrap();
}
