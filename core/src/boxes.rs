//! Box maths: centre and corner forms, overlap (IoU) as an exact ratio, encode and decode (SPEC §3).

use crate::math;
use glam::Vec2;

/// A box in centre form `(cx, cy, w, h)`, as priors are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CenterBox {
    /// Centre `(cx, cy)`.
    pub center: Vec2,
    /// Size `(w, h)`.
    pub size: Vec2,
}

/// A box in corner form `(xmin, ymin, xmax, ymax)`, as ground truth is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CornerBox {
    /// `(xmin, ymin)`.
    pub min: Vec2,
    /// `(xmax, ymax)`.
    pub max: Vec2,
}

impl CenterBox {
    /// From a `[cx, cy, w, h]` row.
    #[must_use]
    pub fn from_row(row: [f32; 4]) -> Self {
        Self {
            center: Vec2::new(row[0], row[1]),
            size: Vec2::new(row[2], row[3]),
        }
    }

    /// As a `[cx, cy, w, h]` row.
    #[must_use]
    pub fn to_row(self) -> [f32; 4] {
        [self.center.x, self.center.y, self.size.x, self.size.y]
    }

    /// Corner form `cx ± w/2, cy ± h/2` (SPEC §3).
    #[must_use]
    pub fn to_corners(self) -> CornerBox {
        let half = self.size * 0.5;
        CornerBox {
            min: self.center - half,
            max: self.center + half,
        }
    }
}

impl CornerBox {
    /// From the first four values of an `[xmin, ymin, xmax, ymax, ..]` row.
    #[must_use]
    pub fn from_row(row: &[f32]) -> Self {
        Self {
            min: Vec2::new(row[0], row[1]),
            max: Vec2::new(row[2], row[3]),
        }
    }

    /// As a `[xmin, ymin, xmax, ymax]` row.
    #[must_use]
    pub fn to_row(self) -> [f32; 4] {
        [self.min.x, self.min.y, self.max.x, self.max.y]
    }

    /// Centre form: centre `(min + max) / 2`, size `max − min`.
    #[must_use]
    pub fn to_center(self) -> CenterBox {
        CenterBox {
            center: (self.min + self.max) * 0.5,
            size: self.max - self.min,
        }
    }

    /// Area, 0 for an empty box.
    #[must_use]
    pub fn area(self) -> f32 {
        let d = (self.max - self.min).max(Vec2::ZERO);
        d.x * d.y
    }
}

/// Relative tolerance under which two overlaps count as tied (SPEC §3).
pub const TIE_TOLERANCE: f32 = 1e-5;

/// The Jaccard overlap of two boxes kept as the pair `(intersection, union)`, so that
/// decisions are taken with products rather than quotients (SPEC §3): WGSL's division is
/// not correctly rounded, its `+ − ×` are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overlap {
    /// Intersection area.
    pub inter: f32,
    /// Union area (> 0 for boxes of positive area).
    pub union: f32,
}

impl Overlap {
    /// The overlap of `a` and `b`.
    #[must_use]
    pub fn of(a: CornerBox, b: CornerBox) -> Self {
        Self::of_rows(a.to_row(), a.area(), b.to_row(), b.area())
    }

    /// The overlap of the corner rows `a` and `b` (`[xmin, ymin, xmax, ymax]`) of areas
    /// `a_area` and `b_area` ([`CornerBox::area`]): the intersection's sides
    /// `max(min(a_max, b_max) − max(a_min, b_min), 0)` as selects, so that a loop of it
    /// over a block of priors' columns vectorises (the host's match).
    #[must_use]
    #[inline(always)]
    pub fn of_rows(a: [f32; 4], a_area: f32, b: [f32; 4], b_area: f32) -> Self {
        let min = |x: f32, y: f32| if x < y { x } else { y };
        let max = |x: f32, y: f32| if x > y { x } else { y };
        let dx = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0);
        let dy = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0);
        let inter = dx * dy;
        Self {
            inter,
            union: a_area + b_area - inter,
        }
    }

    /// The IoU as a float (for display and tests; decisions use the comparisons below).
    #[must_use]
    pub fn iou(self) -> f32 {
        self.inter / self.union
    }

    /// Strictly larger than `other`: `inter · other.union > other.inter · union`.
    #[must_use]
    #[inline]
    pub fn beats(self, other: Overlap) -> bool {
        self.inter * other.union > other.inter * self.union
    }

    /// Counts as tied with the maximum `max`: `iou >= max_iou · (1 − 1e-5)` (SPEC §3).
    #[must_use]
    #[inline]
    pub fn ties_with(self, max: Overlap) -> bool {
        self.inter * max.union >= (1.0 - TIE_TOLERANCE) * max.inter * self.union
    }

    /// At or above `threshold`: `inter >= threshold · union` (SPEC §3 step 4).
    #[must_use]
    #[inline]
    pub fn reaches(self, threshold: f32) -> bool {
        self.inter >= threshold * self.union
    }
}

/// Encodes ground truth `truth` against `prior` with `variance = (v0, v1)` (SPEC §3 step 5):
/// `((gc − pc) / (v0 · ps), ln(gs / ps) / v1)`.
#[must_use]
pub fn encode(truth: CornerBox, prior: CenterBox, variance: [f32; 2]) -> [f32; 4] {
    let g = truth.to_center();
    let c = (g.center - prior.center) / (variance[0] * prior.size);
    let s = g.size / prior.size;
    [
        c.x,
        c.y,
        math::ln(s.x) / variance[1],
        math::ln(s.y) / variance[1],
    ]
}

/// Decodes predicted offsets `loc` against `prior` into a corner box: the inverse of
/// [`encode`], as used at inference.
#[must_use]
pub fn decode(loc: [f32; 4], prior: CenterBox, variance: [f32; 2]) -> CornerBox {
    let center = prior.center + Vec2::new(loc[0], loc[1]) * variance[0] * prior.size;
    let size = prior.size
        * Vec2::new(
            math::exp(loc[2] * variance[1]),
            math::exp(loc[3] * variance[1]),
        );
    CenterBox { center, size }.to_corners()
}
