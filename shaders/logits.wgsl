// Included after shared.wgsl by the stages that read the logits (prior terms, reduce,
// grad): the tensors at bindings 1 and 2 and the log-sum-exp of a row of each.
// Twin of core/src/stages/prior_terms.rs `log_sum_exp`.

@group(0) @binding(1) var<storage, read> student_conf: array<f32>;
@group(0) @binding(2) var<storage, read> teacher_conf: array<f32>;

// ln Σ exp(row[c] · scale) of the student row starting at `base`, stable (max first).
fn student_log_sum_exp(base: u32, scale: f32) -> f32 {
    var m = -3.4028235e38;
    for (var c = 0u; c < params.num_classes; c++) {
        m = max(m, student_conf[base + c] * scale);
    }
    var sum = 0.0;
    for (var c = 0u; c < params.num_classes; c++) {
        sum += exp(student_conf[base + c] * scale - m);
    }
    return m + log(sum);
}

// The same over the teacher row starting at `base`.
fn teacher_log_sum_exp(base: u32, scale: f32) -> f32 {
    var m = -3.4028235e38;
    for (var c = 0u; c < params.num_classes; c++) {
        m = max(m, teacher_conf[base + c] * scale);
    }
    var sum = 0.0;
    for (var c = 0u; c < params.num_classes; c++) {
        sum += exp(teacher_conf[base + c] * scale - m);
    }
    return m + log(sum);
}

