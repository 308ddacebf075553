//! Every float function the core uses, routed in one place (glam's `f32/math.rs` habit):
//! through `std` when the `std` feature is on, through `libm` otherwise. Call sites never choose.
//!
//! Except the f64 exponential and logarithm of the selected rows' soft terms and
//! gradients ([`exp_f64`], [`ln_f64`]): those are written out here, branch-free, from
//! `+`, `−`, `×`, `÷` and bit moves alone, so that every build (std or libm, any CPU) and
//! the host's vectorised loops that inline them (`host/src/cpu/simd.rs`) get the same
//! bits, which neither `std` (the platform's libm) nor `libm` promises.

#[cfg(feature = "std")]
mod imp {
    /// `e^x`.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        x.exp()
    }
    /// Natural logarithm.
    #[inline(always)]
    pub fn ln(x: f32) -> f32 {
        x.ln()
    }
    /// Square root in f64 (prior generation).
    #[inline(always)]
    pub fn sqrt_f64(x: f64) -> f64 {
        x.sqrt()
    }
    /// Integer part, rounding toward zero.
    #[inline(always)]
    pub fn trunc(x: f32) -> f32 {
        x.trunc()
    }
}

#[cfg(not(feature = "std"))]
mod imp {
    /// `e^x`.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        libm::expf(x)
    }
    /// Natural logarithm.
    #[inline(always)]
    pub fn ln(x: f32) -> f32 {
        libm::logf(x)
    }
    /// Square root in f64 (prior generation).
    #[inline(always)]
    pub fn sqrt_f64(x: f64) -> f64 {
        libm::sqrt(x)
    }
    /// Integer part, rounding toward zero.
    #[inline(always)]
    pub fn trunc(x: f32) -> f32 {
        libm::truncf(x)
    }
}

pub use imp::{exp, ln, sqrt_f64, trunc};

/// 1.5 · 2²³: adding it rounds an f32 of magnitude below 2²² to an integer, which its low
/// mantissa bits then hold.
const ROUND_MAGIC_F32: f32 = 12_582_912.0;
/// ln 2 split so that `n · LN2_HI_F32` is exact for |n| ≤ 2⁸ (Cody–Waite).
const LN2_HI_F32: f32 = 0.693_359_4;
const LN2_LO_F32: f32 = -2.121_944_4e-4;

/// `e^x` in f32, within 2 ulp of the exact value for normal results (tests below), from
/// Cody–Waite reduction and Cephes' `expf` polynomial on |r| ≤ ln 2 / 2. Overflows to +∞
/// above about 88.72, reaches 0 below about −103.9; NaN stays NaN. Branch-free, so that a
/// loop of it vectorises: the cross-entropy's ([`crate::stages::prior_terms::cross_entropy`])
/// and the host's vectorised bound and exact rows take it, with the same bits.
#[inline(always)]
#[must_use]
pub fn exp_f32(x: f32) -> f32 {
    let c = x.clamp(-104.0, 89.0);
    let t = c * core::f32::consts::LOG2_E + ROUND_MAGIC_F32;
    let n = t - ROUND_MAGIC_F32;
    let r = c - n * LN2_HI_F32 - n * LN2_LO_F32;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let poly = p * (r * r) + r + 1.0;
    // 2ⁿ as two powers of two, each a normal number for n in [−151, 129].
    let n_int = t.to_bits().wrapping_sub(ROUND_MAGIC_F32.to_bits()) as i32;
    let half = n_int >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    poly * pow2(half) * pow2(n_int - half)
}

/// Bits of 1/√2 in f32.
const SQRT_HALF_BITS_F32: u32 = 0x3f35_04f3;

