//! Batch files (SPEC §8): safetensors with the tensors of §1, `config` and `prior_preset`
//! in the metadata; and the gradient files `eval --grad-out` writes.

use crate::batch::{Batch, BatchShape, Gradients, OwnedBatch};
pub use crate::config_keys::{config_json, ConfigOverrides};
use crate::error::{shown, Error, Result};
use safetensors::{Dtype, SafeTensors};
use ssdkd_core::{LossConfig, PriorPreset};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `__metadata__` keys a batch file may hold: SPEC §8's `config` and `prior_preset`,
/// and informational keys that the reference generator and `safetensors`' PyTorch helpers
/// write (read and ignored). Any other key is an error, so that a misspelt `config` or
/// `prior_preset` is not silently ignored.
pub const METADATA_KEYS: [&str; 6] = [
    "config",
    "prior_preset",
    "seed",
    "losses_order",
    "counts_order",
    "format",
];

/// Parses a preset name, naming the known ones when it is not.
///
/// # Errors
/// [`Error::Config`] for an unknown name.
pub fn parse_preset(name: &str) -> Result<PriorPreset> {
    PriorPreset::from_name(name).ok_or_else(|| Error::Config {
        key: "prior_preset".into(),
        problem: format!(
            "unknown preset `{name}` (known: {})",
            PriorPreset::ALL.map(PriorPreset::name).join(", ")
        ),
    })
}

/// A batch read from a file: owned tensors, the resolved config and where the priors came from.
#[derive(Clone, Debug)]
pub struct BatchFile {
    /// The file it came from.
    pub path: PathBuf,
    /// The tensors; priors from the file or generated from the preset.
    pub tensors: OwnedBatch,
    /// The resolved configuration (flags over metadata over defaults).
    pub config: LossConfig,
}

impl BatchFile {
    /// Reads `path`, resolving the config as defaults ← file metadata ← `flags`.
    ///
    /// # Errors
    /// [`Error::File`] for an unreadable or malformed file, [`Error::Shape`] naming a
    /// missing or mis-shaped tensor, [`Error::Config`] for bad metadata.
    pub fn read(path: &Path, flags: &ConfigOverrides) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::File {
            path: path.to_owned(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::from_bytes(&bytes, path, flags)
    }

    /// Parses a batch file's bytes; `path` only names the file in errors.
    ///
    /// # Errors
    /// As [`BatchFile::read`].
    pub fn from_bytes(bytes: &[u8], path: &Path, flags: &ConfigOverrides) -> Result<Self> {
        let file_error = |problem: String| Error::File {
            path: path.to_owned(),
            problem,
        };
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| file_error(format!("not a valid safetensors file: {e}")))?;
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| file_error(format!("not a valid safetensors file: {e}")))?;

        let metadata = header.metadata().clone().unwrap_or_default();
        let mut keys: Vec<&String> = metadata.keys().collect();
        keys.sort();
        if let Some(key) = keys
            .into_iter()
            .find(|k| !METADATA_KEYS.contains(&k.as_str()))
        {
            return Err(file_error(format!(
                "unknown metadata key `{key}` (known: {})",
                METADATA_KEYS.join(", ")
            )));
        }
        let mut from_file = match metadata.get("config") {
            Some(json) => ConfigOverrides::from_config_json(json)?,
            None => ConfigOverrides::default(),
        };
        if let Some(name) = metadata.get("prior_preset") {
            from_file.preset = Some(parse_preset(name)?);
        }
        let resolved = from_file.then(flags);

