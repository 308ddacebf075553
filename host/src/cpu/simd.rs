//! Vectorised kernels of the CPU fast path, compiled for AVX-512, AVX2+FMA and NEON and
//! chosen at run time by [`multiversion`](mod@multiversion) (scalar baseline otherwise).
//! Each is a flat loop over a contiguous block that the compiler vectorises at the selected
//! width: no intrinsics, no horizontal work inside a row.
//!
//! Every formula here is the core's, inlined into the loop: the exponentials and the
//! logarithm ([`exp_f32`], `exp_f64`, [`ln_f32`] and, through the soft terms,
//! `ln_f64`), the overlaps ([`Overlap::of_rows`]), the match decisions
//! ([`Overlap::beats`], [`Overlap::ties_with`], [`Overlap::reaches`]: the core's
//! `match_priors` a block of priors at a time, `prior_words_block`) and the soft term's
//! summands ([`add_soft_terms`]), so the same bits as the core's scalar calls. The
//! logarithm over a block of sums ([`score_estimates_block`]) feeds only the bounds of
//! `fast.rs`; no value it returns reaches a loss or a gradient.

use multiversion::multiversion;
use ssdkd_core::boxes::Overlap;
use ssdkd_core::math::{exp_f32, ln_f32, Lanes, LANES};
use ssdkd_core::stages::prior_terms::{shifted_exp_f64, SoftmaxF64};
use ssdkd_core::stages::r#match::POSITIVE;
use ssdkd_core::stages::reduce::add_soft_terms;
use ssdkd_core::LossConfig;

/// The smallest row sum [`score_estimates_block`] takes a logarithm of: e⁻⁶⁰. Below it
/// the exponentials it flushes to 0 (each < e⁻⁸⁷) could matter, so the row gets no bound.
const MIN_SUM: f32 = 8.7e-27;

/// The estimate of each row's mining score (the cross-entropy against class 0, unshifted):
/// `out[i] = ln Σ_c e^(row[c]) − row[0] = ln Σ_c e^(row[c] − row[0])` for each row of the
/// row-major `rows` (`C` classes, `out.len()` rows), through the flat buffer `flat` (at
/// least `rows.len()` long): the exponentials of all the rows' logits in one flat pass,
/// then each row's sum (in any order: it only bounds), one vectorised logarithm over the
/// sums, and the first logit off. A row whose sum overflows or falls below e⁻⁶⁰ gets NaN
/// (no bound). Returns the largest `|x|` of the block (by the bits of `|x|`, an integer
/// maximum that vectorises; NaN counts as larger than +∞).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn score_estimates_block(
    rows: &[f32],
    classes: usize,
    flat: &mut [f32],
    out: &mut [f32],
) -> f32 {
    let flat = &mut flat[..rows.len()];
    let mut abs_max_bits = 0_u32;
    for (v, &x) in flat.iter_mut().zip(rows) {
        *v = exp_f32(x);
        abs_max_bits = abs_max_bits.max(x.to_bits() & 0x7fff_ffff);
    }
    for (o, row) in out.iter_mut().zip(flat.chunks_exact(classes)) {
        // Four partial sums: independent chains instead of one long one.
        let mut acc = [0.0_f32; 4];
        let mut quads = row.chunks_exact(4);
        for quad in &mut quads {
            for (a, &v) in acc.iter_mut().zip(quad) {
                *a += v;
            }
        }
        let tail: f32 = quads.remainder().iter().sum();
        *o = (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail;
    }
    // The logarithms over the contiguous sums (vectorised), then the strided first logits.
    for o in out.iter_mut() {
        let sum = *o;
        *o = if sum >= MIN_SUM {
            ln_f32(sum)
        } else {
            f32::NAN
        };
    }
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(classes)) {
        *o -= row[0];
    }
    f32::from_bits(abs_max_bits)
}

