//! SPEC §7's tolerances, as one check that the command line (`--backend both`), the tests
//! and library users share: losses agree to 1e-4 relative (1e-6 absolute where the
//! expected value is below 1e-2), gradient elements to `1e-3 |e| + 1e-7`, counts exactly.
//!
//! Differences are measured in units of the tolerance: a value of at most 1 agrees.

use crate::batch::Evaluation;
use std::fmt;

/// Relative tolerance of a loss (SPEC §7).
pub const LOSS_REL: f64 = 1e-4;
/// Absolute tolerance of a loss whose expected value is below [`LOSS_SMALL`] (SPEC §7).
pub const LOSS_ABS: f64 = 1e-6;
/// Below this expected magnitude a loss is compared absolutely (SPEC §7).
pub const LOSS_SMALL: f64 = 1e-2;
/// Relative tolerance of a gradient element (SPEC §7).
pub const GRAD_REL: f64 = 1e-3;
/// Absolute tolerance of a gradient element (SPEC §7).
pub const GRAD_ABS: f64 = 1e-7;

/// The names of the four terms and the total, in [`terms`]' order (those of
/// [`Evaluation::named_terms`]).
pub use crate::batch::TERM_NAMES;

/// The four terms and the total of an evaluation, in [`TERM_NAMES`]' order.
#[must_use]
pub fn terms(eval: &Evaluation) -> [f64; 5] {
    eval.named_terms().map(|(_, value)| value)
}

/// One compared value: what it is, where, both values, and the difference in units of its
/// tolerance (≤ 1 agrees; NaN on either side counts as infinitely far).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Difference {
    /// The term (`soft_loss`, …) or gradient (`grad_student_conf`, `grad_student_loc`).
    pub what: &'static str,
    /// The flat element index, for a gradient.
    pub index: Option<usize>,
    /// The value under test.
    pub actual: f64,
    /// The reference value.
    pub expected: f64,
    /// `|actual − expected| / tolerance`.
    pub units: f64,
}

impl Difference {
    /// Whether the values agree to their tolerance.
    #[must_use]
    pub fn agrees(&self) -> bool {
        self.units <= 1.0
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.what)?;
        if let Some(i) = self.index {
            write!(f, "[{i}]")?;
        }
        write!(
            f,
            " {} against {} ({:.3} × tolerance)",
            self.actual, self.expected, self.units
        )
    }
}

fn units(actual: f64, expected: f64, tolerance: f64) -> f64 {
    let diff = (actual - expected).abs();
    if diff.is_nan() {
        f64::INFINITY
    } else {
        diff / tolerance
    }
}

/// A loss against its expected value, to SPEC §7.
#[must_use]
pub fn loss_difference(what: &'static str, actual: f64, expected: f64) -> Difference {
    loss_difference_within(what, actual, expected, LOSS_REL, LOSS_ABS)
}

/// A loss against its expected value with other tolerances than SPEC §7's: `rel`
/// relative, or `abs` absolute where `|expected|` is below [`LOSS_SMALL`].
#[must_use]
pub fn loss_difference_within(
    what: &'static str,
    actual: f64,
    expected: f64,
    rel: f64,
    abs: f64,
) -> Difference {
    let tolerance = if expected.abs() < LOSS_SMALL {
        abs
    } else {
        rel * expected.abs()
    };
    Difference {
        what,
        index: None,
        actual,
        expected,
        units: units(actual, expected, tolerance),
    }
}

/// The worst of many elements (`|a − e| <= rel |e| + abs`) and how many are out of
/// tolerance. Slices of different lengths are compared up to the shorter one, and the first
/// missing element is the worst (infinitely far).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Elements {
    /// The element furthest from its tolerance; `None` for empty slices.
    pub worst: Option<Difference>,
    /// Elements out of tolerance (a length difference counts each missing element).
    pub failures: usize,
    /// Elements compared.
    pub count: usize,
}

impl Elements {
    /// Whether every element agrees.
    #[must_use]
    pub fn agrees(&self) -> bool {
        self.failures == 0
    }
}

/// Compares `actual` with `expected` element by element, with tolerance `rel |e| + abs`.
#[must_use]
pub fn elements(
    what: &'static str,
    actual: &[f32],
    expected: &[f32],
    rel: f64,
    abs: f64,
) -> Elements {
    let mut worst: Option<Difference> = None;
    let mut failures = 0;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let (a, e) = (f64::from(a), f64::from(e));
        let d = Difference {
            what,
            index: Some(i),
            actual: a,
            expected: e,
            units: units(a, e, rel * e.abs() + abs),
        };
        failures += usize::from(!d.agrees());
        if worst.is_none_or(|w| d.units > w.units) {
            worst = Some(d);
        }
    }
    let common = actual.len().min(expected.len());
    if actual.len() != expected.len() {
        failures += actual.len().max(expected.len()) - common;
        let at = |v: &[f32]| v.get(common).map_or(f64::NAN, |&x| f64::from(x));
        worst = Some(Difference {
            what,
            index: Some(common),
            actual: at(actual),
            expected: at(expected),
            units: f64::INFINITY,
        });
    }
    Elements {
        worst,
        failures,
        count: actual.len().max(expected.len()),
    }
}

/// Gradient elements to SPEC §7 (`1e-3 |e| + 1e-7`).
#[must_use]
pub fn gradient_elements(what: &'static str, actual: &[f32], expected: &[f32]) -> Elements {
    elements(what, actual, expected, GRAD_REL, GRAD_ABS)
}

