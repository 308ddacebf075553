// Stage **reduce** (SPEC §5): each selected row's soft term (`reduce_rows`, a thread per
// prior, so that no invocation loops over more than one row's C classes), the sums over the
// selected rows of an image (`reduce_image`), then the batch totals (`reduce_batch`). Twin
// of core/src/stages/reduce.rs, kernel by kernel. Every sum is taken in a fixed order — each
// thread's strided rows in prior order, then a pairwise tree in workgroup memory — so the
// same input gives the same bits run after run. No float atomics.

// Bindings 1 and 2 (student_conf, teacher_conf) and their rows' log-sum-exp: logits.wgsl.
@group(0) @binding(7) var<storage, read> conf_target: array<u32>;
@group(0) @binding(9) var<storage, read> neg_mask: array<u32>;
@group(0) @binding(11) var<storage, read> prior_loss: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> image_sums: array<Sums>;
@group(0) @binding(14) var<storage, read_write> batch_sums: array<Sums>;
// Per prior: the soft term of a selected row, 0 elsewhere.
@group(0) @binding(12) var<storage, read_write> row_soft: array<f32>;

// The class-weighted form's term of a class from its weight w (neg_w for class 0, else
// pos_w), p_c and q_c: w (q_c + ε) ln((q_c + ε) / (p_c + ε)) (SPEC §5). Twin of
// core/src/stages/reduce.rs `weighted_class_term`.
fn weighted_class_term(w: f32, p: f32, q: f32) -> f32 {
    let qe = q + params.eps;
    let pe = p + params.eps;
    return w * qe * log(qe / pe);
}

// The plain KL form's term of a class from q_c and the two log-probabilities:
// q_c (ln q_c − ln p_c), 0 where q_c = 0 (SPEC §5). Twin of the core's `kl_class_term`.
fn kl_class_term(q: f32, log_q: f32, log_p: f32) -> f32 {
    if q > 0.0 {
        return q * (log_q - log_p);
    }
    return 0.0;
}

// T² times the sum of a row's terms, as t · (t · sum), not t² · sum: T² overflows f32 from
// T ≈ 1.8e19, and ∞ · 0 is NaN. Twin of the core's `soft_term_total` (which takes T² in f64).
fn soft_term_total(sum: f32) -> f32 {
    let t = params.temperature;
    return t * (t * sum);
}

// The soft-target term of the row starting at `base` (SPEC §5), not yet divided by N:
// T² times the sum over the classes of `weighted_class_term` (class-weighted, neg_w > 1) or
// `kl_class_term`, with p_c = e_c / S, e_c = exp((x_c − max) / T), S = Σ e_c and
// ln p_c = (x_c − max) / T − ln S. Twin of core/src/stages/reduce.rs `soft_term`, loop for
// loop.
fn soft_term(base: u32) -> f32 {
    let inv_t = 1.0 / params.temperature;
    let max_s = row_max(STUDENT, base);
    let max_t = row_max(TEACHER, base);
    let sum_s = shifted_sum(STUDENT, base, max_s, inv_t);
    let sum_t = shifted_sum(TEACHER, base, max_t, inv_t);
    let lse_s = log(sum_s);
    let lse_t = log(sum_t);
    var sum = 0.0;
    for (var c = 0u; c < params.num_classes; c++) {
        let shifted_s = (student_conf[base + c] - max_s) * inv_t;
        let shifted_t = (teacher_conf[base + c] - max_t) * inv_t;
        let q = exp(shifted_t) / sum_t;
        if params.weighted_soft != 0u {
            let w = select(params.pos_w, params.neg_w, c == 0u);
            sum += weighted_class_term(w, exp(shifted_s) / sum_s, q);
        } else {
            sum += kl_class_term(q, shifted_t - lse_t, shifted_s - lse_s);
        }
    }
    return soft_term_total(sum);
}

// (soft, l2, conf, loc) and the counts of each thread, then of each tree node.
var<workgroup> partial_sums: array<vec4<f32>, WORKGROUP_SIZE>;
var<workgroup> partial_counts: array<vec3<u32>, WORKGROUP_SIZE>;

// Sums the workgroup's partials into entry 0 by a fixed pairwise tree.
fn tree_sum(lid: u32) {
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if lid < stride {
            partial_sums[lid] += partial_sums[lid + stride];
            partial_counts[lid] += partial_counts[lid + stride];
        }
    }
    workgroupBarrier();
}

// A thread per prior: the soft term of each selected row.
@compute @workgroup_size(WORKGROUP_SIZE)
fn reduce_rows(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let index = thread_index(workgroup, num_workgroups, lid);
    if index >= params.num_images * params.num_priors {
        return;
    }
    let selected = conf_target[params.prior_base + index] > 0u || neg_mask[params.prior_base + index] != 0u;
    var soft = 0.0;
    if selected {
        soft = soft_term(params.conf_base + index * params.num_classes);
    }
    row_soft[params.prior_base + index] = soft;
}

// One workgroup per image: the image's sums over its selected rows and positives.
@compute @workgroup_size(WORKGROUP_SIZE)
fn reduce_image(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let image = workgroup_index(workgroup, num_workgroups);
    if image >= params.num_images {
        return;
    }
    let num_priors = params.num_priors;
    var sums = vec4<f32>(0.0); // soft, l2, conf, loc
    var num_bounded = 0u;
    for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
        let index = image * num_priors + p;
        let positive = conf_target[params.prior_base + index] > 0u;
        let loss = prior_loss[params.loc_base + index];
        if positive || neg_mask[params.prior_base + index] != 0u {
            sums.x += row_soft[params.prior_base + index];
            sums.z += loss.x;
        }
        if positive {
            sums.y += loss.z;
            sums.w += loss.y;
            num_bounded += u32(loss.w);
        }
    }
    partial_sums[lid] = sums;
    partial_counts[lid] = vec3<u32>(num_bounded, 0u, 0u);
    tree_sum(lid);
    if lid == 0u {
        let total = partial_sums[0];
        let sums_index = params.first_image + image;
        var out = image_sums[sums_index]; // num_pos (match) and num_neg (mine) kept
        out.soft = total.x;
        out.l2 = total.y;
        out.conf = total.z;
        out.loc = total.w;
        out.num_bounded = partial_counts[0].x;
        image_sums[sums_index] = out;
    }
}

// One workgroup: the batch totals over every image of the batch (all chunks).
@compute @workgroup_size(WORKGROUP_SIZE)
fn reduce_batch(@builtin(local_invocation_index) lid: u32) {
    var sums = vec4<f32>(0.0);
    var counts = vec3<u32>(0u);
    for (var i = lid; i < params.batch_images; i += WORKGROUP_SIZE) {
        let image = image_sums[i];
        sums += vec4<f32>(image.soft, image.l2, image.conf, image.loc);
        counts += vec3<u32>(image.num_pos, image.num_neg, image.num_bounded);
    }
    partial_sums[lid] = sums;
    partial_counts[lid] = counts;
    tree_sum(lid);
    if lid == 0u {
        let total = partial_sums[0];
        let c = partial_counts[0];
        batch_sums[0] = Sums(total.x, total.y, total.z, total.w, c.x, c.y, c.z, 0u);
    }
}