/// The overlaps (`inter`, `union`) of the corner box `truth` (`[xmin, ymin, xmax, ymax]`,
/// area `truth_area`) with a block of priors given as columns `[x0, y0, x1, y1, area]`,
/// by the core's [`Overlap::of_rows`] lane by lane; one flat pass over the block.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn overlaps_block(
    truth: [f32; 4],
    truth_area: f32,
    priors: [&[f32]; 5],
    inter: &mut [f32],
    union: &mut [f32],
) {
    let [x0, y0, x1, y1, area] = priors;
    let len = inter.len();
    let (x0, y0, x1, y1, area) = (&x0[..len], &y0[..len], &x1[..len], &y1[..len], &area[..len]);
    let union = &mut union[..len];
    for i in 0..len {
        let prior = [x0[i], y0[i], x1[i], y1[i]];
        let overlap = Overlap::of_rows(truth, truth_area, prior, area[i]);
        inter[i] = overlap.inter;
        union[i] = overlap.union;
    }
}

/// Steps 1 and 4 of the match (SPEC §3) for a block of `words.len()` priors:
/// `prior_words_block` on the columns `inter`/`union` (object `m`'s overlaps with the
/// block from `m · stride`, its `targets` row `rows[m]`), compiled for the vector width.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
#[allow(clippy::too_many_arguments)] // the block's columns in and out
pub fn best_objects_block(
    inter: &[f32],
    union: &[f32],
    stride: usize,
    rows: &[u32],
    threshold: f32,
    best_inter: &mut [f32],
    best_union: &mut [f32],
    words: &mut [u32],
) {
    let len = words.len();
    prior_words_block(
        rows.len(),
        |m| rows[m],
        |m| (&inter[m * stride..][..len], &union[m * stride..][..len]),
        threshold,
        best_inter,
        best_union,
        words,
    );
}

/// The core's `match_priors` decisions for a block of `words.len()` priors, lane by lane:
/// `overlaps(m)` gives object `m`'s overlaps with the block as columns
/// `(intersections, unions)` (objects in row order, `row(m)` its `targets` row, at least
/// one object). Each prior's maximum is object 0's overlap replaced by every later one that
/// [`Overlap::beats`] it; its word is the row of the lowest object that
/// [`Overlap::ties_with`] that maximum (object 0's when none does: only NaN input, which
/// validation rejects), with the core's `POSITIVE` when the maximum [`Overlap::reaches`]
/// `threshold`: the core's loops over the objects, each turned into a loop over the block
/// (the lowest tied object by writing from the last object down), written as selects so
/// that they vectorise. `best_inter`, `best_union` are scratch of the block's length.
#[inline(always)]
// Index loops over the columns: the same loops over `iter_mut().enumerate()` of `words`
// measured about three times slower here (not vectorised).
#[allow(clippy::needless_range_loop)]
fn prior_words_block<'a>(
    objects: usize,
    row: impl Fn(usize) -> u32,
    overlaps: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    threshold: f32,
    best_inter: &mut [f32],
    best_union: &mut [f32],
    words: &mut [u32],
) {
    let len = words.len();
    let (best_inter, best_union) = (&mut best_inter[..len], &mut best_union[..len]);
    let (inter, union) = overlaps(0);
    best_inter.copy_from_slice(&inter[..len]);
    best_union.copy_from_slice(&union[..len]);
    for m in 1..objects {
        let (inter, union) = overlaps(m);
        let (inter, union) = (&inter[..len], &union[..len]);
        for i in 0..len {
            let (current, best) = (
                overlap_at(inter, union, i),
                overlap_at(best_inter, best_union, i),
            );
            let beats = current.beats(best);
            best_inter[i] = if beats { current.inter } else { best.inter };
            best_union[i] = if beats { current.union } else { best.union };
        }
    }
    words.fill(row(0));
    // From the last object down, so that the lowest tied one is written last.
    for m in (0..objects).rev() {
        let (inter, union) = overlaps(m);
        let (inter, union) = (&inter[..len], &union[..len]);
        let row = row(m);
        for i in 0..len {
            let (current, best) = (
                overlap_at(inter, union, i),
                overlap_at(best_inter, best_union, i),
            );
            words[i] = if current.ties_with(best) {
                row
            } else {
                words[i]
            };
        }
    }
    for i in 0..len {
        words[i] |= if overlap_at(best_inter, best_union, i).reaches(threshold) {
            POSITIVE
        } else {
            0
        };
    }
}

/// Lane `i` of columns of overlaps.
#[inline(always)]
pub fn overlap_at(inter: &[f32], union: &[f32], i: usize) -> Overlap {
    Overlap {
        inter: inter[i],
        union: union[i],
    }
}

