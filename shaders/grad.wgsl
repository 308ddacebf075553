// Stage **grad** (SPEC §6): ∂total/∂student_conf and ∂total/∂student_loc, with matching,
// mining and the teacher bound held fixed. Twin of core/src/stages/grad.rs, kernel by
// kernel (`grad_conf`, `grad_loc`), one thread per prior each; `grad_conf`'s row,
// `conf_grad`, is the core's function by function (same names), in f32. N comes from the
// batch totals of the reduce stage, recorded before in the same command encoder.

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

// What every entry of a selected row reads besides `params`: the factors w / N of its two
// parts (`scale_conf`, `soft_scale` = T w_soft / N). Twin of the core's `GradForm`.
struct GradForm {
    scale_conf: f32,
    soft_scale: f32,
}

fn grad_form() -> GradForm {
    let n = normaliser();
    return GradForm(params.w_conf / n, params.w_soft / n * params.temperature);
}

// Class c of a selected row: softmax(s)_c (the cross-entropy's), p_c = softmax(s / T)_c and
// q_c = softmax(t / T)_c (SPEC §6).
struct ClassProbs {
    softmax: f32,
    p: f32,
    q: f32,
}

// The class of the student row's largest logit at `base`, the lowest on ties: the only
// class whose probability can be over 1/2.
fn top_class(base: u32) -> u32 {
    var top = 0u;
    for (var c = 1u; c < params.num_classes; c++) {
        if student_conf[base + c] > student_conf[base + top] {
            top = c;
        }
    }
    return top;
}

// A selected row's three softmaxes, as each row's maximum and shifted log-sum-exp:
// log-probabilities are (x − max) · scale − ln Σ, so no large numbers cancel. (The core
// takes e_c / S in f64, its `SoftmaxF64`.)
struct RowSoftmax {
    base: u32,
    max_s: f32,
    max_t: f32,
    lse: f32,
    lse_s: f32,
    lse_t: f32,
}

fn row_softmax(base: u32, top: u32) -> RowSoftmax {
    let inv_t = 1.0 / params.temperature;
    let max_s = student_conf[base + top];
    let max_t = row_max(TEACHER, base);
    return RowSoftmax(
        base,
        max_s,
        max_t,
        shifted_log_sum_exp(STUDENT, base, max_s, 1.0),
        shifted_log_sum_exp(STUDENT, base, max_s, inv_t),
        shifted_log_sum_exp(TEACHER, base, max_t, inv_t),
    );
}

fn class_probs(row: RowSoftmax, c: u32) -> ClassProbs {
    let inv_t = 1.0 / params.temperature;
    let s = student_conf[row.base + c];
    return ClassProbs(
        exp((s - row.max_s) - row.lse),
        exp((s - row.max_s) * inv_t - row.lse_s),
        exp((teacher_conf[row.base + c] - row.max_t) * inv_t - row.lse_t),
    );
}

// h_c = w_c (q_c + ε) / (p_c + ε), the class-weighted form's ratio.
fn soft_ratio(c: u32, p: f32, q: f32) -> f32 {
    let w = select(params.pos_w, params.neg_w, c == 0u);
    return w * (q + params.eps) / (p + params.eps);
}

// The sums over a row's classes that its entries take, each in class order:
// G = Σ h_c p_c (class-weighted form), and the sums over the classes other than `top` or the
// target from which `ce_grad` and `soft_grad` take the entries whose probability is over 1/2.
struct RestSums {
    g_sum: f32,
    rest_p: f32,
    rest_q: f32,
    rest_ph: f32,
    rest_ce: f32,
}