        let read = |name: &'static str| -> Result<(Vec<usize>, Vec<f32>)> {
            let view = tensors
                .tensor(name)
                .map_err(|_| Error::shape(name, format!("missing from {}", shown(path))))?;
            if view.dtype() != Dtype::F32 {
                return Err(Error::shape(
                    name,
                    format!("dtype {:?}, expected F32", view.dtype()),
                ));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok((view.shape().to_vec(), data))
        };
        let (loc_dims, student_loc) = read("student_loc")?;
        let (conf_dims, student_conf) = read("student_conf")?;
        let (target_dims, targets) = read("targets")?;
        let rank = |name: &'static str, dims: &[usize], r: usize| {
            if dims.len() == r {
                Ok(())
            } else {
                Err(Error::shape(
                    name,
                    format!("shape {dims:?} has rank {}, expected {r}", dims.len()),
                ))
            }
        };
        rank("student_loc", &loc_dims, 3)?;
        rank("student_conf", &conf_dims, 3)?;
        rank("targets", &target_dims, 3)?;
        let shape = BatchShape {
            batch: loc_dims[0],
            priors: loc_dims[1],
            classes: conf_dims[2],
            objects: target_dims[1],
        };
        let BatchShape {
            batch: b,
            priors: p,
            classes: c,
            objects: m,
        } = shape;
        let expect = |name: &'static str, dims: &[usize], want: &[usize]| {
            if dims == want {
                Ok(())
            } else {
                Err(Error::shape(
                    name,
                    format!(
                        "shape {dims:?}, expected {want:?} (B = {b}, P = {p}, C = {c}, M = {m})"
                    ),
                ))
            }
        };
        expect("student_loc", &loc_dims, &[b, p, 4])?;
        expect("student_conf", &conf_dims, &[b, p, c])?;
        expect("targets", &target_dims, &[b, m, 5])?;
        let (dims, teacher_loc) = read("teacher_loc")?;
        expect("teacher_loc", &dims, &[b, p, 4])?;
        let (dims, teacher_conf) = read("teacher_conf")?;
        expect("teacher_conf", &dims, &[b, p, c])?;

        let priors = match (
            resolved.preset,
            flags.preset.is_some() || tensors.tensor("priors").is_err(),
        ) {
            (Some(preset), true) => {
                let config = preset.config();
                if config.num_priors() != p {
                    return Err(Error::shape(
                        "priors",
                        format!(
                            "preset `{}` has {} priors, the tensors have P = {p}",
                            preset.name(),
                            config.num_priors()
                        ),
                    ));
                }
                bytemuck::cast_slice(&config.priors()).to_vec()
            }
            (None, true) => {
                return Err(Error::shape(
                    "priors",
                    "missing, and no `prior_preset` in the metadata (pass --preset)",
                ));
            }
            (_, false) => {
                let (dims, priors) = read("priors")?;
                expect("priors", &dims, &[p, 4])?;
                priors
            }
        };

        if let Some(num_classes) = resolved.num_classes {
            if num_classes as usize != c {
                return Err(Error::Config {
                    key: "num_classes".into(),
                    problem: format!("{num_classes}, but student_conf has C = {c} classes"),
                });
            }
        }
        let mut config = resolved.apply(LossConfig::DEFAULT);
        config.num_classes = c as u32;

        let tensors = OwnedBatch::new(
            shape,
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        )?;
        Ok(Self {
            path: path.to_owned(),
            tensors,
            config,
        })
    }

    /// Borrows the tensors as a [`Batch`].
    #[must_use]
    pub fn batch(&self) -> Batch<'_> {
        self.tensors.batch()
    }
}

/// Writes f32 tensors to a safetensors file atomically: a temporary file in the same folder,
/// renamed over `path` once complete, so a failure leaves nothing behind.
///
/// # Errors
/// [`Error::Io`] when the folder is not writable.
pub fn write_f32_tensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let io = |source: std::io::Error| Error::Io {
        path: path.to_owned(),
        source,
    };
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = safetensors::tensor::TensorView::new(
                Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .map_err(|e| Error::shape("output", format!("{name}: {e}")))?;
            Ok((name.to_string(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temp = tempfile::NamedTempFile::new_in(folder).map_err(io)?;
    std::io::Write::write_all(&mut temp, &bytes).map_err(io)?;
    temp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Writes the gradients of an evaluation of a batch of `shape` as `grad_student_conf`
/// `[B, P, C]` and `grad_student_loc` `[B, P, 4]` (f32), atomically (as `eval --grad-out`).
///
/// # Errors
/// [`Error::Shape`] when the gradients' lengths disagree with `shape`; [`Error::Io`] when
/// the folder is not writable.
pub fn write_gradients(path: &Path, shape: BatchShape, gradients: &Gradients) -> Result<()> {
    let BatchShape {
        batch: b,
        priors: p,
        classes: c,
        ..
    } = shape;
    write_f32_tensors(
        path,
        &[
            ("grad_student_conf", vec![b, p, c], &gradients.student_conf),
            ("grad_student_loc", vec![b, p, 4], &gradients.student_loc),
        ],
        None,
    )
}

/// Writes `tensors` as a batch file (SPEC §8) with `config` (and the tensors' C as
/// `num_classes`) in the metadata, atomically.
///
/// # Errors
/// [`Error::Io`] when the folder is not writable.
pub fn write_batch_file(path: &Path, tensors: &OwnedBatch, config: &LossConfig) -> Result<()> {
    let BatchShape {
        batch: b,
        priors: p,
        classes: c,
        objects: m,
    } = tensors.shape();
    let metadata = [("config".to_owned(), config_json(config, c as u32))].into();
    write_f32_tensors(
        path,
        &[
            ("student_loc", vec![b, p, 4], tensors.student_loc()),
            ("student_conf", vec![b, p, c], tensors.student_conf()),
            ("teacher_loc", vec![b, p, 4], tensors.teacher_loc()),
            ("teacher_conf", vec![b, p, c], tensors.teacher_conf()),
            ("targets", vec![b, m, 5], tensors.targets()),
            ("priors", vec![p, 4], tensors.priors()),
        ],
        Some(metadata),
    )
}