/// The first of a block's overlaps (`inter[i]`, `union[i]`) that [`Overlap::beats`]
/// `best`, or `inter.len()` when none does. Before it, visiting the block changes no
/// object's best prior (the core's `BestPrior::visit` past prior 0), so
/// those visits can be skipped. A minimum over the lanes, no early exit, so that the loop
/// vectorises.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn first_beating(inter: &[f32], union: &[f32], best: Overlap) -> usize {
    let len = inter.len();
    let union = &union[..len];
    let mut first = len as u32;
    for (i, (&inter, &union)) in inter.iter().zip(union).enumerate() {
        let beats = Overlap { inter, union }.beats(best);
        first = first.min(if beats { i as u32 } else { u32::MAX });
    }
    first as usize
}

/// f32 lanes per chunk of [`row_exps_f32`]: a whole AVX-512 vector.
pub const LANES_F32: usize = 16;

/// The exponentials of a selected row's two softmaxes: with `out` split in two halves of
/// `padded` (a multiple of [`LANES`], at least C), the first half's `out[c]` = the
/// core's [`shifted_exp_f64`]`(student[c], max_s, scale)` and the second half's
/// `shifted_exp_f64(teacher[c], max_t, scale)` for `c < classes`; the padding's values are
/// left unspecified (finite or not) and must not be read. `student` and `teacher` start at
/// the row and may run on into the next rows: whole chunks are then read in place, the
/// padding lanes from the next row ([`row_chunks`]). The core's branch-free exponential
/// inlined, so the same bits as its scalar calls, [`LANES`] at a time.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn softmax_exps(
    student: &[f32],
    max_s: f32,
    teacher: &[f32],
    max_t: f32,
    classes: usize,
    scale: f64,
    out: &mut [f64],
) {
    let half = out.len() / 2;
    let (s_out, t_out) = out.split_at_mut(half);
    row_chunks::<LANES, f64>(student, classes, max_s, s_out, |x| {
        shifted_exp_f64(x, max_s, scale)
    });
    row_chunks::<LANES, f64>(teacher, classes, max_t, t_out, |x| {
        shifted_exp_f64(x, max_t, scale)
    });
}

/// `out[c]` = the core's [`exp_f32`]`(row[c] · 1 − max)` for `c < classes`, the exponentials
/// of the core's `cross_entropy`, and 0 on the padding up to `out.len()` (a
/// multiple of [`LANES_F32`]), so that a sum over all of `out` is the sum over the row.
/// `values` starts at the row and may run on into the next rows, as for [`softmax_exps`].
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn row_exps_f32(values: &[f32], classes: usize, max: f32, out: &mut [f32]) {
    row_chunks::<LANES_F32, f32>(values, classes, max, out, |x| exp_f32(x * 1.0 - max));
    for v in &mut out[classes..] {
        *v = 0.0;
    }
}

/// `out[c] = f(values[c])` chunk by chunk of `N` over `out` (its length a multiple of `N`):
/// when `values` reaches as far as `out`, each chunk is read in place, whole (a vector load
/// straight from the tensor, padding lanes from the next row: no store of the arguments
/// first, which a vector load could not take whole from the store buffer); otherwise (the
/// tensor's last row) from a copy completed with `pad`. Inlined into the kernels above.
#[inline(always)]
fn row_chunks<const N: usize, T: Copy>(
    values: &[f32],
    classes: usize,
    pad: f32,
    out: &mut [T],
    f: impl Fn(f32) -> T,
) {
    let padded = out.len();
    if values.len() >= padded {
        for (xs, out) in values[..padded]
            .chunks_exact(N)
            .zip(out.chunks_exact_mut(N))
        {
            let xs: &[f32; N] = xs.try_into().expect("a chunk of N");
            let out: &mut [T; N] = out.try_into().expect("a chunk of N");
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = f(x);
            }
        }
    } else {
        for (k, out) in out.chunks_exact_mut(N).enumerate() {
            let mut xs = [pad; N];
            let start = (k * N).min(classes);
            let rest = &values[start..classes.min(start + N)];
            xs[..rest.len()].copy_from_slice(rest);
            for (o, &x) in out.iter_mut().zip(&xs) {
                *o = f(x);
            }
        }
    }
}

