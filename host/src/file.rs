//! Batch files (SPEC §8): safetensors with the tensors of §1, `config` and `prior_preset`
//! in the metadata; and the gradient files `eval --grad-out` writes.

use crate::batch::{Batch, BatchShape, OwnedBatch};
use crate::error::{Error, Result};
use crate::input::SafetensorsInput;
use ssdkd_core::{LossConfig, PriorPreset};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `config` keys of SPEC §8, in the order they are documented.
pub const CONFIG_KEYS: [&str; 11] = [
    "num_classes",
    "overlap_threshold",
    "negpos_ratio",
    "negatives_for_hard",
    "variance",
    "temperature",
    "pos_w",
    "neg_w",
    "reg_m",
    "eps",
    "weights",
];

/// The command-line flag (without `--`) that sets a `config` key.
#[must_use]
pub fn flag_for_key(key: &str) -> String {
    match key {
        "overlap_threshold" => "threshold".into(),
        other => other.replace('_', "-"),
    }
}

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

/// Config values given explicitly (file metadata or flags); `None` keeps what is below.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigOverrides {
    /// `num_classes`.
    pub num_classes: Option<u32>,
    /// `overlap_threshold`.
    pub overlap_threshold: Option<f32>,
    /// `negpos_ratio`.
    pub negpos_ratio: Option<u32>,
    /// `negatives_for_hard`.
    pub negatives_for_hard: Option<u32>,
    /// `variance`.
    pub variance: Option<[f32; 2]>,
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `pos_w`.
    pub pos_w: Option<f32>,
    /// `neg_w`.
    pub neg_w: Option<f32>,
    /// `reg_m`.
    pub reg_m: Option<f32>,
    /// `eps`.
    pub eps: Option<f32>,
    /// `weights` (soft, conf, l2, loc).
    pub weights: Option<[f32; 4]>,
    /// The prior preset (`prior_preset` metadata, `--preset` flag).
    pub preset: Option<PriorPreset>,
}

impl ConfigOverrides {
    /// `self` with every value `over` sets replaced (flags over metadata).
    #[must_use]
    pub fn then(&self, over: &ConfigOverrides) -> ConfigOverrides {
        ConfigOverrides {
            num_classes: over.num_classes.or(self.num_classes),
            overlap_threshold: over.overlap_threshold.or(self.overlap_threshold),
            negpos_ratio: over.negpos_ratio.or(self.negpos_ratio),
            negatives_for_hard: over.negatives_for_hard.or(self.negatives_for_hard),
            variance: over.variance.or(self.variance),
            temperature: over.temperature.or(self.temperature),
            pos_w: over.pos_w.or(self.pos_w),
            neg_w: over.neg_w.or(self.neg_w),
            reg_m: over.reg_m.or(self.reg_m),
            eps: over.eps.or(self.eps),
            weights: over.weights.or(self.weights),
            preset: over.preset.or(self.preset),
        }
    }

