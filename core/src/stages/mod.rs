//! The five stages of the loss, **match → prior terms → mine → reduce → grad**, each a
//! function over one image's slices. Each has a WGSL twin of the same name in `shaders/`
//! and a pipeline of the same name in the host (label `"ssdkd.<stage>"`).

pub mod grad;
#[path = "match.rs"]
pub mod r#match;
pub mod mine;
pub mod prior_terms;
pub mod reduce;
