//! The records shared by the host and the kernels: the uniform [`Params`] and the sums
//! record [`GpuSums`], mirrored in `shaders/shared.wgsl`.

use crate::batch::BatchShape;
use ssdkd_core::stages::validate::Finding;
use ssdkd_core::{LossConfig, LossSums};

/// Threads per workgroup of every kernel: the core's, equal to `WORKGROUP_SIZE` in
/// `shaders/shared.wgsl` (`tests/tests/shared_constants.rs`).
pub(crate) use ssdkd_core::stages::WORKGROUP_SIZE;

/// The uniform every stage reads at `@group(0) @binding(0)`: the chunk's shape, where the
/// chunk starts inside each bound window, and the loss configuration.
///
/// Keep in sync with `struct Params` in `shaders/shared.wgsl` (same members, same order;
/// the test below compares every offset with naga's layout of the WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub num_images: u32,
    pub first_image: u32,
    pub batch_images: u32,
    pub num_priors: u32,
    pub num_classes: u32,
    pub num_objects: u32,
    pub conf_base: u32,
    pub loc_base: u32,
    pub target_base: u32,
    pub prior_base: u32,
    pub negpos_ratio: u32,
    pub negatives_for_hard: u32,
    pub weighted_soft: u32,
    pub overlap_threshold: f32,
    pub variance0: f32,
    pub variance1: f32,
    pub temperature: f32,
    pub pos_w: f32,
    pub neg_w: f32,
    pub reg_m: f32,
    pub eps: f32,
    pub w_soft: f32,
    pub w_conf: f32,
    pub w_l2: f32,
    pub w_loc: f32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// Where a chunk of images starts inside each bound window, in elements of the binding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct WindowBases {
    /// `[B, P, C]` f32 tensors.
    pub conf: u32,
    /// `[B, P]` vec4 tensors (`[B, P, 4]` f32).
    pub loc: u32,
    /// `[B, M, 5]` f32 targets.
    pub target: u32,
    /// `[B, P]` u32 / f32 per-prior arrays.
    pub prior: u32,
}

impl Params {
    /// The uniform of a chunk of `num_images` images starting at `first_image`.
    pub fn new(
        shape: &BatchShape,
        config: &LossConfig,
        first_image: usize,
        num_images: usize,
        bases: WindowBases,
    ) -> Self {
        let w = config.weights;
        Self {
            num_images: num_images as u32,
            first_image: first_image as u32,
            batch_images: shape.batch as u32,
            num_priors: shape.priors as u32,
            num_classes: shape.classes as u32,
            num_objects: shape.objects as u32,
            conf_base: bases.conf,
            loc_base: bases.loc,
            target_base: bases.target,
            prior_base: bases.prior,
            negpos_ratio: config.negpos_ratio,
            negatives_for_hard: config.negatives_for_hard,
            weighted_soft: u32::from(config.weighted_soft_loss()),
            overlap_threshold: config.overlap_threshold,
            variance0: config.variance[0],
            variance1: config.variance[1],
            temperature: config.temperature,
            pos_w: config.pos_w,
            neg_w: config.neg_w,
            reg_m: config.reg_m,
            eps: config.eps,
            w_soft: w.soft,
            w_conf: w.conf,
            w_l2: w.l2,
            w_loc: w.loc,
            ..Self::default()
        }
    }
}

/// The f32 sums and counts of one image or of the batch, as the reduce stage writes them.
///
/// Keep in sync with `struct Sums` in `shaders/shared.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GpuSums {
    pub soft: f32,
    pub l2: f32,
    pub conf: f32,
    pub loc: f32,
    pub num_pos: u32,
    pub num_neg: u32,
    pub num_bounded: u32,
    pub _pad: u32,
}

impl From<GpuSums> for LossSums {
    fn from(s: GpuSums) -> Self {
        LossSums {
            soft: f64::from(s.soft),
            l2: f64::from(s.l2),
            conf: f64::from(s.conf),
            loc: f64::from(s.loc),
            num_pos: s.num_pos,
            num_neg: s.num_neg,
            num_bounded: s.num_bounded,
        }
    }
}

/// The first finding of the validate stage, as `validate_report` writes it.
///
/// Keep in sync with `struct Finding` in `shaders/validate.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GpuFinding {
    pub found: u32,
    pub slot: u32,
    pub check: u32,
    pub row: u32,
    pub column: u32,
    pub value: f32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub corners: [f32; 4],
}

