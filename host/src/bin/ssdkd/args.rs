//! The command line's arguments (clap): the four commands and their flags, the config
//! flags generated from [`CONFIG_KEYS`].

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum};
use ssdkd::io::config_keys::CONFIG_KEYS;
use ssdkd::io::file::{parse_preset, ConfigOverrides};
use ssdkd::{Error, PriorPreset};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ssdkd",
    version,
    about = "SSD knowledge-distillation loss and gradient on the CPU and on any GPU"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Evaluate a built-in SSD300/VOC-like batch (no input needed) and print the four terms.
    Demo(DemoArgs),
    /// Evaluate a safetensors batch file (SPEC §8).
    Eval(EvalArgs),
    /// Time forward and forward+backward on synthetic batches (medians).
    Bench(BenchArgs),
    /// Print or write the prior boxes of a preset.
    Priors(PriorsArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendChoice {
    /// A GPU when one is found, else the CPU (said on stderr).
    Auto,
    /// The CPU reference on every core.
    Cpu,
    /// A GPU adapter; exit code 3 when there is none.
    Gpu,
    /// The CPU and the GPU, compared.
    Both,
}

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Images in the demo batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) batch: u32,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub(crate) backend: BackendChoice,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// The batch file (safetensors, SPEC §8).
    pub(crate) file: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub(crate) backend: BackendChoice,
    /// Print one JSON object per backend on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write grad_student_conf and grad_student_loc (f32) to this safetensors file.
    #[arg(long, value_name = "OUT.safetensors")]
    pub(crate) grad_out: Option<PathBuf>,
    /// Skip the scan of the logits and offsets (student_loc, student_conf, teacher_loc,
    /// teacher_conf; SPEC §1.3) for a trusted file. Still checked: the shapes, the config,
    /// the priors and the targets (labels, boxes), an error with exit code 2; a GPU checks
    /// the skipped values on the device (the same errors); on the CPU a skipped NaN or ∞
    /// that reaches a term or gradient is a numerical error (exit code 1).
    #[arg(long)]
    pub(crate) no_validate: bool,
    #[command(flatten)]
    pub(crate) config: ConfigFlags,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8u32, 32, 128],
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) batch: Vec<u32>,
    /// Classes including background.
    #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub(crate) classes: u32,
    /// Prior preset.
    #[arg(long, default_value = "ssd300", value_parser = preset_arg)]
    pub(crate) preset: PriorPreset,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub(crate) backend: BackendChoice,
    /// Timed iterations per configuration (after 2 warm-up runs).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) iters: u32,
    /// One JSON object per configuration on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct PriorsArgs {
    /// Preset name: ssd300, ssd300-strided, ssd512, mobilenet300.
    #[arg(long, value_parser = preset_arg)]
    pub(crate) preset: PriorPreset,
    /// Write a safetensors file with the tensor `priors` [P, 4] instead of printing.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

/// Config flags, one per row of [`CONFIG_KEYS`] (`--threshold`, `--temperature`, …) and
/// `--preset`: each overrides the file's `config` metadata, which overrides the defaults.
/// Values may be negative (`--reg-m -0.2`).
#[derive(Default)]
pub(crate) struct ConfigFlags(pub(crate) ConfigOverrides);

impl Args for ConfigFlags {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for key in CONFIG_KEYS {
            cmd = cmd.arg(
                Arg::new(key.key)
                    .long(key.flag)
                    .value_name(key.value_name)
                    .help(key.doc)
                    .allow_hyphen_values(true)
                    .action(ArgAction::Set),
            );
        }
        cmd.arg(
            Arg::new("preset")
                .long("preset")
                .value_name("NAME")
                .help("Prior preset, used instead of the file's priors")
                .value_parser(preset_arg),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for ConfigFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Self::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for key in CONFIG_KEYS {
            if let Some(text) = matches.get_one::<String>(key.key) {
                self.0.set_from_text(key.key, text).map_err(|e| {
                    let problem = match e {
                        Error::Config { problem, .. } => problem,
                        other => other.to_string(),
                    };
                    clap::Error::raw(
                        clap::error::ErrorKind::ValueValidation,
                        format!("invalid value for --{}: {problem}\n", key.flag),
                    )
                })?;
            }
        }
        if let Some(preset) = matches.get_one::<PriorPreset>("preset") {
            self.0.preset = Some(*preset);
        }
        Ok(())
    }
}

fn preset_arg(name: &str) -> std::result::Result<PriorPreset, String> {
    parse_preset(name).map_err(|e| match e {
        Error::Config { problem, .. } => problem,
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_are_the_config_keys() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let eval = cli.find_subcommand("eval").unwrap();
        for key in CONFIG_KEYS {
            let arg = eval
                .get_arguments()
                .find(|a| a.get_long() == Some(key.flag))
                .unwrap_or_else(|| panic!("no flag --{}", key.flag));
            assert_eq!(arg.get_id().as_str(), key.key);
        }
        let cli = Cli::try_parse_from([
            "ssdkd",
            "eval",
            "f",
            "--reg-m",
            "-0.2",
            "--variance",
            "-0.1,0.2",
            "--threshold",
            "0.4",
        ])
        .unwrap();
        let Command::Eval(args) = cli.command else {
            panic!("eval")
        };
        assert_eq!(args.config.0.reg_m, Some(-0.2));
        assert_eq!(args.config.0.variance, Some([-0.1, 0.2]));
        assert_eq!(args.config.0.overlap_threshold, Some(0.4));
    }
}
