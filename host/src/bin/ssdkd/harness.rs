//! The bench harness: one timed configuration (a backend, a batch and where its inputs
//! live) and the median of its evaluations.

use crate::failure::Outcome;
use indicatif::ProgressBar;
use ssdkd::{Backend, LossConfig, Request};
use std::time::{Duration, Instant};

/// Where the inputs of a timed evaluation live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inputs {
    /// Host memory: uploaded by every evaluation (gradients read back).
    Host,
    /// Prepared once ([`Backend::prepare`]): on a GPU already in its buffers, as a training
    /// loop's outputs are (gradients stay there).
    Device,
}

impl Inputs {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Inputs::Host => "host",
            Inputs::Device => "gpu",
        }
    }
}

/// One timed configuration: a backend, a batch and where its inputs live.
pub(crate) struct Timed<'a> {
    backend: &'a mut Backend,
    batch: ssdkd::Batch<'a>,
    config: LossConfig,
    prepared: Option<ssdkd::Prepared<'a>>,
}

impl<'a> Timed<'a> {
    pub(crate) fn new(
        backend: &'a mut Backend,
        batch: ssdkd::Batch<'a>,
        config: LossConfig,
        inputs: Inputs,
    ) -> Outcome<Self> {
        let prepared = match inputs {
            Inputs::Device => Some(backend.prepare(&batch, &config)?),
            Inputs::Host => None,
        };
        Ok(Self {
            backend,
            batch,
            config,
            prepared,
        })
    }

    /// One evaluation, forward only or forward and backward. The value scan is skipped, as a
    /// trusted training loop would.
    pub(crate) fn once(&mut self, gradients: bool) -> Outcome {
        match &self.prepared {
            Some(prepared) => self
                .backend
                .evaluate_prepared(prepared, &self.config, gradients)
                .map(drop)?,
            None => {
                let request = Request {
                    gradients,
                    validate: false,
                    ..Request::default()
                };
                self.backend
                    .evaluate(&self.batch, &self.config, request)
                    .map(drop)?;
            }
        }
        Ok(())
    }

    /// Median milliseconds of `iters` evaluations.
    pub(crate) fn median_ms(
        &mut self,
        gradients: bool,
        iters: u32,
        bar: &ProgressBar,
    ) -> Outcome<f64> {
        let mut samples = (0..iters)
            .map(|_| {
                let start = Instant::now();
                self.once(gradients)?;
                bar.inc(1);
                Ok(start.elapsed())
            })
            .collect::<Outcome<Vec<Duration>>>()?;
        samples.sort();
        Ok(samples[samples.len() / 2].as_secs_f64() * 1e3)
    }
}
