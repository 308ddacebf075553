// Shared by every stage: the uniform `Params`, the `Sums` record and the small maths the
// stages have in common. Concatenated in front of each stage's file by the host
// (`concat!(include_str!(..), include_str!(..))` in host/src/gpu/engine.rs).

// Threads per workgroup of every kernel: the core's `WORKGROUP_SIZE`
// (core/src/stages/mod.rs; tests/tests/shared_constants.rs holds every constant of the
// shaders to its Rust twin).
const WORKGROUP_SIZE: u32 = 256u;

// Keep in sync with `Params` in host/src/gpu/params.rs (a unit test there checks every
// member's offset and the size against this declaration).
struct Params {
    // Images in this chunk; the chunk's first image in the batch; images in the batch.
    num_images: u32,
    first_image: u32,
    batch_images: u32,
    // P, C, M (SPEC §1).
    num_priors: u32,
    num_classes: u32,
    num_objects: u32,
    // Where the chunk's first image starts inside each bound window, in elements of the
    // binding: [B, P, C] f32, [B, P] vec4, [B, M, 5] f32 and [B, P] u32/f32 arrays.
    conf_base: u32,
    loc_base: u32,
    target_base: u32,
    prior_base: u32,
    // SPEC §4.
    negpos_ratio: u32,
    negatives_for_hard: u32,
    // 1 when the soft loss takes its class-weighted form (neg_w > 1, SPEC §5).
    weighted_soft: u32,
    // The rest of LossConfig.
    overlap_threshold: f32,
    variance0: f32,
    variance1: f32,
    temperature: f32,
    pos_w: f32,
    neg_w: f32,
    reg_m: f32,
    eps: f32,
    w_soft: f32,
    w_conf: f32,
    w_l2: f32,
    w_loc: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Un-normalised sums and counts of one image or of the batch; the f32 twin of `LossSums`
// in core/src/stages/reduce.rs. Keep in sync with `GpuSums` in host/src/gpu/params.rs.
struct Sums {
    soft: f32,
    l2: f32,
    conf: f32,
    loc: f32,
    num_pos: u32,
    num_neg: u32,
    num_bounded: u32,
    _pad: u32,
}

// `params` is binding 0 in every file. The host reads every other binding from the WGSL
// (naga's reflection, host/src/gpu/shader.rs): a buffer is known by its variable's name.
// By convention each keeps one number in every file (student_conf 1, teacher_conf 2,
// student_loc 3, teacher_loc 4, targets 5, priors 6, conf_target 7, loc_target 8,
// neg_mask 9, mining_score 10, prior_loss 11, row_soft 12, image_sums 13, batch_sums 14,
// grad_student_conf 15, grad_student_loc 16), so that the files read alike.
@group(0) @binding(0) var<uniform> params: Params;

// The flat index of a thread of a 1-D launch that the host may have folded into 2-D
// (x is capped by max_compute_workgroups_per_dimension).
fn thread_index(workgroup: vec3<u32>, num_workgroups: vec3<u32>, local: u32) -> u32 {
    return (workgroup.y * num_workgroups.x + workgroup.x) * WORKGROUP_SIZE + local;
}

// The index of a workgroup of a one-workgroup-per-image launch.
fn workgroup_index(workgroup: vec3<u32>, num_workgroups: vec3<u32>) -> u32 {
    return workgroup.y * num_workgroups.x + workgroup.x;
}

// Smooth-L1 with beta = 1 (SPEC §5).
fn smooth_l1(d: f32) -> f32 {
    let a = abs(d);
    if a < 1.0 {
        return 0.5 * d * d;
    }
    return a - 0.5;
}

// Derivative of smooth_l1: d when |d| < 1, else sign(d) (SPEC §6).
fn smooth_l1_grad(d: f32) -> f32 {
    if abs(d) < 1.0 {
        return d;
    }
    return select(-1.0, 1.0, d > 0.0);
}
