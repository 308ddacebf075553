//! Cancelling an evaluation from another thread: a caller (the Python binding on Ctrl-C, a
//! GUI's stop button) keeps a clone of a [`CancelToken`] and cancels it; the CPU backend
//! checks it before each image of each pass, the GPU backend before it starts, and the
//! evaluation returns [`Error::Cancelled`].

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A flag shared between an evaluation and whoever may cancel it. Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not cancelled yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every evaluation that checks this token (or a clone) to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Error::Cancelled)` once cancelled.
    ///
    /// # Errors
    /// [`Error::Cancelled`] when the token was cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{synthetic_batch, SyntheticSpec};
    use crate::{Backend, Request};
    use ssdkd_core::{LossConfig, PriorPreset};

    #[test]
    fn a_cancelled_evaluation_stops_and_the_backend_evaluates_again() {
        let owned = synthetic_batch(&SyntheticSpec::bench(4, 21, PriorPreset::Mobilenet300));
        let (batch, config) = (owned.batch(), LossConfig::DEFAULT);
        let mut cpu = Backend::cpu();
        let want = cpu
            .evaluate(&batch, &config, Request::with_gradients())
            .unwrap();
        let token = CancelToken::new();
        token.clone().cancel();
        let got =
            cpu.evaluate_cancellable(&batch, &config, Request::with_gradients(), Some(&token));
        assert!(matches!(got, Err(Error::Cancelled)), "{got:?}");
        match &mut cpu {
            Backend::Cpu(inner) => assert!(inner.gradients_of_last(&batch, &config).is_none()),
            #[cfg(feature = "gpu")]
            Backend::Gpu(..) => unreachable!("Backend::cpu() is the CPU backend"),
        }
        let again = cpu
            .evaluate_cancellable(
                &batch,
                &config,
                Request::with_gradients(),
                Some(&CancelToken::new()),
            )
            .unwrap();
        assert_eq!(again, want);
    }
}
