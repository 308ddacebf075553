//! Stage **match** (SPEC §3): each prior's matched object, its label and encoded offsets.
//! Twin of `shaders/match.wgsl`, kernel by kernel:
//! - [`match_priors`], a loop over priors: steps 1 and 4, each prior's best object and the
//!   threshold;
//! - [`match_objects`], a loop over object rows: steps 2 and 3, each object's best prior,
//!   forced onto it with a maximum so that the later object wins;
//! - [`match_finish`], a loop over priors: step 5's labels and offsets, and num_pos.
//!
//! Objects are named by their row in `targets` on both sides (padding rows skipped
//! wherever they stand), and `conf_target` carries the same flag words between the
//! kernels: [`POSITIVE`], [`FORCED`] and the row in [`ROW`].

use crate::boxes::{encode, CenterBox, CornerBox, Overlap};

/// Per-object scratch of the match stage; a caller provides at least one per `targets` row.
/// The real objects are kept in row order, each with its row (padding rows are left out:
/// the CPU's loops visit only real objects, and name them by row as the GPU does).
#[derive(Clone, Copy, Debug)]
pub struct ObjectScratch {
    truth: CornerBox,
    label: u32,
    /// Its row in `targets`.
    row: u32,
    /// The object's best prior over the priors visited so far.
    best: BestPrior,
}

impl Default for ObjectScratch {
    fn default() -> Self {
        let zero = glam::Vec2::ZERO;
        Self {
            truth: CornerBox {
                min: zero,
                max: zero,
            },
            label: 0,
            row: 0,
            best: BestPrior::default(),
        }
    }
}

/// One object's best prior (SPEC §3 step 2, the lowest tied index), gathered while the
/// priors are visited in order: the CPU's fusion of `match_objects` into the loop over
/// priors, shared by the reference and the host's fast path.
#[derive(Clone, Copy, Debug)]
pub struct BestPrior {
    /// The best overlap over the priors visited so far.
    best: Overlap,
    /// The lowest prior index tied with `best`, unless `rescan`.
    prior: u32,
    /// `best` rose from a value within the tie tolerance of it, so an earlier prior may tie
    /// with it too: the best prior is found by a second scan (rare).
    rescan: bool,
}

impl Default for BestPrior {
    fn default() -> Self {
        Self {
            best: NO_OVERLAP,
            prior: 0,
            rescan: false,
        }
    }
}

impl BestPrior {
    /// Takes prior `p`'s overlap, priors visited in index order from 0. When the best
    /// overlap rises clear of the tolerance, every earlier prior lies below the new
    /// maximum's tie band, so `p` is the lowest tied one; a rise within the band needs a
    /// rescan.
    pub fn visit(&mut self, p: usize, overlap: Overlap) {
        if p == 0 {
            self.best = overlap;
        } else if overlap.beats(self.best) {
            if self.best.ties_with(overlap) {
                self.rescan = true;
            } else {
                self.prior = p as u32;
                self.rescan = false;
            }
            self.best = overlap;
        }
    }

    /// The best overlap over the priors visited so far: a later prior changes nothing
    /// unless it [`Overlap::beats`] this one (or is prior 0).
    #[must_use]
    pub fn best(&self) -> Overlap {
        self.best
    }

    /// The lowest prior tied with the best overlap, after every prior was visited;
    /// `overlap_at(p)` recomputes prior `p`'s overlap for the rare rescan.
    pub fn resolve(&self, priors: usize, overlap_at: impl Fn(usize) -> Overlap) -> usize {
        if self.rescan {
            (0..priors)
                .position(|p| overlap_at(p).ties_with(self.best))
                .unwrap_or(0) // only NaN input (rejected by validation) finds no tie
        } else {
            self.prior as usize
        }
    }
}

