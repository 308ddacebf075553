//! Bad input is a typed error naming what is at fault — through the library (matched on
//! the error's variant and fields) and through `ssdkd eval` (exit code 2, one line on
//! stderr naming the tensor, image and index, the key and flag, or the file; no panic, no
//! output file left behind).

use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::io::file::{write_batch_file, BatchFile, ConfigOverrides};
use ssdkd::{
    BatchShape, Error, InputError, LossConfig, LossWeights, OwnedBatch, PriorPreset, Tensor,
};
use std::path::Path;
use std::process::Command;

/// A batch's tensors as plain vectors, free to disagree with each other (what a malformed
/// file holds; an [`OwnedBatch`] cannot).
struct Raw {
    shape: BatchShape,
    student_loc: Vec<f32>,
    student_conf: Vec<f32>,
    teacher_loc: Vec<f32>,
    teacher_conf: Vec<f32>,
    targets: Vec<f32>,
    priors: Vec<f32>,
}

fn synthetic() -> OwnedBatch {
    synthetic_batch(&SyntheticSpec {
        batch: 2,
        classes: 5,
        preset: PriorPreset::Mobilenet300,
        objects: 3,
        vary_objects: false,
        seed: 9,
    })
}

/// A small valid batch: B = 2, mobilenet300 priors (P = 3000), C = 5, M = 3.
fn base() -> (Raw, LossConfig) {
    let batch = synthetic();
    let shape = batch.shape();
    let [student_loc, student_conf, teacher_loc, teacher_conf, targets, priors] =
        batch.into_tensors();
    (
        Raw {
            shape,
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        },
        LossConfig::DEFAULT,
    )
}

/// What the library's error must be.
type Expect = fn(&Error) -> bool;

/// One malformed input: how to make the file, the flags, the error the library must give
/// and the words the binary's message must contain.
struct Case {
    name: &'static str,
    file: Box<dyn Fn(&Path)>,
    overrides: ConfigOverrides,
    flags: &'static [&'static str],
    expect: Expect,
    keywords: &'static [&'static str],
}

fn tensors_case(
    name: &'static str,
    mutate: fn(&mut Raw, &mut LossConfig),
    expect: Expect,
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
        expect,
        keywords,
    }
}

fn bytes_case(
    name: &'static str,
    edit: fn(Vec<u8>) -> Vec<u8>,
    expect: Expect,
    keywords: &'static [&'static str],
) -> Case {
    Case {
        name,
        file: Box::new(move |path| {
            write_batch_file(path, &synthetic(), &base().1).unwrap();
            let bytes = std::fs::read(path).unwrap();
            std::fs::write(path, edit(bytes)).unwrap();
        }),
        overrides: ConfigOverrides::default(),
        flags: &[],
        expect,
        keywords,
    }
}

fn flag_case(
    name: &'static str,
    overrides: ConfigOverrides,
    flags: &'static [&'static str],
    expect: Expect,
    keywords: &'static [&'static str],
) -> Case {
    Case {
        name,
        file: Box::new(|path| {
            write_batch_file(path, &synthetic(), &base().1).unwrap();
        }),
        overrides,
        flags,
        expect,
        keywords,
    }
}

