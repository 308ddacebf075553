// Stage **prior terms** (SPEC §4, §5): the per-prior maths — log-sum-exp, cross-entropy,
// mining score, smooth-L1 and the teacher-bounded L2 test. Twin of
// core/src/stages/prior_terms.rs function by function (same names). One thread per prior.
// The soft term, needed only on the selected rows, is taken by the reduce stage once
// mining has chosen them.

// Binding 1 (student_conf), `row_max` and `shifted_log_sum_exp`: logits.wgsl (its binding
// 2, the teacher's logits, is not used here).
@group(0) @binding(3) var<storage, read> student_loc: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> teacher_loc: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> conf_target: array<u32>;
@group(0) @binding(8) var<storage, read> loc_target: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> mining_score: array<f32>;
// Per prior: (cross_entropy, smooth-L1 over the 4 coordinates, d_s where the teacher
// bound holds else 0, 1 where it holds else 0); the loc entries are 0 off the positives.
@group(0) @binding(11) var<storage, read_write> prior_loss: array<vec4<f32>>;

// Cross-entropy of the student row at `row` against `target_class` (SPEC §5):
// (max − x_label) + ln S, the difference first: ln S in [0, ln C] is not rounded away next
// to a large max.
fn cross_entropy(row: u32, target_class: u32) -> f32 {
    let max_s = row_max(STUDENT, row);
    return (max_s - student_conf[row + target_class]) + shifted_log_sum_exp(STUDENT, row, max_s, 1.0);
}

// The localisation terms of one positive prior at `at` (SPEC §5): smooth-L1 over the 4
// coordinates, d_s = ‖student − target‖², and whether the teacher bound d_s + reg_m > d_t
// holds.
struct LocTerms {
    smooth_l1: f32,
    student_sq: f32,
    bounded: bool,
}

fn loc_terms(at: u32) -> LocTerms {
    let target_offsets = loc_target[at];
    let ds = student_loc[at] - target_offsets;
    let dt = teacher_loc[at] - target_offsets;
    let smooth_sum = smooth_l1(ds.x) + smooth_l1(ds.y) + smooth_l1(ds.z) + smooth_l1(ds.w);
    let student_sq = dot(ds, ds);
    let teacher_sq = dot(dt, dt);
    return LocTerms(smooth_sum, student_sq, student_sq + params.reg_m > teacher_sq);
}

// One prior's `prior_loss` record from its cross-entropy `ce`: (ce, smooth-L1, d_s where the
// teacher bound holds else 0, 1 where it holds else 0) for a positive, (ce, 0, 0, 0)
// otherwise.
fn prior_loss_record(ce: f32, positive: bool, at: u32) -> vec4<f32> {
    if !positive {
        return vec4<f32>(ce, 0.0, 0.0, 0.0);
    }
    let terms = loc_terms(at);
    return vec4<f32>(ce, terms.smooth_l1, select(0.0, terms.student_sq, terms.bounded), select(0.0, 1.0, terms.bounded));
}

// A thread per prior: its mining score and its `prior_loss` record.
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
    let ce = cross_entropy(row, target_class);
    // The core's `mining_score` (a function name here would clash with the binding):
    // positives score 0 (SPEC §4); `+ 0.0` keeps the score off −0 as on the CPU.
    mining_score[params.prior_base + index] = select(ce + 0.0, 0.0, positive);
    prior_loss[params.loc_base + index] = prior_loss_record(ce, positive, params.loc_base + index);
}
