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
