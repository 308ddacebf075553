//! Reading and writing files, in layers that import only downwards: `fs` (file kinds,
//! opening regular files only) and `json` (the duplicate-key check) at the bottom;
//! [`input`] (bounded safetensors reading), [`output`] (atomic writing) and [`config_keys`]
//! (SPEC §8's `config` keys) on them; [`mod@file`] (batch and gradient files) on top. The
//! public four are reached through this module (`ssdkd::io::file`, …), not the crate root.

pub mod config_keys;
pub mod file;
pub(crate) mod fs;
pub mod input;
pub(crate) mod json;
pub mod output;
