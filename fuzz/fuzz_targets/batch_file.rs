//! Fuzzes the batch-file reader and validation: any bytes must give a batch or a typed
//! error, never a panic; a batch that validates must evaluate (forward and backward).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssdkd::file::{BatchFile, ConfigOverrides};
use ssdkd::Request;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = BatchFile::from_bytes(data, Path::new("fuzz.safetensors"), &ConfigOverrides::default()) else {
        return;
    };
    let Ok(batch) = file.batch() else {
        return;
    };
    let s = batch.shape;
    // Keep each run cheap: evaluate small batches only (reading and validation run always).
    if batch.check(&file.config, true).is_ok() && s.batch * s.priors * (s.classes + s.objects) <= 1 << 16 {
        let _ = ssdkd::cpu::evaluate(&batch, &file.config, Request::with_gradients());
    }
});
