//! Soak of the GPU backend at changing shapes: `STEPS` evaluations (default 5,000), each of
//! a batch whose shape is drawn among hundreds of (B, M) pairs (B 1–4, 0–10 objects per
//! image, 0–50 padding rows), forward and backward with the gradients read back. Prints the
//! process's resident set size (RSS, from `/proc/self/statm`) and the backend's shape
//! cache ([`ssdkd::gpu::GpuBackend::cache_stats`]) every 500 steps, then the RSS growth
//! after the first 1,000 steps, which is to stay under 1 MiB once the cache is warm.
//!
//! Not a timed test. Run it on a GPU adapter or on lavapipe:
//!
//! ```text
//! NODEVICE_SELECT=1 cargo run --release -p ssdkd --example soak_shapes [STEPS] [P]
//! ```
//!
//! `P` (default 64) is the number of priors, kept small so that 5,000 steps take minutes on
//! a software adapter; the classes are VOC's 21.

use ssdkd::gpu::GpuBackend;
use ssdkd::{Backend, Batch, BatchShape, LossConfig, Request};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().map_or(Ok(5000), |s| s.parse())?;
    let p: usize = args.next().map_or(Ok(64), |s| s.parse())?;
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
        "adapter: {}, P = {p}, C = {c}, {steps} steps",
        backend.adapter()
    );
    let config = LossConfig::DEFAULT;
    let request = Request {
        gradients: true,
        ..Request::default()
    };
    let mut at_1000 = None;
    let mut last = rss();
    let mut pairs = std::collections::HashSet::new();
    for step in 1..=steps {
        let b = 1 + rng.below(4);
        let m = 1 + rng.below(60);
        pairs.insert((b, m));
        let [sl, sc, tl, tc, targets] = tensors(&mut rng, b, p, c, m);
        let shape = BatchShape {
            batch: b,
            priors: p,
            classes: c,
            objects: m,
        };
        let batch = Batch::new(shape, &sl, &sc, &tl, &tc, &targets, &priors)?;
        let eval = backend.evaluate(&batch, &config, request)?;
        assert!(eval.terms.total.is_finite());
        if step % 500 == 0 {
            last = rss();
            let cache = match &backend {
                Backend::Gpu(gpu, _) => format!("{:?}", gpu.cache_stats()),
                Backend::Cpu(_) => String::new(),
            };
            println!(
                "step {step:5}: RSS {:8.2} MiB, {} (B, M) pairs seen; cache {cache}",
                mib(last as i64),
                pairs.len()
            );
            if step == 1000 {
                at_1000 = Some(last);
            }
        }
    }
    if let Some(at_1000) = at_1000 {
        println!(
            "RSS growth after step 1000: {:+.3} MiB over {} steps",
            mib(last as i64 - at_1000 as i64),
            steps - 1000
        );
    }
    Ok(())
}