/// `ln x` in f32 for finite normal `x > 0`, within 2 ulp of the exact value rounded to f32
/// (tests below), from `x = 2ᵉ m`, m in [1/√2, √2), and `ln m = 2 atanh z`,
/// `z = (m − 1)/(m + 1)`, by its series to z¹¹ (|z| ≤ 0.172): [`ln_f64`]'s algorithm in
/// f32, with [`exp_f32`]'s split ln 2. +∞ and NaN pass through; zero, negatives and subnormals are
/// not in its domain. Branch-free, so that a loop of it vectorises: the host's bounds on
/// the mining scores take it over a block of row sums.
#[inline(always)]
#[must_use]
pub fn ln_f32(x: f32) -> f32 {
    let shifted = x.to_bits().wrapping_sub(SQRT_HALF_BITS_F32);
    let e = (shifted as i32) >> 23;
    let m = f32::from_bits((shifted & 0x007f_ffff).wrapping_add(SQRT_HALF_BITS_F32));
    let z = (m - 1.0) / (m + 1.0);
    let z2 = z * z;
    // Σ_{k≥1} z^(2k−2) / (2k + 1), 1/11 down to 1/3.
    let mut s = 1.0 / 11.0_f32;
    s = s * z2 + 1.0 / 9.0;
    s = s * z2 + 1.0 / 7.0;
    s = s * z2 + 1.0 / 5.0;
    s = s * z2 + 1.0 / 3.0;
    let ln_m = 2.0 * z + 2.0 * z * z2 * s;
    let y = e as f32 * LN2_HI_F32 + (ln_m + e as f32 * LN2_LO_F32);
    if x < f32::INFINITY {
        y
    } else {
        x // +∞ or NaN
    }
}

/// A sum in [`LANES`] interleaved lanes: element `i` goes into lane `i mod LANES`, each lane
/// in element order, and the lanes are combined pairwise. The fixed order of the longer
/// sums of a row here (the log-sum-exps, the soft terms), the same whether a caller adds
/// one element at a time ([`Lanes::add`]) or a whole chunk ([`Lanes::add_chunk`], the
/// host's vectorised loops): the same bits either way.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lanes<T>([T; LANES]);

/// The lanes of a [`Lanes`] sum.
pub const LANES: usize = 8;

impl<T: Copy + Default + core::ops::Add<Output = T>> Lanes<T> {
    /// No elements yet: every lane `+0`.
    #[must_use]
    pub fn new() -> Self {
        Self([T::default(); LANES])
    }

    /// Adds element `i` (counting from the first element of the sum).
    #[inline(always)]
    pub fn add(&mut self, i: usize, value: T) {
        self.0[i % LANES] = self.0[i % LANES] + value;
    }

    /// Adds elements `i .. i + LANES` for `i` a multiple of [`LANES`].
    #[inline(always)]
    pub fn add_chunk(&mut self, values: &[T; LANES]) {
        for (lane, &value) in self.0.iter_mut().zip(values) {
            *lane = *lane + value;
        }
    }

    /// Adds `values` as elements `0, 1, …` (chunk by chunk).
    #[inline(always)]
    pub fn add_all(&mut self, values: &[T]) {
        let mut chunks = values.chunks_exact(LANES);
        for chunk in &mut chunks {
            self.add_chunk(chunk.try_into().expect("a chunk of LANES"));
        }
        let done = values.len() - chunks.remainder().len();
        for (i, &value) in chunks.remainder().iter().enumerate() {
            self.add(done + i, value);
        }
    }

    /// `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
    #[inline(always)]
    #[must_use]
    pub fn total(&self) -> T {
        let l = self.0;
        ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
    }
}

/// 1.5 · 2⁵²: adding it rounds an f64 of magnitude below 2⁵¹ to an integer, which its low
/// mantissa bits then hold.
const ROUND_MAGIC_F64: f64 = 6_755_399_441_055_744.0;
/// ln 2 split so that `n · LN2_HI_F64` is exact for |n| < 2²⁰ (fdlibm's constants).
const LN2_HI_F64: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO_F64: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

/// `e^x` in f64, within 2 ulp of the exact value for normal results (tests below), from
/// Cody–Waite reduction `x = n ln 2 + r`, |r| ≤ ln 2 / 2, and the Taylor polynomial of
/// `e^r` to degree 13 (truncation below 2⁻⁵⁵). Overflows to +∞ above about 709.78,
/// reaches 0 below about −745.1 (subnormal results are rounded twice); NaN stays NaN.
/// Branch-free, so that a loop of it vectorises.
#[inline(always)]
#[must_use]
pub fn exp_f64(x: f64) -> f64 {
    let c = x.clamp(-746.0, 710.0);
    let t = c * core::f64::consts::LOG2_E + ROUND_MAGIC_F64;
    let n = t - ROUND_MAGIC_F64;
    let r = (c - n * LN2_HI_F64) - n * LN2_LO_F64;
    // Σ_{k≥2} r^(k−2) / k! by Horner, 1/13! down to 1/2!.
    let mut p = 1.0 / 6_227_020_800.0;
    p = p * r + 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    let poly = 1.0 + (r + r * r * p);
    // 2ⁿ as two powers of two, each a normal number for n in [−1076, 1025].
    let n_int = t.to_bits().wrapping_sub(ROUND_MAGIC_F64.to_bits()) as i64;
    let half = n_int >> 1;
    let pow2 = |e: i64| f64::from_bits(((e + 1023) as u64) << 52);
    poly * pow2(half) * pow2(n_int - half)
}

