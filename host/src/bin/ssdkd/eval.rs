//! `ssdkd eval FILE`: a batch file (SPEC §8) on the chosen backends; its terms as text or
//! JSON, its gradients to `--grad-out`.

use crate::args::{BackendChoice, EvalArgs};
use crate::common::{agreement_line, backends, print_terms, timed, verdict};
use crate::failure::{Failure, Outcome};
use crate::stdout::Out;
use serde_json::json;
use ssdkd::agreement::compare;
use ssdkd::io::file::write_gradients;
use ssdkd::Request;

pub(crate) fn eval(args: &EvalArgs, out: &mut Out) -> Outcome {
    // Usage errors come before any file is read or checked.
    if args.grad_out.is_some() && args.backend == BackendChoice::Both {
        return Err(Failure::Usage(
            "--grad-out needs a single backend (cpu, gpu or auto), not both".into(),
        ));
    }
    // The output must not be a special file or the input; checked before anything is read.
    if let Some(path) = &args.grad_out {
        ssdkd::io::output::check_target(path, &[&args.file])?;
    }
    let request = Request {
        gradients: args.grad_out.is_some() || args.backend == BackendChoice::Both,
        decisions: false,
        validate: !args.no_validate,
    };
    let evaluations = if args.backend == BackendChoice::Both {
        2
    } else {
        1
    };
    // Bounded reading, and the memory check before the tensors are read (input.rs).
    let file = ssdkd::io::file::read_batch_file(&args.file, &args.config.0, &request, evaluations)?;
    let batch = file.batch();
    let mut results = Vec::new();
    for mut backend in backends(args.backend)? {
        let (eval, elapsed) = timed(&mut backend, &batch, &file.config, request)?;
        results.push((backend, eval, elapsed));
    }
    // Write the gradients before printing anything: on failure nothing claims success.
    if let (Some(path), Some((_, eval, _))) = (&args.grad_out, results.first()) {
        if let Some(grads) = &eval.gradients {
            write_gradients(
                path,
                &[&args.file],
                batch.shape(),
                grads,
                Some(crate::interrupt::token()),
            )?;
        }
    }
    for (backend, eval, elapsed) in &results {
        if args.json {
            let s = &eval.sums;
            let mut line = json!({
                "backend": backend.name(),
                "adapter": backend.adapter(),
                "num_pos": s.num_pos,
                "num_neg": s.num_neg,
                "num_bounded": s.num_bounded,
                "elapsed_ms": elapsed.as_secs_f64() * 1e3,
            });
            for (name, value) in eval.named_terms() {
                line[name] = json!(value);
            }
            out.line(format_args!("{line}"))?;
        } else {
            print_terms(out, backend, eval, *elapsed)?;
        }
    }
    if let [(_, cpu, _), (_, gpu, _)] = results.as_slice() {
        let agreement = compare(gpu, cpu);
        // The results reach the reader before the verdict.
        out.flush()?;
        eprintln!("ssdkd: {}", agreement_line(&agreement));
        verdict(&agreement)?;
    }
    Ok(())
}
