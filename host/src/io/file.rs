//! Batch files (SPEC §8): safetensors with the tensors of §1, `config` and `prior_preset`
//! in the metadata; and the gradient files `eval --grad-out` writes.

use super::input::SafetensorsInput;
use crate::batch::{Batch, BatchShape, Gradients, OwnedBatch, Request};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::limits::{check_estimate, Estimate};
use ssdkd_core::{LossConfig, PriorPreset, Tensors, TENSOR_NAMES};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use super::config_keys::{config_json, ConfigOverrides};

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
        // Bounded reading: file type and header first, then only the tensors (input.rs).
        read_batch_file(path, flags, &Request::losses(), 1)
    }

    /// Parses a batch file's bytes; `path` only names the file in errors.
    ///
    /// # Errors
    /// As [`BatchFile::read`].
    pub fn from_bytes(bytes: &[u8], path: &Path, flags: &ConfigOverrides) -> Result<Self> {
        Self::from_input(&SafetensorsInput::from_bytes(bytes, path)?, flags)
    }

    /// Builds the batch from a file whose header has been checked, reading its tensors.
    pub(crate) fn from_input(
        tensors: &SafetensorsInput<'_>,
        flags: &ConfigOverrides,
    ) -> Result<Self> {
        let path = tensors.path();
        let file_error = |problem: String| Error::File {
            path: path.to_owned(),
            problem,
        };
        let metadata = tensors.metadata().cloned().unwrap_or_default();
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

        // The priors: the file's, or its preset's (or the flag's) when it has none or a
        // preset is passed.
        let preset = match (
            resolved.preset,
            flags.preset.is_some() || !tensors.has("priors"),
        ) {
            (Some(preset), true) => Some(preset),
            (None, true) => {
                return Err(Error::shape(
                    "priors",
                    "missing, and no `prior_preset` in the metadata (pass --preset)",
                ));
            }
            (_, false) => None,
        };
        let preset_dims = preset.map(|preset| [preset.config().num_priors(), 4]);
        // The shape from the header's dimensions, before any value is read. The teacher's
        // tensors are optional, both or neither (SPEC §10.1): without them the file holds
        // the plain MultiBox loss's batch.
        let dims = Tensors::NAMES.try_map(|name| tensors.declared_f32(name))?;
        let dims = Tensors {
            priors: preset_dims.as_ref().map(|d| &d[..]).or(dims.priors),
            ..dims
        };
        let shape = BatchShape::from_dims(dims).map_err(|e| match (e, preset) {
            (
                Error::Shape {
                    tensor: "priors", ..
                },
                Some(preset),
            ) => Error::shape(
                "priors",
                format!(
                    "preset `{}` has {} priors, the tensors have P = {}",
                    preset.name(),
                    preset.config().num_priors(),
                    dims.student_loc.map_or(0, |d| d[1])
                ),
            ),
            (e, _) => e,
        })?;
        let read = |name: &'static str| tensors.read_f32(name).map(|(_, values)| values);
        let priors = match preset {
            Some(preset) => bytemuck::cast_slice(&preset.config().priors()).to_vec(),
            None => read("priors")?,
        };
        let c = shape.classes;
        let config = resolved.config_for(c)?;

        let (student_loc, student_conf) = (read("student_loc")?, read("student_conf")?);
        let targets = read("targets")?;
        let tensors = if dims.teacher_loc.is_some() {
            OwnedBatch::new(
                shape,
                student_loc,
                student_conf,
                read("teacher_loc")?,
                read("teacher_conf")?,
                targets,
                priors,
            )?
        } else {
            OwnedBatch::without_teacher(shape, student_loc, student_conf, targets, priors)?
        };
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

/// Reads the batch file `path` for `evaluations` evaluations whose results are held at once
/// (2 for `--backend both`), each asking for `request`: the header is checked, then the
/// memory the batch and the evaluations need is checked against what the machine has
/// ([`Estimate`]), and only then are the tensors read.
///
/// # Errors
/// As [`BatchFile::read`], and [`Error::File`] when the batch would not fit in
/// memory.
pub fn read_batch_file(
    path: &Path,
    flags: &ConfigOverrides,
    request: &Request,
    evaluations: u64,
) -> Result<BatchFile> {
    let input = SafetensorsInput::open(path)?;
    // What is read is what the header declares, whatever the shapes say (a mis-shaped
    // tensor is only found once read).
    let declared = input.declared_bytes(&TENSOR_NAMES);
    let (mut estimate, what) = match input.declared_shape() {
        Some(shape) => (
            Estimate::evaluations(&shape, request, evaluations),
            format!(
                "the batch (B = {} × P = {} × C = {}){}",
                shape.batch,
                shape.priors,
                shape.classes,
                if request.gradients {
                    " with gradients"
                } else {
                    ""
                }
            ),
        ),
        None => (Estimate::default(), "the batch".to_owned()),
    };
    estimate.inputs = estimate.inputs.max(declared);
    check_estimate(&estimate, &what).map_err(|problem| Error::File {
        path: path.to_owned(),
        problem,
    })?;
    BatchFile::from_input(&input, flags)
}

/// Writes f32 tensors to a safetensors file safely and atomically
/// ([`crate::io::output::write_f32_tensors`], with no inputs to protect).
///
/// # Errors
/// [`Error::File`] for a target that is not a regular file; [`Error::Io`] when the folder
/// is not writable.
pub fn write_f32_tensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    super::output::write_f32_tensors(path, &[], tensors, metadata)
}

