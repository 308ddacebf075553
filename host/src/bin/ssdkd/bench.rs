//! `ssdkd bench`: forward and forward+backward medians on synthetic batches, per backend,
//! batch size and (on a GPU) where the inputs live.

use crate::args::BenchArgs;
use crate::common::{backends, check_synthetic};
use crate::failure::Outcome;
use crate::harness::{Inputs, Timed};
use crate::stdout::Out;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::{LossConfig, Request};
use std::time::{Duration, Instant};

pub(crate) fn bench(args: &BenchArgs, out: &mut Out) -> Outcome {
    // Memory check of every batch size before any is generated (limits.rs).
    for &b in &args.batch {
        let spec = SyntheticSpec::bench(b as usize, args.classes as usize, args.preset);
        check_synthetic(&spec, &Request::with_gradients(), args.backend, "--batch")?;
    }
    let chosen = backends(args.backend)?;
    let config = LossConfig::DEFAULT;
    if !args.json {
        out.line(format_args!(
            "{:<5} {:<5} {:<28} {:>6} {:>7} {:>7} {:>11} {:>20} {:>6}",
            "",
            "input",
            "adapter",
            "batch",
            "priors",
            "classes",
            "forward ms",
            "forward+backward ms",
            "iters"
        ))?;
    }
    for mut backend in chosen {
        // On a GPU, time inputs already on the device (the training-loop case) and uploaded ones.
        let modes = if backend.name() == "gpu" {
            vec![Inputs::Device, Inputs::Host]
        } else {
            vec![Inputs::Host]
        };
        let adapter = backend.adapter();
        let name = backend.name();
        for &b in &args.batch {
            let tensors = synthetic_batch(&SyntheticSpec::bench(
                b as usize,
                args.classes as usize,
                args.preset,
            ));
            let batch = tensors.batch();
            batch.check(&config, true)?;
            let shape = batch.shape();
            for &inputs in &modes {
                let mut timed = Timed::new(&mut backend, batch, config, inputs)?;
                // Warm-up, which also tells whether a progress bar is worth drawing.
                let start = Instant::now();
                for _ in 0..2 {
                    timed.once(true)?;
                }
                let bar = if start.elapsed() * args.iters > Duration::from_secs(1) {
                    ProgressBar::with_draw_target(
                        Some(2 * u64::from(args.iters)),
                        ProgressDrawTarget::stderr(),
                    )
                } else {
                    ProgressBar::hidden()
                };
                bar.set_style(
                    ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}<{eta}]")
                        .expect("static template"),
                );
                bar.set_message(format!("{name} B={b} inputs={}", inputs.name()));
                let forward_ms = timed.median_ms(false, args.iters, &bar)?;
                let forward_backward_ms = timed.median_ms(true, args.iters, &bar)?;
                bar.finish_and_clear();
                if args.json {
                    let line = json!({
                        "backend": name,
                        "adapter": adapter,
                        "inputs": inputs.name(),
                        "preset": args.preset.name(),
                        "batch": shape.batch,
                        "priors": shape.priors,
                        "classes": shape.classes,
                        "objects_per_image": shape.objects,
                        "forward_ms": forward_ms,
                        "forward_backward_ms": forward_backward_ms,
                        "iters": args.iters,
                    });
                    out.line(format_args!("{line}"))?;
                } else {
                    out.line(format_args!(
                        "{:<5} {:<5} {:<28} {:>6} {:>7} {:>7} {:>11.3} {:>20.3} {:>6}",
                        name,
                        inputs.name(),
                        adapter,
                        shape.batch,
                        shape.priors,
                        shape.classes,
                        forward_ms,
                        forward_backward_ms,
                        args.iters
                    ))?;
                }
            }
        }
    }
    Ok(())
}
