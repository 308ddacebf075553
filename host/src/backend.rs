//! Backend selection: the CPU reference or the GPU, behind one `evaluate`; and inputs
//! prepared once for repeated evaluations (on a GPU, uploaded once).

use crate::batch::{Batch, Evaluation, Gradients, Request};
use crate::cancel::CancelToken;
pub use crate::cpu::CpuBackend;
use crate::error::Result;
#[cfg(feature = "gpu")]
use crate::gpu::GpuBackend;
use ssdkd_core::LossConfig;

/// A backend that evaluates batches.
pub enum Backend {
    /// The core's stages on every CPU core, with the workspaces this backend owns.
    Cpu(CpuBackend),
    /// The WGSL kernels on a GPU adapter; with a [`Fallback`] (as [`Backend::auto`] sets
    /// up), a batch over the GPU backend's limits is evaluated by the CPU backend instead.
    #[cfg(feature = "gpu")]
    Gpu(Box<GpuBackend>, Option<Box<Fallback>>),
}

/// Where a GPU [`Backend`] sends the batches its GPU refuses (`Error::GpuUnsupported`: a
/// shape over the limits of SPEC §7.4): the CPU backend, after `notice` hears why. The
/// backend owns it; nothing else falls back.
#[cfg(feature = "gpu")]
pub struct Fallback {
    cpu: CpuBackend,
    notice: Box<dyn Fn(&crate::Error) + Send + Sync>,
}

impl Backend {
    /// The CPU backend, with no workspaces yet.
    #[must_use]
    pub fn cpu() -> Self {
        Backend::Cpu(CpuBackend::new())
    }

    /// The GPU backend.
    ///
    /// # Errors
    /// [`crate::Error::NoAdapter`] when no adapter is found.
    pub fn gpu() -> Result<Self> {
        #[cfg(feature = "gpu")]
        return Ok(Backend::Gpu(Box::new(GpuBackend::new()?), None));
        #[cfg(not(feature = "gpu"))]
        Err(crate::Error::NoAdapter(
            "this build of ssdkd has no GPU backend (feature `gpu`)".into(),
        ))
    }

    /// The fastest device known: a hardware GPU adapter when one is found, else the CPU (a
    /// software adapter such as lavapipe, slower than the CPU backend, is passed over).
    /// `on_fallback` hears every time the CPU is used instead of a GPU: at once, why no GPU
    /// was taken (naming a software adapter passed over); later, for each batch over the
    /// chosen GPU's limits (SPEC §7.4), why that batch went to the CPU backend.
    pub fn auto(on_fallback: impl Fn(&crate::Error) + Send + Sync + 'static) -> Self {
        #[cfg(feature = "gpu")]
        let gpu = GpuBackend::hardware();
        #[cfg(not(feature = "gpu"))]
        let gpu: Result<Self> = Self::gpu();
        match gpu {
            #[cfg(feature = "gpu")]
            Ok(gpu) => Self::with_fallback(gpu, on_fallback),
            #[cfg(not(feature = "gpu"))]
            Ok(backend) => backend,
            Err(e) => {
                on_fallback(&e);
                Backend::cpu()
            }
        }
    }

    /// `gpu` with a [`Fallback`]: a batch over its limits is evaluated by a CPU backend
    /// of this backend's, after `notice` hears why.
    #[cfg(feature = "gpu")]
    pub fn with_fallback(
        gpu: GpuBackend,
        notice: impl Fn(&crate::Error) + Send + Sync + 'static,
    ) -> Self {
        let fallback = Fallback {
            cpu: CpuBackend::new(),
            notice: Box::new(notice),
        };
        Backend::Gpu(Box::new(gpu), Some(Box::new(fallback)))
    }

