//! The buffers the kernels bind ([`Resource`]): each declared once, with its WGSL name,
//! layout and owner (its `@binding` numbers are read from the shaders, `shader.rs`).

use crate::batch::BatchShape;
use crate::gpu::chunks::Layout;
use crate::gpu::params::{GpuFinding, GpuSums};

/// A buffer the kernels bind: declared here once, with its WGSL name, its layout and who
/// owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Resource {
    StudentConf,
    TeacherConf,
    StudentLoc,
    TeacherLoc,
    Targets,
    Priors,
    ConfTarget,
    LocTarget,
    NegMask,
    MiningScore,
    PriorLoss,
    RowSoft,
    ImageSums,
    BatchSums,
    GradStudentConf,
    GradStudentLoc,
    ImageFindings,
    Finding,
}

/// Who holds a [`Resource`]'s buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The batch's input tensors ([`crate::gpu::GpuTensors`]).
    Input,
    /// The batch's gradient buffers.
    Gradient,
    /// The engine's per-shape workspace.
    Workspace,
}

impl Resource {
    /// Every resource.
    pub const ALL: [Resource; 18] = [
        Resource::StudentConf,
        Resource::TeacherConf,
        Resource::StudentLoc,
        Resource::TeacherLoc,
        Resource::Targets,
        Resource::Priors,
        Resource::ConfTarget,
        Resource::LocTarget,
        Resource::NegMask,
        Resource::MiningScore,
        Resource::PriorLoss,
        Resource::RowSoft,
        Resource::ImageSums,
        Resource::BatchSums,
        Resource::GradStudentConf,
        Resource::GradStudentLoc,
        Resource::ImageFindings,
        Resource::Finding,
    ];

    /// Its variable name in the WGSL, and its buffer's label `"ssdkd.<name>"`.
    pub fn name(self) -> &'static str {
        use Resource::*;
        match self {
            StudentConf => "student_conf",
            TeacherConf => "teacher_conf",
            StudentLoc => "student_loc",
            TeacherLoc => "teacher_loc",
            Targets => "targets",
            Priors => "priors",
            ConfTarget => "conf_target",
            LocTarget => "loc_target",
            NegMask => "neg_mask",
            MiningScore => "mining_score",
            PriorLoss => "prior_loss",
            RowSoft => "row_soft",
            ImageSums => "image_sums",
            BatchSums => "batch_sums",
            GradStudentConf => "grad_student_conf",
            GradStudentLoc => "grad_student_loc",
            ImageFindings => "image_findings",
            Finding => "finding",
        }
    }

    /// Who holds its buffer.
    pub fn owner(self) -> Owner {
        use Resource::*;
        match self {
            StudentConf | TeacherConf | StudentLoc | TeacherLoc | Targets | Priors => Owner::Input,
            GradStudentConf | GradStudentLoc => Owner::Gradient,
            _ => Owner::Workspace,
        }
    }

    /// The window layout it is bound with, or `None` when bound whole.
    pub fn layout(self) -> Option<Layout> {
        use Resource::*;
        match self {
            StudentConf | TeacherConf | GradStudentConf => Some(Layout::Conf),
            StudentLoc | TeacherLoc | LocTarget | PriorLoss | GradStudentLoc => Some(Layout::Loc),
            Targets => Some(Layout::Target),
            ConfTarget | NegMask | MiningScore | RowSoft => Some(Layout::Prior),
            Priors | ImageSums | BatchSums | ImageFindings | Finding => None,
        }
    }

    /// The bytes its buffer holds for a batch of `shape`.
    pub fn bytes(self, shape: &BatchShape) -> u64 {
        let sums = std::mem::size_of::<GpuSums>() as u64;
        match (self, self.layout()) {
            (_, Some(layout)) => layout.image_bytes(shape) * shape.batch as u64,
            (Resource::Priors, None) => shape.priors as u64 * 16,
            (Resource::ImageSums, None) => sums * shape.batch as u64,
            // A slot for the priors and one per image (`shaders/validate.wgsl`).
            (Resource::ImageFindings, None) => 4 * (shape.batch as u64 + 1),
            (Resource::Finding, None) => std::mem::size_of::<GpuFinding>() as u64,
            _ => sums,
        }
    }
}
