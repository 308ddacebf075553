//! The CPU backend's fast path (`ssdkd::cpu`, bounded mining over vectorised
//! log-sum-exp) against the core's scalar reference (`forward_image`, `backward_image`),
//! bit for bit: sums, decisions and gradients, on random batches with C = 2, 21, 81 and
//! 1000, rows whose scores crowd the mining threshold (the bound at its tightest), tied
//! scores, and large logits; and the same bits on rayon pools of 1 and 2 threads.

use proptest::prelude::*;
use ssdkd::{BatchShape, Evaluation, LossConfig, OwnedBatch, Request};
use ssdkd_core::stages::r#match::Offsets;
use ssdkd_core::stages::reduce::reduce_batch;
use ssdkd_core::{backward_image, forward_image, GradScale, ImageWorkspace};

/// A small deterministic generator (splitmix64).
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }
}

/// How the student logits are drawn.
#[derive(Clone, Copy, Debug)]
enum Logits {
    /// Independent, uniform in ±scale.
    Spread(f32),
    /// A few distinct rows repeated (many exactly tied scores), each copy nudged by at
    /// most a few ulp on some entries: scores a hair apart around the threshold.
    Crowded,
    /// Every row the same up to one ulp: all negatives tied or next to tied.
    Tied,
}

fn batch(seed: u64, images: usize, priors: usize, classes: usize, logits: Logits) -> OwnedBatch {
    let mut rng = Rng(seed);
    let objects = 3;
    let mut prior_rows = Vec::new();
    for p in 0..priors {
        if p % 5 == 4 {
            // A copy of an earlier prior: tied overlaps (the match's tie rules and rescans).
            let q = 4 * (rng.next_u64() as usize % p);
            let copy: [f32; 4] = prior_rows[q..q + 4].try_into().expect("4 values");
            prior_rows.extend(copy);
            continue;
        }
        let (w, h) = (rng.range(0.05, 0.6), rng.range(0.05, 0.6));
        prior_rows.extend([rng.range(0.1, 0.9), rng.range(0.1, 0.9), w, h]);
    }
    let mut targets = Vec::new();
    for i in 0..images {
        for m in 0..objects {
            let (x, y) = (rng.range(0.0, 0.6), rng.range(0.0, 0.6));
            let label = if m == 1 && i % 2 == 1 {
                -1.0 // a padding row between real ones
            } else {
                (rng.next_u64() % (classes as u64 - 1).max(1)) as f32
            };
            targets.extend([
                x,
                y,
                x + rng.range(0.1, 0.4),
                y + rng.range(0.1, 0.4),
                label,
            ]);
        }
    }
    let n = images * priors * classes;
    let mut student_conf = Vec::with_capacity(n);
    let base: Vec<f32> = (0..4 * classes).map(|_| rng.range(-3.0, 3.0)).collect();
    for r in 0..images * priors {
        for c in 0..classes {
            let x = match logits {
                Logits::Spread(scale) => rng.range(-scale, scale),
                Logits::Crowded => {
                    let b = base[(r % 4) * classes + c];
                    let ulps = (rng.next_u64() % 7) as i32 - 3;
                    if rng.uniform() < 0.3 {
                        f32::from_bits((b.to_bits() as i32 + ulps) as u32)
                    } else {
                        b
                    }
                }
                Logits::Tied => {
                    let b = base[c];
                    if rng.uniform() < 0.05 {
                        f32::from_bits(b.to_bits() + 1)
                    } else {
                        b
                    }
                }
            };
            student_conf.push(x);
        }
    }
    let teacher_conf = (0..n).map(|_| rng.range(-4.0, 4.0)).collect();
    let loc = |rng: &mut Rng| -> Vec<f32> {
        (0..images * priors * 4)
            .map(|_| rng.range(-2.0, 2.0))
            .collect()
    };
    let student_loc = loc(&mut rng);
    let teacher_loc = loc(&mut rng);
    let shape = BatchShape {
        batch: images,
        priors,
        classes,
        objects,
    };
    OwnedBatch::new(
        shape,
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        (0..images).fold(Vec::new(), |_, _| prior_rows.clone()),
    )
    .expect("consistent shapes")
}

