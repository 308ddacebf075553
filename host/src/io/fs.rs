//! The file-system basics of reading and writing: what kind of file a path is, opening a
//! regular file only (never blocking on a FIFO or a device), and reading at an offset.

use crate::error::{Error, Result};
use std::fs::File;
use std::path::Path;

/// What kind of file a non-regular file is, for messages.
pub(crate) fn file_kind(file_type: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading only if it is a regular file, without ever blocking: the type
/// is checked before opening (a FIFO, device, socket or directory is refused at once), the
/// file is opened non-blocking (should it be swapped for a FIFO in between) and checked
/// again once open. Returns the file and its length.
///
/// # Errors
/// [`Error::File`] naming the path and what it is.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let refuse = |problem: String| Error::File {
        path: path.to_owned(),
        problem,
    };
    let not_regular = |kind: &str| refuse(format!("is {kind}, not a regular file; refused"));
    let metadata = std::fs::metadata(path).map_err(|e| refuse(format!("cannot read: {e}")))?;
    if !metadata.is_file() {
        return Err(not_regular(file_kind(metadata.file_type())));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options
        .open(path)
        .map_err(|e| refuse(format!("cannot read: {e}")))?;
    let metadata = file
        .metadata()
        .map_err(|e| refuse(format!("cannot read: {e}")))?;
    if !metadata.is_file() {
        return Err(not_regular(file_kind(metadata.file_type())));
    }
    Ok((file, metadata.len()))
}

/// `read_exact` at an offset, without moving a shared cursor.
pub(crate) fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = file;
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(buffer)
    }
}
