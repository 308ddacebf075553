//! Stage **match** (SPEC §3): each prior's matched object, its label and encoded offsets.
//! Twin of `shaders/match.wgsl`.

use crate::boxes::{encode, CenterBox, CornerBox, Overlap};

/// Per-object scratch of the match stage; a caller provides at least one per `targets` row.
#[derive(Clone, Copy, Debug)]
pub struct ObjectScratch {
    truth: CornerBox,
    label: u32,
    /// The object's best overlap over the priors visited so far.
    best: Overlap,
    /// The lowest prior index tied with `best`, unless `rescan`.
    best_prior: u32,
    /// `best` rose from a value within the tie tolerance of it, so an earlier prior may tie
    /// with it too: the best prior is found by a second scan (rare).
    rescan: bool,
    /// The overlap with the prior being visited.
    current: Overlap,
}

impl Default for ObjectScratch {
    fn default() -> Self {
        let zero = glam::Vec2::ZERO;
        let none = Overlap {
            inter: 0.0,
            union: 1.0,
        };
        Self {
            truth: CornerBox {
                min: zero,
                max: zero,
            },
            label: 0,
            best: none,
            best_prior: 0,
            rescan: false,
            current: none,
        }
    }
}

/// Which priors get encoded offsets in `loc_target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offsets {
    /// Every prior, against its best object (SPEC §3 step 5): what the decisions report.
    All,
    /// Only the positives, the others left at 0: all the loss and its gradient read, and it
    /// saves two logarithms per negative prior.
    Positives,
}

/// Flag kept in `conf_target` between the passes: the prior is positive.
const POSITIVE: u32 = 1 << 31;

/// Matches the priors of one image to its objects and writes, for every prior, the label
/// `conf_target` (0 = background) and the encoded offsets `loc_target` (of every prior, or
/// of the positives only: see [`Offsets`]). Returns the number of
/// positive priors.
///
/// `targets` rows are `xmin, ymin, xmax, ymax, label`; rows with a negative label are padding
/// and skipped wherever they stand. Ties (SPEC §3): overlaps within a relative 1e-5 of the
/// maximum count as tied and resolve to the lowest index; decisions use products only.
///
/// # Panics
/// If `objects` is shorter than `targets`, or the output slices are not `priors.len()` long.
#[allow(clippy::too_many_arguments)] // one slice per tensor, as the shader binds them
pub fn match_image(
    targets: &[[f32; 5]],
    priors: &[[f32; 4]],
    threshold: f32,
    variance: [f32; 2],
    offsets: Offsets,
    objects: &mut [ObjectScratch],
    conf_target: &mut [u32],
    loc_target: &mut [[f32; 4]],
) -> u32 {
    assert!(objects.len() >= targets.len(), "object scratch too short");
    assert_eq!(conf_target.len(), priors.len());
    assert_eq!(loc_target.len(), priors.len());

    let mut n = 0;
    for row in targets.iter().filter(|row| row[4] >= 0.0) {
        objects[n] = ObjectScratch {
            truth: CornerBox::from_row(row),
            label: row[4] as u32,
            ..ObjectScratch::default()
        };
        n += 1;
    }
    let objects = &mut objects[..n];
    if n == 0 {
        conf_target.fill(0);
        loc_target.fill([0.0; 4]);
        return 0;
    }

    // Steps 1 and 4: the best object of each prior, and whether it reaches the threshold.
    // Each object's best overlap over the priors is gathered in the same pass.
    for (p, prior) in priors.iter().enumerate() {
        let prior_box = CenterBox::from_row(*prior).to_corners();
        let mut best = Overlap {
            inter: 0.0,
            union: 1.0,
        };
        for (m, object) in objects.iter_mut().enumerate() {
            let overlap = Overlap::of(object.truth, prior_box);
            object.current = overlap;
            if m == 0 || overlap.beats(best) {
                best = overlap;
            }
            // The object's best prior in the same pass: when its best overlap rises clear of
            // the tolerance, every earlier prior lies below the new maximum's tie band, so
            // this prior is the lowest tied one; a rise within the band needs a rescan.
            if p == 0 {
                object.best = overlap;
            } else if overlap.beats(object.best) {
                if object.best.ties_with(overlap) {
                    object.rescan = true;
                } else {
                    object.best_prior = p as u32;
                    object.rescan = false;
                }
                object.best = overlap;
            }
        }
        let best_object = objects
            .iter()
            .position(|object| object.current.ties_with(best))
            .unwrap_or(0) as u32; // only NaN input (rejected by validation) finds no tie
        let positive = if best.reaches(threshold) { POSITIVE } else { 0 };
        conf_target[p] = best_object | positive;
    }

    // Steps 2 and 3: the best prior of each object (lowest tied index), forced onto that
    // object in object order so that a later object wins a prior two objects both want.
    for (m, object) in objects.iter().enumerate() {
        let best_prior = if object.rescan {
            priors
                .iter()
                .position(|prior| {
                    let prior_box = CenterBox::from_row(*prior).to_corners();
                    Overlap::of(object.truth, prior_box).ties_with(object.best)
                })
                .unwrap_or(0) // only NaN input (rejected by validation) finds no tie
        } else {
            object.best_prior as usize
        };
        conf_target[best_prior] = m as u32 | POSITIVE;
    }

    // Steps 4 and 5: labels and offsets.
    let mut num_pos = 0;
    for ((target, loc), prior) in conf_target
        .iter_mut()
        .zip(loc_target.iter_mut())
        .zip(priors)
    {
        let object = &objects[(*target & !POSITIVE) as usize];
        let positive = *target & POSITIVE != 0;
        *loc = if positive || offsets == Offsets::All {
            encode(object.truth, CenterBox::from_row(*prior), variance)
        } else {
            [0.0; 4]
        };
        *target = if positive {
            num_pos += 1;
            object.label + 1
        } else {
            0
        };
    }
    num_pos
}