/// Bits of 1/√2.
const SQRT_HALF_BITS: u64 = 0x3fe6_a09e_667f_3bcd;
/// 2⁵⁴, the scale that makes a subnormal normal.
const TWO_54: f64 = 18_014_398_509_481_984.0;

/// `ln x` in f64, within 2 ulp of the exact value (tests below), from `x = 2ᵉ m`,
/// m in [1/√2, √2), and `ln m = 2 atanh z`, `z = (m − 1)/(m + 1)`, by its series to z²³
/// (|z| ≤ 0.172, truncation below 2⁻⁵⁸). −∞ at ±0, NaN below 0 and for NaN, +∞ at +∞;
/// subnormals are scaled first. Branch-free, so that a loop of it vectorises.
#[inline(always)]
#[must_use]
pub fn ln_f64(x: f64) -> f64 {
    let tiny = x < f64::MIN_POSITIVE;
    let scaled = if tiny { x * TWO_54 } else { x };
    let shifted = scaled.to_bits().wrapping_sub(SQRT_HALF_BITS);
    let e = ((shifted as i64) >> 52) - if tiny { 54 } else { 0 };
    let m = f64::from_bits((shifted & 0x000f_ffff_ffff_ffff).wrapping_add(SQRT_HALF_BITS));
    let z = (m - 1.0) / (m + 1.0);
    let z2 = z * z;
    // Σ_{k≥1} z^(2k−2) / (2k + 1), 1/23 down to 1/3.
    let mut s = 1.0 / 23.0;
    s = s * z2 + 1.0 / 21.0;
    s = s * z2 + 1.0 / 19.0;
    s = s * z2 + 1.0 / 17.0;
    s = s * z2 + 1.0 / 15.0;
    s = s * z2 + 1.0 / 13.0;
    s = s * z2 + 1.0 / 11.0;
    s = s * z2 + 1.0 / 9.0;
    s = s * z2 + 1.0 / 7.0;
    s = s * z2 + 1.0 / 5.0;
    s = s * z2 + 1.0 / 3.0;
    let ln_m = 2.0 * z + 2.0 * z * (z2 * s);
    let e = e as f64;
    let y = e * LN2_HI_F64 + (ln_m + e * LN2_LO_F64);
    let y = if x == 0.0 { f64::NEG_INFINITY } else { y };
    let y = if x < 0.0 || x.is_nan() { f64::NAN } else { y };
    if x == f64::INFINITY {
        x
    } else {
        y
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::{exp_f32, exp_f64, ln_f32, ln_f64, Lanes};

    /// Within 2 ulp of the f64 exponential rounded to f32 over a dense grid of [−87, 88]
    /// (normal results), and its edges.
    #[test]
    fn exp_f32_is_within_two_ulp() {
        let steps = 4_000_000;
        let mut worst = 0;
        for i in 0..=steps {
            let x = -87.0 + 175.0 * (i as f32 / steps as f32);
            let want = f64::from(x).exp() as f32;
            let got = exp_f32(x);
            worst = worst.max((got.to_bits() as i32 - want.to_bits() as i32).unsigned_abs());
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(88.8), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(-104.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.7) > 3.3e38 && exp_f32(88.7).is_finite());
        let (got, want) = (exp_f32(-95.0), (-95.0_f64).exp() as f32);
        assert!(
            (got - want).abs() <= 2.0 * f32::from_bits(1),
            "{got} vs {want}"
        );
    }

    /// Within 2 ulp of the f64 logarithm rounded to f32 over [1e-37, 3e38] (geometric
    /// grid) and near 1, with its edges.
    #[test]
    fn ln_f32_is_within_two_ulp() {
        let ulps = |x: f32| {
            let (got, want) = (ln_f32(x), f64::from(x).ln() as f32);
            if want == 0.0 {
                assert_eq!(got, 0.0);
                return 0;
            }
            (got.to_bits() as i32 - want.to_bits() as i32).unsigned_abs()
        };
        let mut worst = 0;
        let mut x = 1e-37_f32;
        while x < 3e38 {
            worst = worst.max(ulps(x));
            x *= 1.000_37;
        }
        for i in 1..=1_000_000 {
            worst = worst.max(ulps(0.5 + i as f32 * 1e-6));
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(ln_f32(1.0), 0.0);
        assert_eq!(ln_f32(f32::INFINITY), f32::INFINITY);
        assert!(ln_f32(f32::NAN).is_nan());
    }

    /// Element by element or chunk by chunk, the same lanes and the same total.
    #[test]
    fn lanes_add_the_same_in_every_grouping() {
        let values: Vec<f32> = (0..37).map(|i| 1.0 / (1.0 + i as f32 * 0.37)).collect();
        let mut one = Lanes::new();
        for (i, &v) in values.iter().enumerate() {
            one.add(i, v);
        }
        let mut all = Lanes::new();
        all.add_all(&values);
        assert_eq!(one.total().to_bits(), all.total().to_bits());
        let want: f64 = values.iter().map(|&v| f64::from(v)).sum();
        assert!((f64::from(one.total()) - want).abs() < 1e-5);
        assert_eq!(Lanes::<f64>::new().total(), 0.0);
    }

    /// Ulps between two finite f64 of the same sign.
    fn ulps(a: f64, b: f64) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    /// Within 2 ulp of the platform's `exp` (itself correctly rounded or nearly) over a
    /// dense grid of [−708, 709.7] (normal results), and its edges.
    #[test]
    fn exp_f64_is_within_two_ulp() {
        let steps = 2_000_000;
        let mut worst = 0;
        for i in 0..=steps {
            let x = -708.0 + 1417.7 * (i as f64 / steps as f64);
            worst = worst.max(ulps(exp_f64(x), x.exp()));
        }
        // Near 0, where the arguments of the soft terms gather.
        for i in 0..=steps {
            let x = -20.0 + 20.0 * (i as f64 / steps as f64);
            worst = worst.max(ulps(exp_f64(x), x.exp()));
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(-0.0), 1.0);
        assert_eq!(exp_f64(709.8), f64::INFINITY);
        assert_eq!(exp_f64(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp_f64(-746.0), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert!(exp_f64(f64::NAN).is_nan());
        // A subnormal result, near the platform's.
        let (got, want) = (exp_f64(-720.0), (-720.0_f64).exp());
        assert!(
            (got - want).abs() <= 2.0 * f64::from_bits(1),
            "{got} vs {want}"
        );
    }

    /// Within 2 ulp of the platform's `ln` over [1e-300, 1e300] (geometric grid), near 1,
    /// for subnormals, and at the edges.
    #[test]
    fn ln_f64_is_within_two_ulp() {
        let mut worst = 0;
        let mut x = 1e-300;
        while x < 1e300 {
            worst = worst.max(ulps(ln_f64(x), x.ln()));
            x *= 1.000_3;
        }
        for i in 1..=1_000_000 {
            let x = 0.5 + i as f64 * 1e-6; // (0.5, 1.5]: ln near 0, relative accuracy
            let (got, want) = (ln_f64(x), x.ln());
            if want != 0.0 {
                worst = worst.max(ulps(got, want));
            } else {
                assert_eq!(got, 0.0);
            }
        }
        assert!(worst <= 2, "worst {worst} ulp");
        for x in [f64::from_bits(1), 1e-310, f64::MIN_POSITIVE / 3.0] {
            assert!(ulps(ln_f64(x), x.ln()) <= 2, "{x}");
        }
        assert_eq!(ln_f64(1.0), 0.0);
        assert_eq!(ln_f64(0.0), f64::NEG_INFINITY);
        assert_eq!(ln_f64(-0.0), f64::NEG_INFINITY);
        assert!(ln_f64(-1.0).is_nan());
        assert!(ln_f64(f64::NAN).is_nan());
        assert_eq!(ln_f64(f64::INFINITY), f64::INFINITY);
        assert_eq!(ln_f64(f64::MAX), f64::MAX.ln());
    }
}