/// The [`Lanes`] sum of a row's soft-term summands: the core's [`add_soft_terms`] over the
/// row's `classes` exponentials in `p` and `q` (each padded to a multiple of [`LANES`]),
/// turned into the probabilities in place, compiled for the vector width (its branch-free
/// f64 logarithm inlined).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn soft_terms<'a>(
    config: &LossConfig,
    student: &SoftmaxF64<'a>,
    teacher: &SoftmaxF64<'a>,
    classes: usize,
    p: &mut [f64],
    q: &mut [f64],
) -> Lanes<f64> {
    let mut sum = Lanes::new();
    add_soft_terms(config, student, teacher, 0, classes, p, q, &mut sum);
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The margin of `fast.rs` takes the core's `ln_f32` over the sums of
    /// [`score_estimates_block`] (at least [`MIN_SUM`]) to an absolute error below
    /// 1e-6 + 1e-7·|ln x|.
    #[test]
    fn ln_f32_is_within_the_margins_bound() {
        let mut x = MIN_SUM;
        let mut count = 0;
        while x < 1e30 {
            let want = f64::from(x).ln();
            let got = f64::from(ln_f32(x));
            assert!(
                (got - want).abs() <= 1e-6 + 1e-7 * want.abs(),
                "ln({x}) = {got}, want {want}"
            );
            x *= 1.000_37;
            count += 1;
        }
        assert!(count > 100_000);
    }

    /// The block kernel against the f64 definition, C = 2, 21, 81, 1000.
    #[test]
    fn the_block_kernel_matches_f64() {
        for classes in [1, 2, 21, 81, 1000] {
            let rows = 37;
            let logits: Vec<f32> = (0..rows * classes)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 12.0)
                .collect();
            let mut flat = vec![0.0; logits.len()];
            let mut out = vec![0.0; rows];
            let max_abs = score_estimates_block(&logits, classes, &mut flat, &mut out);
            let want_max = logits.iter().fold(0.0_f32, |m, &x| m.max(x.abs()));
            assert_eq!(max_abs, want_max);
            for (r, row) in logits.chunks_exact(classes).enumerate() {
                let want = row
                    .iter()
                    .map(|&x| (f64::from(x) - f64::from(row[0])).exp())
                    .sum::<f64>()
                    .ln();
                assert!((f64::from(out[r]) - want).abs() < 2e-6 * (1.0 + want.abs()));
            }
            // Sums out of range: no bound.
            for (value, _) in [(-100.0_f32, "below e^-60"), (100.0, "overflow")] {
                let logits = vec![value; 3 * classes];
                let max_abs = score_estimates_block(&logits, classes, &mut flat, &mut out[..3]);
                assert_eq!(max_abs, value.abs());
                assert!(out[..3].iter().all(|v| !v.is_finite()), "{value}: {out:?}");
            }
        }
    }
    /// The selected rows' kernels give the core's exponentials on the row's classes,
    /// whether they read whole chunks in place (the row runs on into the next) or from a
    /// padded copy (the tensor's last row), for C below, at and above a chunk.
    #[test]
    fn row_kernels_read_in_place_or_from_a_copy_alike() {
        for classes in [2, 7, 8, 9, 16, 21, 81] {
            let values: Vec<f32> = (0..3 * classes)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 12.0)
                .collect();
            let row = &values[..classes];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let padded = classes.next_multiple_of(LANES);
            for from in [&values[..], row] {
                let mut out = vec![0.0; 2 * padded];
                softmax_exps(from, max, from, max - 0.5, classes, 0.5, &mut out);
                for c in 0..classes {
                    let want_s = shifted_exp_f64(row[c], max, 0.5);
                    let want_t = shifted_exp_f64(row[c], max - 0.5, 0.5);
                    assert_eq!(out[c].to_bits(), want_s.to_bits(), "C = {classes}, c = {c}");
                    assert_eq!(out[padded + c].to_bits(), want_t.to_bits());
                }
                let mut out = vec![1.0; classes.next_multiple_of(LANES_F32)];
                row_exps_f32(from, classes, max, &mut out);
                for c in 0..classes {
                    assert_eq!(out[c].to_bits(), exp_f32(row[c] * 1.0 - max).to_bits());
                }
                assert!(out[classes..].iter().all(|&v| v == 0.0), "C = {classes}");
            }
        }
    }
}
