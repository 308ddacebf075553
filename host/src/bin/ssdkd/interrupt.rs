//! Ctrl-C (`SIGINT`): the command stops through the library's [`CancelToken`], its
//! temporary file goes, one line says so on stderr, and the exit code is 130 (128 + the
//! signal's number, as shells report it). An evaluation checks the token before each
//! image, a write before each MiB ([`ssdkd::io::output`]); a command busy elsewhere (reading
//! its input, waiting for a GPU) is ended by the handler itself after [`GRACE`], with the
//! named temporary files of its writes removed ([`ssdkd::io::output::exit_removing_temporaries`]).

use ssdkd::CancelToken;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The exit code after Ctrl-C.
pub(crate) const EXIT_CODE: u8 = 130;

/// The one line printed after Ctrl-C.
const MESSAGE: &str = "ssdkd: interrupted; any output file is as it was or completely written";

/// How long the command has, after Ctrl-C, to stop by itself.
const GRACE: Duration = Duration::from_millis(500);

static TOKEN: OnceLock<CancelToken> = OnceLock::new();

/// Whether the line was printed (by the handler or by [`finish`]): it is printed once.
static REPORTED: AtomicBool = AtomicBool::new(false);

/// The token Ctrl-C cancels; every evaluation and write of the command checks it.
pub(crate) fn token() -> &'static CancelToken {
    TOKEN.get_or_init(CancelToken::new)
}

/// Whether this call is the one that prints the line.
fn claim_report() -> bool {
    !REPORTED.swap(true, Ordering::SeqCst)
}

/// Installs the Ctrl-C handler. Without one (the `ctrlc` crate refused), Ctrl-C keeps its
/// default effect: the process ends and its unnamed temporary file with it.
pub(crate) fn install() {
    let token = token().clone();
    let _ = ctrlc::set_handler(move || {
        token.cancel();
        std::thread::sleep(GRACE);
        // The command did not stop in time: end it here.
        if claim_report() {
            eprintln!("{MESSAGE}");
            ssdkd::io::output::exit_removing_temporaries(i32::from(EXIT_CODE));
        }
    });
}

/// After the command: `Some(130)`, with the line printed, when Ctrl-C came (whatever the
/// command's outcome, whose own message is then not printed); `None` otherwise.
pub(crate) fn finish() -> Option<u8> {
    if !token().is_cancelled() {
        return None;
    }
    if claim_report() {
        eprintln!("{MESSAGE}");
    } else {
        // The handler printed it and is ending the process with the same code.
        std::thread::park();
    }
    Some(EXIT_CODE)
}
