//! Soak of the GPU backend at changing shapes: `STEPS` evaluations (default 5,000), each of
//! a batch whose shape is drawn among `4 × MAX_M` (B, M) pairs (B 1–4, M 1–`MAX_M` target
//! rows of which 0–10 objects per image; `MAX_M` 250 by default: 1,000 pairs, so that new
//! shapes keep coming well after step 1,000), forward and backward with the gradients read back. Prints the
//! process's resident set size (RSS, from `/proc/self/statm`), the device's live buffer
//! allocations (where its allocator reports them: Vulkan) and the backend's shape cache
//! ([`ssdkd::gpu::GpuBackend::cache_stats`]) every 500 steps, then the growth of both
//! after the first 1,000 steps, which is to stay under 1 MiB once the cache is warm.
//!
//! Two ways of feeding the batches:
//! - `host` (default): [`ssdkd::Backend::evaluate`] of host slices, as Python and the CLI
//!   do; the backend uploads them into the buffers it caches per shape;
//! - `thread`: as `host`, each evaluation on a new thread, as the Python package runs it
//!   (so that Ctrl-C can interrupt it);
//! - `kept`: a training framework's registry, one resident batch kept per shape (as the
//!   Burn crate keeps them), all bound over the same buffers (written before each step)
//!   and evaluated with [`ssdkd::gpu::GpuBackend::evaluate_resident`].
//!
//! Not a timed test. Run it on a GPU adapter or on lavapipe:
//!
//! ```text
//! NODEVICE_SELECT=1 cargo run --release -p ssdkd --example soak_shapes -- \
//!     [host|thread|kept] [STEPS] [P] [MAX_M]
//! ```
//!
//! `P` (default 64) is the number of priors, kept small so that 5,000 steps take a minute or
//! two on a software adapter; the classes are VOC's 21.

use ssdkd::gpu::{wgpu, GpuBackend, GpuBatch, GpuGradients, GpuRequest, GpuSlice, GpuTensors};
use ssdkd::{Backend, Batch, BatchShape, Evaluation, LossConfig, Request};
use std::collections::HashMap;

/// SplitMix64: the same draws everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> usize {
        (self.next_u64() % n) as usize
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }
}

/// The process's resident set, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("statm's resident field");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page as u64
}

