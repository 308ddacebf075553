// Stage **match** (SPEC §3): each prior's matched object, its label and encoded offsets.
// Twin of core/src/stages/match.rs, in three kernels so that no invocation loops over more
// than M objects or P / WORKGROUP_SIZE priors (a long-running workgroup is slow on a GPU,
// and lavapipe silently cuts loops that run too long):
// - `match_priors`, a thread per prior: steps 1 and 4, its best object and the threshold;
// - `match_objects`, a workgroup per (image, object row): step 2, the object's best prior,
//   forced with an atomic maximum so that the later object wins (step 3) in any order;
// - `match_finish`, a workgroup per image: step 5's labels and offsets, and num_pos.
//
// Objects are named by their row in `targets` (padding rows skipped wherever they stand),
// on both sides; the flag words below are the CPU's `POSITIVE`, `FORCED` and `ROW`.

@group(0) @binding(5) var<storage, read> targets: array<f32>;
@group(0) @binding(6) var<storage, read> priors: array<vec4<f32>>;
// Atomic so that `match_objects` can force priors with atomicMax; plain loads and stores
// elsewhere.
@group(0) @binding(7) var<storage, read_write> conf_target: array<atomic<u32>>;
@group(0) @binding(8) var<storage, read_write> loc_target: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> image_sums: array<Sums>;

// Relative tolerance under which two overlaps count as tied (SPEC §3); core/src/boxes.rs.
const TIE_TOLERANCE: f32 = 1e-5;
// Flags kept in `conf_target` between the kernels: the prior is positive; the prior is some
// object's best prior (the largest forcing row wins, as the later object does in step 3).
const POSITIVE: u32 = 0x40000000u;
const FORCED: u32 = 0x80000000u;
const ROW: u32 = 0x3fffffffu;
const NONE: u32 = 0xffffffffu;

// The Jaccard overlap as (intersection, union): decisions use products, never quotients.
// This and the box helpers below are the core's (core/src/boxes.rs `Overlap`, `CornerBox`,
// `encode`), a method there being a function of the same name here (`Overlap::of` is
// `overlap_of`).
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

// Twin of the core's `prior_corners` (core/src/stages/match.rs).
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

// The first real object row of `image`, or NONE.
fn first_object(image: u32) -> u32 {
    for (var m = 0u; m < params.num_objects; m++) {
        if is_object(image, m) {
            return m;
        }
    }
    return NONE;
}

// Steps 1 and 4: the best object of each prior (lowest tied row), and whether the maximum
// reaches the threshold. An image without objects gets 0 (background). Twin of the core's
// `match_priors`, loop by loop (the core walks its gathered real objects where this skips
// the padding rows from `first_object`).
@compute @workgroup_size(WORKGROUP_SIZE)
fn match_priors(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let index = thread_index(workgroup, num_workgroups, lid);
    if index >= params.num_images * params.num_priors {
        return;
    }
    let image = index / params.num_priors;
    let p = index % params.num_priors;
    let first = first_object(image);
    if first == NONE {
        atomicStore(&conf_target[params.prior_base + index], 0u);
        return;
    }
    let prior_box = prior_corners(p);
    var best = overlap_of(truth(image, first), prior_box);
    for (var m = first + 1u; m < params.num_objects; m++) {
        if is_object(image, m) {
            let overlap = overlap_of(truth(image, m), prior_box);
            if beats(overlap, best) {
                best = overlap;
            }
        }
    }
    var best_object = first;
    for (var m = first; m < params.num_objects; m++) {
        if is_object(image, m) && ties_with(overlap_of(truth(image, m), prior_box), best) {
            best_object = m;
            break;
        }
    }
    let word = best_object | select(0u, POSITIVE, reaches(best, params.overlap_threshold));
    atomicStore(&conf_target[params.prior_base + index], word);
}

var<workgroup> best_inter: array<f32, WORKGROUP_SIZE>;
var<workgroup> best_union: array<f32, WORKGROUP_SIZE>;
var<workgroup> tied_prior: atomic<u32>;
var<workgroup> num_pos: atomic<u32>;

// Steps 2 and 3: the best prior of one object row (lowest tied index), forced onto it. The
// atomic maximum keeps the largest forcing row, so a later object wins a prior two objects
// both want, whatever order the workgroups run in.
@compute @workgroup_size(WORKGROUP_SIZE)
fn match_objects(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let index = workgroup_index(workgroup, num_workgroups);
    if index >= params.num_images * params.num_objects {
        return;
    }
    let image = index / params.num_objects;
    let m = index % params.num_objects;
    if !is_object(image, m) {
        return;
    }
    if lid == 0u {
        atomicStore(&tied_prior, NONE);
    }
    let object = truth(image, m);
    // The object's best overlap: per-thread maxima, then a fixed pairwise tree.
    var best = Overlap(0.0, 1.0);
    for (var p = lid; p < params.num_priors; p += WORKGROUP_SIZE) {
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
    for (var p = lid; p < params.num_priors; p += WORKGROUP_SIZE) {
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
        atomicMax(&conf_target[params.prior_base + image * params.num_priors + best_prior], FORCED | m);
    }
}

// Step 5 and the labels: offsets of every prior against its object, labels of the
// positives (forced or over the threshold), and the image's positive count.
@compute @workgroup_size(WORKGROUP_SIZE)
fn match_finish(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let image = workgroup_index(workgroup, num_workgroups);
    if image >= params.num_images {
        return;
    }
    if lid == 0u {
        atomicStore(&num_pos, 0u);
    }
    workgroupBarrier();
    let prior_base = params.prior_base + image * params.num_priors;
    let loc_base = params.loc_base + image * params.num_priors;
    let has_objects = first_object(image) != NONE;
    for (var p = lid; p < params.num_priors; p += WORKGROUP_SIZE) {
        if !has_objects {
            loc_target[loc_base + p] = vec4<f32>(0.0);
            atomicStore(&conf_target[prior_base + p], 0u);
            continue;
        }
        let word = atomicLoad(&conf_target[prior_base + p]);
        let row = word & ROW;
        loc_target[loc_base + p] = encode(truth(image, row), priors[p]);
        if (word & (POSITIVE | FORCED)) != 0u {
            atomicAdd(&num_pos, 1u);
            atomicStore(&conf_target[prior_base + p], u32(targets[target_offset(image, row) + 4u]) + 1u);
        } else {
            atomicStore(&conf_target[prior_base + p], 0u);
        }
    }
    workgroupBarrier();
    if lid == 0u {
        image_sums[params.first_image + image].num_pos = atomicLoad(&num_pos);
    }
}
