//! `ssdkd-burn`: ssdkd's SSD knowledge-distillation loss (the MultiBox loss plus the
//! soft-target and teacher-bounded L2 terms, SPEC §5) and its analytic gradient as a
//! [Burn](https://burn.dev) loss.
//!
//! - On Burn's **wgpu** device, the kernels run on the slices of Burn's own buffers, on
//!   Burn's device and queue: no tensor goes through the host; only the sums come back (a
//!   few hundred bytes) and the four terms go up as a `[4]` tensor. Open the device with
//!   [`wgpu_device`] (or share one you opened with [`share_wgpu_device`]).
//! - On **NdArray** (and any other cubecl runtime), the same API evaluates through ssdkd's
//!   CPU backend on host data, so one training program runs on either device.
//! - Under **autodiff**, the backward pass is ssdkd's gradient, weighted by the incoming
//!   gradients of the four terms, so any combination of them backpropagates as it would
//!   through Burn's own operations. The teacher gets no gradient.
//! - Burn's **fusion** (on by default on wgpu) defers the loss like any other operation and
//!   runs it on the resolved tensors.
//!
//! ```no_run
#![doc = include_str!("../examples/train_step.rs")]
//! ```
#![warn(missing_docs)]
// NdArray is Burn's deprecated CPU backend, still the one this crate supports on the CPU.
#![allow(deprecated)]

mod autodiff;
mod backend;
mod cube;
mod host;

pub use backend::{LossPath, LossSpec, SsdkdBackend, TERMS};
pub use cube::{adapter_name, bytes_read_back, share_wgpu_device, wgpu_device};
pub use ssdkd::{Error, LossConfig, LossWeights, PriorPreset, Result};
pub use ssdkd_core::{FeatureMap, PriorConfig};

use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, NdArray};
use burn::tensor::{DType, Device, Tensor, TensorData};
use ssdkd::{BatchShape, Tensors};
use std::sync::Mutex;

impl SsdkdBackend for NdArray {
    fn ssdkd_terms(
        student_loc: FloatTensor<Self>,
        student_conf: FloatTensor<Self>,
        teacher_loc: FloatTensor<Self>,
        teacher_conf: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        priors: FloatTensor<Self>,
        spec: LossSpec,
    ) -> FloatTensor<Self> {
        let inputs = Tensors {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        };
        host::terms::<Self>(inputs, &spec)
    }

    fn ssdkd_gradients(
        student_loc: FloatTensor<Self>,
        student_conf: FloatTensor<Self>,
        teacher_loc: FloatTensor<Self>,
        teacher_conf: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        priors: FloatTensor<Self>,
        spec: LossSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let inputs = Tensors {
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        };
        host::gradients::<Self>(inputs, &spec)
    }
}

/// Prior boxes `[P, 4]` in centre form (SPEC §2): from a preset, a [`PriorConfig`], or
/// given.
#[derive(Clone, Debug, PartialEq)]
pub struct Priors(Vec<[f32; 4]>);

impl Priors {
    /// P.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The boxes.
    #[must_use]
    pub fn boxes(&self) -> &[[f32; 4]] {
        &self.0
    }
}

impl From<PriorPreset> for Priors {
    fn from(preset: PriorPreset) -> Self {
        Self(preset.config().priors())
    }
}

impl From<&PriorConfig<'_>> for Priors {
    fn from(config: &PriorConfig<'_>) -> Self {
        Self(config.priors())
    }
}

impl From<Vec<[f32; 4]>> for Priors {
    fn from(boxes: Vec<[f32; 4]>) -> Self {
        Self(boxes)
    }
}

/// The four terms of [`MultiBoxLossKd::forward`], each a `[1]` tensor (the seed code base's
/// return order: `soft_loss, l2_loss, loss_c, loss_l`).
#[derive(Clone, Debug)]
pub struct KdTerms {
    /// The soft-target (distillation) term.
    pub soft_loss: Tensor<1>,
    /// The teacher-bounded L2 term.
    pub l2_loss: Tensor<1>,
    /// Cross-entropy with hard-negative mining.
    pub loss_c: Tensor<1>,
    /// Smooth-L1 box regression.
    pub loss_l: Tensor<1>,
}

