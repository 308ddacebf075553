//! `ssdkd`: the command line of SPEC §9 — `demo`, `eval`, `bench`, `priors`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::file::{parse_preset, write_f32_tensors, ConfigOverrides};
use ssdkd::{Backend, Error, Evaluation, LossConfig, PriorPreset, Request, Result};
use std::path::PathBuf;
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

/// Config flags: each overrides the file's `config` metadata, which overrides the defaults.
#[derive(Args, Default)]
struct ConfigFlags {
    /// Classes including background (must equal the tensors' C).
    #[arg(long)]
    num_classes: Option<u32>,
    /// Matching IoU threshold, in (0, 1].
    #[arg(long)]
    threshold: Option<f32>,
    /// Negatives kept per positive.
    #[arg(long)]
    negpos_ratio: Option<u32>,
    /// Negatives kept in an image with no positives.
    #[arg(long)]
    negatives_for_hard: Option<u32>,
    /// Encoding variances.
    #[arg(long, value_name = "V0,V1", value_parser = floats::<2>)]
    variance: Option<[f32; 2]>,
    /// Distillation temperature T > 0.
    #[arg(long)]
    temperature: Option<f32>,
    /// Object-class weight of the weighted soft loss.
    #[arg(long)]
    pos_w: Option<f32>,
    /// Background weight of the soft loss (> 1 selects the weighted form).
    #[arg(long)]
    neg_w: Option<f32>,
    /// Margin of the teacher bound.
    #[arg(long)]
    reg_m: Option<f32>,
    /// ε of the weighted soft loss.
    #[arg(long)]
    eps: Option<f32>,
    /// Weights of soft, conf, l2 and loc terms.
    #[arg(long, value_name = "S,C,L2,L", value_parser = floats::<4>)]
    weights: Option<[f32; 4]>,
    /// Prior preset, used instead of the file's priors.
    #[arg(long, value_parser = preset_arg)]
    preset: Option<PriorPreset>,
}

impl ConfigFlags {
    fn overrides(&self) -> ConfigOverrides {
        ConfigOverrides {
            num_classes: self.num_classes,
            overlap_threshold: self.threshold,
            negpos_ratio: self.negpos_ratio,
            negatives_for_hard: self.negatives_for_hard,
            variance: self.variance,
            temperature: self.temperature,
            pos_w: self.pos_w,
            neg_w: self.neg_w,
            reg_m: self.reg_m,
            eps: self.eps,
            weights: self.weights,
            preset: self.preset,
        }
    }
}

fn preset_arg(name: &str) -> std::result::Result<PriorPreset, String> {
    parse_preset(name).map_err(|e| match e {
        Error::Config { problem, .. } => problem,
        other => other.to_string(),
    })
}

