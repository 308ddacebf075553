//! Input and config checks, run before any arithmetic: no allocation, so embedded callers
//! get the same guarantees. Each error names the tensor, the image and the index.

use crate::config::LossConfig;
use crate::math;
use crate::pipeline::ImageInputs;
use crate::tensors::Tensors;
use core::fmt;

/// How far outside [0, 1] a ground-truth corner may lie (augmentation round-off).
pub const BOX_TOLERANCE: f32 = 1e-3;

// The accepted domain (SPEC §1.3, §8.3): inside it both backends give finite results that
// agree to SPEC §7 (the GPU sums in f32, the CPU in f64); outside it validation refuses the
// input for both, so that no input is a number on one backend and a failure on the other.

/// The largest |logit| of `student_conf` and `teacher_conf`.
pub const MAX_LOGIT: f32 = 1e15;
/// The largest |value| of `student_loc` and `teacher_loc`.
pub const MAX_OFFSET: f32 = 1e12;
/// The smallest width or height of a prior.
pub const MIN_PRIOR_SIZE: f32 = 1e-4;
/// The smallest encoding variance.
pub const MIN_VARIANCE: f32 = 1e-6;
/// The smallest temperature.
pub const MIN_TEMPERATURE: f32 = 1e-2;
/// The largest temperature (the soft gradient scales with it; the GPU backend takes at
/// most 20, SPEC §7.4, and leaves larger ones to the CPU backend).
pub const MAX_TEMPERATURE: f32 = 1e6;
/// The smallest ε of the class-weighted soft loss (ε = 0 would take `0 · ln 0`, which f32
/// reaches where f64 does not).
pub const MIN_EPS: f32 = 1e-30;
/// The largest |weight| of a term or a class.
pub const MAX_WEIGHT: f32 = 1e6;
/// The largest |margin| of the teacher bound.
pub const MAX_MARGIN: f32 = 1e24;

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
        Tensors::NAMES.get(self)
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
    /// A finite value beyond the accepted magnitude of its tensor ([`MAX_LOGIT`],
    /// [`MAX_OFFSET`]) at `[image, row, column]`.
    OutOfRange {
        /// The tensor.
        tensor: Tensor,
        /// The image.
        image: usize,
        /// Prior row.
        row: usize,
        /// Column within the row.
        column: usize,
        /// The value.
        value: f32,
        /// The largest accepted |value|.
        limit: f32,
    },
    /// A prior whose width or height is below [`MIN_PRIOR_SIZE`].
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
            InputError::NonFinite { tensor, .. } | InputError::OutOfRange { tensor, .. } => *tensor,
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
            InputError::OutOfRange { image, row, column, value, limit, .. } => write!(
                f,
                "value {value} at image {image}, prior {row}, column {column} is beyond ±{limit:e}, \
                 the accepted magnitude (SPEC §1.3)"
            ),
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
                write!(f, "prior {index} (cx {cx}, cy {cy}, w {w}, h {h}): width and height must be at least {MIN_PRIOR_SIZE:e}")
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

/// Checks a configuration against SPEC §8.3's ranges: temperature in
/// [[`MIN_TEMPERATURE`], [`MAX_TEMPERATURE`]],
/// threshold in (0, 1], variances ≥ [`MIN_VARIANCE`], term and class weights within
/// ±[`MAX_WEIGHT`], margin within ±[`MAX_MARGIN`], ε ≥ [`MIN_EPS`], all finite. (C ≥ 2 is a
/// property of the tensors, checked with their shapes.)
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
    if !((MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&t)) {
        return fail("temperature", t, "in [1e-2, 1e6]");
    }
    let th = config.overlap_threshold;
    if !(th > 0.0 && th <= 1.0) {
        return fail("overlap_threshold", th, "in (0, 1]");
    }
    for v in config.variance {
        if !(v.is_finite() && v >= MIN_VARIANCE) {
            return fail("variance", v, "finite and >= 1e-6");
        }
    }
    let w = config.weights;
    for v in [w.soft, w.conf, w.l2, w.loc] {
        if !within(v, MAX_WEIGHT) {
            return fail("weights", v, "finite and within ±1e6");
        }
    }
    for (key, v) in [("pos_w", config.pos_w), ("neg_w", config.neg_w)] {
        if !within(v, MAX_WEIGHT) {
            return fail(key, v, "finite and within ±1e6");
        }
    }
    if !within(config.reg_m, MAX_MARGIN) {
        return fail("reg_m", config.reg_m, "finite and within ±1e24");
    }
    if !(config.eps.is_finite() && config.eps >= MIN_EPS) {
        return fail("eps", config.eps, "finite and >= 1e-30");
    }
    Ok(())
}

/// Whether `value` is a number of magnitude at most `limit` (NaN is not).
fn within(value: f32, limit: f32) -> bool {
    value.abs() <= limit
}