impl KdTerms {
    /// `w.soft·soft_loss + w.conf·loss_c + w.l2·l2_loss + w.loc·loss_l`.
    #[must_use]
    pub fn weighted(&self, w: LossWeights) -> Tensor<1> {
        self.soft_loss.clone() * w.soft
            + self.loss_c.clone() * w.conf
            + self.l2_loss.clone() * w.l2
            + self.loss_l.clone() * w.loc
    }
}

/// The two terms of [`MultiBoxLoss::forward`], each a `[1]` tensor.
#[derive(Clone, Debug)]
pub struct PlainTerms {
    /// Smooth-L1 box regression.
    pub loss_l: Tensor<1>,
    /// Cross-entropy with hard-negative mining.
    pub loss_c: Tensor<1>,
}

/// The loss, its priors and where it evaluates; shared by both loss types.
#[derive(Debug)]
struct Loss {
    spec: LossSpec,
    priors: Priors,
    /// The priors as a tensor, per device they were asked on.
    on_device: Mutex<Vec<(Device, Tensor<2>)>>,
}

impl Loss {
    fn new(config: LossConfig, priors: Priors, has_teacher: bool) -> Self {
        Self {
            spec: LossSpec {
                config,
                has_teacher,
                path: LossPath::Auto,
            },
            priors,
            on_device: Mutex::new(Vec::new()),
        }
    }

    fn priors_on(&self, device: &Device) -> Tensor<2> {
        let mut cache = self.on_device.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, t)) = cache.iter().find(|(d, _)| d == device) {
            return t.clone();
        }
        let flat: Vec<f32> = self.priors.0.iter().flatten().copied().collect();
        let t = Tensor::<2>::from_data(TensorData::new(flat, [self.priors.len(), 4]), device);
        cache.push((device.clone(), t.clone()));
        t
    }

    /// Checks the configuration ([`BatchShape::check_config`], SPEC §8), the shapes against
    /// each other and the priors ([`BatchShape::from_dims`], SPEC §1), the dtypes (f32) and
    /// the devices.
    fn check(&self, tensors: Tensors<Option<&Tensor<3>>>) -> ssdkd::Result<()> {
        let dims = tensors.map(|t| t.map(Tensor::dims));
        let priors = [self.priors.len(), 4];
        BatchShape::from_dims(Tensors {
            priors: Some(&priors[..]),
            ..dims.as_ref().map(|d| d.as_ref().map(|d| &d[..]))
        })?
        .check_config(&self.spec.config)?;
        let device = tensors.student_loc.map(Tensor::device);
        for (name, tensor) in tensors.named().to_array() {
            let Some(tensor) = tensor else { continue };
            let problem = if tensor.dtype() != DType::F32 {
                format!("dtype {:?}, expected f32", tensor.dtype())
            } else if Some(tensor.device()) != device {
                "on another device than student_loc".into()
            } else {
                continue;
            };
            return Err(ssdkd::Error::Shape {
                tensor: name,
                problem,
            });
        }
        Ok(())
    }

    /// The `[4]` terms tensor, differentiable in the student's tensors.
    fn terms(&self, inputs: [Tensor<3>; 5]) -> Tensor<1> {
        let [sl, sc, tl, tc, tg] = inputs;
        let priors = self.priors_on(&sl.device());
        let terms = <Dispatch as SsdkdBackend>::ssdkd_terms(
            sl.into_dispatch(),
            sc.into_dispatch(),
            tl.into_dispatch(),
            tc.into_dispatch(),
            tg.into_dispatch(),
            priors.into_dispatch(),
            self.spec.clone(),
        );
        Tensor::from_dispatch(terms)
    }
}

/// The distillation loss (`MultiBoxLoss_KD`): soft-target, teacher-bounded L2,
/// cross-entropy with hard-negative mining and smooth-L1 (SPEC §5), for Burn tensors on any
/// device, its backward ssdkd's analytic gradient.
#[derive(Debug)]
pub struct MultiBoxLossKd(Loss);

impl MultiBoxLossKd {
    /// The loss with `config` (SPEC §8; its `weights` only matter to
    /// [`KdTerms::weighted`]'s caller, the gradient is weighted by what backpropagates) and
    /// `priors` (a [`PriorPreset`], a [`PriorConfig`] or boxes).
    #[must_use]
    pub fn new(config: LossConfig, priors: impl Into<Priors>) -> Self {
        Self(Loss::new(config, priors.into(), true))
    }