/// Writes the gradients of an evaluation of a batch of `shape` as `grad_student_conf`
/// `[B, P, C]` and `grad_student_loc` `[B, P, 4]` (f32), atomically (as `eval --grad-out`),
/// refusing a target that is a special file or the same file as one of `inputs`
/// ([`crate::io::output`]); stopped by `cancel` until the file is in place.
///
/// # Errors
/// [`Error::Shape`] when the gradients' lengths disagree with `shape`; [`Error::File`] when
/// the target is refused; [`Error::Io`] when the folder is not writable;
/// [`Error::Cancelled`] when `cancel` stopped it.
pub fn write_gradients(
    path: &Path,
    inputs: &[&Path],
    shape: BatchShape,
    gradients: &Gradients,
    cancel: Option<&CancelToken>,
) -> Result<()> {
    let BatchShape {
        batch: b,
        priors: p,
        classes: c,
        ..
    } = shape;
    super::output::write_f32_tensors_cancellable(
        path,
        inputs,
        &[
            ("grad_student_conf", vec![b, p, c], &gradients.student_conf),
            ("grad_student_loc", vec![b, p, 4], &gradients.student_loc),
        ],
        None,
        cancel,
    )
}

/// Writes `tensors` as a batch file (SPEC §8) with `config` (and the tensors' C as
/// `num_classes`) in the metadata, atomically; a batch without teacher is written without
/// `teacher_loc` and `teacher_conf`.
///
/// # Errors
/// [`Error::File`] when the target is refused ([`crate::io::output::check_target`]);
/// [`Error::Io`] when the folder is not writable.
pub fn write_batch_file(path: &Path, tensors: &OwnedBatch, config: &LossConfig) -> Result<()> {
    write_batch_file_cancellable(path, tensors, config, None)
}

/// [`write_batch_file`] that stops when `cancel` is cancelled before the file is in place
/// ([`crate::io::output::OutputTarget::write_cancellable`]: the target is then left as it
/// was, and no temporary file remains).
///
/// # Errors
/// As [`write_batch_file`], and [`Error::Cancelled`] when `cancel` stopped it.
pub fn write_batch_file_cancellable(
    path: &Path,
    tensors: &OwnedBatch,
    config: &LossConfig,
    cancel: Option<&CancelToken>,
) -> Result<()> {
    let BatchShape {
        batch: b,
        priors: p,
        classes: c,
        objects: m,
    } = tensors.shape();
    let metadata = [("config".to_owned(), config_json(config, c as u32))].into();
    let mut named = vec![
        ("student_loc", vec![b, p, 4], tensors.student_loc()),
        ("student_conf", vec![b, p, c], tensors.student_conf()),
    ];
    if tensors.has_teacher() {
        named.push(("teacher_loc", vec![b, p, 4], tensors.teacher_loc()));
        named.push(("teacher_conf", vec![b, p, c], tensors.teacher_conf()));
    }
    named.push(("targets", vec![b, m, 5], tensors.targets()));
    named.push(("priors", vec![p, 4], tensors.priors()));
    super::output::write_f32_tensors_cancellable(path, &[], &named, Some(metadata), cancel)
}
