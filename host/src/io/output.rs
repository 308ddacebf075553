//! Output files that cannot destroy anything (`eval --grad-out`, `priors --out`, and any
//! file the library writes for a caller).
//!
//! - The target is checked before anything is written: an existing target that is not a
//!   regular file (a device, FIFO, socket or directory) is refused, and so is a target that
//!   is the same file as one of the command's inputs (by device and inode, after resolving
//!   symbolic links, so hard links count too).
//! - A symbolic link is followed: the file it points to (which may not exist yet) is the
//!   target, and the link stays.
//! - The file is written to a temporary file in the target's folder, flushed to disk
//!   (`fsync`) and renamed over the target, and the folder is flushed too: a failure leaves
//!   the old file as it was and no temporary file behind.
//! - A new file gets mode 0666 less the umask, as `open(O_CREAT, 0666)` would give it
//!   (0644 under umask 022); a replaced file keeps its permission bits.

use super::fs::file_kind;
use crate::error::{Error, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The most symbolic links followed from an output path (Linux's own limit).
const MAX_LINKS: usize = 40;

/// An output path that passed the checks: where it resolves to and what is there now.
#[derive(Debug)]
pub struct OutputTarget {
    /// The path as given.
    requested: PathBuf,
    /// The path after following symbolic links: the file that is replaced.
    resolved: PathBuf,
    /// The permission bits of the file there now, if one exists.
    #[cfg(unix)]
    existing_mode: Option<u32>,
}

/// Follows `path` through symbolic links to the file it names (which need not exist).
fn resolve_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut current = path.to_owned();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&current) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&current)?;
                current = match current.parent() {
                    Some(parent) if link.is_relative() => parent.join(link),
                    _ => link,
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "more than {MAX_LINKS} levels of symbolic links"
    )))
}

/// The same file: device and inode where the platform has them, else canonical paths.
fn same_file(a: &std::fs::Metadata, a_path: &Path, b: &std::fs::Metadata, b_path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let _ = (a_path, b_path);
        a.dev() == b.dev() && a.ino() == b.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (a, b);
        matches!(
            (a_path.canonicalize(), b_path.canonicalize()),
            (Ok(x), Ok(y)) if x == y
        )
    }
}

