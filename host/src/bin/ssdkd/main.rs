//! `ssdkd`: the command line of SPEC §9 — `demo`, `eval`, `bench`, `priors`.
//!
//! The library decides what went wrong ([`ssdkd::Error`]); this binary decides the exit code
//! (SPEC §9, README; `failure.rs`). Every message is one line on stderr. The arguments are
//! in `args.rs`, stdout in `stdout.rs`, each command in its own file and the bench's timing
//! in `harness.rs`.

mod args;
mod bench;
mod common;
mod demo;
mod eval;
mod failure;
mod harness;
mod interrupt;
mod priors;
mod stdout;

use args::{Cli, Command};
use clap::Parser;
use failure::one_line;
use std::process::ExitCode;
use stdout::Out;

fn main() -> ExitCode {
    // Mesa's Vulkan device-select layer prints "XDG_RUNTIME_DIR is invalid" on a headless
    // machine. It only reorders adapters, which the adapter choice here does not rely on, so
    // the binary turns it off there (before any thread exists).
    if std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && std::env::var_os("NODEVICE_SELECT").is_none()
    {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!(
                "ssdkd: a command is required: demo, eval, bench or priors (see ssdkd --help)"
            );
            return ExitCode::from(2);
        }
        Err(e) if e.use_stderr() => {
            // A usage error: its message (clap's first paragraph, which names the argument)
            // as one line on stderr, exit code 2.
            let text = e.render().to_string();
            let message = text
                .split("\n\n")
                .next()
                .unwrap_or("invalid usage")
                .trim()
                .trim_start_matches("error: ")
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("ssdkd: {}", one_line(&message));
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help and --version.
            return match e.print() {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(2),
            };
        }
    };
    interrupt::install();
    let mut out = Out::new();
    // Every command's result goes to stdout: with stdout closed, refuse before any work
    // (and before any --grad-out file is written).
    let outcome = out
        .open()
        .and_then(|()| match cli.command {
            Command::Demo(args) => demo::demo(&args, &mut out),
            Command::Eval(args) => eval::eval(&args, &mut out),
            Command::Bench(args) => bench::bench(&args, &mut out),
            Command::Priors(args) => priors::priors(&args, &mut out),
        })
        .and_then(|()| out.flush());
    if let Some(code) = interrupt::finish() {
        return ExitCode::from(code);
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if let Some(message) = failure.message() {
                eprintln!("ssdkd: error: {}", one_line(&message));
            }
            ExitCode::from(failure.exit_code())
        }
    }
}
