//! The match stage (SPEC §3) of the CPU fast path: the core's `match_priors` and
//! `match_objects` decisions, word for word, with the overlaps of one object against a
//! block of priors taken in one vectorised pass (priors' corners and areas laid out as
//! columns once per evaluation) instead of one prior–object pair at a time. The labels and
//! offsets are then the core's [`match_finish`]. Tested against the core's `match_image`
//! through `tests/fast_cpu.rs` (labels, offsets and everything downstream with
//! `assert_eq`).

use super::simd::{best_objects_block, first_beating, overlap_at, overlaps_block};
use ssdkd_core::boxes::{CenterBox, Overlap};
use ssdkd_core::stages::r#match::{
    gather_objects, match_finish, BestPrior, ObjectScratch, Offsets, FORCED,
};

/// Priors per block of overlaps.
const BLOCK: usize = 256;

/// The priors' corner boxes and areas as columns, computed as the core computes them
/// (`CenterBox::to_corners`, `CornerBox::area`).
#[derive(Clone, Debug, Default)]
pub struct PriorColumns {
    x0: Vec<f32>,
    y0: Vec<f32>,
    x1: Vec<f32>,
    y1: Vec<f32>,
    area: Vec<f32>,
}

impl PriorColumns {
    /// The columns of `priors` (centre form).
    #[must_use]
    pub fn new(priors: &[[f32; 4]]) -> Self {
        let mut columns = Self::default();
        for prior in priors {
            let corners = CenterBox::from_row(*prior).to_corners();
            columns.x0.push(corners.min.x);
            columns.y0.push(corners.min.y);
            columns.x1.push(corners.max.x);
            columns.y1.push(corners.max.y);
            columns.area.push(corners.area());
        }
        columns
    }

    fn len(&self) -> usize {
        self.area.len()
    }
}

/// One real object's state across the priors (the core's `ObjectScratch` fields).
#[derive(Clone, Copy, Debug)]
struct ObjectState {
    /// `[xmin, ymin, xmax, ymax]`.
    truth: [f32; 4],
    area: f32,
    row: u32,
    best: BestPrior,
}

/// Per-image scratch of the fast match.
#[derive(Clone, Debug, Default)]
pub struct MatchScratch {
    states: Vec<ObjectState>,
    /// `[M][BLOCK]` intersections and unions of the block being visited.
    inter: Vec<f32>,
    union: Vec<f32>,
    /// `[BLOCK]` each prior's best overlap.
    best_inter: Vec<f32>,
    best_union: Vec<f32>,
    /// `[M]` each object's `targets` row.
    rows: Vec<u32>,
}

/// The core's `match_image`, the same words, labels and offsets; returns the positives.
/// `objects` is the core's per-object scratch (at least one per `targets` row).
///
/// # Panics
/// If `objects` is shorter than `targets`, or the output slices are not P long.
#[allow(clippy::too_many_arguments)] // the core's match_image's, plus the columns and scratch
pub fn match_image_fast(
    targets: &[[f32; 5]],
    priors: &[[f32; 4]],
    columns: &PriorColumns,
    threshold: f32,
    variance: [f32; 2],
    offsets: Offsets,
    objects: &mut [ObjectScratch],
    conf_target: &mut [u32],
    loc_target: &mut [[f32; 4]],
    scratch: &mut MatchScratch,
) -> u32 {
    assert!(objects.len() >= targets.len(), "object scratch too short");
    assert_eq!(columns.len(), priors.len());
    assert_eq!(conf_target.len(), priors.len());
    let n = gather_objects(targets, objects);
    let objects = &mut objects[..n];
    scratch.states.clear();
    scratch.states.extend(objects.iter().map(|object| {
        let truth = object.truth();
        ObjectState {
            truth: truth.to_row(),
            area: truth.area(),
            row: object.row(),
            best: BestPrior::default(),
        }
    }));
    if n > 0 {
        match_priors(columns, threshold, conf_target, scratch);
        match_objects(columns, conf_target, &scratch.states);
    }
    match_finish(objects, priors, variance, offsets, conf_target, loc_target)
}

/// The core's `match_priors` (steps 1 and 4, with the fused best-prior tracking), block
/// by block: each object's overlaps with the block in one pass ([`overlaps_block`]), the
/// priors' decisions lane by lane ([`best_objects_block`]), and each object's best-prior
/// visits only from the first prior of the block that beats its best so far
/// ([`first_beating`]; before it the core's visits change nothing).
fn match_priors(
    columns: &PriorColumns,
    threshold: f32,
    conf_target: &mut [u32],
    scratch: &mut MatchScratch,
) {
    let objects = scratch.states.len();
    scratch.inter.resize(objects * BLOCK, 0.0);
    scratch.union.resize(objects * BLOCK, 0.0);
    scratch.best_inter.resize(BLOCK, 0.0);
    scratch.best_union.resize(BLOCK, 0.0);
    scratch.rows.clear();
    scratch
        .rows
        .extend(scratch.states.iter().map(|state| state.row));
    let priors = columns.len();
    for start in (0..priors).step_by(BLOCK) {
        let end = (start + BLOCK).min(priors);
        let len = end - start;
        for (m, state) in scratch.states.iter().enumerate() {
            overlaps_block(
                state.truth,
                state.area,
                [
                    &columns.x0[start..end],
                    &columns.y0[start..end],
                    &columns.x1[start..end],
                    &columns.y1[start..end],
                    &columns.area[start..end],
                ],
                &mut scratch.inter[m * BLOCK..m * BLOCK + len],
                &mut scratch.union[m * BLOCK..m * BLOCK + len],
            );
        }
        best_objects_block(
            &scratch.inter,
            &scratch.union,
            BLOCK,
            &scratch.rows,
            threshold,
            &mut scratch.best_inter,
            &mut scratch.best_union,
            &mut conf_target[start..end],
        );
        for (m, state) in scratch.states.iter_mut().enumerate() {
            let inter = &scratch.inter[m * BLOCK..m * BLOCK + len];
            let union = &scratch.union[m * BLOCK..m * BLOCK + len];
            let first = if start == 0 {
                0
            } else {
                first_beating(inter, union, state.best.best())
            };
            for i in first..len {
                state.best.visit(start + i, overlap_at(inter, union, i));
            }
        }
    }
}

/// The core's `match_objects` (steps 2 and 3): each object's best prior forced onto it.
fn match_objects(columns: &PriorColumns, conf_target: &mut [u32], states: &[ObjectState]) {
    for state in states {
        let best_prior = state
            .best
            .resolve(columns.len(), |p| overlap_of(state, columns, p));
        let word = &mut conf_target[best_prior];
        *word = (*word).max(FORCED | state.row);
    }
}

/// One object's overlap with prior `p`, as `Overlap::of` computes it.
fn overlap_of(state: &ObjectState, columns: &PriorColumns, p: usize) -> Overlap {
    let mut inter = [0.0];
    let mut union = [0.0];
    overlaps_block(
        state.truth,
        state.area,
        [
            &columns.x0[p..=p],
            &columns.y0[p..=p],
            &columns.x1[p..=p],
            &columns.y1[p..=p],
            &columns.area[p..=p],
        ],
        &mut inter,
        &mut union,
    );
    Overlap {
        inter: inter[0],
        union: union[0],
    }
}
