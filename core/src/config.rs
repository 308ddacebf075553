//! The loss configuration of SPEC §8 (`config` metadata keys and their defaults).

/// Weights of the four terms in the total (SPEC §5): `total = soft·soft_loss + conf·loss_c +
/// l2·l2_loss + loc·loss_l`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossWeights {
    /// Weight of the soft-target term.
    pub soft: f32,
    /// Weight of the cross-entropy term.
    pub conf: f32,
    /// Weight of the teacher-bounded L2 term.
    pub l2: f32,
    /// Weight of the smooth-L1 localisation term.
    pub loc: f32,
}

impl LossWeights {
    /// SPEC §5 defaults: (0.3, 0.7, 0.5, 1.0).
    pub const DEFAULT: Self = Self {
        soft: 0.3,
        conf: 0.7,
        l2: 0.5,
        loc: 1.0,
    };
}

impl Default for LossWeights {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Everything that shapes the loss apart from the tensors (SPEC §8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    /// IoU at or above which a prior is matched to an object (SPEC §3, default 0.5).
    pub overlap_threshold: f32,
    /// Negatives kept per positive by hard-negative mining (SPEC §4, default 3).
    pub negpos_ratio: u32,
    /// Negatives kept in an image with no positives (SPEC §4, default 100).
    pub negatives_for_hard: u32,
    /// Box-encoding variances (v0, v1) (SPEC §3, default (0.1, 0.2)).
    pub variance: [f32; 2],
    /// Distillation temperature T (SPEC §5, default 1).
    pub temperature: f32,
    /// Weight of the object classes in the class-weighted soft loss (default 1).
    pub pos_w: f32,
    /// Weight of the background class; the class-weighted form is used when > 1 (default 1.5).
    pub neg_w: f32,
    /// Margin of the teacher bound (SPEC §5, default 0).
    pub reg_m: f32,
    /// ε of the class-weighted soft loss (default 1e-10).
    pub eps: f32,
    /// Weights of the four terms in the total.
    pub weights: LossWeights,
}

impl LossConfig {
    /// SPEC §8 defaults. C is not part of the configuration: it is the tensors' last
    /// dimension, stored once, in their shapes (the stages take it from their slices).
    pub const DEFAULT: Self = Self {
        overlap_threshold: 0.5,
        negpos_ratio: 3,
        negatives_for_hard: 100,
        variance: [0.1, 0.2],
        temperature: 1.0,
        pos_w: 1.0,
        neg_w: 1.5,
        reg_m: 0.0,
        eps: 1e-10,
        weights: LossWeights::DEFAULT,
    };

    /// Whether the soft loss takes its class-weighted form (SPEC §5: `neg_w > 1`).
    #[must_use]
    pub fn weighted_soft_loss(&self) -> bool {
        self.neg_w > 1.0
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}
