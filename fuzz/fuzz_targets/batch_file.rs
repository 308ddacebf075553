//! Fuzzes the batch-file reader and validation: any bytes must give a batch or a typed
//! error, never a panic; a batch that validates must evaluate (forward and backward).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssdkd::io::file::{BatchFile, ConfigOverrides};
use ssdkd::Request;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    let Ok(file) = BatchFile::from_bytes(data, path, &ConfigOverrides::default()) else {
        return;
    };
    let batch = file.batch();
    let s = batch.shape();
    // Keep each run cheap: evaluate small batches only (reading and validation run always).
    let small = s.batch * s.priors * (s.classes + s.objects) <= 1 << 16;
    if batch.check(&file.config, true).is_ok() && small {
        let _ = ssdkd::cpu::evaluate(&batch, &file.config, Request::with_gradients());
    }
});
