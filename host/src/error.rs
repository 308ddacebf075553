//! The one error type of the library and the command line.

use std::path::PathBuf;

/// Everything that can go wrong; each variant names what is at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor's shape disagrees with the others or with the config.
    #[error("tensor `{tensor}`: {problem}")]
    Shape {
        /// The tensor at fault.
        tensor: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A value is not allowed (NaN, a degenerate box, a bad label...).
    #[error("tensor `{tensor}`: {problem}")]
    Value {
        /// The tensor at fault.
        tensor: &'static str,
        /// What is wrong, with the image and index.
        problem: String,
    },
    /// A configuration value that cannot work.
    #[error("config `{key}`: {problem}")]
    Config {
        /// The config key (or command-line flag) at fault.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A batch file that cannot be read.
    #[error("{}: {problem}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Writing an output failed.
    #[error("{}: {source}", path.display())]
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
}

impl Error {
    /// The process exit code of SPEC §9: 3 for a missing adapter, 1 for a GPU
    /// failure, 2 for bad input or usage (an unwritable output, and a batch over the GPU
    /// backend's limits, included).
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NoAdapter(_) => 3,
            Error::Gpu(_) => 1,
            _ => 2,
        }
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
