//! Batches without teacher tensors (SPEC §10.1: the plain MultiBox loss that trains the
//! teacher). Their evaluation is the KD evaluation with the soft and L2 weights 0, with
//! `soft_loss`, `l2_loss`, `num_bounded` and their sums 0: checked through `ssdkd eval` on
//! every golden file with its teacher tensors removed, and through the library's gradients,
//! on the CPU (bit-equal) and the GPU (SPEC §7).

use safetensors::SafeTensors;
use ssdkd::io::file::{write_batch_file, BatchFile, ConfigOverrides};
use ssdkd::{Backend, Error, Evaluation, LossConfig, OwnedBatch, Request};
use std::path::{Path, PathBuf};
use std::process::Command;

fn golden_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the five golden files");
    files
}

/// The backends to check: the CPU, and the GPU when an adapter is found (with
/// `SSDKD_REQUIRE_GPU=1`, a missing adapter fails the test instead of skipping it).
fn backends() -> Vec<&'static str> {
    match Backend::gpu() {
        Ok(_) => vec!["cpu", "gpu"],
        Err(e) if std::env::var("SSDKD_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("SSDKD_REQUIRE_GPU=1 but no GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipped: the GPU backend (no GPU adapter: {e})");
            vec!["cpu"]
        }
    }
}

fn backend(name: &str) -> Backend {
    match name {
        "cpu" => Backend::cpu(),
        _ => Backend::gpu().expect("an adapter (checked by backends())"),
    }
}

/// `golden` with `remove` left out, every other tensor and the metadata kept, written to
/// `out` with the safetensors crate (not the library's writer).
fn copy_without(golden: &Path, remove: &[&str], out: &Path) {
    let bytes = std::fs::read(golden).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| !remove.contains(&name.as_str()))
        .collect();
    let data = safetensors::serialize(kept, metadata.metadata().clone()).unwrap();
    std::fs::write(out, data).unwrap();
}

