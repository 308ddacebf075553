//! The batch API shared by every backend: borrowed tensors in, terms, sums, counts and
//! (on request) gradients and per-prior decisions out.

use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use rayon::prelude::*;
use ssdkd_core::validate::{validate_config, validate_image, validate_priors, validate_targets};
use ssdkd_core::{ImageInputs, LossConfig, LossSums, LossTerms, Tensors};

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
    /// Each tensor's dimensions (SPEC §1): `[B, P, 4]`, `[B, P, C]`, `[B, P, 4]`,
    /// `[B, P, C]`, `[B, M, 5]`, `[P, 4]`.
    #[must_use]
    pub fn dims(&self) -> Tensors<Vec<usize>> {
        let Self {
            batch: b,
            priors: p,
            classes: c,
            objects: m,
        } = *self;
        Tensors {
            student_loc: vec![b, p, 4],
            student_conf: vec![b, p, c],
            teacher_loc: vec![b, p, 4],
            teacher_conf: vec![b, p, c],
            targets: vec![b, m, 5],
            priors: vec![p, 4],
        }
    }

    /// Checks that `config` can work and that C ≥ 2 (C is the tensors', stored once in the
    /// shape; a file's or a flag's `num_classes` is checked against it where it is read): what every
    /// evaluation checks, whether or not the values are scanned (and for batches already
    /// on the GPU, whose values cannot be).
    ///
    /// # Errors
    /// [`Error::Config`] naming the key.
    pub fn check_config(&self, config: &LossConfig) -> Result<()> {
        validate_config(config)?;
        self.check()
    }

    /// Checks the dimensions every batch must have (SPEC §1): none is 0, C ≥ 2 (background
    /// and one object class), and every tensor's element count fits in memory's address
    /// range. Every way of making a batch calls it: [`BatchShape::from_dims`],
    /// [`Batch::new`], the file reader, the GPU backend's `wrap`.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the tensor whose dimension is at fault.
    pub fn check(&self) -> Result<()> {
        let Self {
            batch: b,
            priors: p,
            classes: c,
            objects: m,
        } = *self;
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
        Ok(())
    }
}

/// The teacher's tensors, both or neither (SPEC §10: neither is the plain MultiBox loss);
/// one alone is an error naming the one missing.
///
/// # Errors
/// [`Error::Shape`] naming the missing teacher tensor.
pub fn teacher_pair<T>(teacher_loc: Option<T>, teacher_conf: Option<T>) -> Result<Option<(T, T)>> {
    match (teacher_loc, teacher_conf) {
        (Some(loc), Some(conf)) => Ok(Some((loc, conf))),
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Error::shape(
            "teacher_loc",
            "missing while teacher_conf is given (give both or neither)",
        )),
        (Some(_), None) => Err(Error::shape(
            "teacher_conf",
            "missing while teacher_loc is given (give both or neither)",
        )),
    }
}

/// Evaluates a batch with or without teacher by `evaluate` (SPEC §10.1), the one place
/// every path (the [`crate::Backend`], a GPU-resident batch, a framework's binding) gets
/// the rule from. Without teacher, the batch's student tensors stand in for the teacher's
/// ([`Batch::without_teacher`]): `evaluate` is called with the soft and L2 weights 0, so
/// that the stand-in adds nothing to the total or the gradients, and the soft/L2 terms it
/// gave, their sums and `num_bounded` are reported as 0. `loss_c`, `loss_l`, the counts of
/// SPEC §4 and their gradients never read the teacher, so they are the KD evaluation's
/// exactly. (Making the teacher optional in the core's `prior_terms` would change
/// `forward_image`'s signature, which the CPU backend and the GPU's per-image fallback
/// share; this keeps the stages as they are.)
///
/// # Errors
/// What `evaluate` returns.
pub fn with_teacher_rule(
    has_teacher: bool,
    config: &LossConfig,
    evaluate: impl FnOnce(&LossConfig) -> Result<Evaluation>,
) -> Result<Evaluation> {
    if has_teacher {
        return evaluate(config);
    }
    let mut config = *config;
    config.weights.soft = 0.0;
    config.weights.l2 = 0.0;
    let mut eval = evaluate(&config)?;
    eval.terms.soft_loss = 0.0;
    eval.terms.l2_loss = 0.0;
    eval.sums.soft = 0.0;
    eval.sums.l2 = 0.0;
    eval.sums.num_bounded = 0;
    Ok(eval)
}

