//! `ssdkd`: the SSD knowledge-distillation loss (docs/SPEC.md) and its gradient on the CPU
//! (the `ssdkd-core` reference on every core) and on any GPU wgpu drives.
//!
//! Borrow your tensors as a [`Batch`] (or read a batch file with [`io::file::BatchFile`]),
//! pick a [`Backend`] and call [`Backend::evaluate`]; compare two evaluations to SPEC §7
//! with [`agreement::compare`]. Every failure is an [`Error`] naming what is at fault.
#![warn(missing_docs)]

pub mod agreement;
mod backend;
mod batch;
mod cancel;
pub mod cpu;
pub mod demo;
mod error;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod io;
pub mod limits;
pub mod priors;

#[cfg(feature = "gpu")]
pub use backend::Fallback;
pub use backend::{Backend, Prepared};
pub use batch::{
    teacher_pair, with_teacher_rule, Batch, BatchShape, Decisions, Evaluation, Gradients,
    OwnedBatch, Request,
};
pub use cancel::CancelToken;
pub use error::{Error, Result};
pub use ssdkd_core::validate::{ConfigError, InputError, Tensor};
pub use ssdkd_core::{
    LossConfig, LossSums, LossTerms, LossWeights, PriorPreset, Tensors, TENSOR_NAMES,
};