impl GpuFinding {
    /// The core's finding, `None` when nothing was found.
    pub fn finding(&self) -> Option<Finding> {
        (self.found != 0).then_some(Finding {
            slot: self.slot,
            check: self.check,
            row: self.row,
            column: self.column,
            value: self.value,
            corners: self.corners,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use wgpu::naga;

    fn struct_layout(module: &naga::Module, name: &str) -> (u32, Vec<(String, u32)>) {
        let ty = module
            .types
            .iter()
            .find(|(_, ty)| ty.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("struct {name} in shared.wgsl"))
            .1;
        match &ty.inner {
            naga::TypeInner::Struct { members, span } => (
                *span,
                members
                    .iter()
                    .map(|m| (m.name.clone().unwrap(), m.offset))
                    .collect(),
            ),
            other => panic!("{name} is not a struct: {other:?}"),
        }
    }

    fn shared_module() -> naga::Module {
        naga::front::wgsl::parse_str(include_str!("../../../shaders/shared.wgsl"))
            .expect("shared.wgsl parses")
    }

    #[test]
    fn params_layout_matches_wgsl() {
        let (span, members) = struct_layout(&shared_module(), "Params");
        assert_eq!(span as usize, size_of::<Params>(), "Params size");
        let rust = [
            ("num_images", offset_of!(Params, num_images)),
            ("first_image", offset_of!(Params, first_image)),
            ("batch_images", offset_of!(Params, batch_images)),
            ("num_priors", offset_of!(Params, num_priors)),
            ("num_classes", offset_of!(Params, num_classes)),
            ("num_objects", offset_of!(Params, num_objects)),
            ("conf_base", offset_of!(Params, conf_base)),
            ("loc_base", offset_of!(Params, loc_base)),
            ("target_base", offset_of!(Params, target_base)),
            ("prior_base", offset_of!(Params, prior_base)),
            ("negpos_ratio", offset_of!(Params, negpos_ratio)),
            ("negatives_for_hard", offset_of!(Params, negatives_for_hard)),
            ("weighted_soft", offset_of!(Params, weighted_soft)),
            ("overlap_threshold", offset_of!(Params, overlap_threshold)),
            ("variance0", offset_of!(Params, variance0)),
            ("variance1", offset_of!(Params, variance1)),
            ("temperature", offset_of!(Params, temperature)),
            ("pos_w", offset_of!(Params, pos_w)),
            ("neg_w", offset_of!(Params, neg_w)),
            ("reg_m", offset_of!(Params, reg_m)),
            ("eps", offset_of!(Params, eps)),
            ("w_soft", offset_of!(Params, w_soft)),
            ("w_conf", offset_of!(Params, w_conf)),
            ("w_l2", offset_of!(Params, w_l2)),
            ("w_loc", offset_of!(Params, w_loc)),
            ("_pad0", offset_of!(Params, _pad0)),
            ("_pad1", offset_of!(Params, _pad1)),
            ("_pad2", offset_of!(Params, _pad2)),
        ];
        let rust: Vec<(String, u32)> = rust
            .iter()
            .map(|(n, o)| ((*n).to_string(), *o as u32))
            .collect();
        assert_eq!(members, rust, "Params members and offsets");
        assert_eq!(
            size_of::<Params>() % 16,
            0,
            "a uniform is a multiple of 16 bytes"
        );
    }

    #[test]
    fn sums_layout_matches_wgsl() {
        let (span, members) = struct_layout(&shared_module(), "Sums");
        assert_eq!(span as usize, size_of::<GpuSums>(), "Sums size");
        let rust = [
            ("soft", offset_of!(GpuSums, soft)),
            ("l2", offset_of!(GpuSums, l2)),
            ("conf", offset_of!(GpuSums, conf)),
            ("loc", offset_of!(GpuSums, loc)),
            ("num_pos", offset_of!(GpuSums, num_pos)),
            ("num_neg", offset_of!(GpuSums, num_neg)),
            ("num_bounded", offset_of!(GpuSums, num_bounded)),
            ("_pad", offset_of!(GpuSums, _pad)),
        ];
        let rust: Vec<(String, u32)> = rust
            .iter()
            .map(|(n, o)| ((*n).to_string(), *o as u32))
            .collect();
        assert_eq!(members, rust, "Sums members and offsets");
    }

    fn validate_module() -> naga::Module {
        let source = crate::gpu::shader::stage_source(ssdkd_core::Stage::Validate);
        naga::front::wgsl::parse_str(source).expect("validate.wgsl parses")
    }

    #[test]
    fn finding_layout_matches_wgsl() {
        let (span, members) = struct_layout(&validate_module(), "Finding");
        assert_eq!(span as usize, size_of::<GpuFinding>(), "Finding size");
        let rust = [
            ("found", offset_of!(GpuFinding, found)),
            ("slot", offset_of!(GpuFinding, slot)),
            ("check", offset_of!(GpuFinding, check)),
            ("row", offset_of!(GpuFinding, row)),
            ("column", offset_of!(GpuFinding, column)),
            ("value", offset_of!(GpuFinding, value)),
            ("_pad0", offset_of!(GpuFinding, _pad0)),
            ("_pad1", offset_of!(GpuFinding, _pad1)),
            ("corners", offset_of!(GpuFinding, corners)),
        ];
        let rust: Vec<(String, u32)> = rust
            .iter()
            .map(|(n, o)| ((*n).to_string(), *o as u32))
            .collect();
        assert_eq!(members, rust, "Finding members and offsets");
    }
}