impl BatchShape {
    /// The shape of tensors with these dimensions (SPEC §1), before any value is read:
    /// `student_loc` `[B, P, 4]` gives B and P, `student_conf` C, `targets` M; the others
    /// must agree. The teacher's are both given or both absent ([`teacher_pair`]). The
    /// shape is then [`BatchShape::check`]ed.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the first tensor whose dimensions disagree, or as
    /// [`BatchShape::check`].
    pub fn from_dims(dims: Tensors<Option<&[usize]>>) -> Result<Self> {
        let Tensors {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        } = dims;
        let given = |name: &'static str, d: Option<&[usize]>| {
            d.map(<[usize]>::to_vec)
                .ok_or_else(|| Error::shape(name, "missing"))
        };
        let expect = |name: &'static str, got: &[usize], want: &[Option<usize>]| {
            let fits = got.len() == want.len()
                && got.iter().zip(want).all(|(g, w)| w.is_none_or(|w| *g == w));
            if fits {
                return Ok(());
            }
            let want: Vec<String> = want
                .iter()
                .map(|w| w.map_or_else(|| "_".to_owned(), |w| w.to_string()))
                .collect();
            let problem = format!("shape {got:?} where [{}] is needed", want.join(", "));
            Err(Error::shape(name, problem))
        };
        let sl = given("student_loc", student_loc)?;
        expect("student_loc", &sl, &[None, None, Some(4)])?;
        let (b, p) = (sl[0], sl[1]);
        let sc = given("student_conf", student_conf)?;
        expect("student_conf", &sc, &[Some(b), Some(p), None])?;
        let c = sc[2];
        if let Some((tl, tc)) = teacher_pair(teacher_loc, teacher_conf)? {
            expect("teacher_loc", tl, &[Some(b), Some(p), Some(4)])?;
            expect("teacher_conf", tc, &[Some(b), Some(p), Some(c)])?;
        }
        let tg = given("targets", targets)?;
        expect("targets", &tg, &[Some(b), None, Some(5)])?;
        expect("priors", &given("priors", priors)?, &[Some(p), Some(4)])?;
        let shape = Self {
            batch: b,
            priors: p,
            classes: c,
            objects: tg[1],
        };
        shape.check()?;
        Ok(shape)
    }
}

/// Borrowed batch tensors (SPEC §1), flat row-major f32, whose lengths agree with their
/// shape: [`Batch::new`] and [`Batch::without_teacher`] are the only ways to make one.
///
/// A batch without teacher tensors (SPEC §10.1: the plain MultiBox loss that trains the
/// teacher) is evaluated as the KD loss with the soft and L2 weights 0, its
/// `soft_loss`, `l2_loss`, `num_bounded` and their sums reported as 0
/// ([`crate::Backend::evaluate`]).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    shape: BatchShape,
    /// The teacher's are the student's slices when `has_teacher` is false (a stand-in no
    /// term reads).
    tensors: Tensors<&'a [f32]>,
    has_teacher: bool,
}

impl<'a> Batch<'a> {
    /// Checks `shape` ([`BatchShape::check`]) and that every slice has the length it
    /// implies.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the dimension at fault or the first tensor whose length is
    /// wrong.
    pub fn new(
        shape: BatchShape,
        student_loc: &'a [f32],
        student_conf: &'a [f32],
        teacher_loc: &'a [f32],
        teacher_conf: &'a [f32],
        targets: &'a [f32],
        priors: &'a [f32],
    ) -> Result<Self> {
        shape.check()?;
        let tensors = Tensors {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        };
        let dims = shape.dims();
        for ((name, data), dims) in tensors.named().zip(dims).to_array() {
            let expected: usize = dims.iter().product();
            if data.len() != expected {
                return Err(Error::shape(
                    name,
                    format!(
                        "{} values where shape {dims:?} needs {expected}",
                        data.len()
                    ),
                ));
            }
        }
        Ok(Self {
            shape,
            tensors,
            has_teacher: true,
        })
    }

