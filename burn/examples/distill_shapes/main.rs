//! distill_shapes: distil a small SSD detector from a larger one with ssdkd's losses in
//! Burn, on synthetic shapes — the Rust twin of `examples/distill_shapes.py`.
//!
//! ```sh
//! cargo run --release --manifest-path burn/Cargo.toml --example distill_shapes -- \
//!     [--quick] [--device cpu|wgpu] [--json] [--seed N]
//! ```
//!
//! 1. Data are made on the fly from the seed (no download): 64×64 images of 1–5 filled
//!    rectangles, ellipses and triangles in varied colours and sizes, sometimes overlapping,
//!    on textured noise; a training and a validation split.
//! 2. "Start Teacher Train": an SSD-style teacher (a small conv backbone with three feature
//!    maps, 8×8, 4×4 and 2×2, and a 3×3 conv head per map for box offsets and class logits;
//!    368 priors from ssdkd's prior generation, `PriorConfig`) learns with ssdkd-burn's
//!    `MultiBoxLoss` (conf + loc: cross-entropy with hard-negative mining + smooth L1).
//! 3. "Start teacher2student_KD Train": a thinner student learns from the ground truth and
//!    the frozen teacher (its outputs computed without gradient) with `MultiBoxLossKd`,
//!    total `0.3·soft + 0.7·conf + 0.5·l2 + loc` (temperature 2, class-weighted soft term).
//! 4. "Start student_baseline Train": the same student, from the same initialisation and
//!    data order, without distillation (`MultiBoxLoss`).
//! 5. mAP@0.5 of all three on the validation split: boxes decoded with the priors and
//!    variances, per-class NMS, VOC-style AP with COCO's 101-point interpolation.
//!
//! Each epoch shows an indicatif bar (on stderr) with the Python example's loss names
//! (`conf_loss`, `loc_loss`, `l2_loss`, `soft_loss`, `lr`) and prints a line; AdamW with a
//! one-cycle learning rate, as in Python. `--device cpu` trains on `Autodiff<Flex>`
//! (ssdkd's CPU backend evaluates the loss on host data), `--device wgpu` on
//! `Autodiff<Wgpu>` (the loss runs on Burn's own wgpu buffers). With `--json` the last
//! line of stdout is one JSON object: `device`, `loss_backend`, `teacher_map50`,
//! `kd_map50`, `baseline_map50`, `seconds` and the run's settings and final losses.
//! `--quick` uses fewer images and epochs (under 3 minutes on 2 CPU cores, also on
//! lavapipe). Given the seed, the data, the initialisation and the data order are fixed.

mod data;
mod eval;
mod loss;
mod model;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use data::{gather, make_split, Rng, Split, CLASSES};
use indicatif::{ProgressBar, ProgressStyle};
use loss::Losses;
use model::TinySsd;
use ssdkd_burn::{FeatureMap, PriorConfig};
use std::fmt::Write as _;
use std::time::Instant;

const IMAGE_SIZE: usize = 64;
const NUM_CLASSES: usize = CLASSES.len() + 1; // class 0 is background
const VARIANCE: [f32; 2] = [0.1, 0.2];
const TEACHER_WIDTH: usize = 16;
const STUDENT_WIDTH: usize = 6;
const AR_2: &[f32] = &[2.0];
const AR_23: &[f32] = &[2.0, 3.0];
/// Priors of the three feature maps (strides 8, 16, 32 on 64 px).
const FEATURE_MAPS: [FeatureMap<'static>; 3] = [
    FeatureMap { size: 8, step: Some(8.0), min_size: 8.0, max_size: 20.0, aspect_ratios: AR_2 },
    FeatureMap { size: 4, step: Some(16.0), min_size: 20.0, max_size: 34.0, aspect_ratios: AR_23 },
    FeatureMap { size: 2, step: Some(32.0), min_size: 34.0, max_size: 56.0, aspect_ratios: AR_2 },
];

