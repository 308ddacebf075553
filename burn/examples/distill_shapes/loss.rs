//! The losses of the three stages: ssdkd-burn's `MultiBoxLoss` (teacher and baseline) and
//! `MultiBoxLossKd` (the distilled student).

use burn::prelude::*;
use ssdkd_burn::{LossConfig, LossWeights, MultiBoxLoss, MultiBoxLossKd, PriorConfig};

/// A step's loss: the total to backpropagate and the values of its terms.
pub struct StepLoss {
    pub total: Tensor<1>,
    pub terms: Vec<(&'static str, f64)>,
    pub total_value: f64,
}

pub struct Losses {
    plain: MultiBoxLoss,
    kd: MultiBoxLossKd,
    kd_weights: LossWeights,
}

/// The values of `[1]` tensors, read back together.
fn values(terms: &[Tensor<1>]) -> Vec<f64> {
    let all = Tensor::cat(terms.iter().map(|t| t.clone().detach()).collect(), 0);
    all.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 terms")
        .into_iter()
        .map(f64::from)
        .collect()
}

impl Losses {
    pub fn new(temperature: f32, priors: &PriorConfig<'_>) -> Self {
        let (plain, kd) = configs(temperature);
        Self {
            plain: MultiBoxLoss::new(plain, priors),
            kd: MultiBoxLossKd::new(kd, priors),
            kd_weights: kd.weights,
        }
    }

    /// `MultiBoxLoss`: conf + loc. `targets` are `[B, M, 5]` on the outputs' device.
    pub fn plain(&self, loc: Tensor<3>, conf: Tensor<3>, targets: Tensor<3>) -> StepLoss {
        let t =
            self.plain.forward(loc, conf, targets).unwrap_or_else(|e| panic!("MultiBoxLoss: {e}"));
        let v = values(&[t.loss_c.clone(), t.loss_l.clone()]);
        StepLoss {
            total: t.loss_c + t.loss_l,
            terms: vec![("loss_c", v[0]), ("loss_l", v[1])],
            total_value: v[0] + v[1],
        }
    }

    /// `MultiBoxLossKd`: 0.3·soft + 0.7·conf + 0.5·l2 + loc. The teacher's outputs may be on
    /// the device without autodiff; they are moved to the student's and get no gradient.
    pub fn kd(
        &self, loc: Tensor<3>, conf: Tensor<3>, teacher: (Tensor<3>, Tensor<3>), targets: Tensor<3>,
    ) -> StepLoss {
        let on_student = |t: Tensor<3>| if loc.is_autodiff() { t.autodiff() } else { t };
        let (t_loc, t_conf) = (on_student(teacher.0), on_student(teacher.1));
        let t = self
            .kd
            .forward(loc, conf, t_loc, t_conf, targets)
            .unwrap_or_else(|e| panic!("MultiBoxLossKd: {e}"));
        let v =
            values(&[t.loss_c.clone(), t.loss_l.clone(), t.l2_loss.clone(), t.soft_loss.clone()]);
        let w = self.kd_weights;
        let total_value = f64::from(w.conf) * v[0]
            + f64::from(w.loc) * v[1]
            + f64::from(w.l2) * v[2]
            + f64::from(w.soft) * v[3];
        StepLoss {
            total: t.weighted(w),
            terms: vec![("loss_c", v[0]), ("loss_l", v[1]), ("l2_loss", v[2]), ("soft_loss", v[3])],
            total_value,
        }
    }
}

/// The configuration of the Python example: overlap 0.5, 3 negatives per positive,
/// variances (0.1, 0.2); the KD loss at temperature `temperature`, `neg_w` 1.5 (the
/// class-weighted soft term) and the weights 0.3·soft + 0.7·conf + 0.5·l2 + loc; the plain
/// loss conf + loc.
pub fn configs(temperature: f32) -> (LossConfig, LossConfig) {
    let plain = LossConfig {
        weights: LossWeights { soft: 0.0, conf: 1.0, l2: 0.0, loc: 1.0 },
        ..LossConfig::DEFAULT
    };
    let kd = LossConfig {
        temperature,
        neg_w: 1.5,
        weights: LossWeights { soft: 0.3, conf: 0.7, l2: 0.5, loc: 1.0 },
        ..LossConfig::DEFAULT
    };
    (plain, kd)
}