impl ObjectScratch {
    /// The scratch of the real object (label ≥ 0) at `targets` row `row`:
    /// `xmin, ymin, xmax, ymax, label`.
    #[must_use]
    pub fn new(target: &[f32; 5], row: u32) -> Self {
        Self {
            truth: CornerBox::from_row(target),
            label: target[4] as u32,
            row,
            ..Self::default()
        }
    }

    /// The object's box.
    #[must_use]
    pub fn truth(&self) -> CornerBox {
        self.truth
    }

    /// Its row in `targets`.
    #[must_use]
    pub fn row(&self) -> u32 {
        self.row
    }

    /// Takes prior `p`'s overlap into the object's best prior ([`BestPrior::visit`]).
    #[inline]
    pub fn visit(&mut self, p: usize, overlap: Overlap) {
        self.best.visit(p, overlap);
    }

    /// The object's best prior over the priors visited so far.
    #[must_use]
    pub fn best_prior(&self) -> &BestPrior {
        &self.best
    }
}

/// The image's real objects (label ≥ 0; padding rows skipped wherever they stand) into
/// `objects`, in row order ([`ObjectScratch::new`]); returns how many.
///
/// # Panics
/// If `objects` is shorter than the real objects.
pub fn gather_objects(targets: &[[f32; 5]], objects: &mut [ObjectScratch]) -> usize {
    let mut n = 0;
    for (row, target) in targets.iter().enumerate() {
        if target[4] >= 0.0 {
            objects[n] = ObjectScratch::new(target, row as u32);
            n += 1;
        }
    }
    n
}

const NO_OVERLAP: Overlap = Overlap {
    inter: 0.0,
    union: 1.0,
};

/// Which priors get encoded offsets in `loc_target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offsets {
    /// Every prior, against its best object (SPEC §3 step 5): what the decisions report.
    All,
    /// Only the positives, the others left at 0: all the loss and its gradient read, and it
    /// saves two logarithms per negative prior.
    Positives,
}

/// Flag of a `conf_target` word between the kernels: the prior's best overlap reaches the
/// threshold (step 4).
pub const POSITIVE: u32 = 0x4000_0000;
/// Flag of a `conf_target` word between the kernels: the prior is some object's best prior
/// (step 2); the largest forcing word wins, as the later object does in step 3.
pub const FORCED: u32 = 0x8000_0000;
/// The object row in a `conf_target` word between the kernels.
pub const ROW: u32 = 0x3fff_ffff;

/// A prior's corner box from its row `[cx, cy, w, h]`
/// (`prior_corners` in `match.wgsl`).
#[must_use]
#[inline]
pub fn prior_corners(prior: [f32; 4]) -> CornerBox {
    CenterBox::from_row(prior).to_corners()
}

/// Steps 1 and 4, a loop over priors (`match_priors` in `match.wgsl`, a thread per
/// prior): each prior's best object row (the maximum over the objects in row order, the
/// first that [`Overlap::beats`] replacing it; then the lowest object that
/// [`Overlap::ties_with`] it) and [`POSITIVE`] when the maximum [`Overlap::reaches`] the
/// threshold; 0 for every prior of an image without objects. `objects` holds the image's
/// real objects in row order ([`gather_objects`]), where the kernel skips the padding rows
/// from the image's `first_object`.
///
/// CPU fusion: the same loop also gathers each object's best overlap over the priors and
/// its lowest best prior ([`ObjectScratch::visit`]), which `match_objects` on the GPU finds
/// by a loop of its own.
///
/// # Panics
/// If `conf_target` is not `priors.len()` long.
// Index loops over the priors and objects, as the kernel's.
#[allow(clippy::needless_range_loop)]
pub fn match_priors(
    objects: &mut [ObjectScratch],
    priors: &[[f32; 4]],
    threshold: f32,
    conf_target: &mut [u32],
) {
    assert_eq!(conf_target.len(), priors.len());
    if objects.is_empty() {
        conf_target.fill(0);
        return;
    }
    for p in 0..priors.len() {
        let prior_box = prior_corners(priors[p]);
        let mut best = Overlap::of(objects[0].truth, prior_box);
        objects[0].visit(p, best); // CPU fusion, the object's best prior
        for m in 1..objects.len() {
            let overlap = Overlap::of(objects[m].truth, prior_box);
            objects[m].visit(p, overlap); // CPU fusion
            if overlap.beats(best) {
                best = overlap;
            }
        }
        let mut best_object = objects[0].row;
        for m in 0..objects.len() {
            if Overlap::of(objects[m].truth, prior_box).ties_with(best) {
                best_object = objects[m].row;
                break;
            }
        }
        conf_target[p] = best_object | if best.reaches(threshold) { POSITIVE } else { 0 };
    }
}

