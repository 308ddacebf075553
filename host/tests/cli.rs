//! The `ssdkd` binary end to end: `eval` on every golden file (JSON and `--grad-out` to
//! SPEC §7), `demo`, `priors`, and exit codes.

use safetensors::SafeTensors;
use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::io::file::write_batch_file;
use ssdkd::{Error, InputError, LossConfig, OwnedBatch, PriorPreset};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ssdkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ssdkd"))
        .args(args)
        .output()
        .expect("ssdkd runs")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn golden_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(files.len() >= 5);
    files
}

fn numbers<const W: usize, T>(st: &SafeTensors<'_>, name: &str, from: fn([u8; W]) -> T) -> Vec<T> {
    let view = st.tensor(name).unwrap_or_else(|_| panic!("tensor {name}"));
    view.data()
        .chunks_exact(W)
        .map(|b| from(b.try_into().unwrap()))
        .collect()
}

/// The backends to run `eval` with: the CPU, and the GPU when an adapter is found (with
/// `SSDKD_REQUIRE_GPU=1`, a missing adapter fails the test instead of skipping it).
fn eval_backends() -> Vec<&'static str> {
    match ssdkd::Backend::gpu() {
        Ok(_) => vec!["cpu", "gpu"],
        Err(e) if std::env::var("SSDKD_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("SSDKD_REQUIRE_GPU=1 but no GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipped: `ssdkd eval --backend gpu` (no GPU adapter: {e})");
            vec!["cpu"]
        }
    }
}

#[test]
fn eval_golden_files_json_and_grad_out() {
    let out_dir = tempfile::tempdir().unwrap();
    for backend in eval_backends() {
        for path in golden_files() {
            let grad_path = out_dir.path().join("grads.safetensors");
            let output = ssdkd(&[
                "eval",
                path.to_str().unwrap(),
                "--backend",
                backend,
                "--json",
                "--grad-out",
                grad_path.to_str().unwrap(),
            ]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{}: {stderr}", path.display());
            let json: serde_json::Value =
                serde_json::from_slice(&output.stdout).expect("one JSON object");
            for key in [
                "backend",
                "adapter",
                "num_pos",
                "num_neg",
                "num_bounded",
                "elapsed_ms",
            ] {
                assert!(json.get(key).is_some(), "missing key {key}");
            }
            assert_eq!(json["backend"], backend);

            let golden_bytes = std::fs::read(&path).unwrap();
            let golden = SafeTensors::deserialize(&golden_bytes).unwrap();
            let losses = numbers(&golden, "expected_losses", f64::from_le_bytes);
            for (key, expected) in ["soft_loss", "l2_loss", "loss_c", "loss_l", "total"]
                .iter()
                .zip(&losses)
            {
                let got = json[key].as_f64().unwrap();
                let diff = (got - expected).abs();
                let tol = if expected.abs() < 1e-2 {
                    1e-6
                } else {
                    1e-4 * expected.abs()
                };
                assert!(diff <= tol, "{} {key}: {got} vs {expected}", path.display());
            }
            let counts = numbers(&golden, "expected_counts", i64::from_le_bytes);
            assert_eq!(
                [
                    json["num_pos"].as_i64(),
                    json["num_neg"].as_i64(),
                    json["num_bounded"].as_i64()
                ],
                [Some(counts[0]), Some(counts[1]), Some(counts[2])]
            );

            let grad_bytes = std::fs::read(&grad_path).unwrap();
            let grads = SafeTensors::deserialize(&grad_bytes).unwrap();
            for name in ["grad_student_conf", "grad_student_loc"] {
                let view = grads.tensor(name).unwrap();
                assert_eq!(
                    view.shape(),
                    golden.tensor(&format!("expected_{name}")).unwrap().shape(),
                    "{name} shape"
                );
                let ours = numbers(&grads, name, f32::from_le_bytes);
                let expected = numbers(&golden, &format!("expected_{name}"), f32::from_le_bytes);
                for (i, (a, e)) in ours.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-3 * e.abs() + 1e-7,
                        "{} {name}[{i}]: {a} vs {e}",
                        path.display()
                    );
                }
            }
        }
    }
}