    /// Where wgpu tensors are evaluated ([`LossPath::Auto`] by default).
    #[must_use]
    pub fn with_path(mut self, path: LossPath) -> Self {
        self.0.spec.path = path;
        self
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &LossConfig {
        &self.0.spec.config
    }

    /// The priors as a `[P, 4]` tensor on `device` (made once per device).
    #[must_use]
    pub fn priors(&self, device: &Device) -> Tensor<2> {
        self.0.priors_on(device)
    }

    /// The four terms of a batch: the student's and the teacher's outputs (`[B, P, 4]`
    /// box offsets, `[B, P, C]` logits) and the targets (`[B, M, 5]`: corners, label; a
    /// negative label pads). The teacher gets no gradient.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key of a configuration that cannot work (SPEC §8: a
    /// temperature of 0, a negative variance, an `eps` of 0); [`Error::Shape`] naming the
    /// tensor whose shape, dtype (f32 only) or device does not
    /// fit. Faults found while evaluating (a NaN in the inputs, a GPU failure) panic with
    /// ssdkd's message, as Burn operations do.
    pub fn forward(
        &self,
        student_loc: Tensor<3>,
        student_conf: Tensor<3>,
        teacher_loc: Tensor<3>,
        teacher_conf: Tensor<3>,
        targets: Tensor<3>,
    ) -> ssdkd::Result<KdTerms> {
        self.0.check(Tensors {
            student_loc: Some(&student_loc),
            student_conf: Some(&student_conf),
            teacher_loc: Some(&teacher_loc),
            teacher_conf: Some(&teacher_conf),
            targets: Some(&targets),
            priors: None,
        })?;
        let terms = self.0.terms([
            student_loc,
            student_conf,
            teacher_loc.detach(),
            teacher_conf.detach(),
            targets,
        ]);
        let [soft_loss, l2_loss, loss_c, loss_l] = split(terms);
        Ok(KdTerms {
            soft_loss,
            l2_loss,
            loss_c,
            loss_l,
        })
    }
}

/// The plain SSD MultiBox loss (`MultiBoxLoss`, no teacher): cross-entropy with
/// hard-negative mining and smooth-L1, what trains the teacher.
#[derive(Debug)]
pub struct MultiBoxLoss(Loss);

impl MultiBoxLoss {
    /// The loss with `config` (its soft and L2 settings unused) and `priors`.
    #[must_use]
    pub fn new(config: LossConfig, priors: impl Into<Priors>) -> Self {
        Self(Loss::new(config, priors.into(), false))
    }

    /// Where wgpu tensors are evaluated ([`LossPath::Auto`] by default).
    #[must_use]
    pub fn with_path(mut self, path: LossPath) -> Self {
        self.0.spec.path = path;
        self
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &LossConfig {
        &self.0.spec.config
    }

    /// The priors as a `[P, 4]` tensor on `device`.
    #[must_use]
    pub fn priors(&self, device: &Device) -> Tensor<2> {
        self.0.priors_on(device)
    }

    /// `loss_l` and `loss_c` of a batch (shapes as [`MultiBoxLossKd::forward`]).
    ///
    /// # Errors
    /// As [`MultiBoxLossKd::forward`].
    pub fn forward(
        &self,
        student_loc: Tensor<3>,
        student_conf: Tensor<3>,
        targets: Tensor<3>,
    ) -> ssdkd::Result<PlainTerms> {
        self.0.check(Tensors {
            student_loc: Some(&student_loc),
            student_conf: Some(&student_conf),
            teacher_loc: None,
            teacher_conf: None,
            targets: Some(&targets),
            priors: None,
        })?;
        // The teacher's places hold the student's tensors, unused without a teacher.
        let terms = self.0.terms([
            student_loc.clone(),
            student_conf.clone(),
            student_loc,
            student_conf,
            targets,
        ]);
        let [_, _, loss_c, loss_l] = split(terms);
        Ok(PlainTerms { loss_l, loss_c })
    }
}

/// The `[4]` terms as four `[1]` tensors (ordinary Burn ops: autodiff routes each one's
/// gradient back into the one `[4]` gradient).
fn split(terms: Tensor<1>) -> [Tensor<1>; 4] {
    [0, 1, 2, 3].map(|i| terms.clone().narrow(0, i, 1))
}
