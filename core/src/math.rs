//! Every float function the core uses, routed in one place (glam's `f32/math.rs` habit):
//! through `std` when the `std` feature is on, through `libm` otherwise. Call sites never choose.

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
    /// `e^x` in f64 (the selected rows' soft terms and gradients).
    #[inline(always)]
    pub fn exp_f64(x: f64) -> f64 {
        x.exp()
    }
    /// Natural logarithm in f64.
    #[inline(always)]
    pub fn ln_f64(x: f64) -> f64 {
        x.ln()
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
    /// `e^x` in f64 (the selected rows' soft terms and gradients).
    #[inline(always)]
    pub fn exp_f64(x: f64) -> f64 {
        libm::exp(x)
    }
    /// Natural logarithm in f64.
    #[inline(always)]
    pub fn ln_f64(x: f64) -> f64 {
        libm::log(x)
    }
    /// Integer part, rounding toward zero.
    #[inline(always)]
    pub fn trunc(x: f32) -> f32 {
        libm::truncf(x)
    }
}

pub use imp::{exp, exp_f64, ln, ln_f64, sqrt_f64, trunc};
