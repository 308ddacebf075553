//! The per-user pipeline cache on disk: where an adapter's file is, and how it is replaced
//! (the cache itself is made and read by `engine.rs`).

/// The per-user pipeline cache file of an adapter: `$XDG_CACHE_HOME/ssdkd/<key>` or
/// `~/.cache/ssdkd/<key>`, the key from `wgpu::util::pipeline_cache_key` (`None` where wgpu
/// has no cache for the backend, or no cache directory is known).
pub(crate) fn pipeline_cache_file(info: &wgpu::AdapterInfo) -> Option<std::path::PathBuf> {
    let key = wgpu::util::pipeline_cache_key(info)?;
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))?;
    Some(base.join("ssdkd").join(key))
}

/// Writes the pipeline cache (a temporary file renamed over the old one, so that a
/// concurrent process reads a whole file or none). Failures are ignored: the cache only
/// saves time.
pub(crate) fn store_pipeline_cache(file: &std::path::Path, data: &[u8]) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let temporary = file.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&temporary, data).is_ok() && std::fs::rename(&temporary, file).is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
}