fn floats<const N: usize>(text: &str) -> std::result::Result<[f32; N], String> {
    let values: Vec<f32> = text
        .split(',')
        .map(|v| v.trim().parse::<f32>().map_err(|e| format!("`{v}`: {e}")))
        .collect::<std::result::Result<_, _>>()?;
    values
        .try_into()
        .map_err(|v: Vec<f32>| format!("expected {N} comma-separated numbers, found {}", v.len()))
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
        Err(e) if e.use_stderr() => {
            // A usage error: one line on stderr (clap's first), exit code 2.
            let text = e.render().to_string();
            eprintln!(
                "ssdkd: {}",
                text.lines()
                    .next()
                    .unwrap_or("invalid usage")
                    .trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let outcome = match cli.command {
        Command::Demo(args) => demo(&args),
        Command::Eval(args) => eval(&args),
        Command::Bench(args) => bench(&args),
        Command::Priors(args) => priors(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssdkd: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// The backends a choice names, in print order. `auto` says on stderr when it falls back.
fn backends(choice: BackendChoice) -> Result<Vec<Backend>> {
    Ok(match choice {
        BackendChoice::Cpu => vec![Backend::Cpu],
        BackendChoice::Gpu => vec![Backend::gpu()?],
        BackendChoice::Both => vec![Backend::Cpu, Backend::gpu()?],
        BackendChoice::Auto => vec![Backend::auto(|e| {
            eprintln!("ssdkd: {e}; falling back to the CPU backend");
        })],
    })
}

fn timed(
    backend: &mut Backend,
    batch: &ssdkd::Batch<'_>,
    config: &LossConfig,
    request: Request,
) -> Result<(Evaluation, Duration)> {
    let start = Instant::now();
    let eval = backend.evaluate(batch, config, request)?;
    Ok((eval, start.elapsed()))
}

fn print_terms(backend: &Backend, eval: &Evaluation, elapsed: Duration) {
    let t = &eval.terms;
    let s = &eval.sums;
    println!("{} — {}", backend.name(), backend.adapter());
    println!("  soft_loss  {:>14.6}", t.soft_loss);
    println!("  l2_loss    {:>14.6}", t.l2_loss);
    println!("  loss_c     {:>14.6}", t.loss_c);
    println!("  loss_l     {:>14.6}", t.loss_l);
    println!("  total      {:>14.6}", t.total);
    println!(
        "  num_pos {}, num_neg {}, num_bounded {}; {:.2} ms",
        s.num_pos,
        s.num_neg,
        s.num_bounded,
        elapsed.as_secs_f64() * 1e3
    );
}

/// How far two evaluations are apart: the largest relative difference of the five losses,
/// and of the gradients in units of SPEC §7's tolerance (≤ 1 agrees).
fn agreement(a: &Evaluation, b: &Evaluation) -> (f64, f64, bool) {
    let terms = |e: &Evaluation| {
        let t = e.terms;
        [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l, t.total]
    };
    let mut loss_ok = true;
    let mut max_rel: f64 = 0.0;
    for (x, y) in terms(a).into_iter().zip(terms(b)) {
        let diff = (x - y).abs();
        max_rel = max_rel.max(diff / y.abs().max(f64::MIN_POSITIVE));
        loss_ok &= if y.abs() < 1e-2 {
            diff <= 1e-6
        } else {
            diff <= 1e-4 * y.abs()
        };
    }
    let counts = |e: &Evaluation| (e.sums.num_pos, e.sums.num_neg, e.sums.num_bounded);
    let mut grad_units: f64 = 0.0;
    if let (Some(ga), Some(gb)) = (&a.gradients, &b.gradients) {
        let pairs = ga.student_conf.iter().zip(&gb.student_conf);
        for (&x, &y) in pairs.chain(ga.student_loc.iter().zip(&gb.student_loc)) {
            let (x, y) = (f64::from(x), f64::from(y));
            grad_units = grad_units.max((x - y).abs() / (1e-3 * y.abs() + 1e-7));
        }
    }
    (
        max_rel,
        grad_units,
        loss_ok && counts(a) == counts(b) && grad_units <= 1.0,
    )
}

/// Refuses a synthetic batch (`demo`, `bench`) that would not fit in memory, naming the
/// flags and the estimate (limits.rs).
fn check_synthetic(
    spec: &SyntheticSpec,
    request: &Request,
    backend: BackendChoice,
    flag: &str,
) -> Result<()> {
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

fn demo(args: &DemoArgs) -> Result<()> {
    // Memory check before generating the batch (limits.rs).
    let spec = SyntheticSpec::demo(args.batch as usize);
    check_synthetic(&spec, &Request::with_gradients(), args.backend, "--batch")?;
    let chosen = backends(args.backend)?;
    let tensors = synthetic_batch(&spec);
    let batch = tensors.batch()?;
    let config = LossConfig::DEFAULT;
    let shape = batch.shape;
    println!(
        "demo batch: B = {}, P = {} (ssd300), C = {}, up to {} objects per image",
        shape.batch, shape.priors, shape.classes, shape.objects
    );
    let mut results = Vec::new();
    for mut backend in chosen {
        let (eval, elapsed) = timed(&mut backend, &batch, &config, Request::with_gradients())?;
        print_terms(&backend, &eval, elapsed);
        results.push(eval);
    }
    if let [cpu, gpu] = results.as_slice() {
        let (rel, grad_units, ok) = agreement(gpu, cpu);
        println!(
            "agreement: largest relative loss difference {rel:.3e}; largest gradient difference {grad_units:.3} \
             × SPEC §7 tolerance; {}",
            if ok { "the backends agree to SPEC §7" } else { "the backends DISAGREE beyond SPEC §7" }
        );
    }
    Ok(())
}

fn eval(args: &EvalArgs) -> Result<()> {
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
    let file =
        ssdkd::input::read_batch_file(&args.file, &args.config.overrides(), &request, evaluations)?;
    let batch = file.batch()?;
    if args.grad_out.is_some() && args.backend == BackendChoice::Both {
        return Err(Error::Config {
            key: "--grad-out".into(),
            problem: "needs a single backend (cpu, gpu or auto), not both".into(),
        });
    }
    let mut results = Vec::new();
    for mut backend in backends(args.backend)? {
        let (eval, elapsed) = timed(&mut backend, &batch, &file.config, request)?;
        results.push((backend, eval, elapsed));
    }
    // Write the gradients before printing anything: on failure nothing claims success.
    if let (Some(path), Some((_, eval, _))) = (&args.grad_out, results.first()) {
        let grads = eval.gradients.as_ref().expect("gradients were requested");
        let s = file.tensors.shape;
        ssdkd::output::write_f32_tensors(
            path,
            &[&args.file],
            &[
                (
                    "grad_student_conf",
                    vec![s.batch, s.priors, s.classes],
                    &grads.student_conf,
                ),
                (
                    "grad_student_loc",
                    vec![s.batch, s.priors, 4],
                    &grads.student_loc,
                ),
            ],
            None,
        )?;
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
            println!("{line}");
        } else {
            print_terms(backend, eval, *elapsed);
        }
    }
    if let [(_, cpu, _), (_, gpu, _)] = results.as_slice() {
        let (rel, grad_units, ok) = agreement(gpu, cpu);
        eprintln!(
            "ssdkd: largest relative loss difference {rel:.3e}, gradient difference {grad_units:.3} × tolerance: {}",
            if ok { "agree to SPEC §7" } else { "DISAGREE beyond SPEC §7" }
        );
    }
    Ok(())
}

/// Where the inputs of a timed evaluation live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inputs {
    /// Host memory: uploaded by every evaluation (gradients read back).
    Host,
    /// Already in GPU buffers, as a training loop's outputs are (gradients stay there).
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
    #[cfg(feature = "gpu")]
    resident: Option<ssdkd::gpu::GpuBatch>,
}

impl<'a> Timed<'a> {
    fn new(
        backend: &'a mut Backend,
        batch: ssdkd::Batch<'a>,
        config: LossConfig,
        inputs: Inputs,
    ) -> Result<Self> {
        #[cfg(feature = "gpu")]
        let resident = match (&mut *backend, inputs) {
            (Backend::Gpu(gpu), Inputs::Device) => Some(gpu.upload(&batch)?),
            _ => None,
        };
        #[cfg(not(feature = "gpu"))]
        let _ = inputs;
        Ok(Self {
            backend,
            batch,
            config,
            #[cfg(feature = "gpu")]
            resident,
        })
    }

    /// One evaluation, forward only or forward and backward. The value scan is skipped, as a
    /// trusted training loop would.
    fn once(&mut self, gradients: bool) -> Result<()> {
        #[cfg(feature = "gpu")]
        if let (Backend::Gpu(gpu), Some(resident)) = (&mut *self.backend, &self.resident) {
            let request = ssdkd::gpu::GpuRequest {
                gradients,
                ..Default::default()
            };
            return gpu
                .evaluate_resident(resident, &self.config, request)
                .map(drop);
        }
        let request = Request {
            gradients,
            validate: false,
            ..Request::default()
        };
        self.backend
            .evaluate(&self.batch, &self.config, request)
            .map(drop)
    }

    /// Median milliseconds of `iters` evaluations.
    fn median_ms(&mut self, gradients: bool, iters: u32, bar: &ProgressBar) -> Result<f64> {
        let mut samples = (0..iters)
            .map(|_| {
                let start = Instant::now();
                self.once(gradients)?;
                bar.inc(1);
                Ok(start.elapsed())
            })
            .collect::<Result<Vec<Duration>>>()?;
        samples.sort();
        Ok(samples[samples.len() / 2].as_secs_f64() * 1e3)
    }
}

fn bench(args: &BenchArgs) -> Result<()> {
    // Memory check of every batch size before any is generated (limits.rs).
    for &b in &args.batch {
        let spec = SyntheticSpec::bench(b as usize, args.classes as usize, args.preset);
        check_synthetic(&spec, &Request::with_gradients(), args.backend, "--batch")?;
    }
    let chosen = backends(args.backend)?;
    let config = LossConfig {
        num_classes: args.classes,
        ..LossConfig::DEFAULT
    };
    if !args.json {
        println!(
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
        );
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
            let batch = tensors.batch()?;
            batch.check(&config, true)?;
            let shape = batch.shape;
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
                    println!("{line}");
                } else {
                    println!(
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
                    );
                }
            }
        }
    }
    Ok(())
}

fn priors(args: &PriorsArgs) -> Result<()> {
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
                path.display()
            );
        }
        None => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut emit = || -> std::io::Result<()> {
                writeln!(
                    out,
                    "# {}: {} priors, centre form",
                    args.preset.name(),
                    priors.len()
                )?;
                writeln!(out, "cx,cy,w,h")?;
                for [cx, cy, w, h] in &priors {
                    writeln!(out, "{cx},{cy},{w},{h}")?;
                }
                out.flush()
            };
            // A closed pipe (`| head`) is not an error worth reporting.
            if let Err(e) = emit() {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(Error::Io {
                        path: "<stdout>".into(),
                        source: e,
                    });
                }
            }
        }
    }
    Ok(())
}
