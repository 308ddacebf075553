//! `ssdkd-burn`: ssdkd's SSD distillation loss (SPEC §5) and its analytic gradient for
//! [Burn](https://burn.dev). On Burn's wgpu device ([`wgpu_device`]) the kernels run on
//! Burn's own buffers; elsewhere (Flex, other cubecl runtimes) ssdkd's CPU backend evaluates
//! host copies. Under autodiff a step evaluates once (the forward evaluates the gradient too,
//! with the last backward's weights). Bad input is an `Err` from `forward` on every device.
//!
//! ```no_run
#![doc = include_str!("../examples/train_step.rs")]
//! ```
#![warn(missing_docs)]

mod autodiff;
mod backend;
mod cube;
mod host;

pub use backend::{LossInputs, LossPath, LossSpec, SsdkdBackend};
pub use cube::{adapter_name, bytes_read_back, cache_stats, share_wgpu_device, wgpu_device};
pub use ssdkd::{Error, LossConfig, LossWeights, PriorPreset, Result};
pub use ssdkd_core::{FeatureMap, PriorConfig};

use backend::lock;
use burn::backend::{Dispatch, Flex};
use burn::tensor::{DType, Device, Tensor, TensorData};
use ssdkd::{BatchShape, Tensors};
use std::sync::Mutex;

impl SsdkdBackend for Flex {}

/// The four terms of [`MultiBoxLossKd::forward`], each `[1]`, in the seed's order.
#[derive(Clone, Debug)]
#[allow(missing_docs)] // SPEC §5's terms
pub struct KdTerms {
    pub soft_loss: Tensor<1>,
    pub l2_loss: Tensor<1>,
    pub loss_c: Tensor<1>,
    pub loss_l: Tensor<1>,
}

impl KdTerms {
    /// `w.soft·soft_loss + w.conf·loss_c + w.l2·l2_loss + w.loc·loss_l`.
    #[must_use]
    pub fn weighted(&self, w: LossWeights) -> Tensor<1> {
        let terms = [(&self.soft_loss, w.soft), (&self.loss_c, w.conf), (&self.l2_loss, w.l2)];
        terms.into_iter().fold(self.loss_l.clone() * w.loc, |sum, (t, w)| sum + t.clone() * w)
    }
}

/// The two terms of [`MultiBoxLoss::forward`], each `[1]`.
#[derive(Clone, Debug)]
#[allow(missing_docs)] // SPEC §5's terms
pub struct PlainTerms {
    pub loss_l: Tensor<1>,
    pub loss_c: Tensor<1>,
}

/// ssdkd's loss on Burn tensors, [`MultiBoxLossKd`] with a teacher, [`MultiBoxLoss`] without:
/// its configuration, priors, path, and what its calls share ([`LossSpec`]).
#[derive(Debug)]
pub struct Loss<const TEACHER: bool> {
    spec: LossSpec,
    priors: Vec<[f32; 4]>,
    on_device: Mutex<Vec<(Device, Tensor<2>)>>,
}

/// The distillation loss (`MultiBoxLoss_KD`): soft-target, teacher-bounded L2, cross-entropy
/// with hard-negative mining and smooth-L1 (SPEC §5).
pub type MultiBoxLossKd = Loss<true>;

/// The plain SSD MultiBox loss (`MultiBoxLoss`): cross-entropy with hard-negative mining and
/// smooth-L1, what trains the teacher.
pub type MultiBoxLoss = Loss<false>;

impl<const TEACHER: bool> Loss<TEACHER> {
    /// The loss with `config` (SPEC §8; its `weights` are those the first step's gradient
    /// is evaluated with) and `priors` (a [`PriorPreset`], a [`PriorConfig`] or boxes).
    #[must_use]
    pub fn new(config: LossConfig, priors: impl Into<Vec<[f32; 4]>>) -> Self {
        Self {
            spec: LossSpec::new(config, TEACHER, LossPath::Auto),
            priors: priors.into(),
            on_device: Mutex::new(Vec::new()),
        }
    }

