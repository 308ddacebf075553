// Stage **mine** (SPEC §4): hard-negative mining by selection. Twin of
// core/src/stages/mine.rs. One workgroup per image: a radix select (8 bits a pass) over
// the 64-bit rank keys `ordered_bits(score) << 32 | !index` finds the k-th largest key,
// then every prior whose key is at least that one is marked. No sort.

@group(0) @binding(10) var<storage, read> mining_score: array<f32>;
@group(0) @binding(13) var<storage, read_write> image_sums: array<Sums>;
@group(0) @binding(9) var<storage, read_write> neg_mask: array<u32>;

const RADIX_BITS: u32 = 8u;
const RADIX: u32 = 256u;

// An f32 as a u32 whose unsigned order is the float's total order (0 and −0 alike).
fn ordered_bits(x: f32) -> u32 {
    if x == 0.0 {
        return 0x80000000u;
    }
    let bits = bitcast<u32>(x);
    if (bits & 0x80000000u) != 0u {
        return ~bits;
    }
    return bits | 0x80000000u;
}

// k = min(negpos_ratio · num_pos, P − 1), or negatives_for_hard when that is 0; at most P.
fn num_negatives(num_pos: u32, num_priors: u32) -> u32 {
    var k = params.negpos_ratio * num_pos;
    if num_pos != 0u && params.negpos_ratio > 0xffffffffu / num_pos {
        k = 0xffffffffu; // saturating, as on the CPU
    }
    k = min(k, max(num_priors, 1u) - 1u);
    if k == 0u {
        k = params.negatives_for_hard;
    }
    return min(k, num_priors);
}

var<workgroup> histogram: array<atomic<u32>, RADIX>;
var<workgroup> shared_k: u32;
// The digits of the k-th largest key found so far, and which bits they cover.
var<workgroup> prefix: vec2<u32>;
var<workgroup> prefix_mask: vec2<u32>;
// Rank still wanted inside the keys that match `prefix` (1 = the largest).
var<workgroup> wanted: u32;

@compute @workgroup_size(WORKGROUP_SIZE)
fn mine(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let image = workgroup_index(workgroup, num_workgroups);
    if image >= params.num_images {
        return;
    }
    let num_priors = params.num_priors;
    let base = params.prior_base + image * num_priors;
    let sums_index = params.first_image + image;

    if lid == 0u {
        let k = num_negatives(image_sums[sums_index].num_pos, num_priors);
        image_sums[sums_index].num_neg = k;
        shared_k = k;
        prefix = vec2<u32>(0u);
        prefix_mask = vec2<u32>(0u);
        wanted = k;
    }
    let k = workgroupUniformLoad(&shared_k);
    if k == 0u {
        for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
            neg_mask[base + p] = 0u;
        }
        return;
    }

    // Rounds 0..3 fix the score bits (high word), rounds 4..7 the index bits (low word).
    for (var round = 0u; round < 8u; round++) {
        for (var b = lid; b < RADIX; b += WORKGROUP_SIZE) {
            atomicStore(&histogram[b], 0u);
        }
        workgroupBarrier();
        let word = round / 4u;
        let shift = (3u - round % 4u) * RADIX_BITS;
        let fixed = prefix;
        let mask = prefix_mask;
        for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
            let key = vec2<u32>(ordered_bits(mining_score[base + p]), ~p);
            if all((key & mask) == fixed) {
                atomicAdd(&histogram[(key[word] >> shift) & (RADIX - 1u)], 1u);
            }
        }
        workgroupBarrier();
        if lid == 0u {
            // The digit whose bucket holds the wanted rank, counting from the largest.
            var above = 0u;
            var digit = 0u;
            for (var d = RADIX; d > 0u; d--) {
                let count = atomicLoad(&histogram[d - 1u]);
                if above + count >= wanted {
                    digit = d - 1u;
                    break;
                }
                above += count;
            }
            wanted -= above;
            prefix[word] |= digit << shift;
            prefix_mask[word] |= (RADIX - 1u) << shift;
        }
        workgroupBarrier();
    }

    // Keys are distinct, so exactly k priors have a key at least the k-th largest.
    let kth = workgroupUniformLoad(&prefix);
    for (var p = lid; p < num_priors; p += WORKGROUP_SIZE) {
        let hi = ordered_bits(mining_score[base + p]);
        let lo = ~p;
        let selected = hi > kth.x || (hi == kth.x && lo >= kth.y);
        neg_mask[base + p] = u32(selected);
    }
}
