//! Bad input is a typed error naming what is at fault — through the library and through
//! `ssdkd eval` (exit code 2, one line on stderr, no panic, no output file left behind).

use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::file::{write_batch_file, BatchFile, ConfigOverrides};
use ssdkd::{LossConfig, OwnedBatch, PriorPreset};
use std::path::Path;
use std::process::Command;

/// A small valid batch: B = 2, mobilenet300 priors (P = 3000), C = 5, M = 3.
fn base() -> (OwnedBatch, LossConfig) {
    let spec = SyntheticSpec {
        batch: 2,
        classes: 5,
        preset: PriorPreset::Mobilenet300,
        objects: 3,
        vary_objects: false,
        seed: 9,
    };
    (
        synthetic_batch(&spec),
        LossConfig {
            num_classes: 5,
            ..LossConfig::DEFAULT
        },
    )
}

/// One malformed input: how to make the file, the flags, and the words the error must contain.
struct Case {
    name: &'static str,
    file: Box<dyn Fn(&Path)>,
    overrides: ConfigOverrides,
    flags: &'static [&'static str],
    keywords: &'static [&'static str],
}

fn tensors_case(
    name: &'static str,
    mutate: fn(&mut OwnedBatch, &mut LossConfig),
    keywords: &'static [&'static str],
) -> Case {
    Case {
        name,
        file: Box::new(move |path| {
            let (mut batch, mut config) = base();
            mutate(&mut batch, &mut config);
            write_as_is(path, &batch, &config);
        }),
        overrides: ConfigOverrides::default(),
        flags: &[],
        keywords,
    }
}

fn bytes_case(
    name: &'static str,
    edit: fn(Vec<u8>) -> Vec<u8>,
    keywords: &'static [&'static str],
) -> Case {
    Case {
        name,
        file: Box::new(move |path| {
            let (batch, config) = base();
            write_batch_file(path, &batch, &config).unwrap();
            let bytes = std::fs::read(path).unwrap();
            std::fs::write(path, edit(bytes)).unwrap();
        }),
        overrides: ConfigOverrides::default(),
        flags: &[],
        keywords,
    }
}

fn flag_case(
    name: &'static str,
    overrides: ConfigOverrides,
    flags: &'static [&'static str],
    keywords: &'static [&'static str],
) -> Case {
    Case {
        name,
        file: Box::new(|path| {
            let (batch, config) = base();
            write_batch_file(path, &batch, &config).unwrap();
        }),
        overrides,
        flags,
        keywords,
    }
}

/// Writes the tensors with the shapes their lengths imply (the last axis kept), so that a
/// mutation may make them disagree with each other.
fn write_as_is(path: &Path, batch: &OwnedBatch, config: &LossConfig) {
    let (b, p) = (batch.shape.batch, batch.shape.priors);
    let shape = |data: &[f32], last: usize| vec![b, data.len() / (b * last).max(1), last];
    let conf = |data: &[f32]| vec![b, p, data.len() / (b * p)];
    let metadata = [("config".to_owned(), ssdkd::file::config_json(config))].into();
    ssdkd::file::write_f32_tensors(
        path,
        &[
            (
                "student_loc",
                shape(&batch.student_loc, 4),
                &batch.student_loc,
            ),
            (
                "student_conf",
                conf(&batch.student_conf),
                &batch.student_conf,
            ),
            (
                "teacher_loc",
                shape(&batch.teacher_loc, 4),
                &batch.teacher_loc,
            ),
            (
                "teacher_conf",
                conf(&batch.teacher_conf),
                &batch.teacher_conf,
            ),
            ("targets", shape(&batch.targets, 5), &batch.targets),
            ("priors", vec![batch.priors.len() / 4, 4], &batch.priors),
        ],
        Some(metadata),
    )
    .unwrap();
}

