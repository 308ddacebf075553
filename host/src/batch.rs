//! The batch API shared by every backend: borrowed tensors in, terms, sums, counts and
//! (on request) gradients and per-prior decisions out.

use crate::error::{Error, Result};
use rayon::prelude::*;
use ssdkd_core::validate::{validate_config, validate_image, validate_priors, InputError};
use ssdkd_core::{ImageInputs, LossConfig, LossSums, LossTerms};

/// The dimensions of a batch (SPEC §1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BatchShape {
    /// B, images.
    pub batch: usize,
    /// P, priors.
    pub priors: usize,
    /// C, classes including background.
    pub classes: usize,
    /// M, padded objects per image.
    pub objects: usize,
}

impl BatchShape {
    /// Checks that `config` can work and that its `num_classes` equals C: what every
    /// evaluation checks, whether or not the values are scanned (and for batches already
    /// on the GPU, whose values cannot be).
    ///
    /// # Errors
    /// [`Error::Config`] naming the key (and the flag that sets it).
    pub fn check_config(&self, config: &LossConfig) -> Result<()> {
        validate_config(config).map_err(|e| Error::Config {
            key: e.key.into(),
            problem: format!("{e} (flag --{})", crate::file::flag_for_key(e.key)),
        })?;
        if config.num_classes as usize != self.classes {
            return Err(Error::Config {
                key: "num_classes".into(),
                problem: format!(
                    "{}, but student_conf has C = {} classes",
                    config.num_classes, self.classes
                ),
            });
        }
        Ok(())
    }
}

/// Borrowed batch tensors (SPEC §1), flat row-major f32.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// The dimensions.
    pub shape: BatchShape,
    /// `[B, P, 4]`.
    pub student_loc: &'a [f32],
    /// `[B, P, C]`.
    pub student_conf: &'a [f32],
    /// `[B, P, 4]`.
    pub teacher_loc: &'a [f32],
    /// `[B, P, C]`.
    pub teacher_conf: &'a [f32],
    /// `[B, M, 5]`.
    pub targets: &'a [f32],
    /// `[P, 4]`.
    pub priors: &'a [f32],
}

impl<'a> Batch<'a> {
    /// Checks that every slice has the length `shape` implies and that no dimension is 0.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the first tensor whose length is wrong.
    pub fn new(
        shape: BatchShape,
        student_loc: &'a [f32],
        student_conf: &'a [f32],
        teacher_loc: &'a [f32],
        teacher_conf: &'a [f32],
        targets: &'a [f32],
        priors: &'a [f32],
    ) -> Result<Self> {
        let BatchShape {
            batch: b,
            priors: p,
            classes: c,
            objects: m,
        } = shape;
        let dims = [
            ("student_loc", "B", b),
            ("student_loc", "P", p),
            ("student_conf", "C", c),
            ("targets", "M", m),
        ];
        for (tensor, name, value) in dims {
            if value == 0 {
                return Err(Error::shape(tensor, format!("dimension {name} is 0")));
            }
        }
        let too_large = || {
            Error::shape(
                "student_conf",
                format!("shape [{b}, {p}, {c}] is too large"),
            )
        };
        b.checked_mul(p.max(m))
            .and_then(|n| n.checked_mul(c.max(5)))
            .ok_or_else(too_large)?;
        if c < 2 {
            return Err(Error::shape(
                "student_conf",
                format!("C = {c}: at least 2 classes (background and one object class)"),
            ));
        }
        let checks: [(&'static str, &[f32], usize, String); 6] = [
            (
                "student_loc",
                student_loc,
                b * p * 4,
                format!("[{b}, {p}, 4]"),
            ),
            (
                "student_conf",
                student_conf,
                b * p * c,
                format!("[{b}, {p}, {c}]"),
            ),
            (
                "teacher_loc",
                teacher_loc,
                b * p * 4,
                format!("[{b}, {p}, 4]"),
            ),
            (
                "teacher_conf",
                teacher_conf,
                b * p * c,
                format!("[{b}, {p}, {c}]"),
            ),
            ("targets", targets, b * m * 5, format!("[{b}, {m}, 5]")),
            ("priors", priors, p * 4, format!("[{p}, 4]")),
        ];
        for (name, data, expected, dims) in checks {
            if data.len() != expected {
                return Err(Error::shape(
                    name,
                    format!("{} values where shape {dims} needs {expected}", data.len()),
                ));
            }
        }
        Ok(Self {
            shape,
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        })
    }

    /// Checks the batch against `config` before any arithmetic: always that the config can
    /// work and that C equals `num_classes`; with `scan_values`, every value too (finite,
    /// sound boxes and labels, positive prior sizes), images in parallel.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key, or [`Error::Value`] naming the tensor, image and index.
    pub fn check(&self, config: &LossConfig, scan_values: bool) -> Result<()> {
        self.shape.check_config(config)?;
        if !scan_values {
            return Ok(());
        }
        let value_error = |e: InputError| Error::Value {
            tensor: e.tensor().name(),
            problem: e.to_string(),
        };
        validate_priors(bytemuck::cast_slice(self.priors)).map_err(value_error)?;
        let first_bad = (0..self.shape.batch)
            .into_par_iter()
            .map(|i| validate_image(&self.image(i), config.num_classes, i))
            .find_first(Result::is_err);
        match first_bad {
            Some(Err(e)) => Err(value_error(e)),
            _ => Ok(()),
        }
    }

    /// Image `i`'s slices, as the core's per-image stages take them.
    #[must_use]
    pub fn image(&self, i: usize) -> ImageInputs<'a> {
        let BatchShape {
            priors: p,
            classes: c,
            objects: m,
            ..
        } = self.shape;
        ImageInputs {
            student_loc: bytemuck::cast_slice(&self.student_loc[i * p * 4..(i + 1) * p * 4]),
            student_conf: &self.student_conf[i * p * c..(i + 1) * p * c],
            teacher_loc: bytemuck::cast_slice(&self.teacher_loc[i * p * 4..(i + 1) * p * 4]),
            teacher_conf: &self.teacher_conf[i * p * c..(i + 1) * p * c],
            targets: bytemuck::cast_slice(&self.targets[i * m * 5..(i + 1) * m * 5]),
            priors: bytemuck::cast_slice(self.priors),
        }
    }
}

