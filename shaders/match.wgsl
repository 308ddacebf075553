// Stage **match** (SPEC §3): each prior's matched object, its label and encoded offsets.
// Twin of core/src/stages/match.rs. One workgroup per image.
//
// Objects are named by their row in `targets` (padding rows skipped wherever they stand);
// the CPU numbers the real objects 0..n instead, which orders them the same way, so
// "lowest index wins" takes the same decisions.

@group(0) @binding(1) var<storage, read> targets: array<f32>;
@group(0) @binding(2) var<storage, read> priors: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> conf_target: array<u32>;
@group(0) @binding(4) var<storage, read_write> loc_target: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> image_sums: array<Sums>;

// Relative tolerance under which two overlaps count as tied (SPEC §3); core/src/boxes.rs.
const TIE_TOLERANCE: f32 = 1e-5;
// Flag kept in `conf_target` between the passes: the prior is positive.
const POSITIVE: u32 = 0x80000000u;
const NONE: u32 = 0xffffffffu;

// The Jaccard overlap as (intersection, union): decisions use products, never quotients.
struct Overlap {
    inter: f32,
    union_: f32,
}

struct Corners {
    min: vec2<f32>,
    max: vec2<f32>,
}

fn area(b: Corners) -> f32 {
    let d = max(b.max - b.min, vec2<f32>(0.0));
    return d.x * d.y;
}

fn overlap_of(a: Corners, b: Corners) -> Overlap {
    let d = max(min(a.max, b.max) - max(a.min, b.min), vec2<f32>(0.0));
    let inter = d.x * d.y;
    return Overlap(inter, area(a) + area(b) - inter);
}

// Strictly larger than `other`.
fn beats(a: Overlap, other: Overlap) -> bool {
    return a.inter * other.union_ > other.inter * a.union_;
}

// Counts as tied with the maximum `best`: iou >= best_iou * (1 - 1e-5).
fn ties_with(a: Overlap, best: Overlap) -> bool {
    return a.inter * best.union_ >= (1.0 - TIE_TOLERANCE) * best.inter * a.union_;
}

// At or above `threshold`: inter >= threshold * union.
fn reaches(a: Overlap, threshold: f32) -> bool {
    return a.inter >= threshold * a.union_;
}

fn prior_corners(p: u32) -> Corners {
    let prior = priors[p];
    let half = prior.zw * 0.5;
    return Corners(prior.xy - half, prior.xy + half);
}

fn target_offset(image: u32, row: u32) -> u32 {
    return params.target_base + (image * params.num_objects + row) * 5u;
}

fn is_object(image: u32, row: u32) -> bool {
    return targets[target_offset(image, row) + 4u] >= 0.0;
}

fn truth(image: u32, row: u32) -> Corners {
    let o = target_offset(image, row);
    return Corners(vec2<f32>(targets[o], targets[o + 1u]), vec2<f32>(targets[o + 2u], targets[o + 3u]));
}

// (xmin, ymin, xmax, ymax) against a prior in centre form, with variance (v0, v1).
fn encode(t: Corners, prior: vec4<f32>) -> vec4<f32> {
    let center = (t.min + t.max) * 0.5;
    let size = t.max - t.min;
    let c = (center - prior.xy) / (params.variance0 * prior.zw);
    let s = size / prior.zw;
    return vec4<f32>(c, log(s) / params.variance1);
}