/// Checks that `path` may be written without destroying anything: what it resolves to
/// (through symbolic links) is absent or a regular file, and is none of `inputs`.
///
/// # Errors
/// [`Error::File`] naming the path and why it is refused; [`Error::Io`] when its type
/// cannot be read.
pub fn check_target(path: &Path, inputs: &[&Path]) -> Result<OutputTarget> {
    let refuse = |problem: String| Error::File {
        path: path.to_owned(),
        problem,
    };
    let io = |source: std::io::Error| Error::Io {
        path: path.to_owned(),
        source,
    };
    let resolved = resolve_links(path).map_err(io)?;
    let via = if resolved == path {
        String::new()
    } else {
        format!(" (a link to {})", resolved.display())
    };
    let existing = match std::fs::metadata(&resolved) {
        Ok(metadata) => Some(metadata),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    let Some(existing) = existing else {
        return Ok(OutputTarget {
            requested: path.to_owned(),
            resolved,
            #[cfg(unix)]
            existing_mode: None,
        });
    };
    if !existing.is_file() {
        return Err(refuse(format!(
            "output{via} is {}, not a regular file; refusing to replace it",
            file_kind(existing.file_type())
        )));
    }
    for input in inputs {
        // An input that cannot be read cannot be overwritten through this path either.
        if let Ok(input_metadata) = std::fs::metadata(input) {
            if same_file(&existing, &resolved, &input_metadata, input) {
                return Err(refuse(format!(
                    "output{via} is the same file as the input {}; refusing to overwrite it",
                    input.display()
                )));
            }
        }
    }
    #[cfg(unix)]
    let existing_mode = {
        use std::os::unix::fs::PermissionsExt;
        Some(existing.permissions().mode() & 0o777)
    };
    Ok(OutputTarget {
        requested: path.to_owned(),
        resolved,
        #[cfg(unix)]
        existing_mode,
    })
}

impl OutputTarget {
    /// The file that will be replaced (the path with symbolic links followed).
    #[must_use]
    pub fn resolved(&self) -> &Path {
        &self.resolved
    }

    /// Writes the file with `write` and replaces the target with it, atomically; on any
    /// failure (of `write` included) the target is left as it was and no temporary file
    /// remains.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path; [`Error::File`] when the target was replaced by a
    /// file that is not regular since it was checked.
    pub fn write(&self, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
        let io = |source: std::io::Error| Error::Io {
            path: self.requested.clone(),
            source,
        };
        let folder = match self.resolved.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let name = self
            .resolved
            .file_name()
            .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
        let prefix = format!(".{name}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".tmp");
        #[cfg(unix)]
        let permissions = {
            use std::os::unix::fs::PermissionsExt;
            // Created with 0666: the kernel applies the umask, as for any new file.
            builder.permissions(std::fs::Permissions::from_mode(0o666));
            self.existing_mode.map(std::fs::Permissions::from_mode)
        };
        let temp = builder.tempfile_in(folder).map_err(io)?;
        #[cfg(unix)]
        if let Some(permissions) = permissions {
            temp.as_file().set_permissions(permissions).map_err(io)?;
        }
        {
            let mut writer = std::io::BufWriter::with_capacity(1 << 20, temp.as_file());
            write(&mut writer).map_err(io)?;
            writer.flush().map_err(io)?;
        }
        temp.as_file().sync_all().map_err(io)?;
        // Checked again just before the rename: a device or FIFO put there meanwhile stays.
        if let Ok(now) = std::fs::symlink_metadata(&self.resolved) {
            if !now.is_file() {
                return Err(Error::File {
                    path: self.requested.clone(),
                    problem: format!(
                        "output became {}, not a regular file; refusing to replace it",
                        file_kind(now.file_type())
                    ),
                });
            }
        }
        temp.persist(&self.resolved).map_err(|e| io(e.error))?;
        // The rename is durable once the folder is; not every platform can open one.
        if let Ok(dir) = std::fs::File::open(folder) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Checks `path` against `inputs` ([`check_target`]) and writes it with `write`
/// ([`OutputTarget::write`]).
///
/// # Errors
/// As [`check_target`] and [`OutputTarget::write`].
pub fn write_file(
    path: &Path,
    inputs: &[&Path],
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    check_target(path, inputs)?.write(write)
}

/// Writes f32 tensors as a safetensors file to `path`, safely (see the module): refused
/// when `path` is not a regular file or is one of `inputs`, replaced atomically otherwise.
/// The data is streamed to the file, not copied into one buffer first.
///
/// # Errors
/// [`Error::Shape`] when a tensor's data disagrees with its shape; as [`write_file`].
pub fn write_f32_tensors(
    path: &Path,
    inputs: &[&Path],
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let elements: usize = shape.iter().product();
        if elements != data.len() {
            return Err(Error::shape(
                "output",
                format!(
                    "{name}: shape {shape:?} holds {elements} values, {} given",
                    data.len()
                ),
            ));
        }
        let end = offset + 4 * data.len();
        infos.push((
            (*name).to_owned(),
            TensorInfo {
                dtype: Dtype::F32,
                shape: shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let header = Metadata::new(metadata, infos)
        .map_err(|e| Error::shape("output", format!("safetensors header: {e}")))?;
    let mut header = serde_json::to_vec(&header)
        .map_err(|e| Error::shape("output", format!("safetensors header: {e}")))?;
    // The safetensors crate pads the header with spaces to a multiple of 8 bytes.
    header.resize(header.len().next_multiple_of(8), b' ');
    write_file(path, inputs, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (_, _, data) in tensors {
            if cfg!(target_endian = "little") {
                out.write_all(bytemuck::cast_slice(data))?;
            } else {
                for value in *data {
                    out.write_all(&value.to_le_bytes())?;
                }
            }
        }
        Ok(())
    })
}
