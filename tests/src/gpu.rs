//! The GPU backend for the integration tests, skipped loudly where there is no adapter.

use ssdkd::gpu::GpuBackend;
use ssdkd::Error;

/// The GPU backend, or `None` when no adapter is found: then the test prints
/// "skipped: no GPU adapter" and returns, unless `SSDKD_REQUIRE_GPU=1` (set in CI, which
/// installs lavapipe), where it fails instead.
///
/// # Panics
/// Without an adapter when `SSDKD_REQUIRE_GPU=1`, or on any other GPU failure.
#[must_use]
pub fn backend(test: &str) -> Option<GpuBackend> {
    match GpuBackend::new() {
        Ok(gpu) => {
            eprintln!("{test}: GPU adapter {}", gpu.adapter_name());
            Some(gpu)
        }
        Err(Error::NoAdapter(why)) => {
            if std::env::var("SSDKD_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: no GPU adapter ({why}) and SSDKD_REQUIRE_GPU=1");
            }
            eprintln!("==================================================================");
            eprintln!("{test}: skipped: no GPU adapter ({why})");
            eprintln!("==================================================================");
            None
        }
        Err(e) => panic!("{test}: the GPU backend failed to start: {e}"),
    }
}
