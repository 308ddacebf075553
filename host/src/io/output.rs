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
//!   (`fsync`) and renamed over the target, and the folder is flushed too: at every moment
//!   the target is the old file or the new one, whole. A failure or a cancellation leaves
//!   the old file as it was and no temporary file behind.
//! - A killed writer (`SIGKILL`, a crash, a power loss) leaves no temporary file either,
//!   or one that the next write to the folder removes:
//!   - On Linux, where the folder's file system has unnamed files (`O_TMPFILE`: ext4, XFS,
//!     Btrfs, tmpfs and most local file systems), the temporary file has no name while it
//!     is written: the kernel frees it when its writer dies. It is named only between its
//!     `linkat` (through `/proc/self/fd`) and the rename, a few microseconds.
//!   - Elsewhere, and in that window, it is named `.{target name}.ssdkd-{pid}-{random}.tmp`
//!     with its writer's pid. Each write removes the files of that form in its folder whose
//!     pid is no longer a live process (on this machine; a reused pid keeps its file until
//!     that process ends too).
//! - A new file gets mode 0666 less the umask, as `open(O_CREAT, 0666)` would give it
//!   (0644 under umask 022); a replaced file keeps its permission bits.

use super::fs::file_kind;
use crate::cancel::CancelToken;
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
    /// remains ([`OutputTarget::write_cancellable`] without a token).
    ///
    /// # Errors
    /// As [`OutputTarget::write_cancellable`].
    pub fn write(&self, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
        self.write_cancellable(None, write)
    }

    /// Writes the file with `write` and replaces the target with it, atomically (see the
    /// module); `cancel` is checked before every MiB reaches the file and once more before
    /// the file is put in place. Stale temporary files of dead writers in the target's
    /// folder are removed first. On any failure (of `write` included) or cancellation the
    /// target is left as it was and no temporary file remains.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path; [`Error::File`] when the target was replaced by a
    /// file that is not regular since it was checked; [`Error::Cancelled`] when `cancel`
    /// was cancelled before the file was put in place.
    pub fn write_cancellable(
        &self,
        cancel: Option<&CancelToken>,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        self.write_through(cancel, true, write)
    }

    /// [`OutputTarget::write_cancellable`], through a named temporary file when `unnamed`
    /// is false.
    fn write_through(
        &self,
        cancel: Option<&CancelToken>,
        unnamed: bool,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        let io = |source: std::io::Error| Error::Io {
            path: self.requested.clone(),
            source,
        };
        let cancelled = || cancel.is_some_and(CancelToken::is_cancelled);
        let folder = match self.resolved.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let name = self
            .resolved
            .file_name()
            .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
        remove_stale_temporaries(folder);
        let temp = Temporary::create(folder, &name, unnamed).map_err(io)?;
        #[cfg(unix)]
        if let Some(mode) = self.existing_mode {
            use std::os::unix::fs::PermissionsExt;
            temp.file()
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io)?;
        }
        {
            let mut writer = std::io::BufWriter::with_capacity(
                WRITE_CHUNK,
                CheckedWriter {
                    file: temp.file(),
                    cancel,
                },
            );
            let written = write(&mut writer).and_then(|()| writer.flush());
            if cancelled() {
                return Err(Error::Cancelled);
            }
            written.map_err(io)?;
        }
        temp.file().sync_all().map_err(io)?;
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
        if cancelled() {
            return Err(Error::Cancelled);
        }
        temp.persist(folder, &name, &self.resolved).map_err(io)?;
        // The rename is durable once the folder is; not every platform can open one.
        if let Ok(dir) = std::fs::File::open(folder) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// The size of the writes that reach the temporary file (and of the steps between checks
/// of a [`CancelToken`]).
const WRITE_CHUNK: usize = 1 << 20;

/// The file under a [`BufWriter`](std::io::BufWriter): refuses to write once `cancel` is
/// cancelled, so that a cancelled write stops within [`WRITE_CHUNK`] bytes.
struct CheckedWriter<'a> {
    file: &'a std::fs::File,
    cancel: Option<&'a CancelToken>,
}

