//! Input and config checks, run before any arithmetic: no allocation, so embedded callers
//! get the same guarantees. Each error names the tensor, the image and the index.

use crate::config::LossConfig;
use crate::math;
use crate::pipeline::ImageInputs;
use core::fmt;

/// How far outside [0, 1] a ground-truth corner may lie (augmentation round-off).
pub const BOX_TOLERANCE: f32 = 1e-3;

/// The input tensors of SPEC §1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensor {
    /// `student_loc`.
    StudentLoc,
    /// `student_conf`.
    StudentConf,
    /// `teacher_loc`.
    TeacherLoc,
    /// `teacher_conf`.
    TeacherConf,
    /// `targets`.
    Targets,
    /// `priors`.
    Priors,
}

impl Tensor {
    /// The tensor's name in batch files and SPEC §1.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Tensor::StudentLoc => "student_loc",
            Tensor::StudentConf => "student_conf",
            Tensor::TeacherLoc => "teacher_loc",
            Tensor::TeacherConf => "teacher_conf",
            Tensor::Targets => "targets",
            Tensor::Priors => "priors",
        }
    }
}

/// A value the loss cannot take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InputError {
    /// NaN or ±∞ at `[image, row, column]` of `tensor` (`image` is `None` for priors).
    NonFinite {
        /// The tensor.
        tensor: Tensor,
        /// The image, if the tensor has a batch dimension.
        image: Option<usize>,
        /// Prior or object row.
        row: usize,
        /// Column within the row.
        column: usize,
        /// The value.
        value: f32,
    },
    /// A ground-truth box with `xmax <= xmin` or `ymax <= ymin`.
    DegenerateBox {
        /// The image.
        image: usize,
        /// The object row in `targets`.
        object: usize,
        /// `xmin, ymin, xmax, ymax`.
        corners: [f32; 4],
    },
    /// A ground-truth corner outside [0, 1] by more than [`BOX_TOLERANCE`].
    BoxOutOfRange {
        /// The image.
        image: usize,
        /// The object row in `targets`.
        object: usize,
        /// `xmin, ymin, xmax, ymax`.
        corners: [f32; 4],
    },
    /// A label that is not an integer in `0..=C-2` (negative labels are padding).
    BadLabel {
        /// The image.
        image: usize,
        /// The object row in `targets`.
        object: usize,
        /// The label.
        label: f32,
        /// C, classes including background.
        num_classes: u32,
    },
    /// A prior with non-positive width or height.
    BadPrior {
        /// The prior index.
        index: usize,
        /// `cx, cy, w, h`.
        prior: [f32; 4],
    },
}

impl core::error::Error for InputError {}

impl InputError {
    /// The tensor at fault.
    #[must_use]
    pub fn tensor(&self) -> Tensor {
        match self {
            InputError::NonFinite { tensor, .. } => *tensor,
            InputError::DegenerateBox { .. }
            | InputError::BoxOutOfRange { .. }
            | InputError::BadLabel { .. } => Tensor::Targets,
            InputError::BadPrior { .. } => Tensor::Priors,
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            InputError::NonFinite { image: Some(image), row, column, value, tensor } => {
                let what = if tensor == Tensor::Targets { "object" } else { "prior" };
                write!(f, "non-finite value {value} at image {image}, {what} {row}, column {column}")
            }
            InputError::NonFinite { image: None, row, column, value, .. } => {
                write!(f, "non-finite value {value} at prior {row}, column {column}")
            }
            InputError::DegenerateBox { image, object, corners: [x0, y0, x1, y1] } => write!(
                f,
                "image {image}, object {object}: degenerate box (xmin {x0}, ymin {y0}, xmax {x1}, ymax {y1}): \
                 needs xmax > xmin and ymax > ymin"
            ),
            InputError::BoxOutOfRange { image, object, corners: [x0, y0, x1, y1] } => write!(
                f,
                "image {image}, object {object}: box (xmin {x0}, ymin {y0}, xmax {x1}, ymax {y1}) lies outside \
                 [0, 1] (corners are normalised to the image)"
            ),
            InputError::BadLabel { image, object, label, num_classes } => write!(
                f,
                "image {image}, object {object}: label {label} is not an integer in 0..={} \
                 (C = {num_classes}; a negative label marks padding)",
                num_classes.saturating_sub(2)
            ),
            InputError::BadPrior { index, prior: [cx, cy, w, h] } => {
                write!(f, "prior {index} (cx {cx}, cy {cy}, w {w}, h {h}): width and height must be positive")
            }
        }
    }
}

/// A configuration that cannot work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConfigError {
    /// The `config` key at fault.
    pub key: &'static str,
    /// Its value (the first offending element for lists).
    pub value: f32,
    /// What it must be.
    pub requirement: &'static str,
}

impl core::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {}: must be {}",
            self.key, self.value, self.requirement
        )
    }
}