fn check_finite(
    tensor: Tensor,
    image: Option<usize>,
    data: &[f32],
    width: usize,
) -> Result<(), InputError> {
    check_magnitude(tensor, image, data, width, f32::MAX)
}

/// The first value of `data` (rows of `width`) that is not finite, or whose magnitude is
/// over `limit`.
fn check_magnitude(
    tensor: Tensor,
    image: Option<usize>,
    data: &[f32],
    width: usize,
    limit: f32,
) -> Result<(), InputError> {
    let width = width.max(1);
    // One comparison per value (NaN fails it too), so that the scan vectorises.
    let Some(i) = data.iter().position(|&v| beyond(v, limit)) else {
        return Ok(());
    };
    Err(value_error(
        tensor,
        image,
        i / width,
        i % width,
        data[i],
        limit,
    ))
}

/// The error for `value` at `row`, `column` of `tensor` that fails `limit` ([`beyond`]):
/// out of range when it is finite and an image's (a limit below `f32::MAX`), else not
/// finite. The scan and the validate stage's findings both name a value this way.
#[must_use]
pub fn value_error(
    tensor: Tensor,
    image: Option<usize>,
    row: usize,
    column: usize,
    value: f32,
    limit: f32,
) -> InputError {
    match image {
        Some(image) if value.is_finite() && limit < f32::MAX => InputError::OutOfRange {
            tensor,
            image,
            row,
            column,
            value,
            limit,
        },
        _ => InputError::NonFinite {
            tensor,
            image,
            row,
            column,
            value,
        },
    }
}

/// Checks the priors: finite, width and height at least [`MIN_PRIOR_SIZE`].
///
/// # Errors
/// The first bad prior.
pub fn validate_priors(priors: &[[f32; 4]]) -> Result<(), InputError> {
    check_finite(Tensor::Priors, None, priors.as_flattened(), 4)?;
    match priors.iter().position(|p| !prior_size_ok(p)) {
        None => Ok(()),
        Some(index) => Err(InputError::BadPrior {
            index,
            prior: priors[index],
        }),
    }
}

/// Checks one image's tensors (priors excepted: see [`validate_priors`]): everything
/// finite, logits within ±[`MAX_LOGIT`] and box offsets within ±[`MAX_OFFSET`], real objects with non-degenerate boxes inside [0, 1] and integer labels in
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
    let loc = |tensor, values: &[[f32; 4]]| {
        check_magnitude(tensor, at, values.as_flattened(), 4, MAX_OFFSET)
    };
    let conf = |tensor, values| check_magnitude(tensor, at, values, c, MAX_LOGIT);
    loc(Tensor::StudentLoc, inputs.student_loc)?;
    conf(Tensor::StudentConf, inputs.student_conf)?;
    loc(Tensor::TeacherLoc, inputs.teacher_loc)?;
    conf(Tensor::TeacherConf, inputs.teacher_conf)?;
    validate_targets(inputs.targets, image, num_classes)
}

/// Whether `value` fails the magnitude check of a tensor whose accepted magnitude is
/// `limit` (`f32::MAX` for the tensors that need only be finite): NaN, ±∞, or beyond the
/// limit. Compared as bits of `|value|` (the order of finite magnitudes, NaN and ∞ above
/// them), as `shaders/validate.wgsl` does.
#[must_use]
pub fn beyond(value: f32, limit: f32) -> bool {
    (value.to_bits() & 0x7fff_ffff) > limit.to_bits()
}

/// Whether a prior's width and height are at least [`MIN_PRIOR_SIZE`] (for finite priors).
#[must_use]
pub fn prior_size_ok(prior: &[f32; 4]) -> bool {
    prior[2] >= MIN_PRIOR_SIZE && prior[3] >= MIN_PRIOR_SIZE
}

/// Checks one finite `targets` row (`xmin, ymin, xmax, ymax, label`) of `image`, in the
/// scan's order: padding (a negative label) passes; else the label is an integer in
/// `0..=C-2`, then the box is not degenerate, then its corners lie within [0, 1] ±
/// [`BOX_TOLERANCE`].
///
/// # Errors
/// The row's first fault.
pub fn check_object(
    row: &[f32; 5],
    image: usize,
    object: usize,
    num_classes: u32,
) -> Result<(), InputError> {
    let label = row[4];
    if label < 0.0 {
        return Ok(()); // padding, wherever it stands
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
    Ok(())
}

/// Checks every `targets` row of `image` (values and rows, as [`validate_image`] does
/// after the other tensors): what an evaluation checks even when it skips the value scan,
/// as the rows choose the labels and boxes every stage indexes with.
///
/// # Errors
/// The first bad value or row.
pub fn validate_targets(
    targets: &[[f32; 5]],
    image: usize,
    num_classes: u32,
) -> Result<(), InputError> {
    check_finite(Tensor::Targets, Some(image), targets.as_flattened(), 5)?;
    for (object, row) in targets.iter().enumerate() {
        check_object(row, image, object, num_classes)?;
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
