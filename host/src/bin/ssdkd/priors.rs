//! `ssdkd priors`: a preset's prior boxes, printed or written to a safetensors file.

use crate::args::PriorsArgs;
use crate::failure::{shown, Outcome};
use crate::stdout::Out;
use ssdkd::io::output::write_f32_tensors_cancellable;

pub(crate) fn priors(args: &PriorsArgs, out: &mut Out) -> Outcome {
    let config = args.preset.config();
    let priors = config.priors();
    match &args.out {
        Some(path) => {
            let metadata = [("prior_preset".to_owned(), args.preset.name().to_owned())].into();
            write_f32_tensors_cancellable(
                path,
                &[],
                &[(
                    "priors",
                    vec![priors.len(), 4],
                    bytemuck::cast_slice(&priors),
                )],
                Some(metadata),
                Some(crate::interrupt::token()),
            )?;
            eprintln!(
                "ssdkd: wrote {} priors of {} to {}",
                priors.len(),
                args.preset.name(),
                shown(path)
            );
        }
        None => {
            out.line(format_args!(
                "# {}: {} priors, centre form",
                args.preset.name(),
                priors.len()
            ))?;
            out.line(format_args!("cx,cy,w,h"))?;
            for [cx, cy, w, h] in &priors {
                out.line(format_args!("{cx},{cy},{w},{h}"))?;
            }
        }
    }
    Ok(())
}
