//! The one error type of the library. Each variant keeps what is at fault as fields (the
//! tensor, image and index; the config key; the file), so that callers can match on them;
//! the `Display` text is one line. Which process exit code an error gets is the binary's
//! decision (SPEC §9), not the library's.

use ssdkd_core::validate::{ConfigError, InputError};
use std::path::PathBuf;

/// Everything that can go wrong; each variant names what is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's shape disagrees with the others, with the config or with the file.
    #[error("tensor `{tensor}`: {problem}")]
    Shape {
        /// The tensor at fault.
        tensor: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A value the loss cannot take (NaN, a degenerate box, a bad label, a bad prior), with
    /// the tensor, image, index and value as the core's checks found them.
    #[error("tensor `{tensor}`: {input}", tensor = .0.tensor().name(), input = .0)]
    Input(#[from] InputError),
    /// A configuration value that cannot work, or config metadata that cannot be read.
    #[error("config `{key}`: {problem}")]
    Config {
        /// The `config` key of SPEC §8 at fault (`config` itself for malformed JSON).
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A batch file that cannot be read.
    #[error("{}: {problem}", shown(path))]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", shown(path))]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No GPU adapter where one was required.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    /// The GPU failed: out of memory, device lost, a validation error.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// The batch's shape is over a documented limit of the GPU backend (README "GPU
    /// limits"), checked before anything runs; the CPU backend takes it.
    #[error("the GPU backend cannot take this batch: {0}")]
    GpuUnsupported(String),
    /// A loss or gradient came out NaN or infinite although the inputs were accepted.
    #[error("numerical failure: {what}{} is {value} (not finite)", index.map(|i| format!(" at flat index {i}")).unwrap_or_default())]
    Numerical {
        /// The term (`soft_loss`, …, `total`) or gradient (`grad_student_conf`, …).
        what: &'static str,
        /// The flat element index, for a gradient.
        index: Option<usize>,
        /// The value found.
        value: f64,
    },
    /// The caller cancelled the evaluation through its [`crate::CancelToken`].
    #[error("cancelled")]
    Cancelled,
    /// A defect: a panic inside ssdkd, caught where a binding calls the library, with the
    /// panic's message.
    #[error("internal error (a defect of ssdkd; please report it): {0}")]
    Internal(String),
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config {
            key: e.key.into(),
            problem: e.to_string(),
        }
    }
}

/// A path as error messages show it: one line, control characters escaped.
#[must_use]
pub(crate) fn shown(path: &std::path::Path) -> String {
    path.display()
        .to_string()
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Error {
    /// The [`Error::Internal`] of a caught panic's payload (its message when it is a
    /// string).
    #[must_use]
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        Error::Internal(message)
    }

    pub(crate) fn shape(tensor: &'static str, problem: impl Into<String>) -> Self {
        Error::Shape {
            tensor,
            problem: problem.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