fn eval_json(file: &Path, backend: &str) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_ssdkd"))
        .args([
            "eval",
            file.to_str().unwrap(),
            "--json",
            "--backend",
            backend,
        ])
        .output()
        .expect("ssdkd runs");
    assert!(
        output.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

/// SPEC §7's loss tolerance.
fn close(a: f64, b: f64) -> bool {
    let tol = if b.abs() < 1e-2 { 1e-6 } else { 1e-4 * b.abs() };
    (a - b).abs() <= tol
}

#[test]
fn eval_without_teacher_gives_the_kd_files_loss_c_and_loss_l() {
    let dir = tempfile::tempdir().unwrap();
    for backend in backends() {
        for golden in golden_files() {
            let plain = dir.path().join("plain.safetensors");
            copy_without(&golden, &["teacher_loc", "teacher_conf"], &plain);
            let kd = eval_json(&golden, backend);
            let no_teacher = eval_json(&plain, backend);
            let name = golden.display();
            for key in ["loss_c", "loss_l"] {
                let (got, want) = (no_teacher[key].as_f64(), kd[key].as_f64());
                let (got, want) = (got.unwrap(), want.unwrap());
                if backend == "cpu" {
                    assert_eq!(got.to_bits(), want.to_bits(), "{name} {key} ({backend})");
                } else {
                    assert!(
                        close(got, want),
                        "{name} {key} ({backend}): {got} vs {want}"
                    );
                }
            }
            for key in ["num_pos", "num_neg"] {
                assert_eq!(no_teacher[key], kd[key], "{name} {key} ({backend})");
            }
            for key in ["soft_loss", "l2_loss"] {
                assert_eq!(no_teacher[key].as_f64(), Some(0.0), "{name} {key}");
            }
            assert_eq!(no_teacher["num_bounded"].as_i64(), Some(0), "{name}");
            // The KD files have a teacher that bounds some priors and a soft loss > 0, so
            // the comparison above is not between two evaluations that ignore the teacher.
            assert!(kd["soft_loss"].as_f64().unwrap() > 0.0, "{name}");
        }
    }
}

/// The KD evaluation of `file` with the soft and L2 weights 0, and the evaluation of the
/// same batch without its teacher, both with gradients.
fn both(backend: &mut Backend, file: &BatchFile) -> (Evaluation, Evaluation) {
    let mut zeroed: LossConfig = file.config;
    zeroed.weights.soft = 0.0;
    zeroed.weights.l2 = 0.0;
    let request = Request::with_gradients();
    let kd = backend.evaluate(&file.batch(), &zeroed, request).unwrap();
    let shape = file.tensors.shape();
    let [sl, sc, _, _, targets, priors] = file.tensors.clone().into_tensors();
    let plain = OwnedBatch::without_teacher(shape, sl, sc, targets, priors).unwrap();
    assert!(!plain.has_teacher() && !plain.batch().has_teacher());
    // The file's own weights: the soft/L2 ones must not matter without a teacher.
    let without = backend
        .evaluate(&plain.batch(), &file.config, request)
        .unwrap();
    (kd, without)
}

#[test]
fn gradient_without_teacher_is_the_kd_gradient_with_soft_and_l2_weights_zero() {
    for name in backends() {
        let mut backend = backend(name);
        for golden in golden_files() {
            let file = BatchFile::read(&golden, &ConfigOverrides::default()).unwrap();
            assert!(file.config.weights.soft != 0.0 || file.config.weights.l2 != 0.0);
            let (kd, without) = both(&mut backend, &file);
            let (g_kd, g) = (kd.gradients.unwrap(), without.gradients.unwrap());
            let shown = golden.display();
            assert_eq!(without.terms.soft_loss, 0.0);
            assert_eq!(without.terms.l2_loss, 0.0);
            assert_eq!(
                (without.sums.soft, without.sums.l2, without.sums.num_bounded),
                (0.0, 0.0, 0)
            );
            assert_eq!(
                (without.sums.num_pos, without.sums.num_neg),
                (kd.sums.num_pos, kd.sums.num_neg)
            );
            if name == "cpu" {
                assert_eq!(without.terms.loss_c.to_bits(), kd.terms.loss_c.to_bits());
                assert_eq!(without.terms.loss_l.to_bits(), kd.terms.loss_l.to_bits());
                assert_eq!(without.terms.total.to_bits(), kd.terms.total.to_bits());
                assert_eq!(g.student_conf, g_kd.student_conf, "{shown} grad conf");
                assert_eq!(g.student_loc, g_kd.student_loc, "{shown} grad loc");
            } else {
                assert!(close(without.terms.total, kd.terms.total), "{shown} total");
                for (what, a, b) in [
                    ("conf", &g.student_conf, &g_kd.student_conf),
                    ("loc", &g.student_loc, &g_kd.student_loc),
                ] {
                    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                        assert!(
                            (x - y).abs() <= 1e-3 * y.abs() + 1e-7,
                            "{shown} grad {what}[{i}]: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn batch_file_without_teacher_round_trips_and_one_teacher_tensor_alone_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let golden = &golden_files()[0];
    let file = BatchFile::read(golden, &ConfigOverrides::default()).unwrap();
    let shape = file.tensors.shape();
    let [sl, sc, _, _, targets, priors] = file.tensors.clone().into_tensors();
    let plain = OwnedBatch::without_teacher(shape, sl, sc, targets, priors).unwrap();
    let path = dir.path().join("plain.safetensors");
    write_batch_file(&path, &plain, &file.config).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let names: Vec<String> = SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert!(!names.iter().any(|n| n.starts_with("teacher")), "{names:?}");
    let back = BatchFile::read(&path, &ConfigOverrides::default()).unwrap();
    assert!(!back.tensors.has_teacher());
    assert_eq!(back.tensors, plain);
    assert_eq!(back.config, file.config);

    for (removed, missing) in [
        ("teacher_loc", "teacher_loc"),
        ("teacher_conf", "teacher_conf"),
    ] {
        let one = dir.path().join(format!("without_{removed}.safetensors"));
        copy_without(golden, &[removed], &one);
        match BatchFile::read(&one, &ConfigOverrides::default()) {
            Err(Error::Shape { tensor, problem }) => {
                assert_eq!(tensor, missing, "{problem}");
                assert!(problem.contains("both or neither"), "{problem}");
            }
            other => panic!("{removed} removed: {other:?}"),
        }
        // The binary reports it as bad input (exit code 2), naming the tensor.
        let output = Command::new(env!("CARGO_BIN_EXE_ssdkd"))
            .args(["eval", one.to_str().unwrap(), "--backend", "cpu"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(missing), "{stderr}");
    }
}

#[test]
fn a_batch_without_teacher_needs_right_shapes_too() {
    let shape = ssdkd::BatchShape {
        batch: 1,
        priors: 2,
        classes: 3,
        objects: 1,
    };
    let err = OwnedBatch::without_teacher(
        shape,
        vec![0.0; 8],
        vec![0.0; 5],
        vec![0.0; 5],
        vec![0.0; 8],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                tensor: "student_conf",
                ..
            }
        ),
        "{err}"
    );
}
