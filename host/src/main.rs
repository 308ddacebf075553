//! `ssdkd`: the command line of SPEC §9 — `demo`, `eval`, `bench`, `priors`.

//!
//! The library decides what went wrong ([`ssdkd::Error`]); this binary decides the exit code
//! (SPEC §9, README): 0 success; 1 a GPU or numerical failure; 2 bad input, usage or an
//! unwritable output; 3 no GPU adapter where one was required; 4 `--backend both` found the
//! backends disagreeing beyond SPEC §7. Every message is one line on stderr.

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use ssdkd::agreement::{compare, Agreement};
use ssdkd::config_keys::{ConfigKey, CONFIG_KEYS};
use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::file::{parse_preset, write_f32_tensors, write_gradients, ConfigOverrides};
use ssdkd::{Backend, Error, Evaluation, LossConfig, PriorPreset, Request};
use std::io::{StdoutLock, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "ssdkd",
    version,
    about = "SSD knowledge-distillation loss and gradient on the CPU and on any GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
enum BackendChoice {
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
struct DemoArgs {
    /// Images in the demo batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch: u32,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
}

#[derive(Args)]
struct EvalArgs {
    /// The batch file (safetensors, SPEC §8).
    file: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Print one JSON object per backend on stdout.
    #[arg(long)]
    json: bool,
    /// Write grad_student_conf and grad_student_loc (f32) to this safetensors file.
    #[arg(long, value_name = "OUT.safetensors")]
    grad_out: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigFlags,
}

#[derive(Args)]
struct BenchArgs {
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8u32, 32, 128],
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch: Vec<u32>,
    /// Classes including background.
    #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u32).range(2..=1024))]
    classes: u32,
    /// Prior preset.
    #[arg(long, default_value = "ssd300", value_parser = preset_arg)]
    preset: PriorPreset,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Timed iterations per configuration (after 2 warm-up runs).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    iters: u32,
    /// One JSON object per configuration on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PriorsArgs {
    /// Preset name: ssd300, ssd300-strided, ssd512, mobilenet300.
    #[arg(long, value_parser = preset_arg)]
    preset: PriorPreset,
    /// Write a safetensors file with the tensor `priors` [P, 4] instead of printing.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Config flags, one per row of [`CONFIG_KEYS`] (`--threshold`, `--temperature`, …) and
/// `--preset`: each overrides the file's `config` metadata, which overrides the defaults.
/// Values may be negative (`--reg-m -0.2`).
#[derive(Default)]
struct ConfigFlags(ConfigOverrides);

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

/// Why a command did not succeed; [`Failure::exit_code`] is the one place exit codes are
/// decided.
enum Failure {
    /// What the library reports.
    Library(Error),
    /// A command-line combination that cannot work.
    Usage(String),
    /// `--backend both`: the backends disagree beyond SPEC §7 (already reported).
    Disagree,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Library(e)
    }
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Library(Error::NoAdapter(_)) => 3,
            Failure::Library(Error::Gpu(_) | Error::Numerical { .. }) => 1,
            Failure::Library(_) | Failure::Usage(_) => 2,
            Failure::Disagree => 4,
        }
    }

    /// The one-line message, if any: a config key is shown with the flag that sets it; a
    /// closed pipe on stdout is not worth a message (as `head` users expect).
    fn message(&self) -> Option<String> {
        match self {
            Failure::Library(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                None
            }
            Failure::Library(e @ Error::Config { key, .. }) => Some(match ConfigKey::find(key) {
                Some(k) => format!("{e} (flag --{})", k.flag),
                None => e.to_string(),
            }),
            Failure::Library(e) => Some(e.to_string()),
            Failure::Usage(problem) => Some(problem.clone()),
            Failure::Disagree => None,
        }
    }
}

type Outcome<T = ()> = std::result::Result<T, Failure>;

/// One line: control characters (a newline in a file name…) escaped.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Whether the process started with stdout (descriptor 1) closed, as `ssdkd eval FILE >&-`
/// starts it. Rust's runtime reopens a closed standard descriptor on `/dev/null` before
/// `main`, so that every write would succeed and the result be lost; this is recorded by a
/// constructor that runs before the runtime (an `.init_array` entry, Linux and Android).
static STDOUT_CLOSED_AT_START: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

#[cfg(any(target_os = "linux", target_os = "android"))]
mod stdout_probe {
    use std::sync::atomic::Ordering;

