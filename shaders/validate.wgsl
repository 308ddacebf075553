// Stage **validate** (SPEC §1.3, §8.3: the accepted ranges): the host's value scan
// (core/src/validate.rs) on the GPU, for batches whose values the host does not scan. Twin
// of core/src/stages/validate.rs, kernel by kernel, with its rules and its order: a finding
// is a slot (0 for priors, 1 + image for an image's tensors) and a key
// `check << ROW_BITS | row`, the checks numbered in the scan's order, so that the smallest
// (slot, key) is the scan's first error. Each slot keeps its smallest key as an atomic max
// of `~key` (0, the buffer's cleared state, is "nothing found"): the same result whatever
// order the threads run in.
//
// Values are tested as the bits of |v| (`beyond`): NaN and ±∞ lie above every finite
// magnitude, so the test needs no float comparison with NaN, which drivers may fold away.

// Bindings 1 and 2 (student_conf, teacher_conf) and `logit`: logits.wgsl.
@group(0) @binding(3) var<storage, read> student_loc: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> teacher_loc: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> targets: array<f32>;
@group(0) @binding(6) var<storage, read> priors: array<vec4<f32>>;
// Per slot (B + 1): `~key` of its smallest key, 0 when nothing was found.
@group(0) @binding(17) var<storage, read_write> image_findings: array<atomic<u32>>;
// The first finding, read back with the sums.
@group(0) @binding(18) var<storage, read_write> finding: Finding;

// The first finding as the host reads it: whether there is one, its slot, check and row,
// the first bad column of the row and its value (the label for CHECK_TARGET_ROW), and the
// row's first four values. Keep in sync with `GpuFinding` in host/src/gpu/params.rs.
struct Finding {
    found: u32,
    slot: u32,
    check: u32,
    row: u32,
    column: u32,
    value: f32,
    _pad0: u32,
    _pad1: u32,
    corners: vec4<f32>,
}

// The accepted domain (core/src/validate.rs; tests/tests/shared_constants.rs compares them).
const MAX_LOGIT: f32 = 1e15;
const MAX_OFFSET: f32 = 1e12;
const MIN_PRIOR_SIZE: f32 = 1e-4;
const BOX_TOLERANCE: f32 = 1e-3;
// The bits of f32::MAX: beyond it is not finite.
const FINITE_BITS: u32 = 0x7f7fffffu;

// Bits of a key that hold its row (core's `ROW_BITS`).
const ROW_BITS: u32 = 28u;
// The checks, in the scan's order (core's `Check`).
const CHECK_PRIOR_VALUE: u32 = 0u;
const CHECK_PRIOR_SIZE: u32 = 1u;
const CHECK_STUDENT_LOC: u32 = 2u;
const CHECK_STUDENT_CONF: u32 = 3u;
const CHECK_TEACHER_LOC: u32 = 4u;
const CHECK_TEACHER_CONF: u32 = 5u;
const CHECK_TARGET_VALUE: u32 = 6u;
const CHECK_TARGET_ROW: u32 = 7u;
// No finding (above every key).
const NO_KEY: u32 = 0xffffffffu;

// NaN, ±∞, or |v| over the limit whose bits are `limit` (core's `beyond`).
fn beyond(v: f32, limit: u32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > limit;
}

// The first column of a four-value row beyond `limit`, or 4.
fn first_beyond4(row: vec4<f32>, limit: u32) -> u32 {
    for (var c = 0u; c < 4u; c++) {
        if beyond(row[c], limit) {
            return c;
        }
    }
    return 4u;
}

// The first class of the logit row starting at `base` beyond MAX_LOGIT, or C.
fn first_beyond_logit(which: u32, base: u32) -> u32 {
    let limit = bitcast<u32>(MAX_LOGIT);
    for (var c = 0u; c < params.num_classes; c++) {
        if beyond(logit(which, base + c), limit) {
            return c;
        }
    }
    return params.num_classes;
}

// The first of the five values of the targets row at `o` that is not finite, or 5.
fn first_beyond_target(o: u32) -> u32 {
    for (var c = 0u; c < 5u; c++) {
        if beyond(targets[o + c], FINITE_BITS) {
            return c;
        }
    }
    return 5u;
}

// A finite targets row passes core's `check_object`: padding (label < 0), or an integer
// label in 0..=C-2, a box with xmax > xmin and ymax > ymin, corners within [0, 1] ±
// BOX_TOLERANCE.
fn object_ok(o: u32) -> bool {
    let label = targets[o + 4u];
    if label < 0.0 {
        return true;
    }
    if label != trunc(label) || label > f32(params.num_classes - 2u) {
        return false;
    }
    let corners = vec4<f32>(targets[o], targets[o + 1u], targets[o + 2u], targets[o + 3u]);
    if !(corners.z > corners.x && corners.w > corners.y) {
        return false;
    }
    return all(corners >= vec4<f32>(-BOX_TOLERANCE)) && all(corners <= vec4<f32>(1.0 + BOX_TOLERANCE));
}

fn key_of(check: u32, row: u32) -> u32 {
    return (check << ROW_BITS) | row;
}