/// The core's scalar reference over the batch, image by image:
/// `(sums, conf_target, loc_target, neg_mask, grad_conf, grad_loc)`.
#[allow(clippy::type_complexity)]
fn reference(
    tensors: &OwnedBatch,
    config: &LossConfig,
) -> (
    ssdkd::LossSums,
    Vec<u32>,
    Vec<f32>,
    Vec<u8>,
    Vec<f32>,
    Vec<f32>,
) {
    let batch = tensors.batch();
    let shape = batch.shape();
    let (p, c) = (shape.priors, shape.classes);
    let mut workspaces: Vec<ImageWorkspace> = (0..shape.batch)
        .map(|_| ImageWorkspace::new(p, shape.objects))
        .collect();
    let per_image: Vec<_> = workspaces
        .iter_mut()
        .enumerate()
        .map(|(i, w)| {
            let (mut scratch, mut targets) = w.split();
            forward_image(
                &batch.image(i),
                config,
                Offsets::All,
                &mut scratch,
                &mut targets,
            )
        })
        .collect();
    let sums = reduce_batch(&per_image);
    let scale = GradScale::new(config, sums.num_pos);
    let mut grad_conf = vec![1.0; shape.batch * p * c];
    let mut grad_loc = vec![[1.0; 4]; shape.batch * p];
    let (mut labels, mut offsets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for (i, w) in workspaces.iter_mut().enumerate() {
        let (_, targets) = w.split();
        backward_image(
            &batch.image(i),
            config,
            &targets,
            &scale,
            &mut grad_conf[i * p * c..(i + 1) * p * c],
            &mut grad_loc[i * p..(i + 1) * p],
            false,
        );
        labels.extend_from_slice(targets.conf_target);
        offsets.extend(targets.loc_target.iter().flatten());
        mask.extend_from_slice(targets.neg_mask);
    }
    let grad_loc = grad_loc.into_iter().flatten().collect();
    (sums, labels, offsets, mask, grad_conf, grad_loc)
}

fn fast(tensors: &OwnedBatch, config: &LossConfig, threads: usize) -> Evaluation {
    let request = Request {
        gradients: true,
        decisions: true,
        validate: false,
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a pool")
        .install(|| ssdkd::cpu::evaluate(&tensors.batch(), config, request))
        .expect("valid batch")
}

/// Asserts the fast path's evaluation is the reference's, bit for bit.
fn check(tensors: &OwnedBatch, config: &LossConfig) {
    let (sums, labels, offsets, mask, grad_conf, grad_loc) = reference(tensors, config);
    let one = fast(tensors, config, 1);
    let two = fast(tensors, config, 2);
    assert_eq!(one.sums, two.sums);
    assert_eq!(one.gradients, two.gradients);
    assert_eq!(one.decisions, two.decisions);
    assert_eq!(one.sums, sums, "sums");
    let decisions = one.decisions.expect("asked for");
    assert_eq!(decisions.conf_target, labels, "labels");
    assert_eq!(decisions.loc_target, offsets, "offsets");
    assert_eq!(decisions.neg_mask, mask, "negative mask");
    let gradients = one.gradients.expect("asked for");
    assert_eq!(gradients.student_conf, grad_conf, "grad_student_conf");
    assert_eq!(gradients.student_loc, grad_loc, "grad_student_loc");
    // The case is not empty: something was mined.
    assert!(sums.num_neg > 0 || sums.num_pos == 0);
}

/// The default config (T = 1, class-weighted soft term) at `variant` 0; plain KL at T = 1,
/// and both forms at T = 2 and 4, at 1..=5.
fn config(variant: usize) -> LossConfig {
    let (temperature, neg_w) = [
        (1.0, 1.5),
        (1.0, 1.0),
        (2.0, 1.5),
        (2.0, 1.0),
        (4.0, 1.5),
        (4.0, 1.0),
    ][variant % 6];
    LossConfig {
        temperature,
        neg_w,
        ..LossConfig::DEFAULT
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random logits of every scale, C = 2, 21, 81.
    #[test]
    fn spread_logits_agree_with_the_reference(
        seed in any::<u64>(),
        classes in prop::sample::select(vec![2_usize, 21, 81]),
        scale in prop::sample::select(vec![0.01_f32, 1.0, 4.0, 30.0, 1e4]),
        priors in 40_usize..700,
        variant in 0_usize..6,
    ) {
        check(&batch(seed, 3, priors, classes, Logits::Spread(scale)), &config(variant));
    }

    /// Scores crowded at and around the threshold, and exact ties broken by index.
    #[test]
    fn crowded_and_tied_scores_agree_with_the_reference(
        seed in any::<u64>(),
        classes in prop::sample::select(vec![2_usize, 21, 81]),
        tied in any::<bool>(),
        priors in 40_usize..700,
        variant in 0_usize..6,
    ) {
        let logits = if tied { Logits::Tied } else { Logits::Crowded };
        check(&batch(seed, 2, priors, classes, logits), &config(variant));
    }
}

/// C = 1000 (the widest margin), a few seeds.
#[test]
fn a_thousand_classes_agree_with_the_reference() {
    for seed in 0..3 {
        for logits in [Logits::Spread(3.0), Logits::Crowded] {
            check(&batch(seed, 2, 60, 1000, logits), &config(seed as usize));
        }
    }
}

/// The synthetic batch of `ssdkd demo` (SSD300 priors, the bench's logits).
#[test]
fn the_bench_batch_agrees_with_the_reference() {
    let tensors = ssdkd::demo::synthetic_batch(&ssdkd::demo::SyntheticSpec::demo(4));
    check(&tensors, &LossConfig::DEFAULT);
}

/// The backend's check of the gradient rows it wrote finds what a full scan finds: the
/// same error (NaN logits, let through by a request without the value scan, make their
/// rows' terms and gradients NaN; inside the accepted domain of SPEC §1.3 and §8.3 nothing
/// overflows).
#[test]
fn the_written_rows_check_finds_what_the_full_scan_finds() {
    let mut tensors = batch(5, 2, 200, 21, Logits::Spread(4.0));
    for i in [3 * 21 + 4, 57 * 21, 199 * 21 + 20, 200 * 21 + 7] {
        tensors.student_conf_mut()[i] = f32::NAN;
    }
    let config = config(0);
    let request = Request {
        gradients: true,
        validate: false,
        ..Request::default()
    };
    let unchecked = ssdkd::cpu::evaluate(&tensors.batch(), &config, request).expect("evaluates");
    let scanned = unchecked
        .check_finite()
        .expect_err("the gradients overflow");
    let mut backend = ssdkd::Backend::Cpu(ssdkd::cpu::CpuBackend::new());
    let checked = backend
        .evaluate(&tensors.batch(), &config, request)
        .expect_err("the backend refuses the result");
    assert!(matches!(scanned, ssdkd::Error::Numerical { .. }));
    assert_eq!(format!("{checked:?}"), format!("{scanned:?}"));
}