    /// `"cpu"` or `"gpu"`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu(_) => "cpu",
            #[cfg(feature = "gpu")]
            Backend::Gpu(..) => "gpu",
        }
    }

    /// The device that runs it: the GPU adapter's name, or the CPU thread count.
    #[must_use]
    pub fn adapter(&self) -> String {
        match self {
            Backend::Cpu(_) => format!("CPU ({} threads)", rayon::current_num_threads()),
            #[cfg(feature = "gpu")]
            Backend::Gpu(gpu, _) => gpu.adapter_name(),
        }
    }

    /// Evaluates `batch`. Results are checked to be finite. A batch without teacher
    /// ([`Batch::without_teacher`]) is the KD evaluation with the soft and L2 weights 0,
    /// its `soft_loss`, `l2_loss`, `num_bounded` and their sums reported as 0.
    ///
    /// # Errors
    /// Bad input (see [`Batch::check`]), a GPU failure, or [`crate::Error::Numerical`]
    /// for a non-finite term or gradient element.
    pub fn evaluate(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
        request: Request,
    ) -> Result<Evaluation> {
        self.evaluate_cancellable(batch, config, request, None)
    }

    /// [`Backend::evaluate`], stopped early when `cancel` is cancelled from another thread:
    /// the CPU backend checks the token before each image of each pass, the GPU backend
    /// before it starts.
    ///
    /// # Errors
    /// As [`Backend::evaluate`], and [`crate::Error::Cancelled`].
    pub fn evaluate_cancellable(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
        request: Request,
        cancel: Option<&CancelToken>,
    ) -> Result<Evaluation> {
        let config = &for_batch(config, batch.has_teacher());
        let mut eval = match self {
            // The CPU backend checks the gradient rows as it writes them (cpu.rs).
            Backend::Cpu(cpu) => cpu.evaluate_checked(batch, config, request, cancel)?,
            #[cfg(feature = "gpu")]
            Backend::Gpu(gpu, fallback) => {
                cancel.map_or(Ok(()), CancelToken::check)?;
                match (gpu.evaluate(batch, config, request), fallback) {
                    (Err(e @ crate::Error::GpuUnsupported(_)), Some(fallback)) => {
                        (fallback.notice)(&e);
                        // The GPU backend checked the batch before it refused it.
                        let request = Request {
                            validate: false,
                            ..request
                        };
                        fallback
                            .cpu
                            .evaluate_checked(batch, config, request, cancel)?
                    }
                    (result, _) => {
                        let eval = result?;
                        eval.check_finite()?;
                        eval
                    }
                }
            }
        };
        if !batch.has_teacher() {
            without_teacher_terms(&mut eval);
        }
        Ok(eval)
    }

    /// The gradients of the last evaluation's batch for other weights (`config.weights`),
    /// without its forward pass again: on the CPU backend, from what that evaluation kept
    /// ([`CpuBackend::gradients_of_last`]: the same bits as an evaluation with gradients).
    /// `None` on a GPU, or when the last evaluation was not of `batch` with the same
    /// settings: the caller then evaluates with gradients.
    ///
    /// # Errors
    /// [`crate::Error::Numerical`] for a non-finite gradient element.
    pub fn gradients_of_last(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
    ) -> Option<Result<Gradients>> {
        let config = &for_batch(config, batch.has_teacher());
        match self {
            Backend::Cpu(cpu) => cpu.gradients_of_last(batch, config),
            #[cfg(feature = "gpu")]
            Backend::Gpu(..) => None,
        }
    }

    /// Prepares `batch` for repeated evaluations with [`Backend::evaluate_prepared`], as a
    /// training loop's inputs are: the value scan is done here once, and on a GPU the
    /// tensors are uploaded once, so that later evaluations time the kernels alone.
    ///
    /// # Errors
    /// Shapes disagreeing with `config` or a value the loss cannot take (as
    /// [`Batch::check`]); a GPU failure while uploading.
    pub fn prepare<'a>(&mut self, batch: &Batch<'a>, config: &LossConfig) -> Result<Prepared<'a>> {
        batch.check(config, true)?;
        Ok(Prepared {
            batch: *batch,
            #[cfg(feature = "gpu")]
            resident: match self {
                Backend::Cpu(_) => None,
                // A batch the GPU cannot take stays on the host, for the fallback.
                Backend::Gpu(gpu, Some(_)) => match gpu.upload(batch) {
                    Err(crate::Error::GpuUnsupported(_)) => None,
                    uploaded => Some(uploaded?),
                },
                Backend::Gpu(gpu, None) => Some(gpu.upload(batch)?),
            },
        })
    }

    /// Evaluates a batch [`Backend::prepare`]d on this backend (its values are not scanned
    /// again). On a GPU with `gradients`, the gradients stay in GPU buffers and
    /// [`Evaluation::gradients`] is `None`.
    ///
    /// # Errors
    /// As [`Backend::evaluate`].
    pub fn evaluate_prepared(
        &mut self,
        prepared: &Prepared<'_>,
        config: &LossConfig,
        gradients: bool,
    ) -> Result<Evaluation> {
        #[cfg(feature = "gpu")]
        if let (Backend::Gpu(gpu, _), Some(resident)) = (&mut *self, &prepared.resident) {
            let request = crate::gpu::GpuRequest {
                gradients,
                ..Default::default()
            };
            let teacher = prepared.batch.has_teacher();
            let mut eval = gpu.evaluate_resident(resident, &for_batch(config, teacher), request)?;
            if !teacher {
                without_teacher_terms(&mut eval);
            }
            eval.check_finite()?;
            return Ok(eval);
        }
        let request = Request {
            gradients,
            validate: false,
            ..Request::default()
        };
        self.evaluate(&prepared.batch, config, request)
    }
}

// Batches without teacher (SPEC §10.1) are handled here, at the one place both
// backends go through, rather than in the core's stages: the batch's student tensors stand
// in for the teacher's (`Batch::without_teacher`), the soft and L2 weights are 0 so that
// the stand-in adds nothing to the total or the gradients, and the soft/L2 terms it gave
// are reported as 0. `loss_c`, `loss_l`, the counts of SPEC §4 and their gradients never
// read the teacher, so they are the KD evaluation's exactly. (Making the teacher optional in
// the core's `prior_terms` would change `forward_image`'s signature, which the CPU backend
// and the GPU's per-image fallback share; this keeps the stages as they are.)

/// `config` for a batch with or without teacher: without, the soft and L2 weights are 0.
pub(crate) fn for_batch(config: &LossConfig, has_teacher: bool) -> LossConfig {
    let mut config = *config;
    if !has_teacher {
        config.weights.soft = 0.0;
        config.weights.l2 = 0.0;
    }
    config
}

/// Reports the teacher's terms of an evaluation without teacher as 0 (see [`for_batch`]).
pub(crate) fn without_teacher_terms(eval: &mut Evaluation) {
    eval.terms.soft_loss = 0.0;
    eval.terms.l2_loss = 0.0;
    eval.sums.soft = 0.0;
    eval.sums.l2 = 0.0;
    eval.sums.num_bounded = 0;
}

/// A batch ready for repeated evaluations on the backend that prepared it (see
/// [`Backend::prepare`]).
#[derive(Debug)]
pub struct Prepared<'a> {
    batch: Batch<'a>,
    #[cfg(feature = "gpu")]
    resident: Option<crate::gpu::GpuBatch>,
}

impl Prepared<'_> {
    /// Whether the inputs live on a GPU (uploaded once) rather than in host memory.
    #[must_use]
    pub fn on_gpu(&self) -> bool {
        #[cfg(feature = "gpu")]
        return self.resident.is_some();
        #[cfg(not(feature = "gpu"))]
        false
    }
}
