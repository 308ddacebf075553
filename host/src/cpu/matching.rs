//! The match stage (SPEC §3) of the CPU fast path: the core's match, its decisions taken
//! on a block of priors at a time. The overlaps of one object against a block of priors
//! come in one vectorised pass (priors' corners and areas laid out as columns once per
//! evaluation, the core's [`Overlap::of_rows`](ssdkd_core::boxes::Overlap::of_rows) lane
//! by lane), each block's words the core's `match_priors` decisions lane by lane
//! (`simd.rs`), each object's best prior the core's [`ObjectScratch::visit`], and the rest the core's [`match_objects`]
//! and [`match_finish`]. Tested against the core's `match_image` through `tests/fast_cpu.rs`
//! (labels, offsets and everything downstream with `assert_eq`).

use super::simd::{best_objects_block, first_beating, overlap_at, overlaps_block};
use ssdkd_core::stages::r#match::{
    gather_objects, match_finish, match_objects, prior_corners, ObjectScratch, Offsets,
};

/// Priors per block of overlaps.
const BLOCK: usize = 256;

/// The priors' corner boxes and areas as columns, computed as the core computes them
/// ([`prior_corners`], `CornerBox::area`).
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
            let corners = prior_corners(*prior);
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

/// Per-image scratch of the fast match.
#[derive(Clone, Debug, Default)]
pub struct MatchScratch {
    /// `[M]` each object's `[xmin, ymin, xmax, ymax]` and area.
    truths: Vec<([f32; 4], f32)>,
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
    if n > 0 {
        visit_prior_blocks(objects, columns, threshold, conf_target, scratch);
        match_objects(objects, priors, conf_target);
    }
    match_finish(objects, priors, variance, offsets, conf_target, loc_target)
}

/// The core's `match_priors` (steps 1 and 4, with the fused best-prior visits), block by
/// block: each object's overlaps with the block in one pass ([`overlaps_block`]), the
/// priors' words lane by lane ([`best_objects_block`]), and each object's best-prior
/// visits only from the first prior of the block that beats its best so far
/// ([`first_beating`]; before it the core's visits change nothing).
fn visit_prior_blocks(
    objects: &mut [ObjectScratch],
    columns: &PriorColumns,
    threshold: f32,
    conf_target: &mut [u32],
    scratch: &mut MatchScratch,
) {
    let count = objects.len();
    scratch.truths.clear();
    scratch.truths.extend(objects.iter().map(|object| {
        let truth = object.truth();
        (truth.to_row(), truth.area())
    }));
    scratch.rows.clear();
    scratch.rows.extend(objects.iter().map(ObjectScratch::row));
    scratch.inter.resize(count * BLOCK, 0.0);
    scratch.union.resize(count * BLOCK, 0.0);
    scratch.best_inter.resize(BLOCK, 0.0);
    scratch.best_union.resize(BLOCK, 0.0);
    let priors = columns.len();
    for start in (0..priors).step_by(BLOCK) {
        let end = (start + BLOCK).min(priors);
        let len = end - start;
        for (m, &(truth, area)) in scratch.truths.iter().enumerate() {
            overlaps_block(
                truth,
                area,
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
        for (m, object) in objects.iter_mut().enumerate() {
            let inter = &scratch.inter[m * BLOCK..m * BLOCK + len];
            let union = &scratch.union[m * BLOCK..m * BLOCK + len];
            let first = if start == 0 {
                0
            } else {
                first_beating(inter, union, object.best_prior().best())
            };
            for i in first..len {
                object.visit(start + i, overlap_at(inter, union, i));
            }
        }
    }
}
