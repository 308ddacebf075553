//! Stage **validate** (SPEC §1.3, §8.3: the accepted ranges): the value scan of
//! [`crate::validate`] as the GPU runs it, for batches whose values the host does not scan
//! (batches already on the GPU, or evaluations that skip the host's scan). The rules are
//! the scan's own ([`beyond`], [`prior_size_ok`], [`check_object`]); what this stage adds is
//! the order in which findings are compared, so that the first finding is the scan's
//! first error: the same tensor, image and index.
//!
//! Each finding is a slot (0 for `priors`, `1 + image` for an image's tensors) and a key
//! `check << ROW_BITS | row`, where [`Check`] numbers the tensors (and the two checks of
//! `priors` and of `targets`) in the scan's order. Within one check, rows are scanned in
//! order and the first bad row's first bad column is the scan's first bad value, so the
//! smallest (slot, key) is the scan's first error.
//!
//! - `validate_rows`: a thread per row of every image (`max(P, M)` rows), each checking
//!   its prior row of every `[B, P, _]` tensor and its `targets` row (image 0's threads
//!   the `priors` row too), and keeping the smallest key of each slot (an atomic max of
//!   `!key`, so that 0, the buffer's cleared state, is "nothing found").
//! - `validate_report`: the first slot with a finding, and the finding's column and values
//!   read from its row, which [`Finding::error`] turns into the scan's [`InputError`].

use crate::pipeline::ImageInputs;
use crate::validate::{
    beyond, check_object, prior_size_ok, value_error, InputError, Tensor, MAX_LOGIT, MAX_OFFSET,
};

/// Bits of a finding's key that hold its row (P and M are below `2^ROW_BITS`).
pub const ROW_BITS: u32 = 28;

/// What a finding's key checks, in the scan's order: a slot's findings compare by it first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Check {
    /// A non-finite `priors` value (slot 0).
    PriorValue = 0,
    /// A prior's width or height (slot 0).
    PriorSize = 1,
    /// A `student_loc` value beyond ±[`MAX_OFFSET`] or not finite.
    StudentLoc = 2,
    /// A `student_conf` value beyond ±[`MAX_LOGIT`] or not finite.
    StudentConf = 3,
    /// A `teacher_loc` value, as `student_loc`.
    TeacherLoc = 4,
    /// A `teacher_conf` value, as `student_conf`.
    TeacherConf = 5,
    /// A non-finite `targets` value.
    TargetValue = 6,
    /// A `targets` row's label or box ([`check_object`]).
    TargetRow = 7,
}

impl Check {
    /// Every check, by its number.
    pub const ALL: [Check; 8] = [
        Check::PriorValue,
        Check::PriorSize,
        Check::StudentLoc,
        Check::StudentConf,
        Check::TeacherLoc,
        Check::TeacherConf,
        Check::TargetValue,
        Check::TargetRow,
    ];

    /// The tensor it checks, and the accepted magnitude of a value check.
    #[must_use]
    pub fn tensor(self) -> (Tensor, f32) {
        match self {
            Check::PriorValue | Check::PriorSize => (Tensor::Priors, f32::MAX),
            Check::StudentLoc => (Tensor::StudentLoc, MAX_OFFSET),
            Check::StudentConf => (Tensor::StudentConf, MAX_LOGIT),
            Check::TeacherLoc => (Tensor::TeacherLoc, MAX_OFFSET),
            Check::TeacherConf => (Tensor::TeacherConf, MAX_LOGIT),
            Check::TargetValue | Check::TargetRow => (Tensor::Targets, f32::MAX),
        }
    }

    /// The key of a finding of this check at `row`.
    #[must_use]
    pub fn key(self, row: usize) -> u32 {
        ((self as u32) << ROW_BITS) | row as u32
    }
}

/// The first column of `row` beyond `limit` (see [`beyond`]).
fn first_beyond(row: &[f32], limit: f32) -> Option<usize> {
    row.iter().position(|&v| beyond(v, limit))
}