    extern "C" fn probe() {
        // SAFETY: fcntl(F_GETFD) on a descriptor number only reads the descriptor table.
        let closed = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFD) } == -1;
        super::STDOUT_CLOSED_AT_START.store(closed, Ordering::Relaxed);
    }

    #[used]
    #[link_section = ".init_array"]
    static PROBE: extern "C" fn() = probe;
}

/// Results on stdout, written explicitly so that a failing stdout (full disk, closed pipe,
/// closed descriptor) is an error rather than a panic or a silent loss.
struct Out(StdoutLock<'static>);

impl Out {
    fn new() -> Self {
        Self(std::io::stdout().lock())
    }

    /// An error when the process started with stdout closed, where a result would be lost.
    fn open(&self) -> Outcome {
        if STDOUT_CLOSED_AT_START.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(stdout_error(std::io::Error::from_raw_os_error(libc::EBADF)));
        }
        Ok(())
    }

    fn line(&mut self, text: std::fmt::Arguments<'_>) -> Outcome {
        writeln!(self.0, "{text}").map_err(stdout_error)
    }

    fn flush(&mut self) -> Outcome {
        self.0.flush().map_err(stdout_error)
    }
}

fn stdout_error(source: std::io::Error) -> Failure {
    Failure::Library(Error::Io {
        path: "<stdout>".into(),
        source,
    })
}

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
    let mut out = Out::new();
    // Every command's result goes to stdout: with stdout closed, refuse before any work
    // (and before any --grad-out file is written).
    let outcome = out
        .open()
        .and_then(|()| match cli.command {
            Command::Demo(args) => demo(&args, &mut out),
            Command::Eval(args) => eval(&args, &mut out),
            Command::Bench(args) => bench(&args, &mut out),
            Command::Priors(args) => priors(&args, &mut out),
        })
        .and_then(|()| out.flush());
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