// Class c's share of the sums: the body of `conf_grad`'s first loop.
fn add_class(sums: ptr<function, RestSums>, c: u32, top: u32, target_class: u32, k: ClassProbs) {
    if params.weighted_soft != 0u {
        let h = soft_ratio(c, k.p, k.q);
        (*sums).g_sum += h * k.p;
        if c != top {
            (*sums).rest_ph += k.p * h;
        }
    }
    if c != top {
        (*sums).rest_p += k.p;
        (*sums).rest_q += k.q;
    }
    if c != target_class {
        (*sums).rest_ce += k.softmax;
    }
}

// The cross-entropy's entry in the direct form: softmax_c − [c = target].
fn direct_ce(c: u32, target_class: u32, softmax: f32) -> f32 {
    return softmax - select(0.0, 1.0, c == target_class);
}

// The cross-entropy's entry: `direct_ce`, but at the target where its softmax is over 1/2
// (where softmax − 1 would lose its digits) −Σ_{c≠target} softmax_c.
fn ce_grad(c: u32, target_class: u32, softmax: f32, rest_ce: f32) -> f32 {
    return select(direct_ce(c, target_class, softmax), -rest_ce, c == target_class && softmax > 0.5);
}

// The soft term's entry in the direct form before its factor: p_c (G − h_c) (class-weighted)
// or p_c − q_c.
fn direct_soft(c: u32, k: ClassProbs, g_sum: f32) -> f32 {
    if params.weighted_soft != 0u {
        return k.p * (g_sum - soft_ratio(c, k.p, k.q));
    }
    return k.p - k.q;
}

// The soft term's entry at the class `top` from the sums over the other classes:
// p_top (Σ_{c≠top} p_c h_c − h_top Σ_{c≠top} p_c) (class-weighted) or
// Σ_{c≠top} q_c − Σ_{c≠top} p_c.
fn complement_soft(top: u32, k: ClassProbs, sums: RestSums) -> f32 {
    if params.weighted_soft != 0u {
        return k.p * (sums.rest_ph - soft_ratio(top, k.p, k.q) * sums.rest_p);
    }
    return sums.rest_q - sums.rest_p;
}

// The soft term's entry: `direct_soft`, but at the class `top` where its p is over 1/2
// (where p − q or G − h would lose its digits) `complement_soft`.
fn soft_grad(c: u32, top: u32, k: ClassProbs, sums: RestSums) -> f32 {
    if c == top && k.p > 0.5 {
        return complement_soft(top, k, sums);
    }
    return direct_soft(c, k, sums.g_sum);
}

// An entry from its two parts, each scaled by its w / N.
fn grad_entry(form: GradForm, ce: f32, soft: f32) -> f32 {
    return form.scale_conf * ce + form.soft_scale * soft;
}

// The gradient of one selected row's w_conf·CE + w_soft·soft, at `base`:
// - cross-entropy: softmax(s)_c − [c = target];
// - plain KL: T (p_c − q_c);
// - class-weighted: T p_c (G − h_c) with h_c = w_c (q_c + ε) / (p_c + ε), G = Σ h_c p_c.
// In f32, softmax − 1 at the target and p − q or G − h at a class whose p is near 1 lose
// their digits. Where that probability is over 1/2 they are taken from the other classes'
// sums instead (below 1/2 the direct form is the exact one). Two loops over the classes:
// the sums, then the entries.
fn conf_grad(base: u32, target_class: u32) {
    let form = grad_form();
    let top = top_class(base);
    let row = row_softmax(base, top);
    var sums = RestSums(0.0, 0.0, 0.0, 0.0, 0.0);
    for (var c = 0u; c < params.num_classes; c++) {
        add_class(&sums, c, top, target_class, class_probs(row, c));
    }
    for (var c = 0u; c < params.num_classes; c++) {
        let k = class_probs(row, c);
        let ce = ce_grad(c, target_class, k.softmax, sums.rest_ce);
        grad_student_conf[base + c] = grad_entry(form, ce, soft_grad(c, top, k, sums));
    }
}

// A thread per prior: each selected row's conf gradient (`conf_grad`), 0 on the others.
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
    conf_grad(base, target_class);
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
