//! Why a command did not succeed, and the one place where that becomes an exit code
//! (SPEC §9): 0 success; 1 a GPU or numerical failure; 2 bad input, usage or an unwritable
//! output; 3 no GPU adapter where one was required; 4 `--backend both` found the backends
//! disagreeing beyond SPEC §7.

use ssdkd::io::config_keys::ConfigKey;
use ssdkd::Error;
use std::path::Path;

/// Why a command did not succeed; [`Failure::exit_code`] is the one place exit codes are
/// decided.
pub(crate) enum Failure {
    /// What the library reports.
    Library(Error),
    /// A command-line combination that cannot work.
    Usage(String),
    /// `--backend both`: the backends disagree beyond SPEC §7 (already reported).
    Disagree,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Library(e)
    }
}

impl Failure {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Failure::Library(Error::NoAdapter(_)) => 3,
            Failure::Library(Error::Gpu(_) | Error::Numerical { .. } | Error::Internal(_)) => 1,
            Failure::Library(_) | Failure::Usage(_) => 2,
            Failure::Disagree => 4,
        }
    }

    /// The one-line message, if any: a config key is shown with the flag that sets it; a
    /// closed pipe on stdout is not worth a message (as `head` users expect).
    pub(crate) fn message(&self) -> Option<String> {
        match self {
            Failure::Library(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                None
            }
            Failure::Library(e @ Error::Config { key, .. }) => Some(match ConfigKey::find(key) {
                Some(k) => format!("{e} (flag --{})", k.flag),
                None => e.to_string(),
            }),
            Failure::Library(e) => Some(e.to_string()),
            Failure::Usage(problem) => Some(problem.clone()),
            Failure::Disagree => None,
        }
    }
}

pub(crate) type Outcome<T = ()> = std::result::Result<T, Failure>;

/// One line: control characters (a newline in a file name…) escaped.
pub(crate) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A path in a message: one line, control characters escaped.
pub(crate) fn shown(path: &Path) -> String {
    one_line(&path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssdkd::{InputError, Tensor};

    #[test]
    fn exit_codes_of_every_failure() {
        let io = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        let cases: [(Failure, u8); 9] = [
            (Error::NoAdapter("none".into()).into(), 3),
            (Error::Gpu("device lost".into()).into(), 1),
            (
                Error::Numerical {
                    what: "total",
                    index: None,
                    value: f64::NAN,
                }
                .into(),
                1,
            ),
            (
                Error::Input(InputError::BadPrior {
                    index: 3,
                    prior: [0.5, 0.5, 0.0, 0.1],
                })
                .into(),
                2,
            ),
            (
                Error::Config {
                    key: "temperature".into(),
                    problem: "temperature = 0: must be in [1e-2, 1e6]".into(),
                }
                .into(),
                2,
            ),
            (
                Error::Io {
                    path: "<stdout>".into(),
                    source: io(),
                }
                .into(),
                2,
            ),
            (
                Error::Shape {
                    tensor: "targets",
                    problem: "dimension M is 0".into(),
                }
                .into(),
                2,
            ),
            (
                Failure::Usage("--grad-out needs a single backend".into()),
                2,
            ),
            (Failure::Disagree, 4),
        ];
        for (failure, code) in cases {
            assert_eq!(failure.exit_code(), code, "{:?}", failure.message());
        }
        let config: Failure = Error::Config {
            key: "overlap_threshold".into(),
            problem: "overlap_threshold = 2: must be in (0, 1]".into(),
        }
        .into();
        assert!(config.message().unwrap().ends_with("(flag --threshold)"));
        let pipe: Failure = Error::Io {
            path: "<stdout>".into(),
            source: std::io::ErrorKind::BrokenPipe.into(),
        }
        .into();
        assert_eq!(pipe.message(), None);
        let input: Failure = Error::Input(InputError::NonFinite {
            tensor: Tensor::StudentConf,
            image: Some(1),
            row: 7,
            column: 2,
            value: f32::NAN,
        })
        .into();
        assert_eq!(
            input.message().unwrap(),
            "tensor `student_conf`: non-finite value NaN at image 1, prior 7, column 2"
        );
    }
}