/// Writes the tensors with the shapes their lengths imply (the last axis kept), so that a
/// mutation may make them disagree with each other.
fn write_as_is(path: &Path, batch: &Raw, config: &LossConfig) {
    let (b, p) = (batch.shape.batch, batch.shape.priors);
    let shape = |data: &[f32], last: usize| vec![b, data.len() / (b * last).max(1), last];
    let conf = |data: &[f32]| vec![b, p, data.len() / (b * p)];
    // The file declares the C its student_conf holds.
    let json = ssdkd::io::file::config_json(config, conf(&batch.student_conf)[2] as u32);
    let metadata = [("config".to_owned(), json)].into();
    ssdkd::io::file::write_f32_tensors(
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

fn config_key(e: &Error, want: &str) -> bool {
    matches!(e, Error::Config { key, .. } if key == want)
}

fn shape_of(e: &Error, want: &str) -> bool {
    matches!(e, Error::Shape { tensor, .. } if *tensor == want)
}

fn file_error(e: &Error) -> bool {
    matches!(e, Error::File { path, .. } if path.ends_with("bad.safetensors"))
}

fn cases() -> Vec<Case> {
    vec![
        tensors_case(
            "NaN in student_conf",
            |b, _| b.student_conf[(P + 7) * C + 2] = f32::NAN,
            |e| {
                matches!(e, Error::Input(InputError::NonFinite {
                    tensor: Tensor::StudentConf, image: Some(1), row: 7, column: 2, value,
                }) if value.is_nan())
            },
            &["student_conf", "image 1", "prior 7", "NaN"],
        ),
        tensors_case(
            "infinity in teacher_loc",
            |b, _| b.teacher_loc[11 * 4 + 3] = f32::INFINITY,
            |e| {
                matches!(e, Error::Input(InputError::NonFinite {
                    tensor: Tensor::TeacherLoc, image: Some(0), row: 11, column: 3, value,
                }) if *value == f32::INFINITY)
            },
            &["teacher_loc", "image 0", "prior 11", "inf"],
        ),
        tensors_case(
            "NaN in teacher_conf",
            |b, _| b.teacher_conf[5] = f32::NAN,
            |e| {
                matches!(
                    e,
                    Error::Input(InputError::NonFinite {
                        tensor: Tensor::TeacherConf,
                        image: Some(0),
                        row: 1,
                        column: 0,
                        ..
                    })
                )
            },
            &["teacher_conf", "image 0"],
        ),
        tensors_case(
            "NaN in student_loc",
            |b, _| b.student_loc[P * 4 + 1] = f32::NAN,
            |e| {
                matches!(
                    e,
                    Error::Input(InputError::NonFinite {
                        tensor: Tensor::StudentLoc,
                        image: Some(1),
                        row: 0,
                        column: 1,
                        ..
                    })
                )
            },
            &["student_loc", "image 1", "prior 0"],
        ),
        tensors_case(
            "NaN in targets",
            |b, _| b.targets[5 + 1] = f32::NAN,
            |e| {
                matches!(
                    e,
                    Error::Input(InputError::NonFinite {
                        tensor: Tensor::Targets,
                        image: Some(0),
                        row: 1,
                        column: 1,
                        ..
                    })
                )
            },
            &["targets", "image 0", "object 1"],
        ),
        tensors_case(
            "NaN in priors",
            |b, _| b.priors[42 * 4] = f32::NAN,
            |e| {
                matches!(
                    e,
                    Error::Input(InputError::NonFinite {
                        tensor: Tensor::Priors,
                        image: None,
                        row: 42,
                        column: 0,
                        ..
                    })
                )
            },
            &["priors", "prior 42"],
        ),
        tensors_case(
            "degenerate box",
            |b, _| b.targets[15 + 5 + 2] = b.targets[15 + 5],
            |e| {
                matches!(
                    e,
                    Error::Input(InputError::DegenerateBox {
                        image: 1,
                        object: 1,
                        ..
                    })
                )
            },
            &["targets", "image 1", "object 1", "degenerate"],
        ),
        tensors_case(
            "box outside the image",
            |b, _| b.targets[3] = 1.5,
            |e| {
                matches!(e, Error::Input(InputError::BoxOutOfRange { image: 0, object: 0, corners })
                    if corners[3] == 1.5)
            },
            &["targets", "image 0", "object 0", "outside"],
        ),
        tensors_case(
            "label not an integer",
            |b, _| b.targets[5 + 4] = 1.5,
            |e| {
                matches!(
                    e,
                    Error::Input(InputError::BadLabel {
                        image: 0,
                        object: 1,
                        label: 1.5,
                        num_classes: 5
                    })
                )
            },
            &["targets", "image 0", "object 1", "label 1.5"],
        ),
        tensors_case(
            "label out of range",
            |b, _| b.targets[15 + 4] = 4.0,
            |e| {
                matches!(
                    e,
                    Error::Input(InputError::BadLabel {
                        image: 1,
                        object: 0,
                        label: 4.0,
                        num_classes: 5
                    })
                )
            },
            &["targets", "image 1", "object 0", "label 4"],
        ),
        tensors_case(
            "prior with zero width",
            |b, _| b.priors[17 * 4 + 2] = 0.0,
            |e| matches!(e, Error::Input(InputError::BadPrior { index: 17, .. })),
            &["priors", "prior 17", "width"],
        ),
        bytes_case(
            "num_classes disagrees with C",
            |b| set_config(b, r#"{"num_classes": 21}"#),
            |e| config_key(e, "num_classes"),
            &["num_classes", "21", "C = 5", "--num-classes"],
        ),
        tensors_case(
            "teacher_conf with another C",
            |b, _| b.teacher_conf.extend(vec![0.0; 2 * P]),
            |e| shape_of(e, "teacher_conf"),
            &["teacher_conf"],
        ),
        tensors_case(
            "zero objects dimension",
            |b, _| {
                b.targets.clear();
                b.shape.objects = 0;
            },
            |e| shape_of(e, "targets"),
            &["targets", "M is 0"],
        ),
        tensors_case(
            "temperature zero",
            |_, c| c.temperature = 0.0,
            |e| config_key(e, "temperature"),
            &["temperature", "--temperature"],
        ),
        tensors_case(
            "threshold above 1",
            |_, c| c.overlap_threshold = 1.5,
            |e| config_key(e, "overlap_threshold"),
            &["overlap_threshold", "--threshold"],
        ),
        tensors_case(
            "variance zero",
            |_, c| c.variance = [0.1, 0.0],
            |e| config_key(e, "variance"),
            &["variance"],
        ),
        bytes_case(
            "truncated file",
            |b| b[..b.len() - 100].to_vec(),
            file_error,
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
            file_error,
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
            |e| shape_of(e, "student_loc"),
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
            |e| shape_of(e, "teacher_conf"),
            &["teacher_conf", "missing"],
        ),
        bytes_case(
            "unknown metadata key",
            |b| edit_header(b, |h| h["__metadata__"]["prior_presett"] = "ssd300".into()),
            file_error,
            &["prior_presett", "unknown metadata key"],
        ),
        bytes_case(
            "unknown config key",
            |b| set_config(b, r#"{"num_classes": 5, "temprature": 2.0}"#),
            |e| config_key(e, "temprature"),
            &["temprature", "unknown"],
        ),
        bytes_case(
            "malformed config JSON",
            |b| set_config(b, r#"{"num_classes": 5,"#),
            |e| config_key(e, "config"),
            &["config", "JSON"],
        ),
        bytes_case(
            "negative negatives_for_hard",
            |b| set_config(b, r#"{"negatives_for_hard": -1}"#),
            |e| config_key(e, "negatives_for_hard"),
            &["negatives_for_hard"],
        ),
        bytes_case(
            "negative negpos_ratio",
            |b| set_config(b, r#"{"negpos_ratio": -3}"#),
            |e| config_key(e, "negpos_ratio"),
            &["negpos_ratio"],
        ),
        bytes_case(
            "unknown prior preset",
            |b| edit_header(b, |h| h["__metadata__"]["prior_preset"] = "ssd301".into()),
            |e| config_key(e, "prior_preset"),
            &["ssd301", "preset"],
        ),
        flag_case(
            "non-finite weights flag",
            ConfigOverrides {
                weights: Some(LossWeights {
                    soft: f32::NAN,
                    ..LossWeights::DEFAULT
                }),
                ..ConfigOverrides::default()
            },
            &["--weights", "nan,1,1,1"],
            |e| config_key(e, "weights"),
            &["weights", "--weights"],
        ),
        flag_case(
            "negative temperature flag",
            ConfigOverrides {
                temperature: Some(-1.0),
                ..ConfigOverrides::default()
            },
            &["--temperature", "-1"],
            |e| config_key(e, "temperature"),
            &["temperature", "-1", "--temperature"],
        ),
        flag_case(
            "preset with another P",
            ConfigOverrides {
                preset: Some(PriorPreset::Ssd300),
                ..ConfigOverrides::default()
            },
            &["--preset", "ssd300"],
            |e| shape_of(e, "priors"),
            &["priors", "8732"],
        ),
    ]
}

fn library_error(path: &Path, overrides: &ConfigOverrides) -> Option<Error> {
    let outcome =
        BatchFile::read(path, overrides).and_then(|file| file.batch().check(&file.config, true));
    outcome.err()
}

#[test]
fn the_base_batch_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.safetensors");
    write_batch_file(&path, &synthetic(), &base().1).unwrap();
    assert!(library_error(&path, &ConfigOverrides::default()).is_none());
}

#[test]
fn every_error_class_through_the_library() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let path = dir.path().join("bad.safetensors");
        (case.file)(&path);
        let error = library_error(&path, &case.overrides)
            .unwrap_or_else(|| panic!("{}: accepted", case.name));
        assert!((case.expect)(&error), "{}: {error:?}", case.name);
        let message = error.to_string();
        assert_eq!(message.lines().count(), 1, "{}: {message}", case.name);
        // The library names the key; the binary adds the flag that sets it.
        for word in case.keywords.iter().filter(|w| !w.starts_with("--")) {
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
        assert_eq!(stderr.lines().count(), 1, "{}: {stderr}", case.name);
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
    write_batch_file(&path, &synthetic(), &base().1).unwrap();
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
