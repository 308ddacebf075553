//! One training step's loss, forward plus backward, on Burn's wgpu device: through the
//! resident path (ssdkd's kernels on Burn's buffers) against the same loss through host
//! memory (tensors read to the host, ssdkd's CPU backend, gradients uploaded), at SSD300
//! (8732 priors), C = 21, 6 objects per image.
//!
//! ```sh
//! cargo run --release --manifest-path burn/Cargo.toml --example bench_step -- [--batch 8,32] [--iters N]
//! ```
//!
//! Prints one JSON object per batch size and path (median and all step times in ms, and
//! ssdkd evaluations per step: 1, the forward's), then one per batch size with the ratio
//! host / resident. `ssdkd bench --backend gpu --batch B` times one evaluation of the
//! same shape for comparison.
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use ssdkd_burn::{LossConfig, LossPath, LossWeights, MultiBoxLossKd, PriorPreset};
use std::time::Instant;

/// Arguments: `--batch 8,32`, `--iters N` (timed steps per configuration, after 2 warm-up).
fn args() -> (Vec<usize>, usize) {
    let mut batches = vec![8, 32];
    let mut iters = 7;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--batch" => {
                batches = value.split(',').map(|b| b.parse().expect("--batch B,B")).collect()
            }
            "--iters" => iters = value.parse().expect("--iters N"),
            _ => panic!("unknown argument {arg}; use --batch B,B and --iters N"),
        }
    }
    (batches, iters)
}

/// Targets `[B, 6, 5]`: six boxes per image with labels 0..19, from a fixed pattern.
fn targets(b: usize, device: &Device) -> Tensor<3> {
    let mut rows = Vec::with_capacity(b * 6 * 5);
    for i in 0..b {
        for j in 0..6 {
            let x = 0.05 + 0.12 * j as f32;
            let y = 0.1 + 0.07 * ((i + j) % 8) as f32;
            rows.extend_from_slice(&[x, y, x + 0.2, y + 0.3, ((i * 6 + j) % 20) as f32]);
        }
    }
    Tensor::from_data(TensorData::new(rows, [b, 6, 5]), device)
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<(), ssdkd_burn::Error> {
    let (batches, iters) = args();
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let plain = ssdkd_burn::wgpu_device()?;
    let adapter = ssdkd_burn::adapter_name(&plain).unwrap_or_default();
    let device = plain.clone().autodiff();
    let (p, c) = (8732, 21);
    let normal = Distribution::Normal(0.0, 1.0);
    for &b in &batches {
        let student_loc = Tensor::<3>::random([b, p, 4], normal, &device).require_grad();
        let student_conf = Tensor::<3>::random([b, p, c], normal, &device).require_grad();
        let teacher_loc = Tensor::<3>::random([b, p, 4], normal, &plain);
        let teacher_conf = Tensor::<3>::random([b, p, c], normal, &plain);
        let targets = targets(b, &device);
        let mut medians = Vec::new();
        for (name, path) in [("resident", LossPath::Auto), ("host", LossPath::Host)] {
            let loss =
                MultiBoxLossKd::new(LossConfig::DEFAULT, PriorPreset::Ssd300).with_path(path);
            let bytes_before = ssdkd_burn::bytes_read_back(&plain).unwrap_or(0);
            let evaluations_before = loss.evaluations();
            let mut times = Vec::new();
            for step in 0..iters + 2 {
                device.sync().expect("sync");
                let start = Instant::now();
                let terms = loss.forward(
                    student_loc.clone(),
                    student_conf.clone(),
                    teacher_loc.clone(),
                    teacher_conf.clone(),
                    targets.clone(),
                )?;
                let grads = terms.weighted(LossWeights::DEFAULT).backward();
                let conf_grad = student_conf.grad(&grads).expect("gradient");
                let loc_grad = student_loc.grad(&grads).expect("gradient");
                // Use the gradients, so that no lazy backend skips making them.
                let check = (conf_grad.sum() + loc_grad.sum()).into_scalar::<f32>();
                assert!(check.is_finite());
                drop(grads);
                if step >= 2 {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            let read_back = ssdkd_burn::bytes_read_back(&plain).unwrap_or(0) - bytes_before;
            let evaluations = loss.evaluations() - evaluations_before;
            let m = median(times.clone());
            medians.push(m);
            println!(
                "{}",
                serde_json::json!({
                    "adapter": adapter, "path": name, "batch": b, "priors": p, "classes": c,
                    "iters": iters, "median_ms": m, "times_ms": times,
                    "ssdkd_bytes_read_back": read_back,
                    "evaluations_per_step": evaluations as f64 / (iters + 2) as f64,
                })
            );
        }
        println!(
            "{}",
            serde_json::json!({
                "adapter": adapter, "batch": b, "host_over_resident": medians[1] / medians[0],
            })
        );
    }
    Ok(())
}
