//! Written by the example agent; the crate agent does not edit this file.
//!
//! distill_shapes: the Rust twin of examples/distill_shapes.py (work in progress).

fn main() {}
