// Stage **prior terms** (SPEC §4, §5): the per-prior maths — log-sum-exp, cross-entropy,
// mining score, smooth-L1 and the teacher-bounded L2 test. Twin of
// core/src/stages/prior_terms.rs. One thread per prior. The soft term, needed only on the
// selected rows, is taken by the reduce stage once mining has chosen them.

// Binding 1 (student_conf) and `student_log_sum_exp`: logits.wgsl (its binding 2, the
// teacher's logits, is not used here).
@group(0) @binding(3) var<storage, read> student_loc: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> teacher_loc: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> conf_target: array<u32>;
@group(0) @binding(8) var<storage, read> loc_target: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> mining_score: array<f32>;
// Per prior: (cross_entropy, smooth-L1 over the 4 coordinates, d_s where the teacher
// bound holds else 0, 1 where it holds else 0); the loc entries are 0 off the positives.
@group(0) @binding(11) var<storage, read_write> prior_loss: array<vec4<f32>>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn prior_terms(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let index = thread_index(workgroup, num_workgroups, lid);
    if index >= params.num_images * params.num_priors {
        return;
    }
    let row = params.conf_base + index * params.num_classes;
    let target_class = conf_target[params.prior_base + index];
    let positive = target_class > 0u;
    // (max − x_label) + ln S: ln S in [0, ln C] is not rounded away next to a large max.
    let max_s = row_max(STUDENT, row);
    let cross_entropy = (max_s - student_conf[row + target_class]) + shifted_lse(STUDENT, row, max_s, 1.0);
    // Positives score 0 (SPEC §4); `+ 0.0` keeps the score off −0 as on the CPU.
    mining_score[params.prior_base + index] = select(cross_entropy + 0.0, 0.0, positive);

    var loss = vec4<f32>(cross_entropy, 0.0, 0.0, 0.0);
    if positive {
        let target_offsets = loc_target[params.loc_base + index];
        let ds = student_loc[params.loc_base + index] - target_offsets;
        let dt = teacher_loc[params.loc_base + index] - target_offsets;
        let smooth_sum = smooth_l1(ds.x) + smooth_l1(ds.y) + smooth_l1(ds.z) + smooth_l1(ds.w);
        let student_sq = dot(ds, ds);
        let teacher_sq = dot(dt, dt);
        let bounded = student_sq + params.reg_m > teacher_sq;
        loss = vec4<f32>(cross_entropy, smooth_sum, select(0.0, student_sq, bounded), select(0.0, 1.0, bounded));
    }
    prior_loss[params.loc_base + index] = loss;
}
