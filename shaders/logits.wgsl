// Included after shared.wgsl by the stages that read the logits (prior terms, reduce,
// grad): the tensors at bindings 1 and 2, and each row's maximum and shifted sums.
// The core adds a row's exponentials in eight interleaved lanes (`math::Lanes`, for the
// CPU's vectors); here a thread adds them in class order: the same value up to f32
// rounding, within SPEC §7.

@group(0) @binding(1) var<storage, read> student_conf: array<f32>;
@group(0) @binding(2) var<storage, read> teacher_conf: array<f32>;

// The largest value of the student row starting at `base`.
fn student_max(base: u32) -> f32 {
    var m = student_conf[base];
    for (var c = 1u; c < params.num_classes; c++) {
        m = max(m, student_conf[base + c]);
    }
    return m;
}

// The largest value of the teacher row starting at `base`.
fn teacher_max(base: u32) -> f32 {
    var m = teacher_conf[base];
    for (var c = 1u; c < params.num_classes; c++) {
        m = max(m, teacher_conf[base + c]);
    }
    return m;
}

// Σ exp((row[c] − m) · scale) of the student row at `base`, m its maximum: in [1, C], the
// denominator of its softmax (twin of core/src/stages/prior_terms.rs `SoftmaxF64`).
fn student_shifted_sum(base: u32, m: f32, scale: f32) -> f32 {
    var sum = 0.0;
    for (var c = 0u; c < params.num_classes; c++) {
        sum += exp((student_conf[base + c] - m) * scale);
    }
    return sum;
}

// The same over the teacher row at `base`.
fn teacher_shifted_sum(base: u32, m: f32, scale: f32) -> f32 {
    var sum = 0.0;
    for (var c = 0u; c < params.num_classes; c++) {
        sum += exp((teacher_conf[base + c] - m) * scale);
    }
    return sum;
}

// ln Σ exp((row[c] − m) · scale) of the student row at `base`: in [0, ln C], so that a
// log-probability (x − m) · scale − ln Σ never subtracts two large numbers.
// Twin of core/src/stages/prior_terms.rs `shifted_log_sum_exp`.
fn student_shifted_lse(base: u32, m: f32, scale: f32) -> f32 {
    return log(student_shifted_sum(base, m, scale));
}

// The same over the teacher row at `base`.
fn teacher_shifted_lse(base: u32, m: f32, scale: f32) -> f32 {
    return log(teacher_shifted_sum(base, m, scale));
}
