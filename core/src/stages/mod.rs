//! The five stages of the loss, **match → prior terms → mine → reduce → grad**, each a
//! module of one function per GPU kernel, after the **validate** stage that scans the
//! inputs on the GPU where the host does not. Every kernel is a WGSL entry point of the same
//! name in `shaders/<stage>.wgsl` and a function of that name here, written with the
//! same loop (a loop over priors for a thread per prior, over images or object rows for a
//! workgroup each), so that the two can be read side by side. [`KERNELS`] lists them in
//! pipeline order; the host's kernel table has a row of the same name and stage for each,
//! with its launch shape and loop budget (a test there checks both against the shaders'
//! entry points and workgroup sizes). The constants the kernels share with Rust
//! ([`WORKGROUP_SIZE`] and those of each stage's module) are held equal to their WGSL
//! declarations by `tests/tests/shared_constants.rs`.
//!
//! Each formula is one function here, which the twins' loops call; the CPU backend's fast
//! path (`host/src/cpu/`) calls the same functions on its lane blocks or on exponentials
//! it took in vectorised loops. Where a CPU twin differs from its kernel, and why:
//! - `match_priors`: also gathers each object's best prior (`BestPrior` in `match.rs`), one
//!   pass over the P × M overlaps where the GPU needs `match_objects`' second one.
//! - `match_objects`: reads those best priors instead of searching the priors again
//!   (a rescan only when a best overlap rose within the tie band).
//! - `match_finish`, `prior_terms`: the kernel's loop; the CPU takes each row's maximum
//!   and sum itself where the GPU reads them from `logits.wgsl`'s pass.
//! - `mine`: k from the image's `num_pos` as in the kernel, the k-th key by a selection
//!   (`select_nth_unstable`) where the GPU runs a radix select; the same key, as keys are
//!   distinct.
//! - `reduce_rows`: the same soft term in f64 (f32 on the GPU; SPEC §7 bounds the gap).
//! - `reduce_image`, `reduce_batch`: f64 sums in prior, then image order where the GPU
//!   adds f32 by a fixed pairwise tree.
//! - `grad_conf`: the kernel's algorithm ([`grad::conf_grad`]) in f64, rounded once.
//! - `grad_loc`: tests the teacher bound again from `teacher_loc` (the same f32
//!   operations) where the GPU reads `prior_loss`, so that a backward pass needs only the
//!   forward's decisions.
//! - `validate_rows`, `validate_report`: the kernels' checks row by row and their report,
//!   which the GPU runs only where the host does not scan the values (the host scans them
//!   with [`crate::validate`], whose rules these share).

pub mod grad;
#[path = "match.rs"]
pub mod r#match;
pub mod mine;
pub mod prior_terms;
pub mod reduce;
pub mod validate;

/// A stage of the pipeline: one WGSL file `shaders/<name>.wgsl`, one module here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// SPEC §1.3, §8.3 (the accepted ranges), [`validate`].
    Validate,
    /// SPEC §3, the `match` module.
    Match,
    /// SPEC §4–5 per prior, [`prior_terms`].
    PriorTerms,
    /// SPEC §4, [`mine`].
    Mine,
    /// SPEC §5, [`reduce`].
    Reduce,
    /// SPEC §6, [`grad`].
    Grad,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 6] = [
        Stage::Validate,
        Stage::Match,
        Stage::PriorTerms,
        Stage::Mine,
        Stage::Reduce,
        Stage::Grad,
    ];

    /// The name of its WGSL file, its module and its debug labels (`"ssdkd.<name>"`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Validate => "validate",
            Stage::Match => "match",
            Stage::PriorTerms => "prior_terms",
            Stage::Mine => "mine",
            Stage::Reduce => "reduce",
            Stage::Grad => "grad",
        }
    }
}

/// Threads per workgroup of every kernel (`WORKGROUP_SIZE` in `shaders/shared.wgsl`): the
/// stride of a workgroup's loops over priors or images, the width of its pairwise trees,
/// and the priors a workgroup of a thread-per-prior launch covers.
pub const WORKGROUP_SIZE: u32 = 256;

/// Bits of the digit that `mine`'s radix select fixes per round (`RADIX_BITS` in
/// `shaders/mine.wgsl`; SPEC §4): a round per digit of the 64-bit rank key. The CPU twin
/// selects with `select_nth_unstable` instead; the host's loop budget counts the rounds.
pub const RADIX_BITS: u32 = 8;

/// Buckets of a radix round's histogram, `2^RADIX_BITS` (`RADIX` in `shaders/mine.wgsl`).
pub const RADIX: u32 = 1 << RADIX_BITS;

/// Every kernel as `(stage, entry point)`, in pipeline order: the WGSL entry point and the
/// function of the same name in the stage's module.
pub const KERNELS: &[(Stage, &str)] = &[
    (Stage::Validate, "validate_rows"),
    (Stage::Validate, "validate_report"),
    (Stage::Match, "match_priors"),
    (Stage::Match, "match_objects"),
    (Stage::Match, "match_finish"),
    (Stage::PriorTerms, "prior_terms"),
    (Stage::Mine, "mine"),
    (Stage::Reduce, "reduce_rows"),
    (Stage::Reduce, "reduce_image"),
    (Stage::Reduce, "reduce_batch"),
    (Stage::Grad, "grad_conf"),
    (Stage::Grad, "grad_loc"),
];