/// Steps 2 and 3, a loop over object rows (`match_objects` in `match.wgsl`, a workgroup
/// per row): each object's best prior (the lowest tied index), forced onto it by the
/// maximum of its word and `FORCED | row`, so that the later object wins a prior two
/// objects both want (the GPU's `atomicMax`, whatever order its workgroups run in).
///
/// Reads the best overlaps `match_priors` gathered; rescans the priors only for an object
/// whose best overlap rose within the tie tolerance.
pub fn match_objects(objects: &[ObjectScratch], priors: &[[f32; 4]], conf_target: &mut [u32]) {
    for object in objects {
        let best_prior = object.best.resolve(priors.len(), |p| {
            Overlap::of(object.truth, prior_corners(priors[p]))
        });
        let word = &mut conf_target[best_prior];
        *word = (*word).max(FORCED | object.row);
    }
}

/// Step 5 and the labels, a loop over priors (`match_finish` in `match.wgsl`, a workgroup
/// per image): each prior's offsets against its object (every prior or the positives only,
/// per `offsets`), the label `row's label + 1` of the positives (forced or over the
/// threshold) and 0 elsewhere; returns the image's positive count.
///
/// # Panics
/// If the output slices are not `priors.len()` long.
pub fn match_finish(
    objects: &[ObjectScratch],
    priors: &[[f32; 4]],
    variance: [f32; 2],
    offsets: Offsets,
    conf_target: &mut [u32],
    loc_target: &mut [[f32; 4]],
) -> u32 {
    assert_eq!(conf_target.len(), priors.len());
    assert_eq!(loc_target.len(), priors.len());
    if objects.is_empty() {
        conf_target.fill(0);
        loc_target.fill([0.0; 4]);
        return 0;
    }
    if offsets == Offsets::Positives {
        loc_target.fill([0.0; 4]); // one flat fill; the positives' offsets are written below
    }
    let mut num_pos = 0;
    for ((word, loc), prior) in conf_target
        .iter_mut()
        .zip(loc_target.iter_mut())
        .zip(priors)
    {
        let positive = *word & (POSITIVE | FORCED) != 0;
        if !positive && offsets == Offsets::Positives {
            // Most priors: no object to look up, offsets already 0.
            *word = 0;
            continue;
        }
        let row = *word & ROW;
        // Rows are ascending: the object of a row by bisection (few objects, so cheap).
        let object = match objects.binary_search_by_key(&row, |o| o.row) {
            Ok(i) => &objects[i],
            Err(_) => &objects[0], // unreachable: every word names a real object's row
        };
        *loc = encode(object.truth, CenterBox::from_row(*prior), variance);
        *word = if positive {
            num_pos += 1;
            object.label + 1
        } else {
            0
        };
    }
    num_pos
}

/// The three kernels over one image: matches its priors to its objects and writes, for
/// every prior, the label `conf_target` (0 = background) and the encoded offsets
/// `loc_target` (of every prior, or of the positives only: see [`Offsets`]). Returns the
/// number of positive priors.
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
    let n = gather_objects(targets, objects);
    let objects = &mut objects[..n];
    match_priors(objects, priors, threshold, conf_target);
    match_objects(objects, priors, conf_target);
    match_finish(objects, priors, variance, offsets, conf_target, loc_target)
}