/// How far one evaluation is from another (SPEC §7).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// The term (of the four and the total) furthest from its tolerance.
    pub worst_term: Difference,
    /// The gradient element furthest from its tolerance, when both carry gradients.
    pub worst_gradient: Option<Difference>,
    /// Gradient elements out of tolerance.
    pub gradient_failures: usize,
    /// `(num_pos, num_neg, num_bounded)` of the evaluation under test and of the reference.
    pub counts: [(u32, u32, u32); 2],
}

impl Agreement {
    /// Whether everything agrees to SPEC §7: every term, every gradient element, the counts.
    #[must_use]
    pub fn agrees(&self) -> bool {
        self.worst_term.agrees() && self.gradient_failures == 0 && self.counts[0] == self.counts[1]
    }
}

impl fmt::Display for Agreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worst term {}", self.worst_term)?;
        if let Some(g) = self.worst_gradient {
            write!(
                f,
                "; worst gradient element {g}, {} out of tolerance",
                self.gradient_failures
            )?;
        }
        if self.counts[0] != self.counts[1] {
            write!(
                f,
                "; counts (num_pos, num_neg, num_bounded) {:?} against {:?}",
                self.counts[0], self.counts[1]
            )?;
        }
        Ok(())
    }
}

/// Compares `actual` with the reference `expected` to SPEC §7: the four terms and the
/// total, the counts, and the gradients when both carry them.
#[must_use]
pub fn compare(actual: &Evaluation, expected: &Evaluation) -> Agreement {
    let mut worst_term: Option<Difference> = None;
    for ((what, a), e) in TERM_NAMES
        .into_iter()
        .zip(terms(actual))
        .zip(terms(expected))
    {
        let d = loss_difference(what, a, e);
        if worst_term.is_none_or(|w| d.units > w.units) {
            worst_term = Some(d);
        }
    }
    let (mut worst_gradient, mut gradient_failures) = (None::<Difference>, 0);
    if let (Some(ga), Some(ge)) = (&actual.gradients, &expected.gradients) {
        for part in [
            gradient_elements("grad_student_conf", &ga.student_conf, &ge.student_conf),
            gradient_elements("grad_student_loc", &ga.student_loc, &ge.student_loc),
        ] {
            gradient_failures += part.failures;
            if let Some(d) = part.worst {
                if worst_gradient.is_none_or(|w| d.units > w.units) {
                    worst_gradient = Some(d);
                }
            }
        }
    }
    let counts = |e: &Evaluation| (e.sums.num_pos, e.sums.num_neg, e.sums.num_bounded);
    Agreement {
        worst_term: worst_term.expect("five terms"),
        worst_gradient,
        gradient_failures,
        counts: [counts(actual), counts(expected)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Gradients;

    fn eval(total: f64, conf: Vec<f32>) -> Evaluation {
        let mut e = Evaluation::default();
        e.terms.soft_loss = 2.0;
        e.terms.total = total;
        e.sums.num_pos = 3;
        e.gradients = Some(Gradients {
            student_conf: conf,
            student_loc: vec![0.5; 4],
        });
        e
    }

    #[test]
    fn term_names_follow_the_evaluation() {
        let names = Evaluation::default().named_terms().map(|(name, _)| name);
        assert_eq!(names, TERM_NAMES);
    }

    #[test]
    fn tolerances_of_spec_7() {
        // Relative 1e-4 above 1e-2, absolute 1e-6 below.
        assert!(loss_difference("x", 10.0009, 10.0).agrees());
        assert!(!loss_difference("x", 10.0011, 10.0).agrees());
        assert!(loss_difference("x", 0.005_000_9, 0.005).agrees());
        assert!(!loss_difference("x", 0.005_001_1, 0.005).agrees());
        assert!(!loss_difference("x", f64::NAN, 0.005).agrees());
        let e = gradient_elements("g", &[1.0, 2.0011, 0.0], &[1.0, 2.0, 0.0]);
        assert_eq!(e.failures, 0);
        let e = gradient_elements("g", &[1.0, 2.003, 1.2e-7], &[1.0, 2.0, 0.0]);
        assert_eq!(e.failures, 2);
        assert_eq!(e.worst.unwrap().index, Some(1));
    }

    #[test]
    fn compare_names_the_worst_term_and_element() {
        let reference = eval(5.0, vec![0.1, 0.2, 0.3]);
        assert!(compare(&reference, &reference).agrees());

        let off = eval(5.01, vec![0.1, 0.2, 0.31]);
        let a = compare(&off, &reference);
        assert!(!a.agrees());
        assert_eq!(a.worst_term.what, "total");
        let g = a.worst_gradient.unwrap();
        assert_eq!((g.what, g.index), ("grad_student_conf", Some(2)));
        assert_eq!(a.gradient_failures, 1);
        let line = a.to_string();
        assert!(
            line.contains("total") && line.contains("grad_student_conf[2]"),
            "{line}"
        );

        let short = eval(5.0, vec![0.1, 0.2]);
        let a = compare(&short, &reference);
        assert!(!a.agrees());
        assert_eq!(a.worst_gradient.unwrap().index, Some(2));

        let mut counts = eval(5.0, vec![0.1, 0.2, 0.3]);
        counts.sums.num_pos = 4;
        assert!(!compare(&counts, &reference).agrees());
    }
}
