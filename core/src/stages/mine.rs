//! Stage **mine** (SPEC §4): hard-negative mining by selection, expected O(P) per image.
//! Twin of `shaders/mine.wgsl`.

use crate::config::LossConfig;

/// k, the number of ranks selected in an image with `num_pos` positives among
/// `num_priors` priors: `min(negpos_ratio · num_pos, P − 1)`, or `negatives_for_hard` when
/// that is 0 — never more than P.
#[must_use]
pub fn num_negatives(num_pos: u32, num_priors: u32, config: &LossConfig) -> u32 {
    let k = config
        .negpos_ratio
        .saturating_mul(num_pos)
        .min(num_priors.saturating_sub(1));
    let k = if k == 0 { config.negatives_for_hard } else { k };
    k.min(num_priors)
}

/// Maps an f32 to a u32 whose unsigned order is the float's order, 0 and −0 alike (both
/// map to `0x8000_0000`), as `ordered_bits` in `mine.wgsl`.
#[must_use]
pub fn ordered_bits(x: f32) -> u32 {
    if x == 0.0 {
        return 0x8000_0000;
    }
    let bits = x.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The ranking key of prior `index` with mining score `score`: a larger key ranks first;
/// equal scores rank by lower prior index (SPEC §4). Keys of one image are all distinct.
#[must_use]
pub fn rank_key(score: f32, index: u32) -> u64 {
    (u64::from(ordered_bits(score)) << 32) | u64::from(!index)
}

/// The `k`-th largest of `keys` ([`rank_key`]s, `1 ≤ k ≤ keys.len()`), found by selection
/// (`select_nth_unstable`), not a sort: expected O(len). The keys are reordered. Since the
/// keys of an image are distinct, the result does not depend on the selection algorithm.
///
/// # Panics
/// If `k` is 0 or over `keys.len()`.
#[must_use]
pub fn kth_key(keys: &mut [u64], k: usize) -> u64 {
    let (_, kth, _) = keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    *kth
}

/// The stage for one image (`mine` in `mine.wgsl`, a workgroup per image): k from the
/// image's `num_pos` ([`num_negatives`]), then marks in `neg_mask` (1 = selected) the `k`
/// priors of highest `mining_score`, ranking over all priors with ties to the lower index,
/// and returns how many were marked (`min(k, P)`, the image's `num_neg`). `keys` is caller
/// scratch of P entries. Expected O(P) ([`kth_key`]).
///
/// # Panics
/// If the slices' lengths differ.
pub fn mine(
    mining_score: &[f32],
    num_pos: u32,
    config: &LossConfig,
    keys: &mut [u64],
    neg_mask: &mut [u8],
) -> u32 {
    let num_priors = mining_score.len();
    assert_eq!(keys.len(), num_priors);
    assert_eq!(neg_mask.len(), num_priors);
    let k = num_negatives(num_pos, num_priors as u32, config) as usize;
    if k == 0 {
        neg_mask.fill(0);
        return 0;
    }
    for (p, (key, &score)) in keys.iter_mut().zip(mining_score).enumerate() {
        *key = rank_key(score, p as u32);
    }
    let kth = kth_key(keys, k);
    for (p, (mask, &score)) in neg_mask.iter_mut().zip(mining_score).enumerate() {
        *mask = u8::from(rank_key(score, p as u32) >= kth);
    }
    k as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ordered_bits` orders like the floats and maps 0 and −0 to one key, as `mine.wgsl`.
    #[test]
    fn ordered_bits_orders_like_the_floats_and_merges_the_zeros() {
        assert_eq!(ordered_bits(0.0), 0x8000_0000);
        assert_eq!(ordered_bits(-0.0), 0x8000_0000);
        let values = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for pair in values.windows(2) {
            if pair[0] < pair[1] {
                assert!(ordered_bits(pair[0]) < ordered_bits(pair[1]), "{pair:?}");
            }
        }
    }
}