    /// A batch without teacher tensors (SPEC §10.1): the plain MultiBox loss, whose
    /// soft and L2 terms are 0 and not computed from a teacher (see [`Batch`]).
    ///
    /// # Errors
    /// As [`Batch::new`].
    pub fn without_teacher(
        shape: BatchShape,
        student_loc: &'a [f32],
        student_conf: &'a [f32],
        targets: &'a [f32],
        priors: &'a [f32],
    ) -> Result<Self> {
        // The student's tensors stand in for the teacher's (same shapes): every stage can
        // read them, and only the soft/L2 terms, weighted 0 and zeroed, would use them.
        let batch = Self::new(
            shape,
            student_loc,
            student_conf,
            student_loc,
            student_conf,
            targets,
            priors,
        )?;
        Ok(Self {
            has_teacher: false,
            ..batch
        })
    }

    /// The dimensions.
    #[must_use]
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// Whether the batch has teacher tensors (see [`Batch::without_teacher`]).
    #[must_use]
    pub fn has_teacher(&self) -> bool {
        self.has_teacher
    }

    /// The six slices (the teacher's the student's for a batch without teacher: see
    /// [`Batch::has_teacher`]).
    #[must_use]
    pub fn tensors(&self) -> Tensors<&'a [f32]> {
        self.tensors
    }

    /// `[B, P, 4]` student box offsets.
    #[must_use]
    pub fn student_loc(&self) -> &'a [f32] {
        self.tensors.student_loc
    }

    /// `[B, P, C]` student logits.
    #[must_use]
    pub fn student_conf(&self) -> &'a [f32] {
        self.tensors.student_conf
    }

    /// `[B, P, 4]` teacher box offsets (the student's for a batch without teacher: see
    /// [`Batch::has_teacher`]).
    #[must_use]
    pub fn teacher_loc(&self) -> &'a [f32] {
        self.tensors.teacher_loc
    }

    /// `[B, P, C]` teacher logits (the student's for a batch without teacher: see
    /// [`Batch::has_teacher`]).
    #[must_use]
    pub fn teacher_conf(&self) -> &'a [f32] {
        self.tensors.teacher_conf
    }

    /// `[B, M, 5]` ground truth: corners and label (negative labels are padding).
    #[must_use]
    pub fn targets(&self) -> &'a [f32] {
        self.tensors.targets
    }

    /// `[P, 4]` prior boxes, centre form.
    #[must_use]
    pub fn priors(&self) -> &'a [f32] {
        self.tensors.priors
    }

    /// Checks the batch against `config` before any arithmetic: always that the config can
    /// work and that C ≥ 2, and the priors and targets (finite, positive prior sizes,
    /// sound boxes, integer labels in range: what matching and indexing read); with
    /// `scan_values`, every other value too (finite logits and offsets within SPEC §1.3's
    /// magnitudes), images in parallel. A batch without
    /// teacher has no teacher values to scan (its stand-in, the student, is scanned first).
    ///
    /// # Errors
    /// [`Error::Config`] naming the key, or [`Error::Input`] naming the tensor, image and index.
    pub fn check(&self, config: &LossConfig, scan_values: bool) -> Result<()> {
        self.check_cancellable(config, scan_values, None)
    }

    /// [`Batch::check`], whose scan checks `cancel` before each image.
    ///
    /// # Errors
    /// As [`Batch::check`], and [`Error::Cancelled`].
    pub(crate) fn check_cancellable(
        &self,
        config: &LossConfig,
        scan_values: bool,
        cancel: Option<&CancelToken>,
    ) -> Result<()> {
        self.shape.check_config(config)?;
        validate_priors(bytemuck::cast_slice(self.tensors.priors))?;
        if !scan_values {
            // The priors and targets, a few thousand values that matching and every
            // stage's indexing read, are checked whatever `scan_values` says: a label out
            // of range or a box that cannot match would otherwise change the result
            // silently, or index out of bounds.
            let classes = u32::try_from(self.shape.classes).unwrap_or(u32::MAX);
            let m = self.shape.objects;
            let targets: &[[f32; 5]] = bytemuck::cast_slice(self.tensors.targets);
            return targets
                .chunks(m.max(1))
                .enumerate()
                .try_for_each(|(i, rows)| validate_targets(rows, i, classes))
                .map_err(Error::from);
        }
        let first_bad = (0..self.shape.batch)
            .into_par_iter()
            .map(|i| {
                cancel.map_or(Ok(()), CancelToken::check)?;
                Ok(validate_image(&self.image(i), i)?)
            })
            .find_first(Result::is_err);
        first_bad.unwrap_or(Ok(()))
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
        let t = &self.tensors;
        ImageInputs {
            student_loc: bytemuck::cast_slice(&t.student_loc[i * p * 4..(i + 1) * p * 4]),
            student_conf: &t.student_conf[i * p * c..(i + 1) * p * c],
            teacher_loc: bytemuck::cast_slice(&t.teacher_loc[i * p * 4..(i + 1) * p * 4]),
            teacher_conf: &t.teacher_conf[i * p * c..(i + 1) * p * c],
            targets: bytemuck::cast_slice(&t.targets[i * m * 5..(i + 1) * m * 5]),
            priors: bytemuck::cast_slice(t.priors),
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
    /// loop may skip the scan of the logits and offsets (most of the values); shapes, the
    /// config, the priors and the targets are checked regardless ([`Batch::check`]). On a
    /// GPU the skipped values are validated on the device instead, with the same errors;
    /// on the CPU a non-finite value that reaches a loss term makes it non-finite, which
    /// is refused ([`Error::Numerical`]).
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

/// The names of the four terms and the total (SPEC §5), in the order the library reports
/// them everywhere: [`Evaluation::named_terms`], `eval --json`, Python's `ssdkd.TERMS`.
pub const TERM_NAMES: [&str; 5] = ["soft_loss", "l2_loss", "loss_c", "loss_l", "total"];

/// Gradient elements per task of [`Evaluation::check_finite`]'s scan.
const FINITE_SCAN_CHUNK: usize = 1 << 16;

impl Evaluation {
    /// The four terms and the total with their names (SPEC §5; as `eval --json` writes
    /// them): `soft_loss`, `l2_loss`, `loss_c`, `loss_l`, `total`.
    #[must_use]
    pub fn named_terms(&self) -> [(&'static str, f64); 5] {
        let t = self.terms;
        let values = [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l, t.total];
        core::array::from_fn(|i| (TERM_NAMES[i], values[i]))
    }

    /// Checks that every term is finite (see [`Evaluation::check_finite`]).
    ///
    /// # Errors
    /// [`Error::Numerical`] naming the first non-finite term.
    pub fn check_terms_finite(&self) -> Result<()> {
        let terms = self.named_terms();
        match terms.into_iter().find(|(_, v)| !v.is_finite()) {
            Some((what, value)) => Err(Error::Numerical {
                what,
                index: None,
                value,
            }),
            None => Ok(()),
        }
    }

    /// Checks that every term, and every gradient element present, is finite: inputs that
    /// pass validation must give finite results, so anything else is a numerical failure.
    ///
    /// # Errors
    /// [`Error::Numerical`] naming the first non-finite term or gradient element.
    pub fn check_finite(&self) -> Result<()> {
        self.check_terms_finite()?;
        if let Some(g) = &self.gradients {
            for (what, values) in [
                ("grad_student_conf", &g.student_conf),
                ("grad_student_loc", &g.student_loc),
            ] {
                // Chunks scanned by a loop that vectorises, then the first bad element
                // of the first bad chunk (a per-element `position_first` cost more than
                // the whole CPU evaluation).
                let first_bad_chunk = values
                    .par_chunks(FINITE_SCAN_CHUNK)
                    .position_first(|chunk| !chunk.iter().fold(true, |ok, v| ok & v.is_finite()));
                if let Some(i) = first_bad_chunk.and_then(|c| {
                    let start = c * FINITE_SCAN_CHUNK;
                    let offset = values[start..].iter().position(|v| !v.is_finite())?;
                    Some(start + offset)
                }) {
                    return Err(Error::Numerical {
                        what,
                        index: Some(i),
                        value: f64::from(values[i]),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Owned batch tensors (read from a file or generated), flat row-major f32, whose lengths
/// agree with their shape: [`OwnedBatch::new`] checks them, and values can be changed in
/// place but not the lengths.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedBatch {
    shape: BatchShape,
    /// The teacher's are empty when `has_teacher` is false.
    tensors: Tensors<Vec<f32>>,
    has_teacher: bool,
}

impl OwnedBatch {
    /// Takes the tensors after the checks of [`Batch::new`].
    ///
    /// # Errors
    /// [`Error::Shape`] naming the first tensor whose length disagrees with `shape`.
    pub fn new(
        shape: BatchShape,
        student_loc: Vec<f32>,
        student_conf: Vec<f32>,
        teacher_loc: Vec<f32>,
        teacher_conf: Vec<f32>,
        targets: Vec<f32>,
        priors: Vec<f32>,
    ) -> Result<Self> {
        Batch::new(
            shape,
            &student_loc,
            &student_conf,
            &teacher_loc,
            &teacher_conf,
            &targets,
            &priors,
        )?;
        Ok(Self {
            shape,
            tensors: Tensors {
                student_loc,
                student_conf,
                teacher_loc,
                teacher_conf,
                targets,
                priors,
            },
            has_teacher: true,
        })
    }

    /// Takes the tensors of a batch without teacher after the checks of
    /// [`Batch::without_teacher`].
    ///
    /// # Errors
    /// [`Error::Shape`] naming the first tensor whose length disagrees with `shape`.
    pub fn without_teacher(
        shape: BatchShape,
        student_loc: Vec<f32>,
        student_conf: Vec<f32>,
        targets: Vec<f32>,
        priors: Vec<f32>,
    ) -> Result<Self> {
        Batch::without_teacher(shape, &student_loc, &student_conf, &targets, &priors)?;
        Ok(Self {
            shape,
            tensors: Tensors {
                student_loc,
                student_conf,
                teacher_loc: Vec::new(),
                teacher_conf: Vec::new(),
                targets,
                priors,
            },
            has_teacher: false,
        })
    }

    /// Borrows the tensors as a [`Batch`].
    #[must_use]
    pub fn batch(&self) -> Batch<'_> {
        let mut tensors = self.tensors.as_ref().map(Vec::as_slice);
        if !self.has_teacher {
            tensors.teacher_loc = tensors.student_loc;
            tensors.teacher_conf = tensors.student_conf;
        }
        Batch {
            shape: self.shape,
            tensors,
            has_teacher: self.has_teacher,
        }
    }

    /// Whether the batch has teacher tensors (see [`Batch::without_teacher`]); without,
    /// `teacher_loc()` and `teacher_conf()` are empty.
    #[must_use]
    pub fn has_teacher(&self) -> bool {
        self.has_teacher
    }

    /// The dimensions.
    #[must_use]
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// The tensors in SPEC §1's order — `student_loc`, `student_conf`, `teacher_loc`,
    /// `teacher_conf`, `targets`, `priors` — to take apart and rebuild with another shape
    /// (the teacher's empty for a batch without teacher).
    #[must_use]
    pub fn into_tensors(self) -> [Vec<f32>; 6] {
        self.tensors.to_array()
    }
}

/// Read access to an owned batch's tensors, and write access to their values.
macro_rules! owned_accessors {
    ($($name:ident, $name_mut:ident, $dims:literal;)*) => {
        impl OwnedBatch {
            $(
                #[doc = concat!("`", $dims, "` `", stringify!($name), "`.")]
                #[must_use]
                pub fn $name(&self) -> &[f32] {
                    &self.tensors.$name
                }

                #[doc = concat!("`", stringify!($name), "`'s values, to change in place.")]
                #[must_use]
                pub fn $name_mut(&mut self) -> &mut [f32] {
                    &mut self.tensors.$name
                }
            )*
        }
    };
}

owned_accessors! {
    student_loc, student_loc_mut, "[B, P, 4]";
    student_conf, student_conf_mut, "[B, P, C]";
    teacher_loc, teacher_loc_mut, "[B, P, 4]";
    teacher_conf, teacher_conf_mut, "[B, P, C]";
    targets, targets_mut, "[B, M, 5]";
    priors, priors_mut, "[P, 4]";
}
