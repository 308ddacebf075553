//! `ssdkd demo`: a built-in SSD300/VOC-like batch on the chosen backends, its four terms.

use crate::args::DemoArgs;
use crate::common::{agreement_line, backends, check_synthetic, print_terms, timed, verdict};
use crate::failure::Outcome;
use crate::stdout::Out;
use ssdkd::agreement::compare;
use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::{LossConfig, Request};

pub(crate) fn demo(args: &DemoArgs, out: &mut Out) -> Outcome {
    // Memory check before generating the batch (limits.rs).
    let spec = SyntheticSpec::demo(args.batch as usize);
    check_synthetic(&spec, &Request::with_gradients(), args.backend, "--batch")?;
    let chosen = backends(args.backend)?;
    let tensors = synthetic_batch(&spec);
    let batch = tensors.batch();
    let config = LossConfig::DEFAULT;
    let shape = batch.shape();
    out.line(format_args!(
        "demo batch: B = {}, P = {} (ssd300), C = {}, up to {} objects per image",
        shape.batch, shape.priors, shape.classes, shape.objects
    ))?;
    let mut results = Vec::new();
    for mut backend in chosen {
        let (eval, elapsed) = timed(&mut backend, &batch, &config, Request::with_gradients())?;
        print_terms(out, &backend, &eval, elapsed)?;
        results.push(eval);
    }
    if let [cpu, gpu] = results.as_slice() {
        let agreement = compare(gpu, cpu);
        out.line(format_args!("{}", agreement_line(&agreement)))?;
        verdict(&agreement)?;
    }
    Ok(())
}