// A thread per row of every image of the chunk (max(P, M) rows): the row's first finding
// of each of its tensors, in the scan's order, kept per slot.
@compute @workgroup_size(WORKGROUP_SIZE)
fn validate_rows(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = max(params.num_priors, params.num_objects);
    let index = thread_index(workgroup, num_workgroups, lid);
    if index >= params.num_images * rows {
        return;
    }
    let image = index / rows;
    let row = index % rows;
    let batch_image = params.first_image + image;
    if batch_image == 0u && row < params.num_priors {
        let prior = priors[row];
        var key = NO_KEY;
        if first_beyond4(prior, FINITE_BITS) < 4u {
            key = key_of(CHECK_PRIOR_VALUE, row);
        } else if !(prior.z >= MIN_PRIOR_SIZE && prior.w >= MIN_PRIOR_SIZE) {
            key = key_of(CHECK_PRIOR_SIZE, row);
        }
        if key != NO_KEY {
            atomicMax(&image_findings[0], ~key);
        }
    }
    var key = NO_KEY;
    if row < params.num_priors {
        let p = image * params.num_priors + row;
        let conf = params.conf_base + p * params.num_classes;
        let offset = bitcast<u32>(MAX_OFFSET);
        if first_beyond4(student_loc[params.loc_base + p], offset) < 4u {
            key = key_of(CHECK_STUDENT_LOC, row);
        } else if first_beyond_logit(STUDENT, conf) < params.num_classes {
            key = key_of(CHECK_STUDENT_CONF, row);
        } else if first_beyond4(teacher_loc[params.loc_base + p], offset) < 4u {
            key = key_of(CHECK_TEACHER_LOC, row);
        } else if first_beyond_logit(TEACHER, conf) < params.num_classes {
            key = key_of(CHECK_TEACHER_CONF, row);
        }
    }
    if key == NO_KEY && row < params.num_objects {
        let o = params.target_base + (image * params.num_objects + row) * 5u;
        if first_beyond_target(o) < 5u {
            key = key_of(CHECK_TARGET_VALUE, row);
        } else if !object_ok(o) {
            key = key_of(CHECK_TARGET_ROW, row);
        }
    }
    if key != NO_KEY {
        atomicMax(&image_findings[batch_image + 1u], ~key);
    }
}

var<workgroup> first_slot: atomic<u32>;

// One workgroup per chunk, after every chunk's `validate_rows`: the first chunk finds the
// first slot with a finding and records its check and row; the chunk that holds its row
// (the first for priors) records the column and values; each chunk then clears its
// slots for the next evaluation.
@compute @workgroup_size(WORKGROUP_SIZE)
fn validate_report(@builtin(local_invocation_index) lid: u32) {
    let first = params.first_image;
    if first == 0u {
        if lid == 0u {
            atomicStore(&first_slot, NO_KEY);
        }
        workgroupBarrier();
        for (var s = lid; s <= params.batch_images; s += WORKGROUP_SIZE) {
            if atomicLoad(&image_findings[s]) != 0u {
                atomicMin(&first_slot, s);
                break;
            }
        }
        workgroupBarrier();
        if lid == 0u {
            let slot = atomicLoad(&first_slot);
            finding.found = select(0u, 1u, slot != NO_KEY);
            if slot != NO_KEY {
                let key = ~atomicLoad(&image_findings[slot]);
                finding.slot = slot;
                finding.check = key >> ROW_BITS;
                finding.row = key & ((1u << ROW_BITS) - 1u);
            }
        }
    }
    storageBarrier();
    if lid == 0u && finding.found != 0u {
        let slot = finding.slot;
        let row = finding.row;
        let check = finding.check;
        // The slot's image within this chunk (priors: the first chunk).
        let image = max(slot, 1u) - 1u - first;
        let held = select(image < params.num_images, first == 0u, slot == 0u);
        if held {
            var column = 0u;
            var corners = vec4<f32>(0.0);
            var value = 0.0;
            let p = image * params.num_priors + row;
            if check == CHECK_PRIOR_VALUE || check == CHECK_PRIOR_SIZE {
                corners = priors[row];
                if check == CHECK_PRIOR_VALUE {
                    column = first_beyond4(corners, FINITE_BITS);
                }
                value = corners[column];
            } else if check == CHECK_STUDENT_LOC || check == CHECK_TEACHER_LOC {
                corners = select(student_loc[params.loc_base + p], teacher_loc[params.loc_base + p], check == CHECK_TEACHER_LOC);
                column = first_beyond4(corners, bitcast<u32>(MAX_OFFSET));
                value = corners[column];
            } else if check == CHECK_STUDENT_CONF || check == CHECK_TEACHER_CONF {
                let which = select(STUDENT, TEACHER, check == CHECK_TEACHER_CONF);
                let base = params.conf_base + p * params.num_classes;
                column = first_beyond_logit(which, base);
                value = logit(which, base + column);
            } else {
                let o = params.target_base + (image * params.num_objects + row) * 5u;
                corners = vec4<f32>(targets[o], targets[o + 1u], targets[o + 2u], targets[o + 3u]);
                column = 4u;
                if check == CHECK_TARGET_VALUE {
                    column = first_beyond_target(o);
                }
                value = targets[o + column];
            }
            finding.column = column;
            finding.value = value;
            finding.corners = corners;
        }
    }
    workgroupBarrier();
    // Clear this chunk's slots (and the priors' in the first chunk) for the next run.
    for (var i = lid; i <= params.num_images; i += WORKGROUP_SIZE) {
        if i < params.num_images {
            atomicStore(&image_findings[first + i + 1u], 0u);
        } else if first == 0u {
            atomicStore(&image_findings[0], 0u);
        }
    }
}