impl Write for CheckedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(std::io::Error::other("cancelled"));
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The mark in a temporary file's name before its writer's pid:
/// `.{target name}.ssdkd-{pid}-{random}.tmp`.
const TEMP_MARK: &str = ".ssdkd-";
/// The end of a temporary file's name.
const TEMP_END: &str = ".tmp";
/// The most bytes of the target's name in a temporary file's name: with the mark, a pid,
/// the random part and the end, the whole stays under 255 bytes (`NAME_MAX`).
const MAX_NAME_IN_TEMP: usize = 200;

/// The name of this process's temporary files for the target `name`, less the random part
/// [`tempfile::Builder`] adds between the two.
fn temp_builder(name: &str) -> (String, tempfile::Builder<'static, 'static>) {
    // The target's name is shortened to keep the temporary name within 255 bytes.
    let mut end = name.len().min(MAX_NAME_IN_TEMP);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let prefix = format!(".{}{TEMP_MARK}{}-", &name[..end], std::process::id());
    let mut builder = tempfile::Builder::new();
    builder.suffix(TEMP_END);
    (prefix, builder)
}

/// The pid in the name of a temporary file written by [`OutputTarget::write_cancellable`]
/// (of any target in the folder), or `None` for any other name.
fn temp_writer_pid(file_name: &std::ffi::OsStr) -> Option<u32> {
    let name = file_name.to_str()?;
    let body = name.strip_prefix('.')?.strip_suffix(TEMP_END)?;
    let (_, tail) = body.rsplit_once(TEMP_MARK)?;
    let (pid, random) = tail.split_once('-')?;
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !plain(random) || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether the process `pid` is alive (on this machine, in this pid namespace).
#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let sent = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists but belongs to another user.
    sent == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Without a way to ask, every writer is taken to be alive: nothing is removed.
#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    true
}

/// Removes the temporary files in `folder` whose writer (the pid in their name) is no
/// longer alive: what a write killed before it finished left behind. Best effort: a folder
/// that cannot be listed, or a file that cannot be removed, is left as it is.
fn remove_stale_temporaries(folder: &Path) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = temp_writer_pid(&entry.file_name()) else {
            continue;
        };
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if regular && pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The named temporary files of this process that exist now (created and not yet renamed
/// or removed), for [`exit_removing_temporaries`]. It is locked while a name is made, so
/// that no name appears once that function holds it.
static OWN_TEMPORARIES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn own_temporaries() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    OWN_TEMPORARIES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes the named temporary files of the writes under way in this process and exits it
/// with `code`: for a program that must stop while another of its threads may be writing
/// (a Ctrl-C handler that cannot wait for it). No write of this process makes a new name
/// meanwhile. A write cut short this way leaves its target as it was (or already replaced,
/// when its rename came first) and, on Linux, no unnamed file either: the kernel frees it.
pub fn exit_removing_temporaries(code: i32) -> ! {
    let own = own_temporaries();
    for path in own.iter() {
        let _ = std::fs::remove_file(path);
    }
    // The lock is held until the process ends.
    std::process::exit(code)
}

/// A path in [`OWN_TEMPORARIES`] while this lives.
struct Registered(PathBuf);

impl Registered {
    /// Makes the file `path` with `make` and registers it, under the lock.
    fn make<R>(
        path: &Path,
        make: impl FnOnce(&Path) -> std::io::Result<R>,
    ) -> std::io::Result<(R, Self)> {
        let mut own = own_temporaries();
        let made = make(path)?;
        own.push(path.to_owned());
        Ok((made, Self(path.to_owned())))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut own = own_temporaries();
        if let Some(i) = own.iter().position(|p| *p == self.0) {
            own.swap_remove(i);
        }
    }
}

/// The file a write goes to before it replaces the target.
enum Temporary {
    /// An unnamed file in the target's folder (Linux `O_TMPFILE`): it has no name until it
    /// is complete, so a killed writer leaves nothing.
    #[cfg(target_os = "linux")]
    Unnamed(std::fs::File),
    /// A file named `.{target name}.ssdkd-{pid}-{random}.tmp`, removed on failure; one a
    /// killed writer left is removed by the next write to the folder.
    Named(tempfile::NamedTempFile<(std::fs::File, Registered)>),
}

impl Temporary {
    /// An unnamed file where `unnamed` and the folder's file system has them, else a
    /// named one; created with mode 0666 less the umask, as any new file.
    fn create(folder: &Path, name: &str, unnamed: bool) -> std::io::Result<Self> {
        #[cfg(target_os = "linux")]
        if let Some(file) = unnamed.then(|| unnamed_file(folder)).flatten() {
            return Ok(Temporary::Unnamed(file));
        }
        let _ = unnamed;
        let (prefix, mut builder) = temp_builder(name);
        builder.prefix(&prefix);
        let temp = builder.make_in(folder, |path| {
            Registered::make(path, |path| {
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o666);
                }
                options.open(path)
            })
        })?;
        Ok(Temporary::Named(temp))
    }

    fn file(&self) -> &std::fs::File {
        match self {
            #[cfg(target_os = "linux")]
            Temporary::Unnamed(file) => file,
            Temporary::Named(temp) => &temp.as_file().0,
        }
    }

    /// Puts the complete file in place of `target` (in `folder`, named `name`) by a
    /// rename; an unnamed file is first linked under a temporary name.
    fn persist(self, folder: &Path, name: &str, target: &Path) -> std::io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Temporary::Unnamed(file) => {
                use std::os::unix::io::AsRawFd;
                let source = proc_fd_path(file.as_raw_fd());
                let (prefix, mut builder) = temp_builder(name);
                builder.prefix(&prefix);
                // The name exists only between the link and the rename; a writer killed
                // in between leaves a named file that the next write removes.
                let linked = builder.make_in(folder, |path| {
                    Registered::make(path, |path| link_proc_fd(&source, path))
                })?;
                linked.persist(target).map(drop).map_err(|e| e.error)
            }
            Temporary::Named(temp) => temp.persist(target).map(drop).map_err(|e| e.error),
        }
    }
}