var<workgroup> first_object: u32;
var<workgroup> object_row_real: u32;
var<workgroup> best_inter: array<f32, WORKGROUP_SIZE>;
var<workgroup> best_union: array<f32, WORKGROUP_SIZE>;
var<workgroup> tied_prior: atomic<u32>;
var<workgroup> num_pos: atomic<u32>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn match_image(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let image = workgroup_index(workgroup, num_workgroups);
    if image >= params.num_images {
        return;
    }
    let num_priors = params.num_priors;
    let num_objects = params.num_objects;
    let prior_base = params.prior_base + image * num_priors;
    let loc_base = params.loc_base + image * num_priors;

    if lid == 0u {
        var first = NONE;
        for (var m = 0u; m < num_objects; m++) {
            if is_object(image, m) {
                first = m;
                break;
            }
        }
        first_object = first;
        atomicStore(&num_pos, 0u);
    }
    let first = workgroupUniformLoad(&first_object);
    if first == NONE {
        // No objects: every prior is background with zero offsets.
        for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
            conf_target[prior_base + p] = 0u;
            loc_target[loc_base + p] = vec4<f32>(0.0);
        }
        if lid == 0u {
            image_sums[params.first_image + image].num_pos = 0u;
        }
        return;
    }

    // Steps 1 and 4: the best object of each prior (lowest tied row), and whether the
    // maximum reaches the threshold.
    for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
        let prior_box = prior_corners(p);
        var best = overlap_of(truth(image, first), prior_box);
        for (var m = first + 1u; m < num_objects; m++) {
            if is_object(image, m) {
                let overlap = overlap_of(truth(image, m), prior_box);
                if beats(overlap, best) {
                    best = overlap;
                }
            }
        }
        var best_object = first;
        for (var m = first; m < num_objects; m++) {
            if is_object(image, m) && ties_with(overlap_of(truth(image, m), prior_box), best) {
                best_object = m;
                break;
            }
        }
        conf_target[prior_base + p] = best_object | select(0u, POSITIVE, reaches(best, params.overlap_threshold));
    }
    storageBarrier();

    // Steps 2 and 3: the best prior of each object (lowest tied index), forced onto that
    // object in object order so that a later object wins a prior two objects both want.
    for (var m = first; m < num_objects; m++) {
        if lid == 0u {
            object_row_real = u32(is_object(image, m));
            atomicStore(&tied_prior, NONE);
        }
        if workgroupUniformLoad(&object_row_real) == 0u {
            continue;
        }
        let object = truth(image, m);
        // The object's best overlap: per-thread maxima, then a fixed pairwise tree.
        var best = Overlap(0.0, 1.0);
        for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
            let overlap = overlap_of(object, prior_corners(p));
            if p == lid || beats(overlap, best) {
                best = overlap;
            }
        }
        best_inter[lid] = best.inter;
        best_union[lid] = best.union_;
        for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride /= 2u) {
            workgroupBarrier();
            if lid < stride {
                let other = Overlap(best_inter[lid + stride], best_union[lid + stride]);
                if beats(other, Overlap(best_inter[lid], best_union[lid])) {
                    best_inter[lid] = other.inter;
                    best_union[lid] = other.union_;
                }
            }
        }
        workgroupBarrier();
        let object_best = Overlap(best_inter[0], best_union[0]);
        // The lowest prior tied with it (an integer minimum: the same whatever the order).
        for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
            if ties_with(overlap_of(object, prior_corners(p)), object_best) {
                atomicMin(&tied_prior, p);
                break;
            }
        }
        workgroupBarrier();
        if lid == 0u {
            var best_prior = atomicLoad(&tied_prior);
            if best_prior == NONE {
                best_prior = 0u; // only NaN input (rejected by validation) finds no tie
            }
            conf_target[prior_base + best_prior] = m | POSITIVE;
        }
        // Everyone has read best_inter[0] before the next object overwrites it.
        workgroupBarrier();
    }
    storageBarrier();

    // Steps 4 and 5: labels and offsets.
    for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
        let word = conf_target[prior_base + p];
        let row = word & ~POSITIVE;
        loc_target[loc_base + p] = encode(truth(image, row), priors[p]);
        if (word & POSITIVE) != 0u {
            atomicAdd(&num_pos, 1u);
            conf_target[prior_base + p] = u32(targets[target_offset(image, row) + 4u]) + 1u;
        } else {
            conf_target[prior_base + p] = 0u;
        }
    }
    workgroupBarrier();
    if lid == 0u {
        image_sums[params.first_image + image].num_pos = atomicLoad(&num_pos);
    }
}
