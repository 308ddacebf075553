//! The GPU backend: the five stages as WGSL compute kernels (`shaders/`), dispatched by wgpu.
//! (Being written: see the GPU issue.)

use crate::batch::{Batch, Evaluation, Request};
use crate::error::{Error, Result};
use ssdkd_core::LossConfig;

/// A GPU context: adapter, device, queue and every pipeline, created once.
pub struct GpuBackend {
    _private: (),
}

impl GpuBackend {
    /// Picks an adapter (high performance; `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` respected)
    /// and creates every pipeline.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when no adapter is found.
    pub fn new() -> Result<Self> {
        Err(Error::NoAdapter("the GPU backend is not built yet".into()))
    }

    /// The adapter's name, as `eval --json` reports it.
    #[must_use]
    pub fn adapter_name(&self) -> String {
        String::new()
    }

    /// Evaluates `batch` on the GPU.
    ///
    /// # Errors
    /// GPU failures.
    pub fn evaluate(
        &mut self,
        _batch: &Batch<'_>,
        _config: &LossConfig,
        _request: Request,
    ) -> Result<Evaluation> {
        Err(Error::Gpu("not built yet".into()))
    }
}
