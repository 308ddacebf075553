//! Backend selection: the CPU reference or the GPU, behind one `evaluate`.

use crate::batch::{Batch, Evaluation, Request};
use crate::error::Result;
#[cfg(feature = "gpu")]
use crate::gpu::GpuBackend;
use ssdkd_core::LossConfig;

/// A backend that evaluates batches.
pub enum Backend {
    /// The core's stages on every CPU core.
    Cpu,
    /// The WGSL kernels on a GPU adapter.
    #[cfg(feature = "gpu")]
    Gpu(Box<GpuBackend>),
}

impl Backend {
    /// The GPU backend.
    ///
    /// # Errors
    /// [`crate::Error::NoAdapter`] when no adapter is found.
    pub fn gpu() -> Result<Self> {
        #[cfg(feature = "gpu")]
        return Ok(Backend::Gpu(Box::new(GpuBackend::new()?)));
        #[cfg(not(feature = "gpu"))]
        Err(crate::Error::NoAdapter(
            "this build of ssdkd has no GPU backend (feature `gpu`)".into(),
        ))
    }

    /// The fastest device known: a hardware GPU adapter when one is found, else the CPU (a
    /// software adapter such as lavapipe, slower than the CPU backend, is passed over);
    /// `on_fallback` hears why the GPU was not used, naming a software adapter passed over.
    /// A GPU chosen so hands a batch over its limits (README "GPU limits") to the CPU
    /// backend, saying why on stderr (`GpuBackend::fall_back_to_cpu`).
    pub fn auto(on_fallback: impl FnOnce(&crate::Error)) -> Self {
        #[cfg(feature = "gpu")]
        let gpu = GpuBackend::hardware().map(|mut gpu| {
            gpu.fall_back_to_cpu(|why| eprintln!("ssdkd: {why}; using the CPU backend"));
            Backend::Gpu(Box::new(gpu))
        });
        #[cfg(not(feature = "gpu"))]
        let gpu = Self::gpu();
        gpu.unwrap_or_else(|e| {
            on_fallback(&e);
            Backend::Cpu
        })
    }

    /// `"cpu"` or `"gpu"`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            #[cfg(feature = "gpu")]
            Backend::Gpu(_) => "gpu",
        }
    }

    /// The device that runs it: the GPU adapter's name, or the CPU thread count.
    #[must_use]
    pub fn adapter(&self) -> String {
        match self {
            Backend::Cpu => format!("CPU ({} threads)", rayon::current_num_threads()),
            #[cfg(feature = "gpu")]
            Backend::Gpu(gpu) => gpu.adapter_name(),
        }
    }

    /// Evaluates `batch`.
    ///
    /// # Errors
    /// Bad input (see [`Batch::check`]) or a GPU failure.
    pub fn evaluate(
        &mut self,
        batch: &Batch<'_>,
        config: &LossConfig,
        request: Request,
    ) -> Result<Evaluation> {
        match self {
            Backend::Cpu => crate::cpu::evaluate(batch, config, request),
            #[cfg(feature = "gpu")]
            Backend::Gpu(gpu) => gpu.evaluate(batch, config, request),
        }
    }
}