/// The loss names shown on the bars and in the log, as the Python example spells them.
fn shown_name(term: &str) -> &str {
    match term {
        "loss_c" => "conf_loss",
        "loss_l" => "loc_loss",
        other => other,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DeviceChoice {
    Cpu,
    Wgpu,
}

struct Args {
    quick: bool,
    device: DeviceChoice,
    json: bool,
    seed: u64,
    train_images: usize,
    val_images: usize,
    epochs: usize,
    batch: usize,
    lr: f64,
    temperature: f32,
}

const USAGE: &str = "usage: distill_shapes [--quick] [--device cpu|wgpu] [--json] [--seed N] \
[--epochs N] [--train-images N] [--val-images N] [--batch N] [--lr X] [--temperature T]";

fn parse_args() -> Args {
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    let quick = raw.iter().any(|a| a == "--quick");
    let mut args = Args {
        quick,
        device: DeviceChoice::Cpu,
        json: false,
        seed: 0,
        train_images: if quick { 256 } else { 1600 },
        val_images: if quick { 64 } else { 400 },
        epochs: if quick { 2 } else { 10 },
        batch: 32,
        lr: 4e-3,
        temperature: 2.0,
    };
    raw.reverse();
    let fail = |msg: String| -> ! {
        eprintln!("{msg}\n{USAGE}");
        std::process::exit(2)
    };
    while let Some(flag) = raw.pop() {
        let mut value =
            |name: &str| raw.pop().unwrap_or_else(|| fail(format!("{name} needs a value")));
        fn num<T: std::str::FromStr>(name: &str, v: String) -> T {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{name}: not a number: {v}\n{USAGE}");
                std::process::exit(2)
            })
        }
        match flag.as_str() {
            "--quick" => {}
            "--json" => args.json = true,
            "--device" => {
                args.device = match value("--device").as_str() {
                    "cpu" => DeviceChoice::Cpu,
                    "wgpu" => DeviceChoice::Wgpu,
                    other => fail(format!("--device: cpu or wgpu, not {other}")),
                }
            }
            "--seed" => args.seed = num("--seed", value("--seed")),
            "--epochs" => args.epochs = num("--epochs", value("--epochs")),
            "--train-images" => args.train_images = num("--train-images", value("--train-images")),
            "--val-images" => args.val_images = num("--val-images", value("--val-images")),
            "--batch" => args.batch = num("--batch", value("--batch")),
            "--lr" => args.lr = num("--lr", value("--lr")),
            "--temperature" => args.temperature = num("--temperature", value("--temperature")),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            other => fail(format!("unknown argument {other}")),
        }
    }
    if args.epochs == 0 || args.batch == 0 || args.train_images == 0 || args.val_images == 0 {
        fail("--epochs, --batch, --train-images and --val-images must be positive".into());
    }
    args
}