/// What to compute beyond the losses, and whether to scan the inputs first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Both gradients of SPEC §6.
    pub gradients: bool,
    /// The per-prior decisions: labels, offsets, negative mask.
    pub decisions: bool,
    /// Scan every input value before any arithmetic (default `true`). A trusted training
    /// loop may skip the scan; shapes and the config are checked regardless.
    pub validate: bool,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            gradients: false,
            decisions: false,
            validate: true,
        }
    }
}

impl Request {
    /// Losses only, validated.
    #[must_use]
    pub fn losses() -> Self {
        Self::default()
    }

    /// Losses and gradients, validated.
    #[must_use]
    pub fn with_gradients() -> Self {
        Self {
            gradients: true,
            ..Self::default()
        }
    }
}

/// ∂total/∂student outputs (SPEC §6), flat row-major like the inputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gradients {
    /// `[B, P, C]` ∂total/∂student_conf.
    pub student_conf: Vec<f32>,
    /// `[B, P, 4]` ∂total/∂student_loc.
    pub student_loc: Vec<f32>,
}

/// Per-prior decisions of the forward pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    /// `[B, P]` matched labels (SPEC §3).
    pub conf_target: Vec<u32>,
    /// `[B, P, 4]` encoded offsets (SPEC §3).
    pub loc_target: Vec<f32>,
    /// `[B, P]` 1 where mining rank < k (SPEC §4).
    pub neg_mask: Vec<u8>,
}

/// The result of one evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    /// The four normalised terms and the total.
    pub terms: LossTerms,
    /// Un-normalised sums and the counts (for data-parallel normalisation).
    pub sums: LossSums,
    /// Present when requested.
    pub gradients: Option<Gradients>,
    /// Present when requested.
    pub decisions: Option<Decisions>,
}

/// Owned batch tensors (read from a file or generated), flat row-major f32.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OwnedBatch {
    /// The dimensions.
    pub shape: BatchShape,
    /// `[B, P, 4]`.
    pub student_loc: Vec<f32>,
    /// `[B, P, C]`.
    pub student_conf: Vec<f32>,
    /// `[B, P, 4]`.
    pub teacher_loc: Vec<f32>,
    /// `[B, P, C]`.
    pub teacher_conf: Vec<f32>,
    /// `[B, M, 5]`.
    pub targets: Vec<f32>,
    /// `[P, 4]`.
    pub priors: Vec<f32>,
}

impl OwnedBatch {
    /// Borrows the tensors as a [`Batch`].
    ///
    /// # Errors
    /// [`Error::Shape`] if the tensors were changed so that they disagree with `shape`.
    pub fn batch(&self) -> Result<Batch<'_>> {
        Batch::new(
            self.shape,
            &self.student_loc,
            &self.student_conf,
            &self.teacher_loc,
            &self.teacher_conf,
            &self.targets,
            &self.priors,
        )
    }
}