    /// Where wgpu tensors are evaluated ([`LossPath::Auto`] by default).
    #[must_use]
    pub fn with_path(mut self, path: LossPath) -> Self {
        self.spec.path = path;
        self
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &LossConfig {
        &self.spec.config
    }

    /// The priors as a `[P, 4]` tensor on `device` (made once per device).
    #[must_use]
    pub fn priors(&self, device: &Device) -> Tensor<2> {
        let mut cache = lock(&self.on_device);
        if let Some((_, t)) = cache.iter().find(|(d, _)| d == device) {
            return t.clone();
        }
        let data = TensorData::new(self.priors.as_flattened().to_vec(), [self.priors.len(), 4]);
        cache.push((device.clone(), Tensor::from_data(data, device)));
        cache[cache.len() - 1].1.clone()
    }

    /// The evaluations this loss ran: one per training step while its weights repeat.
    #[must_use]
    pub fn evaluations(&self) -> u64 {
        self.spec.evaluations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The terms after checking config, shapes (SPEC §8, §1), dtypes and devices, evaluated
    /// before this returns (Burn would defer them) so that an input error is its `Err`.
    fn terms(
        &self, [sl, sc]: [Tensor<3>; 2], teacher: Option<[Tensor<3>; 2]>, tg: Tensor<3>,
    ) -> ssdkd::Result<[Tensor<1>; 4]> {
        let device = sl.device();
        let [tl, tc] = teacher.map_or([None, None], |t| t.map(|t| Some(t.detach())));
        let given = Tensors::from_array([Some(sl), Some(sc), tl, tc, Some(tg), None]);
        let dims = given.as_ref().map(|t| t.as_ref().map(|t| t.dims().to_vec()));
        let dims = Tensors { priors: Some(vec![self.priors.len(), 4]), ..dims };
        BatchShape::from_dims(dims.as_ref().map(|d| d.as_deref()))?.check_config(self.config())?;
        for (tensor, t) in given.as_ref().named().to_array() {
            let Some(t) = t else { continue };
            let problem = match t.dtype() {
                DType::F32 if t.device() == device => continue,
                DType::F32 => "on another device than student_loc".into(),
                dtype => format!("dtype {dtype:?}, expected f32"),
            };
            return Err(ssdkd::Error::Shape { tensor, problem });
        }
        let [Some(sl), Some(sc), tl, tc, Some(tg), None] = given.to_array() else {
            unreachable!("the tensors as given above")
        };
        // The plain loss gets the student's tensors in the teacher's places, unused.
        let [tl, tc] = [tl.unwrap_or_else(|| sl.clone()), tc.unwrap_or_else(|| sc.clone())];
        let [sl, sc, tl, tc, tg] = [sl, sc, tl, tc, tg].map(Tensor::into_dispatch);
        let priors = self.priors(&device).into_dispatch();
        let inputs = LossInputs::from(Tensors::from_array([sl, sc, tl, tc, tg, priors]));
        // A fresh error slot for this call.
        let spec = LossSpec { error: Default::default(), ..self.spec.clone() };
        let terms = <Dispatch as SsdkdBackend>::ssdkd_terms(inputs, spec.clone());
        let terms = Tensor::<1>::from_dispatch(terms);
        // Reading the terms runs the evaluation; its error, if any, is then in `spec`.
        let _ = terms.clone().into_data();
        let error = lock(&spec.error).take();
        match error {
            Some(error) => Err(error),
            None => Ok([0, 1, 2, 3].map(|i| terms.clone().narrow(0, i, 1))),
        }
    }
}

impl MultiBoxLossKd {
    /// The four terms of a batch: the student's and the teacher's outputs (`[B, P, 4]`
    /// box offsets, `[B, P, C]` logits) and the targets (`[B, M, 5]`: corners, label; a
    /// negative label pads). The teacher gets no gradient.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key of a configuration that cannot work (SPEC §8);
    /// [`Error::Shape`] naming the tensor whose shape, dtype (f32 only) or device does not
    /// fit; [`Error::Input`] naming the tensor, image and index of a value the loss cannot
    /// take (SPEC §1), on every device; [`Error::Numerical`]; [`Error::Gpu`].
    ///
    /// # Panics
    /// On a wgpu device that was not shared with ssdkd ([`wgpu_device`],
    /// [`share_wgpu_device`]): Burn's operation cannot return that error.
    pub fn forward(
        &self, student_loc: Tensor<3>, student_conf: Tensor<3>, teacher_loc: Tensor<3>,
        teacher_conf: Tensor<3>, targets: Tensor<3>,
    ) -> ssdkd::Result<KdTerms> {
        let teacher = Some([teacher_loc, teacher_conf]);
        let [soft_loss, l2_loss, loss_c, loss_l] =
            self.terms([student_loc, student_conf], teacher, targets)?;
        Ok(KdTerms { soft_loss, l2_loss, loss_c, loss_l })
    }
}

impl MultiBoxLoss {
    /// `loss_l` and `loss_c` of a batch (shapes as [`MultiBoxLossKd::forward`]).
    ///
    /// # Errors
    /// As [`MultiBoxLossKd::forward`], which also says when it panics.
    pub fn forward(
        &self, student_loc: Tensor<3>, student_conf: Tensor<3>, targets: Tensor<3>,
    ) -> ssdkd::Result<PlainTerms> {
        let [_, _, loss_c, loss_l] = self.terms([student_loc, student_conf], None, targets)?;
        Ok(PlainTerms { loss_l, loss_c })
    }
}
