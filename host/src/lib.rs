//! `ssdkd`: the SSD knowledge-distillation loss (SPEC.md) and its gradient on the CPU
//! (the `ssdkd-core` reference on every core) and on any GPU wgpu drives.
#![warn(missing_docs)]

pub mod backend;
pub mod batch;
pub mod cpu;
pub mod demo;
pub mod error;
pub mod file;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod input;
pub mod limits;
pub mod output;

pub use backend::Backend;
pub use batch::{Batch, BatchShape, Decisions, Evaluation, Gradients, OwnedBatch, Request};
pub use error::{Error, Result};
pub use ssdkd_core::{LossConfig, LossSums, LossTerms, LossWeights, PriorPreset};