/// One-cycle learning rate (PyTorch's `OneCycleLR` with its defaults: from lr/25 up to lr
/// over the first 15% of the steps, then down to lr/25/10⁴, both halves cosine).
fn one_cycle(step: usize, total: usize, max_lr: f64) -> f64 {
    let initial = max_lr / 25.0;
    let last = initial / 1e4;
    let up = ((0.15 * total as f64) - 1.0).max(1.0);
    let s = step as f64;
    let cos = |from: f64, to: f64, t: f64| {
        to + (from - to) * (1.0 + (std::f64::consts::PI * t.clamp(0.0, 1.0)).cos()) / 2.0
    };
    if s <= up {
        cos(initial, max_lr, s / up)
    } else {
        cos(max_lr, last, (s - up) / ((total as f64 - 1.0) - up).max(1.0))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Plain,
    Kd,
}

/// Everything the stages share.
struct Ctx {
    args: Args,
    device: Device,
    inner: Device,
    train: Split,
    val: Split,
    priors: Vec<f32>,
    losses: Losses,
}

/// Means of each term and of the total over one pass.
#[derive(Default, Clone)]
struct Means {
    names: Vec<&'static str>,
    sums: Vec<f64>,
    total: f64,
    count: usize,
}

impl Means {
    fn add(&mut self, terms: &[(&'static str, f64)], total: f64, n: usize) {
        if self.names.is_empty() {
            self.names = terms.iter().map(|t| t.0).collect();
            self.sums = vec![0.0; terms.len()];
        }
        for (s, t) in self.sums.iter_mut().zip(terms) {
            *s += t.1 * n as f64;
        }
        self.total += total * n as f64;
        self.count += n;
    }

    fn mean(&self, i: usize) -> f64 {
        self.sums[i] / self.count.max(1) as f64
    }

    fn total(&self) -> f64 {
        self.total / self.count.max(1) as f64
    }

    fn shown(&self) -> String {
        let mut s = String::new();
        for (i, name) in self.names.iter().enumerate() {
            let _ = write!(s, "{} {:.4}  ", shown_name(name), self.mean(i));
        }
        s.trim_end().to_string()
    }

    fn json(&self) -> String {
        let mut s = String::from("{");
        for (i, name) in self.names.iter().enumerate() {
            let _ = write!(s, "\"{name}\": {}, ", json_num(self.mean(i)));
        }
        let _ = write!(s, "\"total\": {}}}", json_num(self.total()));
        s
    }
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.6}")
    } else {
        "null".into()
    }
}

fn images_tensor(images: Vec<f32>, n: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(images, [n, 3, IMAGE_SIZE, IMAGE_SIZE]), device)
}

/// Targets `[B, M, 5]` (SPEC §1) from the host.
fn targets_tensor(targets: Vec<f32>, n: usize, device: &Device) -> Tensor<3> {
    let m = targets.len() / (5 * n);
    Tensor::from_data(TensorData::new(targets, [n, m, 5]), device)
}

