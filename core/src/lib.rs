//! `ssdkd-core`: the `no_std` reference of the SSD knowledge-distillation loss (see
//! `docs/SPEC.md`): prior boxes, box maths, matching, hard-negative mining, the four loss
//! terms and their gradients. It is the ground truth the GPU kernels are tested against,
//! and the CPU backend of the `ssdkd` crate.
//!
//! Features: `std` (default) routes float maths through the standard library, otherwise
//! through `libm` (except the branch-free exponentials and logarithm of [`math`], written
//! out so that every build and the host's vectorised loops get the same bits); `alloc`
//! (implied by `std`) adds owned conveniences such as
//! [`pipeline::ImageWorkspace`]. The per-image path needs neither: callers pass scratch.
//!
//! ```
//! use ssdkd_core::prior::PriorPreset;
//! assert_eq!(PriorPreset::Ssd300.config().num_priors(), 8732);
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod boxes;
pub mod config;
pub mod math;
pub mod pipeline;
pub mod prior;
pub mod stages;
pub mod tensors;
pub mod validate;

pub use config::{LossConfig, LossWeights};
#[cfg(feature = "alloc")]
pub use pipeline::ImageWorkspace;
pub use pipeline::{backward_image, forward_image, ImageInputs, ImageScratch, ImageTargets};
pub use prior::{FeatureMap, PriorConfig, PriorPreset};
pub use stages::grad::GradScale;
pub use stages::reduce::{LossSums, LossTerms};
pub use stages::{Stage, KERNELS};
pub use tensors::{Tensors, TENSOR_NAMES};