/// `/proc/self/fd/{fd}`: the path through which an open unnamed file can be linked.
#[cfg(target_os = "linux")]
fn proc_fd_path(fd: std::os::unix::io::RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// An unnamed file in `folder` (`O_TMPFILE`, mode 0666 less the umask), or `None` where
/// the file system cannot make one or `/proc` is not there to link it.
#[cfg(target_os = "linux")]
fn unnamed_file(folder: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .mode(0o666)
        .custom_flags(libc::O_TMPFILE)
        .open(folder)
        .ok()?;
    std::fs::symlink_metadata(proc_fd_path(file.as_raw_fd()))
        .is_ok()
        .then_some(file)
}

/// Gives the open file behind `source` (a `/proc/self/fd` path) the name `path`
/// (`linkat` with `AT_SYMLINK_FOLLOW`, which needs no privilege).
#[cfg(target_os = "linux")]
fn link_proc_fd(source: &Path, path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(source)?, c(path)?);
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if linked == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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
/// As [`write_f32_tensors_cancellable`].
pub fn write_f32_tensors(
    path: &Path,
    inputs: &[&Path],
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_f32_tensors_cancellable(path, inputs, tensors, metadata, None)
}

/// [`write_f32_tensors`] that stops when `cancel` is cancelled before the file is in place
/// ([`OutputTarget::write_cancellable`]).
///
/// # Errors
/// [`Error::Shape`] when a tensor's data disagrees with its shape; as [`check_target`] and
/// [`OutputTarget::write_cancellable`].
pub fn write_f32_tensors_cancellable(
    path: &Path,
    inputs: &[&Path],
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
    cancel: Option<&CancelToken>,
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
    check_target(path, inputs)?.write_cancellable(cancel, |out| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn temporary_names_carry_their_writer_pid() {
        let pid = |name: &str| temp_writer_pid(std::ffi::OsStr::new(name));
        assert_eq!(pid(".g.safetensors.ssdkd-4242-aB3xY9.tmp"), Some(4242));
        assert_eq!(pid(".a.ssdkd-1.b.ssdkd-17-Zz0.tmp"), Some(17));
        let (prefix, _) = temp_builder("g.safetensors");
        assert_eq!(
            pid(&format!("{prefix}q1W2e3.tmp")),
            Some(std::process::id())
        );
        // A long target name is shortened in its temporary's name (NAME_MAX is 255).
        let long = "é".repeat(120);
        let (prefix, _) = temp_builder(&long);
        assert!(prefix.len() + 6 + TEMP_END.len() <= 255, "{}", prefix.len());
        assert_eq!(
            pid(&format!("{prefix}q1W2e3.tmp")),
            Some(std::process::id())
        );
        for other in [
            "g.safetensors",
            ".g.safetensors.aB3xY9.tmp",
            "g.safetensors.ssdkd-4242-aB3xY9.tmp",
            ".g.ssdkd-42x-aB3.tmp",
            ".g.ssdkd-42-.tmp",
            ".g.ssdkd-42-a.b.tmp",
            ".g.ssdkd--aB3.tmp",
            ".g.ssdkd-4242-aB3xY9.tmp.old",
        ] {
            assert_eq!(pid(other), None, "{other}");
        }
    }

    /// The pid of a process that has ended (a child, reaped).
    #[cfg(unix)]
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[cfg(unix)]
    #[test]
    fn a_write_removes_the_temporaries_of_dead_writers_only() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        assert!(!process_alive(dead));
        assert!(process_alive(std::process::id()));
        let stale = format!(".g.safetensors.ssdkd-{dead}-aB3xY9.tmp");
        let stale_other_target = format!(".h.ssdkd-{dead}-Q.tmp");
        let live = format!(".g.safetensors.ssdkd-{}-aB3xY9.tmp", std::process::id());
        let kept = [".g.safetensors.aB3xY9.tmp", "notes.txt", live.as_str()];
        for name in [stale.as_str(), stale_other_target.as_str()]
            .iter()
            .chain(&kept)
        {
            std::fs::write(dir.path().join(name), b"partial").unwrap();
        }
        // A folder with a stale-looking name is not a temporary file.
        let folder = format!(".d.ssdkd-{dead}-x.tmp");
        std::fs::create_dir(dir.path().join(&folder)).unwrap();
        let target = dir.path().join("g.safetensors");
        for unnamed in [true, false] {
            check_target(&target, &[])
                .unwrap()
                .write_through(None, unnamed, |out| out.write_all(b"new"))
                .unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"new");
            let mut want: Vec<String> = kept.iter().map(|s| (*s).to_owned()).collect();
            want.extend([folder.clone(), "g.safetensors".into()]);
            want.sort();
            assert_eq!(names(dir.path()), want);
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_named_fallback_replaces_atomically_keeps_the_mode_and_cleans_up() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("g.safetensors");
        std::fs::write(&target, b"old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let output = check_target(&target, &[]).unwrap();
        let err = output
            .write_through(None, false, |out| {
                out.write_all(b"half")?;
                Err(std::io::Error::other("disk on fire"))
            })
            .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["g.safetensors"]);
        assert!(!own_temporaries().iter().any(|p| p.starts_with(dir.path())));
        output
            .write_through(None, false, |out| out.write_all(b"new"))
            .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(names(dir.path()), ["g.safetensors"]);
        assert!(!own_temporaries().iter().any(|p| p.starts_with(dir.path())));
    }

    #[test]
    fn a_cancelled_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("g.safetensors");
        std::fs::write(&target, b"old").unwrap();
        let output = check_target(&target, &[]).unwrap();
        for unnamed in [true, false] {
            let token = CancelToken::new();
            // Cancelled after 3 MiB of 8 MiB reached the file.
            let err = output
                .write_through(Some(&token), unnamed, |out| {
                    let chunk = vec![7u8; WRITE_CHUNK];
                    for i in 0..8 {
                        if i == 3 {
                            token.cancel();
                        }
                        out.write_all(&chunk)?;
                    }
                    Ok(())
                })
                .unwrap_err();
            assert!(matches!(err, Error::Cancelled), "{err}");
            assert_eq!(std::fs::read(&target).unwrap(), b"old");
            assert_eq!(names(dir.path()), ["g.safetensors"]);
            // Cancelled after the data was written: not put in place either.
            let token = CancelToken::new();
            let err = output
                .write_through(Some(&token), unnamed, |out| {
                    out.write_all(b"new")?;
                    token.cancel();
                    Ok(())
                })
                .unwrap_err();
            assert!(matches!(err, Error::Cancelled), "{err}");
            assert_eq!(std::fs::read(&target).unwrap(), b"old");
            assert_eq!(names(dir.path()), ["g.safetensors"]);
        }
    }
}