/// What `validate_rows`' thread for `row` of `image` finds: the smallest key of slot 0
/// (the priors, checked by image 0's threads) and of the image's slot, `None` where the
/// row passes. `num_classes` is C.
#[must_use]
pub fn validate_rows(
    inputs: &ImageInputs<'_>,
    image: usize,
    row: usize,
    num_classes: u32,
) -> (Option<u32>, Option<u32>) {
    let c = num_classes as usize;
    let mut priors_key = None;
    if image == 0 {
        if let Some(prior) = inputs.priors.get(row) {
            if first_beyond(prior, f32::MAX).is_some() {
                priors_key = Some(Check::PriorValue.key(row));
            } else if !prior_size_ok(prior) {
                priors_key = Some(Check::PriorSize.key(row));
            }
        }
    }
    let mut image_key = None;
    if row < inputs.student_loc.len() {
        let rows = row * c..(row + 1) * c;
        let tensors: [(Check, &[f32]); 4] = [
            (Check::StudentLoc, &inputs.student_loc[row]),
            (Check::StudentConf, &inputs.student_conf[rows.clone()]),
            (Check::TeacherLoc, &inputs.teacher_loc[row]),
            (Check::TeacherConf, &inputs.teacher_conf[rows]),
        ];
        image_key = tensors
            .iter()
            .find(|(check, values)| first_beyond(values, check.tensor().1).is_some())
            .map(|(check, _)| check.key(row));
    }
    if let (None, Some(target)) = (image_key, inputs.targets.get(row)) {
        if first_beyond(target, f32::MAX).is_some() {
            image_key = Some(Check::TargetValue.key(row));
        } else if check_object(target, image, row, num_classes).is_err() {
            image_key = Some(Check::TargetRow.key(row));
        }
    }
    (priors_key, image_key)
}

/// A finding as `validate_report` writes it: the slot, the check, the row, the first bad
/// column of the row and its value (the label for [`Check::TargetRow`]), and the row's
/// first four values (corners, or a prior's `cx, cy, w, h`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Finding {
    /// 0 for `priors`, `1 + image` for an image's tensors.
    pub slot: u32,
    /// [`Check`] as a number.
    pub check: u32,
    /// The prior or object row.
    pub row: u32,
    /// The first bad column of a value check.
    pub column: u32,
    /// The value at `column`; the label for [`Check::TargetRow`].
    pub value: f32,
    /// The row's first four values.
    pub corners: [f32; 4],
}

/// The first slot with a finding, from the slots' stored `!key` (0: nothing found), and
/// its key.
#[must_use]
pub fn validate_report(slots: &[u32]) -> Option<(usize, u32)> {
    slots
        .iter()
        .position(|&s| s != 0)
        .map(|slot| (slot, !slots[slot]))
}

impl Finding {
    /// The finding of the key `key` in `slot`, its column and values read from `inputs`
    /// (the image's, or any image's for slot 0): what `validate_report` writes.
    #[must_use]
    pub fn read(inputs: &ImageInputs<'_>, slot: usize, key: u32, num_classes: u32) -> Self {
        let check = Check::ALL[(key >> ROW_BITS) as usize & 7];
        let row = (key & ((1 << ROW_BITS) - 1)) as usize;
        let c = num_classes as usize;
        let values: &[f32] = match check {
            Check::PriorValue | Check::PriorSize => &inputs.priors[row],
            Check::StudentLoc => &inputs.student_loc[row],
            Check::StudentConf => &inputs.student_conf[row * c..(row + 1) * c],
            Check::TeacherLoc => &inputs.teacher_loc[row],
            Check::TeacherConf => &inputs.teacher_conf[row * c..(row + 1) * c],
            Check::TargetValue | Check::TargetRow => &inputs.targets[row],
        };
        let column = match check {
            Check::PriorSize => 0,
            Check::TargetRow => 4,
            _ => first_beyond(values, check.tensor().1).unwrap_or(0),
        };
        let mut corners = [0.0; 4];
        for (corner, v) in corners.iter_mut().zip(values) {
            *corner = *v;
        }
        Finding {
            slot: slot as u32,
            check: check as u32,
            row: row as u32,
            column: column as u32,
            value: values.get(column).copied().unwrap_or(0.0),
            corners,
        }
    }

