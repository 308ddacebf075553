//! The CPU backend's pool of per-image workspaces, kept between evaluations so that a
//! training loop's repeated calls neither allocate nor zero-fill them again, and what the
//! last evaluation left in them (for [`super::CpuBackend::gradients_of_last`]).

use super::fast::FastScratch;
use crate::batch::{Batch, BatchShape};
use ssdkd_core::{ImageWorkspace, LossConfig, LossWeights};

/// At most this many workspaces are kept (about 0.3 MiB each for SSD300). A workspace is
/// resized in place for each image it serves, so the pool holds at most this many images of
/// the largest (P, M) seen, however many shapes go through: nothing is kept per shape.
const MAX_POOLED: usize = 256;

/// One image's core workspace and the fast path's scratch.
pub(super) type Workspace = (ImageWorkspace, FastScratch);

/// The workspaces a backend keeps, and what the last evaluation's hold.
#[derive(Debug, Default)]
pub(super) struct Pool {
    workspaces: Vec<Workspace>,
    /// What the last evaluation's workspaces (the last B of `workspaces`) hold; `None`
    /// when they hold nothing usable.
    last: Option<Box<LastBatch>>,
}

/// The evaluation whose selected rows, labels and probabilities the pooled workspaces
/// hold: its tensors (by address and length), shape, config (weights aside: the gradient's
/// factors are all that they change) and N.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LastBatch {
    shape: BatchShape,
    tensors: [(usize, usize); 6],
    config: LossConfig,
    num_pos: u32,
}

impl LastBatch {
    fn of(batch: &Batch<'_>, config: &LossConfig, num_pos: u32) -> Self {
        let tensors = [
            batch.student_loc(),
            batch.student_conf(),
            batch.teacher_loc(),
            batch.teacher_conf(),
            batch.targets(),
            batch.priors(),
        ]
        .map(|t| (t.as_ptr() as usize, t.len()));
        let config = LossConfig {
            weights: LossWeights {
                soft: 0.0,
                conf: 0.0,
                l2: 0.0,
                loc: 0.0,
            },
            ..*config
        };
        Self {
            shape: batch.shape(),
            tensors,
            config,
            num_pos,
        }
    }
}

impl Pool {
    /// How many workspaces the pool holds.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.workspaces.len()
    }

    /// `count` workspaces, the pooled ones first; what they held is forgotten.
    pub(super) fn take(&mut self, count: usize) -> Vec<Workspace> {
        self.last = None;
        let keep = self.workspaces.len().saturating_sub(count);
        let mut taken = self.workspaces.split_off(keep);
        taken.resize_with(count, Workspace::default);
        taken
    }

    /// Takes `workspaces` back, as many as there is room for; whether all were kept.
    pub(super) fn give_back(&mut self, workspaces: Vec<Workspace>) -> bool {
        let room = MAX_POOLED.saturating_sub(self.workspaces.len());
        let all = workspaces.len() <= room;
        self.workspaces.extend(workspaces.into_iter().take(room));
        all
    }

    /// Remembers that the last workspaces given back hold the evaluation of `batch` with
    /// `config`, which found `num_pos` positives.
    pub(super) fn remember(&mut self, batch: &Batch<'_>, config: &LossConfig, num_pos: u32) {
        self.last = Some(Box::new(LastBatch::of(batch, config, num_pos)));
    }

    /// Forgets what the last evaluation left.
    pub(super) fn forget(&mut self) {
        self.last = None;
    }

    /// The workspaces of the last evaluation and its N, when it was of `batch` (the same
    /// tensors, by address and length, and shape) with `config`'s settings (weights aside).
    pub(super) fn last_of(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
    ) -> Option<(&mut [Workspace], u32)> {
        let last = *self.last.as_deref()?;
        if last != LastBatch::of(batch, config, last.num_pos) {
            return None;
        }
        let start = self.workspaces.len().checked_sub(last.shape.batch)?;
        Some((&mut self.workspaces[start..], last.num_pos))
    }
}