/// Bytes of the device's live buffer allocations, where its allocator reports them (Vulkan,
/// lavapipe included).
fn device_bytes(gpu: &GpuBackend) -> Option<u64> {
    let report = gpu.device().generate_allocator_report()?;
    Some(report.allocations.iter().map(|a| a.size).sum())
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The tensors of one batch: `[B, P, 4]` locs, `[B, P, C]` logits, `[B, M, 5]` targets with
/// 0–10 objects per image and label −1 padding after them.
fn tensors(rng: &mut Rng, b: usize, p: usize, c: usize, m: usize) -> [Vec<f32>; 5] {
    let normal =
        |rng: &mut Rng, n: usize| -> Vec<f32> { (0..n).map(|_| rng.range(-2.0, 2.0)).collect() };
    let mut targets = Vec::with_capacity(b * m * 5);
    for _ in 0..b {
        let objects = rng.below(11).min(m);
        for row in 0..m {
            if row < objects {
                let (w, h) = (rng.range(0.1, 0.6), rng.range(0.1, 0.6));
                let (x, y) = (rng.range(0.0, 1.0 - w), rng.range(0.0, 1.0 - h));
                let label = rng.below(c as u64 - 1) as f32;
                targets.extend([x, y, x + w, y + h, label]);
            } else {
                targets.extend([0.0, 0.0, 0.0, 0.0, -1.0]);
            }
        }
    }
    [
        normal(rng, b * p * 4),
        normal(rng, b * p * c),
        normal(rng, b * p * 4),
        normal(rng, b * p * c),
        targets,
    ]
}

/// A registry of resident batches, one per shape, over one set of buffers as large as the
/// largest shape (what a framework that pools its allocations hands out).
struct Kept {
    buffers: [wgpu::Buffer; 8],
    batches: HashMap<BatchShape, GpuBatch>,
}

impl Kept {
    fn new(gpu: &GpuBackend, max: BatchShape) -> Self {
        let (b, p, c, m) = (max.batch, max.priors, max.classes, max.objects);
        let floats = [
            b * p * 4,
            b * p * c,
            b * p * 4,
            b * p * c,
            b * m * 5,
            p * 4,
            b * p * c,
            b * p * 4,
        ];
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let buffers = floats.map(|n| {
            gpu.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("soak.pool"),
                size: (n * 4) as u64,
                usage,
                mapped_at_creation: false,
            })
        });
        // Room for every shape at once, so that the registry itself never grows.
        let shapes = max.batch * max.objects;
        Self {
            buffers,
            batches: HashMap::with_capacity(shapes),
        }
    }

    fn evaluate(
        &mut self,
        gpu: &mut GpuBackend,
        batch: &Batch<'_>,
        config: &LossConfig,
    ) -> ssdkd::Result<Evaluation> {
        let data = [
            batch.student_loc(),
            batch.student_conf(),
            batch.teacher_loc(),
            batch.teacher_conf(),
            batch.targets(),
            batch.priors(),
        ];
        for (buffer, values) in self.buffers.iter().zip(data) {
            gpu.queue()
                .write_buffer(buffer, 0, bytemuck::cast_slice(values));
        }
        let shape = batch.shape();
        if !self.batches.contains_key(&shape) {
            let [sl, sc, tl, tc, targets, priors, gc, gl] =
                self.buffers.clone().map(GpuSlice::whole);
            let tensors = GpuTensors {
                student_loc: sl,
                student_conf: sc,
                teacher_loc: tl,
                teacher_conf: tc,
                targets,
                priors,
            };
            let gradients = GpuGradients {
                student_conf: gc,
                student_loc: gl,
            };
            let kept = gpu.wrap_with_gradients(shape, tensors, gradients)?;
            self.batches.insert(shape, kept);
        }
        let request = GpuRequest {
            gradients: true,
            read_gradients: true,
            decisions: false,
        };
        gpu.evaluate_resident(&self.batches[&shape], config, request)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "host".into());
    let steps: usize = args.next().map_or(Ok(5000), |s| s.parse())?;
    let p: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let max_m: usize = args.next().map_or(Ok(250), |s| s.parse())?;
    if !["host", "thread", "kept"].contains(&mode.as_str()) {
        return Err(format!("mode {mode:?}: expected host, thread or kept").into());
    }
    let c = 21;
    let mut rng = Rng(2017);
    let priors: Vec<f32> = (0..p)
        .flat_map(|i| {
            let side = 0.1 + 0.8 * (i % 7) as f32 / 7.0;
            let (cx, cy) = ((i % 8) as f32 / 8.0 + 0.06, (i / 8 % 8) as f32 / 8.0 + 0.06);
            [cx, cy, side, side]
        })
        .collect();
    let mut backend = Backend::Gpu(Box::new(GpuBackend::new()?), None);
    println!(
        "adapter: {}, mode {mode}, P = {p}, C = {c}, B 1-4, M 1-{max_m}, {steps} steps",
        backend.adapter()
    );
    let mut kept = match &backend {
        Backend::Gpu(gpu, _) if mode == "kept" => Some(Kept::new(
            gpu,
            BatchShape {
                batch: 4,
                priors: p,
                classes: c,
                objects: max_m,
            },
        )),
        _ => None,
    };
    let config = LossConfig::DEFAULT;
    let request = Request {
        gradients: true,
        ..Request::default()
    };
    let mut at_1000 = None;
    let mut last = (rss(), None);
    let mut pairs = std::collections::HashSet::new();
    for step in 1..=steps {
        let b = 1 + rng.below(4);
        let m = 1 + rng.below(max_m as u64);
        pairs.insert((b, m));
        let [sl, sc, tl, tc, targets] = tensors(&mut rng, b, p, c, m);
        let shape = BatchShape {
            batch: b,
            priors: p,
            classes: c,
            objects: m,
        };
        let batch = Batch::new(shape, &sl, &sc, &tl, &tc, &targets, &priors)?;
        let eval = match (&mut backend, &mut kept) {
            (Backend::Gpu(gpu, _), Some(kept)) => kept.evaluate(gpu, &batch, &config)?,
            _ if mode == "thread" => std::thread::scope(|scope| {
                let worker = scope.spawn(|| backend.evaluate(&batch, &config, request));
                worker.join().expect("the evaluation's thread")
            })?,
            _ => backend.evaluate(&batch, &config, request)?,
        };
        assert!(eval.terms.total.is_finite());
        if step % 500 == 0 {
            last = (rss(), None);
            let (device, cache) = match &backend {
                Backend::Gpu(gpu, _) => (device_bytes(gpu), gpu.cache_stats()),
                Backend::Cpu(_) => unreachable!("a GPU backend"),
            };
            println!(
                "step {step:5}: RSS {:8.2} MiB, {:4} (B, M) pairs seen; device memory {}; \
                 cache: {} shapes, {:.1} KiB, {} bind-group sets, {} evictions",
                mib(last.0 as i64),
                pairs.len(),
                device.map_or("not reported".into(), |b| format!(
                    "{:.2} MiB",
                    mib(b as i64)
                )),
                cache.shapes,
                cache.bytes as f64 / 1024.0,
                cache.bound_sets,
                cache.evictions,
            );
            last.1 = device;
            if step == 1000 {
                at_1000 = Some(last);
            }
        }
    }
    if let Some((rss_1000, device_1000)) = at_1000 {
        let device = match (last.1, device_1000) {
            (Some(now), Some(then)) => format!("{:+.3} MiB", mib(now as i64 - then as i64)),
            _ => "not reported".into(),
        };
        println!(
            "growth after step 1000, over {} steps: RSS {:+.3} MiB, device memory {device}",
            steps - 1000,
            mib(last.0 as i64 - rss_1000 as i64),
        );
    }
    Ok(())
}
