//! The six input tensors of SPEC §1 as one record, declared once: the batches of every
//! layer (borrowed slices, owned vectors, GPU buffer slices, a framework's tensors) are a
//! [`Tensors`] of their own kind of tensor, and the names of SPEC §1 are [`Tensors::NAMES`].

use crate::validate::Tensor;

/// One value per input tensor of SPEC §1, under the SPEC's names, in the order every API
/// takes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tensors<T> {
    /// `[B, P, 4]` student box offsets.
    pub student_loc: T,
    /// `[B, P, C]` student logits.
    pub student_conf: T,
    /// `[B, P, 4]` teacher box offsets.
    pub teacher_loc: T,
    /// `[B, P, C]` teacher logits.
    pub teacher_conf: T,
    /// `[B, M, 5]` ground truth: corners and label (negative labels are padding).
    pub targets: T,
    /// `[P, 4]` prior boxes, centre form.
    pub priors: T,
}

/// The names of SPEC §1, in the order every API takes the tensors.
pub const TENSOR_NAMES: [&str; 6] = Tensors::NAMES.into_array();

impl Tensors<&'static str> {
    /// Each tensor's name in batch files and SPEC §1.
    pub const NAMES: Self = Self {
        student_loc: "student_loc",
        student_conf: "student_conf",
        teacher_loc: "teacher_loc",
        teacher_conf: "teacher_conf",
        targets: "targets",
        priors: "priors",
    };
}

impl<T: Copy> Tensors<T> {
    /// The six values in SPEC §1's order.
    #[must_use]
    pub const fn into_array(self) -> [T; 6] {
        [
            self.student_loc,
            self.student_conf,
            self.teacher_loc,
            self.teacher_conf,
            self.targets,
            self.priors,
        ]
    }
}

impl<T> Tensors<T> {
    /// The record of six values given in SPEC §1's order.
    #[must_use]
    pub fn from_array(values: [T; 6]) -> Self {
        let [student_loc, student_conf, teacher_loc, teacher_conf, targets, priors] = values;
        Self {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        }
    }

    /// The six values in SPEC §1's order.
    #[must_use]
    pub fn to_array(self) -> [T; 6] {
        let Self {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        } = self;
        [
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        ]
    }

    /// `f` applied to each value.
    #[must_use]
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> Tensors<U> {
        Tensors {
            student_loc: f(self.student_loc),
            student_conf: f(self.student_conf),
            teacher_loc: f(self.teacher_loc),
            teacher_conf: f(self.teacher_conf),
            targets: f(self.targets),
            priors: f(self.priors),
        }
    }

    /// `f` applied to each value in SPEC §1's order, stopping at the first error.
    ///
    /// # Errors
    /// The first error `f` returns.
    pub fn try_map<U, E>(self, mut f: impl FnMut(T) -> Result<U, E>) -> Result<Tensors<U>, E> {
        Ok(Tensors {
            student_loc: f(self.student_loc)?,
            student_conf: f(self.student_conf)?,
            teacher_loc: f(self.teacher_loc)?,
            teacher_conf: f(self.teacher_conf)?,
            targets: f(self.targets)?,
            priors: f(self.priors)?,
        })
    }

    /// Each value paired with the same tensor's value of `other`.
    #[must_use]
    pub fn zip<U>(self, other: Tensors<U>) -> Tensors<(T, U)> {
        Tensors {
            student_loc: (self.student_loc, other.student_loc),
            student_conf: (self.student_conf, other.student_conf),
            teacher_loc: (self.teacher_loc, other.teacher_loc),
            teacher_conf: (self.teacher_conf, other.teacher_conf),
            targets: (self.targets, other.targets),
            priors: (self.priors, other.priors),
        }
    }

    /// Each value paired with its tensor's name.
    #[must_use]
    pub fn named(self) -> Tensors<(&'static str, T)> {
        Tensors::NAMES.zip(self)
    }

    /// A record of references to the values.
    #[must_use]
    pub fn as_ref(&self) -> Tensors<&T> {
        Tensors {
            student_loc: &self.student_loc,
            student_conf: &self.student_conf,
            teacher_loc: &self.teacher_loc,
            teacher_conf: &self.teacher_conf,
            targets: &self.targets,
            priors: &self.priors,
        }
    }

    /// The value of `tensor`.
    #[must_use]
    pub fn get(&self, tensor: Tensor) -> &T {
        match tensor {
            Tensor::StudentLoc => &self.student_loc,
            Tensor::StudentConf => &self.student_conf,
            Tensor::TeacherLoc => &self.teacher_loc,
            Tensor::TeacherConf => &self.teacher_conf,
            Tensor::Targets => &self.targets,
            Tensor::Priors => &self.priors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are SPEC §1's, in its order, and `validate::Tensor` names each one as the
    /// record does.
    #[test]
    fn names_are_the_spec_tensors_in_order() {
        assert_eq!(
            TENSOR_NAMES,
            [
                "student_loc",
                "student_conf",
                "teacher_loc",
                "teacher_conf",
                "targets",
                "priors"
            ]
        );
        let all = [
            Tensor::StudentLoc,
            Tensor::StudentConf,
            Tensor::TeacherLoc,
            Tensor::TeacherConf,
            Tensor::Targets,
            Tensor::Priors,
        ];
        for (tensor, name) in all.into_iter().zip(TENSOR_NAMES) {
            assert_eq!(tensor.name(), name);
        }
    }

    /// `map`, `zip` and the array forms keep each value with its tensor.
    #[test]
    fn map_and_arrays_keep_each_value_in_its_place() {
        let record = Tensors::from_array([1, 2, 3, 4, 5, 6]);
        assert_eq!(record.teacher_conf, 4);
        assert_eq!(record.map(|v| v * 10).to_array(), [10, 20, 30, 40, 50, 60]);
        assert_eq!(record.named().targets, ("targets", 5));
        assert_eq!(*record.get(Tensor::Priors), 6);
        assert_eq!(record.into_array(), record.to_array());
        let mut seen = [0; 6];
        let mut n = 0;
        let stopped = record.try_map(|v| {
            seen[n] = v;
            n += 1;
            if v == 3 {
                Err(v)
            } else {
                Ok(v)
            }
        });
        assert_eq!((stopped, seen), (Err(3), [1, 2, 3, 0, 0, 0]));
    }
}