    /// The scan's error for this finding ([`crate::validate::validate_priors`],
    /// [`crate::validate::validate_image`]); `None` for a record that names no check.
    #[must_use]
    pub fn error(&self, num_classes: u32) -> Option<InputError> {
        let check = *Check::ALL.get(self.check as usize)?;
        let (tensor, limit) = check.tensor();
        let (row, column, value) = (self.row as usize, self.column as usize, self.value);
        let image = (self.slot as usize).checked_sub(1);
        Some(match (check, image) {
            (Check::PriorValue, _) => InputError::NonFinite {
                tensor,
                image: None,
                row,
                column,
                value,
            },
            (Check::PriorSize, _) => InputError::BadPrior {
                index: row,
                prior: self.corners,
            },
            (_, None) => return None,
            (Check::TargetRow, Some(image)) => {
                let [x0, y0, x1, y1] = self.corners;
                check_object(&[x0, y0, x1, y1, value], image, row, num_classes).err()?
            }
            (_, image) => value_error(tensor, image, row, column, value, limit),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{validate_image, validate_priors};
    use alloc::vec;
    use alloc::vec::Vec;

    /// One batch of `b` images of P = 6 priors, C = 4 classes and M = 3 object rows.
    struct Case {
        loc: Vec<[f32; 4]>,
        conf: Vec<f32>,
        tloc: Vec<[f32; 4]>,
        tconf: Vec<f32>,
        targets: Vec<[f32; 5]>,
        priors: Vec<[f32; 4]>,
    }

    const P: usize = 6;
    const C: usize = 4;
    const M: usize = 3;

    impl Case {
        fn new(b: usize) -> Self {
            let mut targets = Vec::new();
            for _ in 0..b {
                targets.extend([
                    [0.1, 0.1, 0.5, 0.6, 1.0],
                    [0.2, 0.3, 0.9, 0.8, 2.0],
                    [0.0, 0.0, 0.0, 0.0, -1.0],
                ]);
            }
            Case {
                loc: vec![[0.5, -0.5, 0.1, 0.2]; b * P],
                conf: vec![1.5; b * P * C],
                tloc: vec![[0.25, -0.5, 0.1, 0.2]; b * P],
                tconf: vec![-2.0; b * P * C],
                targets,
                priors: vec![[0.5, 0.5, 0.2, 0.3]; P],
            }
        }

        fn image(&self, i: usize) -> ImageInputs<'_> {
            ImageInputs {
                student_loc: &self.loc[i * P..(i + 1) * P],
                student_conf: &self.conf[i * P * C..(i + 1) * P * C],
                teacher_loc: &self.tloc[i * P..(i + 1) * P],
                teacher_conf: &self.tconf[i * P * C..(i + 1) * P * C],
                targets: &self.targets[i * M..(i + 1) * M],
                priors: &self.priors,
            }
        }

        /// The host scan: priors, then each image in order.
        fn scan(&self, b: usize) -> Result<(), InputError> {
            validate_priors(&self.priors)?;
            (0..b).try_for_each(|i| validate_image(&self.image(i), i))
        }

        /// The stage's kernels, thread by thread.
        fn twin(&self, b: usize) -> Result<(), InputError> {
            let mut slots = vec![0u32; b + 1];
            for i in 0..b {
                for row in 0..P.max(M) {
                    let (priors, image) = validate_rows(&self.image(i), i, row, C as u32);
                    for (slot, key) in [(0, priors), (i + 1, image)] {
                        if let Some(key) = key {
                            slots[slot] = slots[slot].max(!key);
                        }
                    }
                }
            }
            match validate_report(&slots) {
                None => Ok(()),
                Some((slot, key)) => {
                    let inputs = self.image(slot.saturating_sub(1));
                    let finding = Finding::read(&inputs, slot, key, C as u32);
                    Err(finding.error(C as u32).expect("a finding names a check"))
                }
            }
        }
    }

    /// Bad values of every kind, one to three at a time at pseudo-random places: the
    /// stage's first finding is the scan's first error (same kind, tensor, image, index,
    /// value); and clean batches pass both.
    #[test]
    fn the_first_finding_is_the_scans_first_error() {
        let b = 3;
        assert_eq!(Case::new(b).twin(b), Ok(()));
        let bad = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            2e15,
            -2e12,
            25.0,
            3.7,
            3e9,
            -0.5,
            1.2,
            0.05,
        ];
        let mut state = 0x2545_f491_u32;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as usize % n
        };
        let mut errors = 0;
        for _ in 0..4000 {
            let mut case = Case::new(b);
            for _ in 0..1 + next(3) {
                let v = bad[next(bad.len())];
                match next(6) {
                    0 => case.loc[next(b * P)][next(4)] = v,
                    1 => case.conf[next(b * P * C)] = v,
                    2 => case.tloc[next(b * P)][next(4)] = v,
                    3 => case.tconf[next(b * P * C)] = v,
                    4 => case.targets[next(b * M)][next(5)] = v,
                    _ => case.priors[next(P)][next(4)] = v,
                }
            }
            let scan = case.scan(b);
            errors += usize::from(scan.is_err());
            let (scan, twin) = (scan.map_err(|e| alloc::format!("{e:?}")), case.twin(b));
            assert_eq!(scan, twin.map_err(|e| alloc::format!("{e:?}")));
        }
        assert!(errors > 2000, "{errors} of 4000 corrupted batches refused");
    }
}