    /// The defaults of SPEC §8 with these values applied.
    #[must_use]
    pub fn apply(&self, mut config: LossConfig) -> LossConfig {
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { config.$field = v; })* };
        }
        set!(
            num_classes,
            overlap_threshold,
            negpos_ratio,
            negatives_for_hard,
            variance,
            temperature,
            pos_w,
            neg_w,
            reg_m,
            eps
        );
        if let Some([soft, conf, l2, loc]) = self.weights {
            config.weights = ssdkd_core::LossWeights {
                soft,
                conf,
                l2,
                loc,
            };
        }
        config
    }

    /// Parses the `config` metadata JSON; unknown keys and wrong types are errors naming
    /// the key.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key, or `config` itself for malformed JSON.
    pub fn from_config_json(json: &str) -> Result<Self> {
        let bad = |key: &str, problem: String| Error::Config {
            key: key.to_owned(),
            problem,
        };
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| bad("config", format!("malformed JSON: {e}")))?;
        // serde_json keeps the last of a repeated key; a repeated setting is an error.
        if let Ok(Some(path)) = crate::input::duplicate_key(json) {
            return Err(bad(&path.join("."), "given more than once".into()));
        }
        let object = value
            .as_object()
            .ok_or_else(|| bad("config", "not a JSON object".into()))?;
        let mut out = ConfigOverrides::default();
        for (key, value) in object {
            let number = || {
                value
                    .as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| bad(key, format!("expected a number, found {value}")))
            };
            // Integers may arrive as `3` or `3.0` (Python's json writes either).
            let count = || {
                value
                    .as_u64()
                    .or_else(|| {
                        value
                            .as_f64()
                            .filter(|v| v.fract() == 0.0 && *v >= 0.0)
                            .map(|v| v as u64)
                    })
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| {
                        bad(
                            key,
                            format!("expected a non-negative integer, found {value}"),
                        )
                    })
            };
            let numbers = |n: usize| -> Result<Vec<f32>> {
                let list = value.as_array().filter(|a| a.len() == n);
                let list = list.ok_or_else(|| {
                    bad(
                        key,
                        format!("expected a list of {n} numbers, found {value}"),
                    )
                })?;
                list.iter()
                    .map(|v| {
                        v.as_f64()
                            .map(|v| v as f32)
                            .ok_or_else(|| bad(key, format!("expected numbers, found {v}")))
                    })
                    .collect()
            };
            match key.as_str() {
                "num_classes" => out.num_classes = Some(count()?),
                "overlap_threshold" => out.overlap_threshold = Some(number()?),
                "negpos_ratio" => out.negpos_ratio = Some(count()?),
                "negatives_for_hard" => out.negatives_for_hard = Some(count()?),
                "variance" => out.variance = Some(numbers(2)?.try_into().expect("length checked")),
                "temperature" => out.temperature = Some(number()?),
                "pos_w" => out.pos_w = Some(number()?),
                "neg_w" => out.neg_w = Some(number()?),
                "reg_m" => out.reg_m = Some(number()?),
                "eps" => out.eps = Some(number()?),
                "weights" => out.weights = Some(numbers(4)?.try_into().expect("length checked")),
                _ => {
                    return Err(bad(
                        key,
                        format!("unknown config key (known: {})", CONFIG_KEYS.join(", ")),
                    ));
                }
            }
        }
        Ok(out)
    }
}

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
        crate::input::read_batch_file(path, flags, &crate::batch::Request::losses(), 1)
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

        let read = |name: &'static str| tensors.read_f32(name);
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
            flags.preset.is_some() || !tensors.has("priors"),
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

        let tensors = OwnedBatch {
            shape,
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        };
        Ok(Self {
            path: path.to_owned(),
            tensors,
            config,
        })
    }

    /// Borrows the tensors as a [`Batch`].
    ///
    /// # Errors
    /// Only if the tensors were changed after reading so that they disagree.
    pub fn batch(&self) -> Result<Batch<'_>> {
        self.tensors.batch()
    }
}

/// Writes f32 tensors to a safetensors file safely and atomically
/// ([`crate::output::write_f32_tensors`], with no inputs to protect).
///
/// # Errors
/// [`Error::File`] for a target that is not a regular file; [`Error::Io`] when the folder
/// is not writable.
pub fn write_f32_tensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    crate::output::write_f32_tensors(path, &[], tensors, metadata)
}

/// The `config` metadata JSON of SPEC §8 for `config`, every key written.
#[must_use]
pub fn config_json(config: &LossConfig) -> String {
    let w = config.weights;
    serde_json::json!({
        "num_classes": config.num_classes,
        "overlap_threshold": config.overlap_threshold,
        "negpos_ratio": config.negpos_ratio,
        "negatives_for_hard": config.negatives_for_hard,
        "variance": config.variance,
        "temperature": config.temperature,
        "pos_w": config.pos_w,
        "neg_w": config.neg_w,
        "reg_m": config.reg_m,
        "eps": config.eps,
        "weights": [w.soft, w.conf, w.l2, w.loc],
    })
    .to_string()
}

/// Writes `tensors` as a batch file (SPEC §8) with `config` in the metadata, atomically.
///
/// # Errors
/// [`Error::Io`] when the folder is not writable.
pub fn write_batch_file(path: &Path, tensors: &OwnedBatch, config: &LossConfig) -> Result<()> {
    let BatchShape {
        batch: b,
        priors: p,
        classes: c,
        objects: m,
    } = tensors.shape;
    let metadata = [("config".to_owned(), config_json(config))].into();
    write_f32_tensors(
        path,
        &[
            ("student_loc", vec![b, p, 4], &tensors.student_loc),
            ("student_conf", vec![b, p, c], &tensors.student_conf),
            ("teacher_loc", vec![b, p, 4], &tensors.teacher_loc),
            ("teacher_conf", vec![b, p, c], &tensors.teacher_conf),
            ("targets", vec![b, m, 5], &tensors.targets),
            ("priors", vec![p, 4], &tensors.priors),
        ],
        Some(metadata),
    )
}