#[test]
fn demo_prints_the_four_terms() {
    let output = ssdkd(&["demo", "--backend", "cpu", "--batch", "2"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    for term in ["soft_loss", "l2_loss", "loss_c", "loss_l", "total"] {
        assert!(stdout.contains(term), "{term} missing from:\n{stdout}");
    }
}

#[test]
fn priors_out_writes_the_preset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    let output = ssdkd(&[
        "priors",
        "--preset",
        "mobilenet300",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("priors").unwrap().shape(), &[3000, 4]);
}

/// A batch file of the small synthetic batch (B = 2, mobilenet300 priors, C = 21, M = 3)
/// after `edit`, and the scan's error for it, if any (`Batch::check` with the value scan).
fn edited_batch_file(path: &Path, edit: impl FnOnce(&mut OwnedBatch)) -> Option<Error> {
    let mut batch = synthetic_batch(&SyntheticSpec {
        batch: 2,
        classes: 21,
        preset: PriorPreset::Mobilenet300,
        objects: 3,
        vary_objects: false,
        seed: 28,
    });
    edit(&mut batch);
    write_batch_file(path, &batch, &LossConfig::DEFAULT).unwrap();
    batch.batch().check(&LossConfig::DEFAULT, true).err()
}

/// `eval --no-validate` skips the scan of the logits and offsets, never the check of the
/// targets (SPEC §1.3, `Request::validate`): a label out of range (25 with C = 21), not an
/// integer (3.7) or beyond u32 (3e9) is still the targets' input error, on the CPU and on
/// the GPU — exit code 2, nothing on stdout, and on stderr the scan's own line naming
/// `targets`, the image and the object; never a loss, never a panic.
#[test]
fn no_validate_still_refuses_bad_labels_naming_targets_and_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batch.safetensors");
    let file = path.to_str().unwrap();
    for backend in eval_backends() {
        for label in [25.0, 3.7, 3e9] {
            // Image 1, object 2.
            let scan = edited_batch_file(&path, |batch| {
                let m = batch.shape().objects;
                batch.targets_mut()[(m + 2) * 5 + 4] = label;
            });
            let Some(Error::Input(scan)) = scan else {
                panic!("the scan refuses label {label}: {scan:?}");
            };
            assert!(
                matches!(
                    scan,
                    InputError::BadLabel {
                        image: 1,
                        object: 2,
                        num_classes: 21,
                        ..
                    }
                ),
                "{scan:?}"
            );
            for flags in [&["--no-validate"][..], &["--no-validate", "--json"], &[]] {
                let mut args = vec!["eval", file, "--backend", backend];
                args.extend(flags);
                let output = ssdkd(&args);
                let stderr = String::from_utf8_lossy(&output.stderr);
                let what = format!("{backend}, label {label}, {flags:?}");
                assert_eq!(output.status.code(), Some(2), "{what}: {stderr}");
                assert!(output.stdout.is_empty(), "{what}");
                assert_eq!(
                    stderr,
                    format!("ssdkd: error: {}\n", Error::Input(scan)),
                    "{what}"
                );
                assert!(
                    stderr.contains("tensor `targets`: image 1, object 2: label"),
                    "{what}: {stderr}"
                );
            }
        }
    }
}

/// `--no-validate` takes effect: a NaN logit, which only the scan finds on the host, is
/// the scan's input error (exit 2) with the flag off; with it on, the CPU refuses the NaN
/// that reaches the loss as a numerical error (exit 1), the GPU finds it on the device
/// (exit 2, naming `student_conf`). Never a number on stdout.
#[test]
fn no_validate_skips_the_host_scan_of_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batch.safetensors");
    let file = path.to_str().unwrap();
    let scan = edited_batch_file(&path, |batch| {
        let c = batch.shape().classes;
        batch.student_conf_mut()[..c].fill(f32::NAN);
    });
    let Some(scan @ Error::Input(_)) = scan else {
        panic!("the scan refuses a NaN logit: {scan:?}");
    };
    for backend in eval_backends() {
        let output = ssdkd(&["eval", file, "--backend", backend]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{backend}: {stderr}");
        assert_eq!(stderr, format!("ssdkd: error: {scan}\n"), "{backend}");
        let output = ssdkd(&["eval", file, "--backend", backend, "--no-validate"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.stdout.is_empty(), "{backend}");
        let (code, words) = if backend == "cpu" {
            (1, "numerical")
        } else {
            (2, "tensor `student_conf`")
        };
        assert_eq!(output.status.code(), Some(code), "{backend}: {stderr}");
        assert!(stderr.contains(words), "{backend}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{backend}: {stderr}");
    }
}

#[test]
fn usage_errors_exit_2_naming_the_flag() {
    let golden = golden_files()[0].clone();
    let output = ssdkd(&["eval", golden.to_str().unwrap(), "--preset", "ssd301"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--preset"));

    let output = ssdkd(&["eval", "/nonexistent/batch.safetensors", "--backend", "cpu"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/batch.safetensors"));
}

/// `eval --grad-out` with `--backend both` is a usage error found before any file is read:
/// a batch path that does not exist still gives the usage error, not a file error.
#[test]
fn grad_out_with_both_backends_is_a_usage_error_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let grads = dir.path().join("grads.safetensors");
    let output = ssdkd(&[
        "eval",
        "/nonexistent/batch.safetensors",
        "--backend",
        "both",
        "--grad-out",
        grads.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--grad-out needs a single backend"),
        "{stderr}"
    );
    assert!(!stderr.contains("/nonexistent"), "{stderr}");
    assert!(!grads.exists());
}

#[test]
fn bench_smoke() {
    let output = ssdkd(&[
        "bench",
        "--backend",
        "cpu",
        "--batch",
        "2",
        "--iters",
        "2",
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for key in [
        "backend",
        "adapter",
        "batch",
        "priors",
        "classes",
        "forward_ms",
        "forward_backward_ms",
        "iters",
    ] {
        assert!(line.get(key).is_some(), "missing key {key}");
    }
    assert_eq!(line["batch"], 2);
    assert_eq!(line["priors"], 8732);
}

/// With no adapter to be had (DX12 is not built on Linux): `--backend gpu` is exit code 3,
/// `--backend auto` says on stderr that it falls back to the CPU and succeeds.
#[cfg(target_os = "linux")]
#[test]
fn missing_adapter_exit_code_and_fallback() {
    let golden = golden_files()[0].clone();
    let run = |backend: &str| {
        Command::new(env!("CARGO_BIN_EXE_ssdkd"))
            .args([
                "eval",
                golden.to_str().unwrap(),
                "--json",
                "--backend",
                backend,
            ])
            .env("WGPU_BACKEND", "dx12")
            .output()
            .unwrap()
    };
    let gpu = run("gpu");
    assert_eq!(
        gpu.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&gpu.stderr)
    );
    assert!(gpu.stdout.is_empty());
    let auto = run("auto");
    assert!(auto.status.success());
    assert!(String::from_utf8_lossy(&auto.stderr).contains("falling back to the CPU"));
    let json: serde_json::Value = serde_json::from_slice(&auto.stdout).unwrap();
    assert_eq!(json["backend"], "cpu");
}
