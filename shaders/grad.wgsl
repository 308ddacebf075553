// Stage **grad** (SPEC §6): ∂total/∂student_conf and ∂total/∂student_loc, with matching,
// mining and the teacher bound held fixed. Twin of core/src/stages/grad.rs, kernel by
// kernel (`grad_conf`, `grad_loc`), one thread per prior each; `grad_conf` runs the
// core's `conf_grad` in f32. N comes from the batch totals of the reduce stage, recorded
// before in the same command encoder.

// Bindings 1 and 2 (student_conf, teacher_conf) and their rows' log-sum-exp: logits.wgsl.
@group(0) @binding(7) var<storage, read> conf_target: array<u32>;
@group(0) @binding(9) var<storage, read> neg_mask: array<u32>;
@group(0) @binding(14) var<storage, read> batch_sums: array<Sums>;
@group(0) @binding(15) var<storage, read_write> grad_student_conf: array<f32>;
@group(0) @binding(3) var<storage, read> student_loc: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> loc_target: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read> prior_loss: array<vec4<f32>>;
@group(0) @binding(16) var<storage, read_write> grad_student_loc: array<vec4<f32>>;

// N = max(total positives over the batch, 1) (SPEC §5).
fn normaliser() -> f32 {
    return f32(max(batch_sums[0].num_pos, 1u));
}

// The gradient of one selected row's w_conf·CE + w_soft·soft:
// - cross-entropy: softmax(s)_c − [c = target];
// - plain KL: T (p_c − q_c);
// - class-weighted: T p_c (G − h_c) with h_c = w_c (q_c + ε) / (p_c + ε), G = Σ h_c p_c.
@compute @workgroup_size(WORKGROUP_SIZE)
fn grad_conf(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let index = thread_index(workgroup, num_workgroups, lid);
    if index >= params.num_images * params.num_priors {
        return;
    }
    let base = params.conf_base + index * params.num_classes;
    let target_class = conf_target[params.prior_base + index];
    if target_class == 0u && neg_mask[params.prior_base + index] == 0u {
        for (var c = 0u; c < params.num_classes; c++) {
            grad_student_conf[base + c] = 0.0;
        }
        return;
    }
    let n = normaliser();
    let scale_conf = params.w_conf / n;
    let t = params.temperature;
    let inv_t = 1.0 / t;
    let soft_scale = params.w_soft / n * t;
    let eps = params.eps;
    let weighted = params.weighted_soft != 0u;
    // In f32, softmax − 1 at the target and p − q or G − h at a class whose p is near 1
    // lose their digits. Where that probability is over 1/2 they are taken from the other
    // classes' sums instead (below 1/2 the direct form is the exact one): the target's
    // cross-entropy term is −Σ_{c≠t} softmax_c, and the class `top` of largest logit (the
    // only p that can be near 1) gets Σ_{c≠top} q_c − Σ_{c≠top} p_c, or
    // G − h_top = Σ_{c≠top} p_c h_c − h_top Σ_{c≠top} p_c.
    var top = 0u;
    for (var c = 1u; c < params.num_classes; c++) {
        if student_conf[base + c] > student_conf[base + top] {
            top = c;
        }
    }
    // Log-probabilities as (x − max) · scale − ln Σ: no large numbers cancel.
    let max_s = student_conf[base + top];
    let max_t = row_max(TEACHER, base);
    let lse = shifted_lse(STUDENT, base, max_s, 1.0);
    let lse_s = shifted_lse(STUDENT, base, max_s, inv_t);
    let lse_t = shifted_lse(TEACHER, base, max_t, inv_t);
    var g_sum = 0.0;
    var rest_p = 0.0;
    var rest_q = 0.0;
    var rest_ph = 0.0;
    var rest_ce = 0.0;
    for (var c = 0u; c < params.num_classes; c++) {
        let s = student_conf[base + c];
        let q = exp((teacher_conf[base + c] - max_t) * inv_t - lse_t);
        let p = exp((s - max_s) * inv_t - lse_s);
        let w = select(params.pos_w, params.neg_w, c == 0u);
        let h = w * (q + eps) / (p + eps);
        g_sum += h * p;
        if c != top {
            rest_p += p;
            rest_q += q;
            rest_ph += p * h;
        }
        if c != target_class {
            rest_ce += exp((s - max_s) - lse);
        }
    }
    for (var c = 0u; c < params.num_classes; c++) {
        let s = student_conf[base + c];
        let q = exp((teacher_conf[base + c] - max_t) * inv_t - lse_t);
        let p = exp((s - max_s) * inv_t - lse_s);
        let softmax = exp((s - max_s) - lse);
        // The complements only where they are the exact side: a probability over 1/2.
        let ce = select(softmax, select(softmax - 1.0, -rest_ce, softmax > 0.5), c == target_class);
        let complement = c == top && p > 0.5;
        var soft = 0.0;
        if weighted {
            let w = select(params.pos_w, params.neg_w, c == 0u);
            let h = w * (q + eps) / (p + eps);
            soft = p * select(g_sum - h, rest_ph - h * rest_p, complement);
        } else {
            soft = select(p - q, rest_q - rest_p, complement);
        }
        grad_student_conf[base + c] = scale_conf * ce + soft_scale * soft;
    }
}

// The gradient of one positive prior's w_loc·smooth-L1 + w_l2·bounded L2, zero elsewhere.
@compute @workgroup_size(WORKGROUP_SIZE)
fn grad_loc(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let index = thread_index(workgroup, num_workgroups, lid);
    if index >= params.num_images * params.num_priors {
        return;
    }
    let at = params.loc_base + index;
    if conf_target[params.prior_base + index] == 0u {
        grad_student_loc[at] = vec4<f32>(0.0);
        return;
    }
    let n = normaliser();
    let bounded = prior_loss[at].w != 0.0;
    let l2 = select(0.0, 2.0 * (params.w_l2 / n), bounded);
    let d = student_loc[at] - loc_target[at];
    let smooth_grad = vec4<f32>(smooth_l1_grad(d.x), smooth_l1_grad(d.y), smooth_l1_grad(d.z), smooth_l1_grad(d.w));
    grad_student_loc[at] = (params.w_loc / n) * smooth_grad + l2 * d;
}