/// Trains `model` for the configured epochs; returns it and the last epoch's training and
/// validation means.
fn train_stage(
    ctx: &mut Ctx, stage: Stage, title: &str, mut model: TinySsd, teacher: Option<&TinySsd>,
) -> (TinySsd, Means, Means) {
    println!("{title}");
    let epochs = ctx.args.epochs;
    let n = ctx.train.len();
    let steps_per_epoch = n.div_ceil(ctx.args.batch);
    let total_steps = epochs * steps_per_epoch;
    let mut optim = AdamWConfig::new().with_weight_decay(1e-4).init();
    let mut order_rng = Rng::new(ctx.args.seed + 1); // the same order for every stage
    let teacher = teacher.map(Module::valid); // outputs without gradient
    let style = ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {elapsed} {msg}")
        .expect("template")
        .progress_chars("=> ");
    let mut step = 0;
    let (mut last_train, mut last_val) = (Means::default(), Means::default());
    for epoch in 1..=epochs {
        let started = Instant::now();
        let order = order_rng.permutation(n);
        let flips: Vec<bool> = (0..n).map(|_| order_rng.unit() < 0.5).collect();
        let bar = ProgressBar::new(steps_per_epoch as u64)
            .with_style(style.clone())
            .with_prefix(format!("Epoch {epoch}/{epochs} train"));
        let mut means = Means::default();
        let mut lr = one_cycle(step, total_steps, ctx.args.lr);
        for (chunk, flip) in order.chunks(ctx.args.batch).zip(flips.chunks(ctx.args.batch)) {
            let hb = gather(&ctx.train, chunk, flip);
            let x = images_tensor(hb.images, hb.len, &ctx.device);
            let (loc, conf) = model.forward(x.clone());
            let targets = targets_tensor(hb.targets, hb.len, &ctx.device);
            let out = match (stage, &teacher) {
                (Stage::Kd, Some(t)) => {
                    let t_out = t.forward(x.inner());
                    ctx.losses.kd(loc, conf, t_out, targets)
                }
                _ => ctx.losses.plain(loc, conf, targets),
            };
            lr = one_cycle(step, total_steps, ctx.args.lr);
            let grads = GradientsParams::from_grads(out.total.backward(), &model);
            model = optim.step(lr, model, grads);
            step += 1;
            means.add(&out.terms, out.total_value, hb.len);
            bar.set_message(format!("{}  lr {lr:.2e}", means.shown()));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let val = evaluate_loss(ctx, stage, &model, teacher.as_ref());
        println!(
            "  epoch {epoch:>2}/{epochs}  train {}  total {:.4}  |  val total {:.4}  lr {lr:.2e}  {:.1} s",
            means.shown(),
            means.total(),
            val.total(),
            started.elapsed().as_secs_f64()
        );
        last_train = means;
        last_val = val;
    }
    (model, last_train, last_val)
}

/// The stage's loss on the validation split, without gradient.
fn evaluate_loss(ctx: &Ctx, stage: Stage, model: &TinySsd, teacher: Option<&TinySsd>) -> Means {
    let model = model.valid();
    let mut means = Means::default();
    let indices: Vec<usize> = (0..ctx.val.len()).collect();
    for chunk in indices.chunks(ctx.args.batch) {
        let hb = gather(&ctx.val, chunk, &[]);
        let x = images_tensor(hb.images, hb.len, &ctx.inner);
        let (loc, conf) = model.forward(x.clone());
        let targets = targets_tensor(hb.targets, hb.len, &ctx.inner);
        let out = match (stage, teacher) {
            (Stage::Kd, Some(t)) => ctx.losses.kd(loc, conf, t.forward(x), targets),
            _ => ctx.losses.plain(loc, conf, targets),
        };
        means.add(&out.terms, out.total_value, hb.len);
    }
    means
}

/// mAP@0.5 of `model` on the validation split.
fn mean_ap(ctx: &Ctx, model: &TinySsd) -> f64 {
    let model = model.valid();
    let mut detections = Vec::with_capacity(ctx.val.len());
    let indices: Vec<usize> = (0..ctx.val.len()).collect();
    for chunk in indices.chunks(ctx.args.batch) {
        let hb = gather(&ctx.val, chunk, &[]);
        let (loc, conf) = model.forward(images_tensor(hb.images, hb.len, &ctx.inner));
        let [b, p, c] = conf.dims();
        let loc = loc.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
        let conf = conf.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
        for (l, k) in loc.chunks_exact(p * 4).zip(conf.chunks_exact(p * c)).take(b) {
            detections.push(eval::detect(l, k, &ctx.priors, c, VARIANCE));
        }
    }
    eval::map50(&detections, &ctx.val.objects, CLASSES.len())
}

fn main() {
    let started = Instant::now();
    let args = parse_args();
    let (device_name, base) = match args.device {
        DeviceChoice::Cpu => ("cpu", Device::flex()),
        // Burn's default wgpu device, shared with ssdkd so the loss runs on its buffers.
        DeviceChoice::Wgpu => (
            "wgpu",
            ssdkd_burn::wgpu_device().unwrap_or_else(|e| {
                eprintln!("no wgpu device for ssdkd-burn: {e}");
                std::process::exit(1)
            }),
        ),
    };
    let device = base.clone().autodiff();
    let inner = base;

    let prior_config =
        PriorConfig { image_size: IMAGE_SIZE as f32, feature_maps: &FEATURE_MAPS, clip: true };
    let mut priors4 = vec![[0f32; 4]; prior_config.num_priors()];
    prior_config.write_priors(&mut priors4);
    let priors: Vec<f32> = priors4.concat();
    let boxes_per_cell = FEATURE_MAPS.map(|m| m.boxes_per_cell());

    let train = make_split(args.train_images, args.seed * 2 + 1000, IMAGE_SIZE);
    let val = make_split(args.val_images, args.seed * 2 + 1001, IMAGE_SIZE);
    println!(
        "data: {} training and {} validation images of {IMAGE_SIZE} px, {} training objects; \
         {} priors; {NUM_CLASSES} classes with background; device {device_name}",
        train.len(),
        val.len(),
        train.objects.iter().map(Vec::len).sum::<usize>(),
        priors4.len()
    );

    let losses = Losses::new(args.temperature, &prior_config);
    // ssdkd-burn evaluates on Burn's wgpu buffers exactly when the device is shared with
    // ssdkd (it then counts the bytes it maps back); on Flex through its CPU backend.
    let adapter = ssdkd_burn::adapter_name(&device);
    let loss_backend =
        if ssdkd_burn::bytes_read_back(&device).is_some() { "gpu-resident" } else { "cpu" };

    device.seed(args.seed);
    let teacher = TinySsd::new(TEACHER_WIDTH, NUM_CLASSES, boxes_per_cell, &device);
    device.seed(args.seed + 7);
    let student_init = TinySsd::new(STUDENT_WIDTH, NUM_CLASSES, boxes_per_cell, &device);
    println!(
        "teacher: {} parameters; student: {} parameters; loss on {loss_backend}",
        teacher.num_params(),
        student_init.num_params()
    );

    let mut ctx = Ctx { args, device, inner, train, val, priors, losses };
    let (teacher, teacher_train, teacher_val) =
        train_stage(&mut ctx, Stage::Plain, "Start Teacher Train", teacher, None);
    let (student_kd, kd_train, kd_val) = train_stage(
        &mut ctx,
        Stage::Kd,
        "Start teacher2student_KD Train",
        student_init.clone(),
        Some(&teacher),
    );
    let (student_base, base_train, base_val) = train_stage(
        &mut ctx,
        Stage::Plain,
        "Start student_baseline Train (same student, no distillation)",
        student_init,
        None,
    );

    let maps = [
        ("teacher", mean_ap(&ctx, &teacher)),
        ("student (KD)", mean_ap(&ctx, &student_kd)),
        ("student (baseline)", mean_ap(&ctx, &student_base)),
    ];
    let seconds = started.elapsed().as_secs_f64();
    println!("\nmAP@0.5 on the validation split ({} images)", ctx.val.len());
    println!("  {:<20} {:>8}", "model", "mAP@0.5");
    for (name, value) in maps {
        println!("  {name:<20} {value:>8.3}");
    }
    let gain = maps[1].1 - maps[2].1;
    let verdict = if gain > 0.0 { "beats" } else { "does not beat" };
    println!("distillation {verdict} the baseline here: {gain:+.3} mAP ({seconds:.0} s in all)");
    let read_back = ssdkd_burn::bytes_read_back(&ctx.device);
    if let Some(bytes) = read_back {
        println!("ssdkd mapped {bytes} bytes back from the GPU in all (sums only)");
    }

    if ctx.args.json {
        let a = &ctx.args;
        let stage = |train: &Means, val: &Means| {
            format!("{{\"train\": {}, \"val\": {}}}", train.json(), val.json())
        };
        println!(
            "{{\"device\": \"{device_name}\", \"adapter\": {}, \"loss_backend\": \"{loss_backend}\", \
             \"bytes_read_back\": {}, \
             \"teacher_map50\": {}, \"kd_map50\": {}, \"baseline_map50\": {}, \
             \"kd_minus_baseline\": {}, \"seconds\": {seconds:.1}, \"quick\": {}, \"seed\": {}, \
             \"image_size\": {IMAGE_SIZE}, \"num_priors\": {}, \"train_images\": {}, \
             \"val_images\": {}, \"epochs\": {}, \"batch\": {}, \"lr\": {}, \"temperature\": {}, \
             \"final_losses\": {{\"teacher\": {}, \"teacher2student_KD\": {}, \"student_baseline\": {}}}}}",
            adapter.map_or("null".into(), |a| format!("{a:?}")),
            read_back.map_or("null".into(), |b| b.to_string()),
            json_num(maps[0].1),
            json_num(maps[1].1),
            json_num(maps[2].1),
            json_num(gain),
            a.quick,
            a.seed,
            ctx.priors.len() / 4,
            a.train_images,
            a.val_images,
            a.epochs,
            a.batch,
            a.lr,
            a.temperature,
            stage(&teacher_train, &teacher_val),
            stage(&kd_train, &kd_val),
            stage(&base_train, &base_val),
        );
    }
}