/// Checks a configuration: temperature > 0, finite weights, threshold in (0, 1],
/// variances > 0, finite class weights, margin and ε. (C ≥ 2 is a property of the
/// tensors, checked with their shapes.)
///
/// # Errors
/// The first key that cannot work.
pub fn validate_config(config: &LossConfig) -> Result<(), ConfigError> {
    let fail = |key, value, requirement| {
        Err(ConfigError {
            key,
            value,
            requirement,
        })
    };
    let t = config.temperature;
    if !(t.is_finite() && t > 0.0) {
        return fail("temperature", t, "finite and > 0");
    }
    let th = config.overlap_threshold;
    if !(th > 0.0 && th <= 1.0) {
        return fail("overlap_threshold", th, "in (0, 1]");
    }
    for v in config.variance {
        if !(v.is_finite() && v > 0.0) {
            return fail("variance", v, "finite and > 0");
        }
    }
    let w = config.weights;
    for v in [w.soft, w.conf, w.l2, w.loc] {
        if !v.is_finite() {
            return fail("weights", v, "finite");
        }
    }
    for (key, v) in [
        ("pos_w", config.pos_w),
        ("neg_w", config.neg_w),
        ("reg_m", config.reg_m),
    ] {
        if !v.is_finite() {
            return fail(key, v, "finite");
        }
    }
    if !(config.eps.is_finite() && config.eps >= 0.0) {
        return fail("eps", config.eps, "finite and >= 0");
    }
    Ok(())
}

fn check_finite(
    tensor: Tensor,
    image: Option<usize>,
    data: &[f32],
    width: usize,
) -> Result<(), InputError> {
    let width = width.max(1);
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(InputError::NonFinite {
            tensor,
            image,
            row: i / width,
            column: i % width,
            value: data[i],
        }),
    }
}

/// Checks the priors: finite, positive width and height.
///
/// # Errors
/// The first bad prior.
pub fn validate_priors(priors: &[[f32; 4]]) -> Result<(), InputError> {
    check_finite(Tensor::Priors, None, priors.as_flattened(), 4)?;
    match priors.iter().position(|p| !(p[2] > 0.0 && p[3] > 0.0)) {
        None => Ok(()),
        Some(index) => Err(InputError::BadPrior {
            index,
            prior: priors[index],
        }),
    }
}

/// Checks one image's tensors (priors excepted: see [`validate_priors`]): everything
/// finite, real objects with non-degenerate boxes inside [0, 1] and integer labels in
/// `0..=C-2`, with C taken from the slices (`student_conf` holds P × C values for the P
/// rows of `student_loc`). `image` is only used to name the image in the error.
///
/// # Errors
/// The first bad value, in tensor order.
pub fn validate_image(inputs: &ImageInputs<'_>, image: usize) -> Result<(), InputError> {
    let c = inputs
        .student_conf
        .len()
        .checked_div(inputs.student_loc.len())
        .unwrap_or(0);
    let num_classes = u32::try_from(c).unwrap_or(u32::MAX);
    let at = Some(image);
    check_finite(Tensor::StudentLoc, at, inputs.student_loc.as_flattened(), 4)?;
    check_finite(Tensor::StudentConf, at, inputs.student_conf, c)?;
    check_finite(Tensor::TeacherLoc, at, inputs.teacher_loc.as_flattened(), 4)?;
    check_finite(Tensor::TeacherConf, at, inputs.teacher_conf, c)?;
    check_finite(Tensor::Targets, at, inputs.targets.as_flattened(), 5)?;
    for (object, row) in inputs.targets.iter().enumerate() {
        let label = row[4];
        if label < 0.0 {
            continue; // padding, wherever it stands
        }
        // With C < 2 there is no object class, so every real label is out of range.
        let out_of_range = num_classes
            .checked_sub(2)
            .is_none_or(|max| label > max as f32);
        if label != math::trunc(label) || out_of_range {
            return Err(InputError::BadLabel {
                image,
                object,
                label,
                num_classes,
            });
        }
        let corners = [row[0], row[1], row[2], row[3]];
        if !(row[2] > row[0] && row[3] > row[1]) {
            return Err(InputError::DegenerateBox {
                image,
                object,
                corners,
            });
        }
        if corners
            .iter()
            .any(|&v| !(-BOX_TOLERANCE..=1.0 + BOX_TOLERANCE).contains(&v))
        {
            return Err(InputError::BoxOutOfRange {
                image,
                object,
                corners,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `validate_image` is public: called directly with slices of any C (0 and 1 included) it reports
    /// a real object's label as out of range instead of underflowing `C - 2`.
    #[test]
    fn validate_image_is_safe_for_any_number_of_classes() {
        let targets = [[0.1, 0.1, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, -1.0]];
        let loc = [[0.0f32; 4]];
        let priors = [[0.5, 0.5, 0.2, 0.2]];
        for c in 0..4u32 {
            let conf = [0.5f32; 3];
            let conf = &conf[..c.min(3) as usize];
            let inputs = ImageInputs {
                student_loc: &loc,
                student_conf: conf,
                teacher_loc: &loc,
                teacher_conf: conf,
                targets: &targets,
                priors: &priors,
            };
            let result = validate_image(&inputs, 0);
            if c < 2 {
                assert_eq!(
                    result,
                    Err(InputError::BadLabel {
                        image: 0,
                        object: 0,
                        label: 0.0,
                        num_classes: c
                    })
                );
            } else {
                assert_eq!(result, Ok(()), "C = {c}");
            }
        }
    }
}