/// Rewrites the safetensors header (JSON) of a file with `edit`, keeping the data.
fn edit_header(bytes: Vec<u8>, edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn set_config(bytes: Vec<u8>, config: &str) -> Vec<u8> {
    let config = config.to_owned();
    edit_header(bytes, move |h| {
        h["__metadata__"]["config"] = serde_json::Value::String(config.clone())
    })
}

const P: usize = 3000;
const C: usize = 5;

fn cases() -> Vec<Case> {
    vec![
        tensors_case(
            "NaN in student_conf",
            |b, _| b.student_conf[(P + 7) * C + 2] = f32::NAN,
            &["student_conf", "image 1", "prior 7", "NaN"],
        ),
        tensors_case(
            "infinity in teacher_loc",
            |b, _| b.teacher_loc[11 * 4 + 3] = f32::INFINITY,
            &["teacher_loc", "image 0", "prior 11", "inf"],
        ),
        tensors_case(
            "NaN in teacher_conf",
            |b, _| b.teacher_conf[5] = f32::NAN,
            &["teacher_conf", "image 0"],
        ),
        tensors_case(
            "NaN in student_loc",
            |b, _| b.student_loc[P * 4 + 1] = f32::NAN,
            &["student_loc", "image 1", "prior 0"],
        ),
        tensors_case(
            "NaN in targets",
            |b, _| b.targets[5 + 1] = f32::NAN,
            &["targets", "image 0", "object 1"],
        ),
        tensors_case(
            "NaN in priors",
            |b, _| b.priors[42 * 4] = f32::NAN,
            &["priors", "prior 42"],
        ),
        tensors_case(
            "degenerate box",
            |b, _| b.targets[15 + 5 + 2] = b.targets[15 + 5],
            &["targets", "image 1", "object 1", "degenerate"],
        ),
        tensors_case(
            "box outside the image",
            |b, _| b.targets[3] = 1.5,
            &["targets", "image 0", "object 0", "outside"],
        ),
        tensors_case(
            "label not an integer",
            |b, _| b.targets[5 + 4] = 1.5,
            &["targets", "image 0", "object 1", "label 1.5"],
        ),
        tensors_case(
            "label out of range",
            |b, _| b.targets[15 + 4] = 4.0,
            &["targets", "image 1", "object 0", "label 4"],
        ),
        tensors_case(
            "prior with zero width",
            |b, _| b.priors[17 * 4 + 2] = 0.0,
            &["priors", "prior 17", "width"],
        ),
        tensors_case(
            "num_classes disagrees with C",
            |_, c| c.num_classes = 21,
            &["num_classes", "21", "C = 5"],
        ),
        tensors_case(
            "teacher_conf with another C",
            |b, _| b.teacher_conf.extend(vec![0.0; 2 * P]),
            &["teacher_conf"],
        ),
        tensors_case(
            "zero objects dimension",
            |b, _| {
                b.targets.clear();
                b.shape.objects = 0;
            },
            &["targets", "M is 0"],
        ),
        tensors_case(
            "temperature zero",
            |_, c| c.temperature = 0.0,
            &["temperature"],
        ),
        tensors_case(
            "threshold above 1",
            |_, c| c.overlap_threshold = 1.5,
            &["overlap_threshold"],
        ),
        tensors_case(
            "variance zero",
            |_, c| c.variance = [0.1, 0.0],
            &["variance"],
        ),
        bytes_case(
            "truncated file",
            |b| b[..b.len() - 100].to_vec(),
            &["safetensors"],
        ),
        bytes_case(
            "header lies about sizes",
            |b| {
                edit_header(b, |h| {
                    let end = h["student_loc"]["data_offsets"][1].as_u64().unwrap();
                    h["student_loc"]["data_offsets"][1] = (end + 64).into();
                })
            },
            &["safetensors"],
        ),
        bytes_case(
            "wrong dtype",
            |b| {
                edit_header(b, |h| {
                    // Same bytes, read as 8-byte floats: half as many elements.
                    h["student_loc"]["dtype"] = "F64".into();
                    let shape = h["student_loc"]["shape"].clone();
                    h["student_loc"]["shape"] = serde_json::json!([shape[0], shape[1], 2]);
                })
            },
            &["student_loc", "dtype"],
        ),
        bytes_case(
            "missing tensor",
            |b| {
                edit_header(b, |h| {
                    let entry = h["teacher_conf"].clone();
                    h.as_object_mut().unwrap().remove("teacher_conf");
                    h["teacher_conf_renamed"] = entry;
                })
            },
            &["teacher_conf", "missing"],
        ),
        bytes_case(
            "unknown metadata key",
            |b| edit_header(b, |h| h["__metadata__"]["prior_presett"] = "ssd300".into()),
            &["prior_presett", "unknown metadata key"],
        ),
        bytes_case(
            "unknown config key",
            |b| set_config(b, r#"{"num_classes": 5, "temprature": 2.0}"#),
            &["temprature", "unknown"],
        ),
        bytes_case(
            "malformed config JSON",
            |b| set_config(b, r#"{"num_classes": 5,"#),
            &["config", "JSON"],
        ),
        bytes_case(
            "negative negatives_for_hard",
            |b| set_config(b, r#"{"negatives_for_hard": -1}"#),
            &["negatives_for_hard"],
        ),
        bytes_case(
            "negative negpos_ratio",
            |b| set_config(b, r#"{"negpos_ratio": -3}"#),
            &["negpos_ratio"],
        ),
        bytes_case(
            "unknown prior preset",
            |b| edit_header(b, |h| h["__metadata__"]["prior_preset"] = "ssd301".into()),
            &["ssd301", "preset"],
        ),
        flag_case(
            "non-finite weights flag",
            ConfigOverrides {
                weights: Some([f32::NAN, 1.0, 1.0, 1.0]),
                ..ConfigOverrides::default()
            },
            &["--weights", "nan,1,1,1"],
            &["weights"],
        ),
        flag_case(
            "negative temperature flag",
            ConfigOverrides {
                temperature: Some(-1.0),
                ..ConfigOverrides::default()
            },
            &["--temperature=-1"],
            &["temperature"],
        ),
        flag_case(
            "preset with another P",
            ConfigOverrides {
                preset: Some(PriorPreset::Ssd300),
                ..ConfigOverrides::default()
            },
            &["--preset", "ssd300"],
            &["priors", "8732"],
        ),
    ]
}

fn library_error(path: &Path, overrides: &ConfigOverrides) -> Option<String> {
    let outcome =
        BatchFile::read(path, overrides).and_then(|file| file.batch()?.check(&file.config, true));
    outcome.err().map(|e| e.to_string())
}

#[test]
fn the_base_batch_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.safetensors");
    let (batch, config) = base();
    write_batch_file(&path, &batch, &config).unwrap();
    assert_eq!(library_error(&path, &ConfigOverrides::default()), None);
}

#[test]
fn every_error_class_through_the_library() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let path = dir.path().join("bad.safetensors");
        (case.file)(&path);
        let message = library_error(&path, &case.overrides)
            .unwrap_or_else(|| panic!("{}: accepted", case.name));
        for word in case.keywords {
            assert!(
                message.contains(word),
                "{}: `{word}` missing from: {message}",
                case.name
            );
        }
    }
}

#[test]
fn every_error_class_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let path = dir.path().join("bad.safetensors");
        let grad_out = dir.path().join("grads.safetensors");
        (case.file)(&path);
        let output = Command::new(env!("CARGO_BIN_EXE_ssdkd"))
            .args([
                "eval",
                path.to_str().unwrap(),
                "--backend",
                "cpu",
                "--json",
                "--grad-out",
                grad_out.to_str().unwrap(),
            ])
            .args(case.flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}: {stderr}", case.name);
        assert!(!stderr.contains("panicked"), "{}: {stderr}", case.name);
        assert!(output.stdout.is_empty(), "{}: printed a result", case.name);
        assert!(!grad_out.exists(), "{}: left an output file", case.name);
        for word in case.keywords {
            assert!(
                stderr.contains(word),
                "{}: `{word}` missing from: {stderr}",
                case.name
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn unwritable_grad_out_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.safetensors");
    let (batch, config) = base();
    write_batch_file(&path, &batch, &config).unwrap();
    let grad_out = dir.path().join("missing-folder/grads.safetensors");
    let output = Command::new(env!("CARGO_BIN_EXE_ssdkd"))
        .args([
            "eval",
            path.to_str().unwrap(),
            "--backend",
            "cpu",
            "--grad-out",
            grad_out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing-folder"));
    assert!(!grad_out.exists());
}
