// Included after shared.wgsl by the stages that read the logits (prior terms, reduce,
// grad): the tensors at bindings 1 and 2, and each row's maximum and shifted sums.
// The core adds a row's exponentials in eight interleaved lanes (`math::Lanes`, for the
// CPU's vectors); here a thread adds them in class order: the same value up to f32
// rounding, within SPEC §7.

@group(0) @binding(1) var<storage, read> student_conf: array<f32>;
@group(0) @binding(2) var<storage, read> teacher_conf: array<f32>;

// Which logits a row is read from: the helpers below take it as their first argument, so
// that each is written once for both tensors (WGSL takes no storage pointers as arguments).
const STUDENT: u32 = 0u;
const TEACHER: u32 = 1u;

// Logit `i` of the student (`STUDENT`) or the teacher (`TEACHER`) tensor.
fn logit(which: u32, i: u32) -> f32 {
    if which == TEACHER {
        return teacher_conf[i];
    }
    return student_conf[i];
}

// The largest value of the row starting at `base` (twin of the core's `row_max`).
fn row_max(which: u32, base: u32) -> f32 {
    var m = logit(which, base);
    for (var c = 1u; c < params.num_classes; c++) {
        m = max(m, logit(which, base + c));
    }
    return m;
}

// Σ exp((row[c] − m) · scale) of the row at `base`, m its maximum: in [1, C], the
// denominator of its softmax (twin of core/src/stages/prior_terms.rs `shifted_sum`, in f32,
// and of the sum of its `SoftmaxF64`, in f64).
fn shifted_sum(which: u32, base: u32, m: f32, scale: f32) -> f32 {
    var sum = 0.0;
    for (var c = 0u; c < params.num_classes; c++) {
        sum += exp((logit(which, base + c) - m) * scale);
    }
    return sum;
}

// ln Σ exp((row[c] − m) · scale) of the row at `base`: in [0, ln C], so that a
// log-probability (x − m) · scale − ln Σ never subtracts two large numbers.
// Twin of core/src/stages/prior_terms.rs `shifted_log_sum_exp`.
fn shifted_log_sum_exp(which: u32, base: u32, m: f32, scale: f32) -> f32 {
    return log(shifted_sum(which, base, m, scale));
}
