//! Results on stdout, written so that a failing stdout (full disk, closed pipe, closed
//! descriptor) is an error rather than a panic or a silent loss; and the probe that finds
//! stdout closed at start, the binary's one `unsafe` call.

use crate::failure::{Failure, Outcome};
use ssdkd::Error;
use std::io::{StdoutLock, Write};

/// Whether the process started with stdout (descriptor 1) closed, as `ssdkd eval FILE >&-`
/// starts it. Rust's runtime reopens a closed standard descriptor on `/dev/null` before
/// `main`, so that every write would succeed and the result be lost; this is recorded by a
/// constructor that runs before the runtime (an `.init_array` entry, Linux and Android).
static STDOUT_CLOSED_AT_START: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

#[cfg(any(target_os = "linux", target_os = "android"))]
mod stdout_probe {
    use std::sync::atomic::Ordering;

    extern "C" fn probe() {
        // SAFETY: fcntl(F_GETFD) on a descriptor number only reads the descriptor table.
        let closed = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFD) } == -1;
        super::STDOUT_CLOSED_AT_START.store(closed, Ordering::Relaxed);
    }

    #[used]
    #[link_section = ".init_array"]
    static PROBE: extern "C" fn() = probe;
}

/// Results on stdout, written explicitly so that a failing stdout (full disk, closed pipe,
/// closed descriptor) is an error rather than a panic or a silent loss.
pub(crate) struct Out(StdoutLock<'static>);

impl Out {
    pub(crate) fn new() -> Self {
        Self(std::io::stdout().lock())
    }

    /// An error when the process started with stdout closed, where a result would be lost.
    pub(crate) fn open(&self) -> Outcome {
        if STDOUT_CLOSED_AT_START.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(stdout_error(std::io::Error::from_raw_os_error(libc::EBADF)));
        }
        Ok(())
    }

    pub(crate) fn line(&mut self, text: std::fmt::Arguments<'_>) -> Outcome {
        writeln!(self.0, "{text}").map_err(stdout_error)
    }

    pub(crate) fn flush(&mut self) -> Outcome {
        self.0.flush().map_err(stdout_error)
    }
}

/// A failed write to stdout, as the library would name it.
pub(crate) fn stdout_error(source: std::io::Error) -> Failure {
    Failure::Library(Error::Io {
        path: "<stdout>".into(),
        source,
    })
}