/// The backends a choice names, in print order. `auto` says on stderr when it falls back.
fn backends(choice: BackendChoice) -> Outcome<Vec<Backend>> {
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

fn timed(
    backend: &mut Backend,
    batch: &ssdkd::Batch<'_>,
    config: &LossConfig,
    request: Request,
) -> Outcome<(Evaluation, Duration)> {
    let start = Instant::now();
    let eval = backend.evaluate(batch, config, request)?;
    Ok((eval, start.elapsed()))
}

fn print_terms(out: &mut Out, backend: &Backend, eval: &Evaluation, elapsed: Duration) -> Outcome {
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
fn agreement_line(agreement: &Agreement) -> String {
    let verdict = if agreement.agrees() {
        "the backends agree to SPEC §7"
    } else {
        "the backends DISAGREE beyond SPEC §7"
    };
    format!("agreement: {verdict}: gpu against cpu, {agreement}")
}

/// `--backend both` as a verifier: disagreement beyond SPEC §7 is a failure (exit code 4).
fn verdict(agreement: &Agreement) -> Outcome {
    if agreement.agrees() {
        Ok(())
    } else {
        Err(Failure::Disagree)
    }
}

/// Refuses a synthetic batch (`demo`, `bench`) that would not fit in memory, naming the
/// flags and the estimate (limits.rs).
fn check_synthetic(
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

fn demo(args: &DemoArgs, out: &mut Out) -> Outcome {
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

fn eval(args: &EvalArgs, out: &mut Out) -> Outcome {
    // The output must not be a special file or the input; checked before anything is read.
    if let Some(path) = &args.grad_out {
        ssdkd::output::check_target(path, &[&args.file])?;
    }
    let request = Request {
        gradients: args.grad_out.is_some() || args.backend == BackendChoice::Both,
        ..Request::default()
    };
    let evaluations = if args.backend == BackendChoice::Both {
        2
    } else {
        1
    };
    // Bounded reading, and the memory check before the tensors are read (input.rs).
    let file = ssdkd::file::read_batch_file(&args.file, &args.config.0, &request, evaluations)?;
    let batch = file.batch();
    if args.grad_out.is_some() && args.backend == BackendChoice::Both {
        return Err(Failure::Usage(
            "--grad-out needs a single backend (cpu, gpu or auto), not both".into(),
        ));
    }
    let mut results = Vec::new();
    for mut backend in backends(args.backend)? {
        let (eval, elapsed) = timed(&mut backend, &batch, &file.config, request)?;
        results.push((backend, eval, elapsed));
    }
    // Write the gradients before printing anything: on failure nothing claims success.
    if let (Some(path), Some((_, eval, _))) = (&args.grad_out, results.first()) {
        if let Some(grads) = &eval.gradients {
            write_gradients(path, &[&args.file], batch.shape(), grads)?;
        }
    }
    for (backend, eval, elapsed) in &results {
        if args.json {
            let t = &eval.terms;
            let s = &eval.sums;
            let line = json!({
                "backend": backend.name(),
                "adapter": backend.adapter(),
                "soft_loss": t.soft_loss,
                "l2_loss": t.l2_loss,
                "loss_c": t.loss_c,
                "loss_l": t.loss_l,
                "total": t.total,
                "num_pos": s.num_pos,
                "num_neg": s.num_neg,
                "num_bounded": s.num_bounded,
                "elapsed_ms": elapsed.as_secs_f64() * 1e3,
            });
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

/// Where the inputs of a timed evaluation live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inputs {
    /// Host memory: uploaded by every evaluation (gradients read back).
    Host,
    /// Prepared once ([`Backend::prepare`]): on a GPU already in its buffers, as a training
    /// loop's outputs are (gradients stay there).
    Device,
}

impl Inputs {
    fn name(self) -> &'static str {
        match self {
            Inputs::Host => "host",
            Inputs::Device => "gpu",
        }
    }
}

/// One timed configuration: a backend, a batch and where its inputs live.
struct Timed<'a> {
    backend: &'a mut Backend,
    batch: ssdkd::Batch<'a>,
    config: LossConfig,
    prepared: Option<ssdkd::Prepared<'a>>,
}

impl<'a> Timed<'a> {
    fn new(
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
    fn once(&mut self, gradients: bool) -> Outcome {
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
    fn median_ms(&mut self, gradients: bool, iters: u32, bar: &ProgressBar) -> Outcome<f64> {
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

fn bench(args: &BenchArgs, out: &mut Out) -> Outcome {
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

fn priors(args: &PriorsArgs, out: &mut Out) -> Outcome {
    let config = args.preset.config();
    let priors = config.priors();
    match &args.out {
        Some(path) => {
            let metadata = [("prior_preset".to_owned(), args.preset.name().to_owned())].into();
            write_f32_tensors(
                path,
                &[(
                    "priors",
                    vec![priors.len(), 4],
                    bytemuck::cast_slice(&priors),
                )],
                Some(metadata),
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

/// A path in a message: one line, control characters escaped.
fn shown(path: &Path) -> String {
    one_line(&path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssdkd::{Gradients, InputError, Tensor};

    #[test]
    fn exit_codes_of_every_failure() {
        let io = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        let cases: [(Failure, u8); 9] = [
            (Error::NoAdapter("none".into()).into(), 3),
            (Error::Gpu("device lost".into()).into(), 1),
            (
                Error::Numerical {
                    what: "total",
                    index: None,
                    value: f64::NAN,
                }
                .into(),
                1,
            ),
            (
                Error::Input(InputError::BadPrior {
                    index: 3,
                    prior: [0.5, 0.5, 0.0, 0.1],
                })
                .into(),
                2,
            ),
            (
                Error::Config {
                    key: "temperature".into(),
                    problem: "temperature = 0: must be in [1e-2, 1e6]".into(),
                }
                .into(),
                2,
            ),
            (
                Error::Io {
                    path: "<stdout>".into(),
                    source: io(),
                }
                .into(),
                2,
            ),
            (
                Error::Shape {
                    tensor: "targets",
                    problem: "dimension M is 0".into(),
                }
                .into(),
                2,
            ),
            (
                Failure::Usage("--grad-out needs a single backend".into()),
                2,
            ),
            (Failure::Disagree, 4),
        ];
        for (failure, code) in cases {
            assert_eq!(failure.exit_code(), code, "{:?}", failure.message());
        }
        let config: Failure = Error::Config {
            key: "overlap_threshold".into(),
            problem: "overlap_threshold = 2: must be in (0, 1]".into(),
        }
        .into();
        assert!(config.message().unwrap().ends_with("(flag --threshold)"));
        let pipe: Failure = Error::Io {
            path: "<stdout>".into(),
            source: std::io::ErrorKind::BrokenPipe.into(),
        }
        .into();
        assert_eq!(pipe.message(), None);
        let input: Failure = Error::Input(InputError::NonFinite {
            tensor: Tensor::StudentConf,
            image: Some(1),
            row: 7,
            column: 2,
            value: f32::NAN,
        })
        .into();
        assert_eq!(
            input.message().unwrap(),
            "tensor `student_conf`: non-finite value NaN at image 1, prior 7, column 2"
        );
    }

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
