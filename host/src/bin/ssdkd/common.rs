//! What the commands share: the backends a `--backend` choice names, one timed
//! evaluation, the printed terms, the agreement verdict of `--backend both` and the memory
//! check of the synthetic batches.

use crate::args::BackendChoice;
use crate::failure::{one_line, Failure, Outcome};
use crate::stdout::Out;
use ssdkd::agreement::Agreement;
use ssdkd::demo::SyntheticSpec;
use ssdkd::{Backend, Error, Evaluation, LossConfig, Request};
use std::time::{Duration, Instant};

/// The backends a choice names, in print order. `auto` says on stderr when it falls back.
pub(crate) fn backends(choice: BackendChoice) -> Outcome<Vec<Backend>> {
    Ok(match choice {
        BackendChoice::Cpu => vec![Backend::cpu()],
        BackendChoice::Gpu => vec![Backend::gpu()?],
        BackendChoice::Both => vec![Backend::cpu(), Backend::gpu()?],
        BackendChoice::Auto => vec![Backend::auto(|e| {
            eprintln!(
                "ssdkd: {}; falling back to the CPU backend",
                one_line(&e.to_string())
            );
        })],
    })
}

pub(crate) fn timed(
    backend: &mut Backend,
    batch: &ssdkd::Batch<'_>,
    config: &LossConfig,
    request: Request,
) -> Outcome<(Evaluation, Duration)> {
    let start = Instant::now();
    let eval =
        backend.evaluate_cancellable(batch, config, request, Some(crate::interrupt::token()))?;
    Ok((eval, start.elapsed()))
}

pub(crate) fn print_terms(
    out: &mut Out,
    backend: &Backend,
    eval: &Evaluation,
    elapsed: Duration,
) -> Outcome {
    let t = &eval.terms;
    let s = &eval.sums;
    out.line(format_args!("{} — {}", backend.name(), backend.adapter()))?;
    out.line(format_args!("  soft_loss  {:>14.6}", t.soft_loss))?;
    out.line(format_args!("  l2_loss    {:>14.6}", t.l2_loss))?;
    out.line(format_args!("  loss_c     {:>14.6}", t.loss_c))?;
    out.line(format_args!("  loss_l     {:>14.6}", t.loss_l))?;
    out.line(format_args!("  total      {:>14.6}", t.total))?;
    out.line(format_args!(
        "  num_pos {}, num_neg {}, num_bounded {}; {:.2} ms",
        s.num_pos,
        s.num_neg,
        s.num_bounded,
        elapsed.as_secs_f64() * 1e3
    ))
}

/// The agreement line of `--backend both` (GPU against the CPU reference, SPEC §7).
pub(crate) fn agreement_line(agreement: &Agreement) -> String {
    let verdict = if agreement.agrees() {
        "the backends agree to SPEC §7"
    } else {
        "the backends DISAGREE beyond SPEC §7"
    };
    format!("agreement: {verdict}: gpu against cpu, {agreement}")
}

/// `--backend both` as a verifier: disagreement beyond SPEC §7 is a failure (exit code 4).
pub(crate) fn verdict(agreement: &Agreement) -> Outcome {
    if agreement.agrees() {
        Ok(())
    } else {
        Err(Failure::Disagree)
    }
}

/// Refuses a synthetic batch (`demo`, `bench`) that would not fit in memory, naming the
/// flags and the estimate (limits.rs).
pub(crate) fn check_synthetic(
    spec: &SyntheticSpec,
    request: &Request,
    backend: BackendChoice,
    flag: &str,
) -> ssdkd::Result<()> {
    let shape = ssdkd::BatchShape {
        batch: spec.batch,
        priors: spec.preset.config().num_priors(),
        classes: spec.classes,
        objects: spec.objects.max(1),
    };
    let evaluations = if backend == BackendChoice::Both { 2 } else { 1 };
    let estimate = ssdkd::limits::Estimate::evaluations(&shape, request, evaluations).generated();
    let what = format!(
        "{flag} {} × {}'s {} priors × {} classes",
        shape.batch,
        spec.preset.name(),
        shape.priors,
        shape.classes
    );
    ssdkd::limits::check_estimate(&estimate, &what).map_err(|problem| Error::Config {
        key: flag.into(),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssdkd::agreement::compare;
    use ssdkd::Gradients;

    #[test]
    fn disagreement_beyond_spec_7_exits_4_naming_the_element() {
        let cpu = Evaluation {
            gradients: Some(Gradients {
                student_conf: vec![0.25, -0.5, 0.125],
                student_loc: vec![0.0; 4],
            }),
            ..Evaluation::default()
        };
        assert!(verdict(&compare(&cpu, &cpu)).is_ok());
        let mut gpu = cpu.clone();
        gpu.gradients.as_mut().unwrap().student_conf[1] = -0.51;
        let agreement = compare(&gpu, &cpu);
        let line = agreement_line(&agreement);
        assert!(
            line.contains("DISAGREE") && line.contains("grad_student_conf[1]"),
            "{line}"
        );
        assert_eq!(verdict(&agreement).unwrap_err().exit_code(), 4);
    }
}
