//! The GPU backend's shape cache ([`GpuCacheBudget`]): however many shapes go through the
//! backend, at most the budget's shapes and bytes stay cached, evicted buffers are freed
//! (also those a kept resident batch had bound), and an evaluation after its shape was
//! evicted gives the same bits as before. Skipped without a GPU adapter, unless
//! `SSDKD_REQUIRE_GPU=1` (lavapipe: also `NODEVICE_SELECT=1`).
#![cfg(feature = "gpu")]

use ssdkd::gpu::{GpuBackend, GpuBatch, GpuCacheBudget, GpuRequest};
use ssdkd::{BatchShape, Evaluation, LossConfig, OwnedBatch, Request};

/// P and C of every batch here; B and M change.
const PRIORS: usize = 48;
const CLASSES: usize = 5;

/// The backend, or `None` (test skipped) without an adapter.
fn gpu() -> Option<GpuBackend> {
    match GpuBackend::new() {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var("SSDKD_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("SSDKD_REQUIRE_GPU=1 but no GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no GPU adapter ({e})");
            None
        }
    }
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// A batch of `b` images and `m` target rows (0 to `m` objects each, padding after them),
/// the same for the same arguments.
fn batch(b: usize, m: usize) -> OwnedBatch {
    let mut rng = Rng((b * 1000 + m) as u64);
    let mut values = |n: usize| (0..n).map(|_| rng.range(-2.0, 2.0)).collect::<Vec<f32>>();
    let (student_loc, student_conf) = (values(b * PRIORS * 4), values(b * PRIORS * CLASSES));
    let (teacher_loc, teacher_conf) = (values(b * PRIORS * 4), values(b * PRIORS * CLASSES));
    let mut targets = Vec::new();
    for image in 0..b {
        let objects = (image + m) % (m + 1);
        for row in 0..m {
            if row < objects {
                let (w, h) = (rng.range(0.1, 0.6), rng.range(0.1, 0.6));
                let (x, y) = (rng.range(0.0, 1.0 - w), rng.range(0.0, 1.0 - h));
                let label = (rng.next() % (CLASSES as u64 - 1)) as f32;
                targets.extend([x, y, x + w, y + h, label]);
            } else {
                targets.extend([0.0, 0.0, 0.0, 0.0, -1.0]);
            }
        }
    }
    let priors = (0..PRIORS)
        .flat_map(|i| {
            let side = 0.1 + 0.1 * (i % 6) as f32;
            [
                (i % 8) as f32 / 8.0 + 0.06,
                (i / 8) as f32 / 6.0 + 0.08,
                side,
                side,
            ]
        })
        .collect::<Vec<f32>>();
    let shape = BatchShape {
        batch: b,
        priors: PRIORS,
        classes: CLASSES,
        objects: m,
    };
    OwnedBatch::new(
        shape,
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        priors,
    )
    .expect("a well-formed batch")
}

/// Every (B, M) of the tests: 4 × 6 = 24 shapes.
fn shapes() -> Vec<(usize, usize)> {
    (1..=4).flat_map(|b| (1..=6).map(move |m| (b, m))).collect()
}

/// The evaluation's every number, to the bit (Rust's `Debug` of a float round-trips).
fn bits(eval: &Evaluation) -> String {
    format!("{eval:?}")
}

/// Live allocations of the device whose buffer label is `label`, when the adapter's
/// allocator reports them (always on Vulkan, lavapipe included).
fn allocations(gpu: &GpuBackend, label: &str) -> Option<usize> {
    gpu.device()
        .poll(ssdkd::gpu::wgpu::PollType::wait_indefinitely())
        .expect("the device idles");
    let report = gpu.device().generate_allocator_report();
    if gpu.device().adapter_info().backend == ssdkd::gpu::wgpu::Backend::Vulkan {
        assert!(report.is_some(), "Vulkan reports its allocations");
    }
    Some(
        report?
            .allocations
            .iter()
            .filter(|a| a.name == label)
            .count(),
    )
}

#[test]
fn host_batches_of_many_shapes_stay_within_the_budget_and_give_the_same_bits() {
    let Some(mut gpu) = gpu() else { return };
    assert_eq!(gpu.cache_stats().budget, GpuCacheBudget::DEFAULT);
    let budget = GpuCacheBudget {
        shapes: 3,
        bytes: 1 << 20,
    };
    gpu.set_cache_budget(budget);
    let config = LossConfig::DEFAULT;
    let request = Request {
        gradients: true,
        decisions: true,
        validate: true,
    };
    let mut first = Vec::new();
    for (round, shapes) in [shapes(), shapes().into_iter().rev().collect()]
        .into_iter()
        .enumerate()
    {
        for (b, m) in shapes {
            let owned = batch(b, m);
            let eval = gpu.evaluate(&owned.batch(), &config, request).unwrap();
            let stats = gpu.cache_stats();
            assert!(
                (1..=budget.shapes).contains(&stats.shapes) && stats.bytes <= budget.bytes,
                "after ({b}, {m}): {stats:?}"
            );
            assert!(stats.bound_sets <= stats.shapes, "{stats:?}");
            if round == 0 {
                first.push(((b, m), bits(&eval)));
            } else {
                // Every shape but the last three was evicted since it was evaluated.
                let before = &first.iter().find(|(s, _)| *s == (b, m)).unwrap().1;
                assert_eq!(&bits(&eval), before, "({b}, {m}) after eviction");
            }
        }
    }
    let stats = gpu.cache_stats();
    assert_eq!(stats.evictions, 2 * 24 - 3 - 3, "{stats:?}");
    if let Some(live) = allocations(&gpu, "ssdkd.conf_target") {
        assert_eq!(live, stats.shapes, "workspaces alive");
    }
    if let Some(live) = allocations(&gpu, "ssdkd.student_conf") {
        assert_eq!(live, stats.shapes, "uploaded batches alive");
    }

    // A smaller budget evicts at once, down to the latest shape when one is over it.
    gpu.set_cache_budget(GpuCacheBudget {
        shapes: 8,
        bytes: 1,
    });
    let stats = gpu.cache_stats();
    assert_eq!(stats.shapes, 1, "{stats:?}");
    assert!(stats.bytes > 1, "{stats:?}");
}

/// Batches kept on the GPU, one per shape (as a training framework keeps them), do not keep
/// the buffers of evicted shapes alive: their bind groups are dropped on eviction and made
/// again on their next evaluation, with the same results.
#[test]
fn kept_resident_batches_do_not_pin_evicted_shapes() {
    let Some(mut gpu) = gpu() else { return };
    let budget = GpuCacheBudget {
        shapes: 2,
        bytes: 64 << 20,
    };
    gpu.set_cache_budget(budget);
    let config = LossConfig::DEFAULT;
    let request = GpuRequest {
        gradients: true,
        read_gradients: true,
        decisions: true,
    };
    let owned: Vec<OwnedBatch> = shapes().into_iter().map(|(b, m)| batch(b, m)).collect();
    let kept: Vec<GpuBatch> = owned
        .iter()
        .map(|o| gpu.upload(&o.batch()).unwrap())
        .collect();
    let mut first = Vec::new();
    for resident in &kept {
        first.push(bits(
            &gpu.evaluate_resident(resident, &config, request).unwrap(),
        ));
        let stats = gpu.cache_stats();
        assert!(stats.shapes <= budget.shapes, "{stats:?}");
        assert!(stats.bound_sets <= stats.shapes, "{stats:?}");
    }
    if let Some(live) = allocations(&gpu, "ssdkd.conf_target") {
        assert_eq!(
            live,
            budget.shapes,
            "workspaces alive with {} kept batches",
            kept.len()
        );
    }
    if let Some(live) = allocations(&gpu, "ssdkd.params") {
        assert_eq!(live, budget.shapes, "bind-group sets alive");
    }
    for ((resident, before), o) in kept.iter().zip(&first).zip(&owned) {
        let again = gpu.evaluate_resident(resident, &config, request).unwrap();
        assert_eq!(&bits(&again), before, "{:?} bound again", resident.shape());
        // The same bits as the batch uploaded from the host.
        let host = gpu
            .evaluate(
                &o.batch(),
                &config,
                Request {
                    gradients: true,
                    decisions: true,
                    validate: true,
                },
            )
            .unwrap();
        assert_eq!(&bits(&host), before, "{:?} from the host", resident.shape());
    }
}

/// The batch used in the cache's test is a real one: its loss is positive and finite and it
/// has positives in some image (so the tests above compare numbers that depend on the data).
#[test]
fn the_batches_have_objects() {
    let b = batch(4, 6);
    let eval = ssdkd::Backend::cpu()
        .evaluate(&b.batch(), &LossConfig::DEFAULT, Request::default())
        .unwrap();
    assert!(eval.sums.num_pos > 0 && eval.terms.total > 0.0, "{eval:?}");
}
