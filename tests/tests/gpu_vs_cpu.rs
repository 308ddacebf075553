//! The GPU backend against the CPU reference on generated SSD300 batches: small and large
//! batches, a batch over 128 MiB per tensor (split into chunks), batches full of exact IoU
//! ties, and bit-identical results run after run. Skipped loudly without an adapter.

use ssdkd::gpu::{GpuBackend, GpuRequest};
use ssdkd::{BatchShape, Evaluation, LossConfig, OwnedBatch, PriorPreset, Request};
use ssdkd_tests::{assert_elements_close, assert_loss_close};

const ALL: Request = Request {
    gradients: true,
    decisions: true,
    validate: true,
};

/// A small deterministic generator (64-bit LCG, high bits out).
struct Lcg(u64);

impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next_u32() as f32 / (1u64 << 31) as f32)
    }

    fn below(&mut self, n: u32) -> u32 {
        self.next_u32() % n
    }
}

fn ssd300_priors() -> Vec<[f32; 4]> {
    PriorPreset::Ssd300.config().priors()
}

/// An SSD300 batch of `batch` images, C = 21, M = 6 rows of which 0 to 4 are real objects
/// (padding rows anywhere). Mining scores are kept apart (≥ ~3e-4) so that f32 noise cannot
/// reorder them: each student row is a rotation of one fixed set of object-class logits,
/// a background logit that walks through a per-image permutation of a grid, and a per-row
/// shift that leaves the softmax unchanged.
fn generate(
    batch: usize,
    seed: u64,
    object_rows: impl Fn(&mut Lcg, usize) -> Vec<[f32; 5]>,
) -> OwnedBatch {
    let priors = ssd300_priors();
    let (p, c, m) = (priors.len(), 21, 6);
    let mut rng = Lcg(seed);
    let class_logits: Vec<f32> = (0..c - 1).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mut student_conf = Vec::with_capacity(batch * p * c);
    let mut teacher_conf = Vec::with_capacity(batch * p * c);
    let mut student_loc = Vec::with_capacity(batch * p * 4);
    let mut teacher_loc = Vec::with_capacity(batch * p * 4);
    let mut targets = Vec::with_capacity(batch * m * 5);
    for image in 0..batch {
        let stride = [1_009, 2_003, 3_001, 4_001][image % 4]; // coprime to 8732
        let offset = rng.below(p as u32) as usize;
        for prior in 0..p {
            let rank = (prior * stride + offset) % p;
            let shift = rng.uniform(-3.0, 3.0);
            student_conf.push(2.0 - 4.0 * rank as f32 / p as f32 + shift);
            let turn = (prior + image) % (c - 1);
            for k in 0..c - 1 {
                student_conf.push(class_logits[(k + turn) % (c - 1)] + shift);
            }
            for _ in 0..c {
                teacher_conf.push(rng.uniform(-3.0, 3.0));
            }
            for _ in 0..4 {
                student_loc.push(rng.uniform(-1.5, 1.5));
                teacher_loc.push(rng.uniform(-1.5, 1.5));
            }
        }
        let rows = object_rows(&mut rng, image);
        assert!(rows.len() <= m);
        let mut slots = vec![[0.0, 0.0, 0.0, 0.0, -1.0]; m];
        // Real rows keep their order but stand anywhere among the padding.
        let mut free: Vec<usize> = (0..m).collect();
        let mut chosen: Vec<usize> = (0..rows.len())
            .map(|_| free.remove(rng.below(free.len() as u32) as usize))
            .collect();
        chosen.sort_unstable();
        for (row, slot) in rows.iter().zip(chosen) {
            slots[slot] = *row;
        }
        targets.extend(slots.iter().flatten());
    }
    OwnedBatch::new(
        BatchShape {
            batch,
            priors: p,
            classes: c,
            objects: m,
        },
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        priors.iter().flatten().copied().collect(),
    )
    .unwrap()
}

/// 0 to 4 random objects (image 1 of every 8 has none).
fn random_objects(rng: &mut Lcg, image: usize) -> Vec<[f32; 5]> {
    let count = if image % 8 == 1 {
        0
    } else {
        1 + rng.below(4) as usize
    };
    (0..count)
        .map(|_| {
            let w = rng.uniform(0.08, 0.6);
            let h = rng.uniform(0.08, 0.6);
            let x = rng.uniform(0.0, 1.0 - w);
            let y = rng.uniform(0.0, 1.0 - h);
            [x, y, x + w, y + h, rng.below(20) as f32]
        })
        .collect()
}

/// Objects made of exact ties (SPEC §3): one centred on the corner of four same-size priors
/// of the 38×38 map (a four-way tie for its best prior), its duplicate under another label
/// (every prior ties between the two, and both want the same best prior), a pair mirrored
/// about a prior's centre (that prior ties between them), and a copy of a prior box.
fn tied_objects(rng: &mut Lcg, _image: usize) -> Vec<[f32; 5]> {
    let priors = ssd300_priors();
    let cell = 1.0 / 38.0;
    let half = 0.055;
    let (i, j) = (4 + rng.below(28) as usize, 4 + rng.below(28) as usize);
    let (cx, cy) = ((j + 1) as f32 * cell, (i + 1) as f32 * cell);
    let corner = [cx - half, cy - half, cx + half, cy + half];
    let label = rng.below(20) as f32;
    let (i2, j2) = (4 + rng.below(28) as usize, 4 + rng.below(28) as usize);
    let (px, py) = ((j2 as f32 + 0.5) * cell, (i2 as f32 + 0.5) * cell);
    let d = 0.5 * cell;
    let mirrored = |sign: f32| {
        [
            px + sign * d - half,
            py - half,
            px + sign * d + half,
            py + half,
        ]
    };
    let (i3, j3) = (4 + rng.below(30) as usize, 4 + rng.below(30) as usize);
    let copy = priors[4 * (i3 * 38 + j3) + rng.below(4) as usize];
    let (hw, hh) = (copy[2] * 0.5, copy[3] * 0.5);
    let with = |b: [f32; 4], l: f32| [b[0], b[1], b[2], b[3], l];
    vec![
        with(corner, label),
        with(mirrored(-1.0), rng.below(20) as f32),
        with(corner, (label + 1.0) % 20.0),
        with(mirrored(1.0), rng.below(20) as f32),
        with(
            [copy[0] - hw, copy[1] - hh, copy[0] + hw, copy[1] + hh],
            rng.below(20) as f32,
        ),
    ]
}

/// GPU against CPU to SPEC §7: counts, labels and negative mask exactly, losses to 1e-4,
/// gradients to 1e-3 relative + 1e-7 absolute.
fn assert_agree(what: &str, gpu: &Evaluation, cpu: &Evaluation) {
    let (g, c) = (gpu.terms, cpu.terms);
    for (label, a, e) in [
        ("soft_loss", g.soft_loss, c.soft_loss),
        ("l2_loss", g.l2_loss, c.l2_loss),
        ("loss_c", g.loss_c, c.loss_c),
        ("loss_l", g.loss_l, c.loss_l),
        ("total", g.total, c.total),
    ] {
        assert_loss_close(&format!("{what} {label}"), a, e);
    }
    let counts = |e: &Evaluation| (e.sums.num_pos, e.sums.num_neg, e.sums.num_bounded);
    assert_eq!(
        counts(gpu),
        counts(cpu),
        "{what}: (num_pos, num_neg, num_bounded)"
    );
    if let (Some(gd), Some(cd)) = (&gpu.decisions, &cpu.decisions) {
        if let Some(i) = gd
            .conf_target
            .iter()
            .zip(&cd.conf_target)
            .position(|(a, b)| a != b)
        {
            panic!(
                "{what}: conf_target differs first at {i}: GPU {}, CPU {}",
                gd.conf_target[i], cd.conf_target[i]
            );
        }
        if let Some(i) = gd
            .neg_mask
            .iter()
            .zip(&cd.neg_mask)
            .position(|(a, b)| a != b)
        {
            panic!(
                "{what}: neg_mask differs first at {i}: GPU {}, CPU {}",
                gd.neg_mask[i], cd.neg_mask[i]
            );
        }
        assert_elements_close(
            &format!("{what} loc_target"),
            &gd.loc_target,
            &cd.loc_target,
            1e-4,
            1e-4,
        );
    }
    if let (Some(gg), Some(cg)) = (&gpu.gradients, &cpu.gradients) {
        assert_elements_close(
            &format!("{what} grad_student_conf"),
            &gg.student_conf,
            &cg.student_conf,
            1e-3,
            1e-7,
        );
        assert_elements_close(
            &format!("{what} grad_student_loc"),
            &gg.student_loc,
            &cg.student_loc,
            1e-3,
            1e-7,
        );
    }
}

fn compare(
    gpu: &mut GpuBackend,
    what: &str,
    generated: &OwnedBatch,
    config: &LossConfig,
) -> Evaluation {
    let batch = generated.batch();
    let cpu_eval = ssdkd::cpu::evaluate(&batch, config, ALL).unwrap();
    let gpu_eval = gpu
        .evaluate(&batch, config, ALL)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_agree(what, &gpu_eval, &cpu_eval);
    eprintln!(
        "{what}: ok (num_pos {}, num_neg {}, total {})",
        gpu_eval.sums.num_pos, gpu_eval.sums.num_neg, gpu_eval.terms.total
    );
    gpu_eval
}

/// The same result, bit for bit.
fn assert_identical(what: &str, a: &Evaluation, b: &Evaluation) {
    let bits = |e: &Evaluation| {
        let t = e.terms;
        [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l, t.total].map(f64::to_bits)
    };
    assert_eq!(bits(a), bits(b), "{what}: terms");
    assert_eq!(a.sums, b.sums, "{what}: sums");
    let grad_bits = |e: &Evaluation| {
        e.gradients.as_ref().map(|g| {
            let conf: Vec<u32> = g.student_conf.iter().map(|x| x.to_bits()).collect();
            let loc: Vec<u32> = g.student_loc.iter().map(|x| x.to_bits()).collect();
            (conf, loc)
        })
    };
    assert!(grad_bits(a) == grad_bits(b), "{what}: gradients differ");
    assert!(a.decisions == b.decisions, "{what}: decisions differ");
}

#[test]
fn small_batches_agree_with_the_cpu() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("small_batches_agree_with_the_cpu") else {
        return;
    };
    let weighted = LossConfig::default();
    let plain = LossConfig {
        neg_w: 1.0,
        temperature: 2.0,
        reg_m: 0.5,
        ..LossConfig::default()
    };
    compare(
        &mut gpu,
        "B=1 weighted",
        &generate(1, 11, random_objects),
        &weighted,
    );
    compare(
        &mut gpu,
        "B=8 weighted",
        &generate(8, 12, random_objects),
        &weighted,
    );
    compare(
        &mut gpu,
        "B=8 plain KL",
        &generate(8, 13, random_objects),
        &plain,
    );
}

#[test]
fn exact_ties_agree_with_the_cpu() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("exact_ties_agree_with_the_cpu") else {
        return;
    };
    for seed in [21, 22, 23] {
        let generated = generate(4, seed, tied_objects);
        compare(
            &mut gpu,
            &format!("ties seed {seed}"),
            &generated,
            &LossConfig::default(),
        );
    }
}

#[test]
fn repeated_runs_are_bit_identical() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("repeated_runs_are_bit_identical") else {
        return;
    };
    let generated = generate(8, 31, random_objects);
    let batch = generated.batch();
    let config = LossConfig::default();
    let first = gpu.evaluate(&batch, &config, ALL).unwrap();
    for run in 1..4 {
        let again = gpu.evaluate(&batch, &config, ALL).unwrap();
        assert_identical(&format!("run {run}"), &first, &again);
    }
    // The same through buffers already on the GPU, gradients read back...
    let resident = gpu.upload(&batch).unwrap();
    let request = GpuRequest {
        gradients: true,
        read_gradients: true,
        decisions: true,
    };
    let on_gpu = gpu.evaluate_resident(&resident, &config, request).unwrap();
    assert_identical("resident", &first, &on_gpu);
    // ...or left on the GPU: only the sums come back.
    let scalars = gpu
        .evaluate_resident(
            &resident,
            &config,
            GpuRequest {
                gradients: true,
                ..GpuRequest::default()
            },
        )
        .unwrap();
    assert!(scalars.gradients.is_none() && scalars.decisions.is_none());
    assert_eq!(scalars.sums, first.sums);
    // ...and split into chunks of three images: the same bits.
    gpu.set_binding_cap(Some(3 * 8732 * 21 * 4 + 256));
    let chunked = gpu.evaluate(&batch, &config, ALL).unwrap();
    assert_identical("chunked", &first, &chunked);
    gpu.set_binding_cap(None);
}

#[test]
fn chunked_batches_agree_with_the_cpu() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("chunked_batches_agree_with_the_cpu") else {
        return;
    };
    // Chunks of 1 and of 3 images (the last one short), windows not aligned to an image.
    let generated = generate(8, 41, random_objects);
    for images in [1, 3] {
        gpu.set_binding_cap(Some(images * 8732 * 21 * 4 + 256));
        compare(
            &mut gpu,
            &format!("B=8 in chunks of {images}"),
            &generated,
            &LossConfig::default(),
        );
    }
}

#[test]
fn a_batch_over_128_mib_agrees_with_the_cpu() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("a_batch_over_128_mib_agrees_with_the_cpu")
    else {
        return;
    };
    // student_conf alone: 184 · 8732 · 21 · 4 bytes > 128 MiB.
    let generated = generate(184, 51, random_objects);
    assert!(generated.student_conf().len() * 4 > 128 << 20);
    eprintln!("binding limit {} bytes", gpu.binding_limit());
    compare(&mut gpu, "B=184", &generated, &LossConfig::default());
}

#[test]
fn equal_mining_scores_rank_by_lower_index() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("equal_mining_scores_rank_by_lower_index") else {
        return;
    };
    // Three row patterns of logits in multiples of 0.25: three levels of mining score, so
    // the k-th rank falls inside a run of exactly equal scores.
    let mut generated = generate(2, 61, random_objects);
    let c = generated.shape().classes;
    for (row, logits) in generated.student_conf_mut().chunks_exact_mut(c).enumerate() {
        for (k, x) in logits.iter_mut().enumerate() {
            *x = 0.25 * ((row % 3 + k * 5) % 9) as f32;
        }
    }
    compare(&mut gpu, "equal scores", &generated, &LossConfig::default());
}

#[test]
fn caller_buffers_are_evaluated_in_place() {
    use ssdkd::gpu::wgpu;
    let Some(mut gpu) = ssdkd_tests::gpu::backend("caller_buffers_are_evaluated_in_place") else {
        return;
    };
    let generated = generate(2, 71, random_objects);
    let batch = generated.batch();
    let config = LossConfig::default();
    let expected = gpu.evaluate(&batch, &config, ALL).unwrap();

    let make = |gpu: &GpuBackend, data: &[f32], usage: wgpu::BufferUsages| {
        let buffer = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("caller"),
            size: (data.len() * 4) as u64,
            usage,
            mapped_at_creation: false,
        });
        gpu.queue()
            .write_buffer(&buffer, 0, bytemuck::cast_slice(data));
        ssdkd::gpu::GpuSlice::whole(buffer)
    };
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let tensors = ssdkd::gpu::GpuTensors {
        student_loc: make(&gpu, batch.student_loc(), usage),
        student_conf: make(&gpu, batch.student_conf(), usage),
        teacher_loc: make(&gpu, batch.teacher_loc(), usage),
        teacher_conf: make(&gpu, batch.teacher_conf(), usage),
        targets: make(&gpu, batch.targets(), usage),
        priors: make(&gpu, batch.priors(), usage),
    };
    let resident = gpu.wrap(batch.shape(), tensors.clone()).unwrap();
    let request = GpuRequest {
        gradients: true,
        read_gradients: true,
        decisions: true,
    };
    let eval = gpu.evaluate_resident(&resident, &config, request).unwrap();
    assert_identical("caller buffers", &expected, &eval);

    // A buffer the kernels cannot bind is refused up front.
    let mut no_storage = tensors.clone();
    no_storage.targets = make(&gpu, batch.targets(), wgpu::BufferUsages::COPY_DST);
    assert!(matches!(
        gpu.wrap(batch.shape(), no_storage),
        Err(ssdkd::Error::Shape {
            tensor: "targets",
            ..
        })
    ));

    // A GPU failure (a destroyed buffer) is an error, not a panic, and the backend recovers.
    let broken = tensors.clone();
    broken.student_conf.buffer.destroy();
    let broken = gpu.wrap(batch.shape(), broken).unwrap();
    match gpu.evaluate_resident(&broken, &config, request) {
        Err(ssdkd::Error::Gpu(message)) => eprintln!("destroyed buffer: {message}"),
        other => panic!("a destroyed buffer gave {other:?}"),
    }
    let again = gpu.evaluate(&batch, &config, ALL).unwrap();
    assert_identical("after a failure", &expected, &again);
}

/// Hundreds of objects in an image: no GPU invocation may loop over P × M (lavapipe cuts
/// loops that run too long, and took wrong decisions here before the match stage was split
/// into per-prior, per-object and per-image kernels).
#[test]
fn hundreds_of_objects_agree_with_the_cpu() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("hundreds_of_objects_agree_with_the_cpu") else {
        return;
    };
    let generated = generate(2, 31, random_objects);
    let mut shape = generated.shape();
    let [student_loc, student_conf, teacher_loc, teacher_conf, _, priors] =
        generated.into_tensors();
    let mut rng = Lcg(32);
    let objects = 500;
    shape.objects = objects;
    let mut targets = Vec::new();
    for image in 0..2 {
        for row in 0..objects {
            if (row + image) % 7 == 3 {
                targets.extend([0.0, 0.0, 0.0, 0.0, -1.0]); // padding, anywhere
                continue;
            }
            let (w, h) = (rng.uniform(0.02, 0.5), rng.uniform(0.02, 0.5));
            let (x, y) = (rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h));
            targets.extend([x, y, x + w, y + h, rng.below(20) as f32]);
        }
    }
    let generated = OwnedBatch::new(
        shape,
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        priors,
    )
    .unwrap();
    compare(
        &mut gpu,
        "500 object rows",
        &generated,
        &LossConfig::default(),
    );
}

/// Many classes and every row selected (no objects, negatives_for_hard = P): the soft terms
/// are taken a thread per row, not a loop per image (lavapipe cut that loop before).
#[test]
fn many_classes_every_row_selected_agree_with_the_cpu() {
    let Some(mut gpu) =
        ssdkd_tests::gpu::backend("many_classes_every_row_selected_agree_with_the_cpu")
    else {
        return;
    };
    let priors = ssd300_priors();
    let (p, c) = (priors.len(), 300);
    let mut rng = Lcg(41);
    let mut logits = |n: usize| (0..n).map(|_| rng.uniform(-4.0, 4.0)).collect::<Vec<f32>>();
    let (student_conf, teacher_conf) = (logits(p * c), logits(p * c));
    let (student_loc, teacher_loc) = (logits(p * 4), logits(p * 4));
    let generated = OwnedBatch::new(
        BatchShape {
            batch: 1,
            priors: p,
            classes: c,
            objects: 1,
        },
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        vec![0.0, 0.0, 0.0, 0.0, -1.0],
        priors.iter().flatten().copied().collect(),
    )
    .unwrap();
    let config = LossConfig {
        negatives_for_hard: p as u32,
        ..LossConfig::default()
    };
    compare(&mut gpu, "C = 300, every row selected", &generated, &config);
}

// ---------------------------------------------------------------------------------------
// The GPU backend's shape limits (README "GPU limits"): CPU = GPU at each limit, a typed
// refusal (`Error::GpuUnsupported`, before anything is uploaded) just beyond it, and the
// CPU backend taking the batch where the GPU was set to fall back.

/// Loop iterations an invocation may count, less the slack kept for exit tests.
const BUDGET: usize = 65_535 - 256;
/// The largest C with gradients (`grad_conf` loops 10 C times in an invocation).
const MAX_CLASSES_WITH_GRADIENTS: usize = BUDGET / 10;
/// The largest C without gradients (`reduce_rows` loops 6 C times).
const MAX_CLASSES: usize = BUDGET / 6;
/// The largest P (`mine` loops 10 ⌈P / 256⌉ + 2064 times).
const MAX_PRIORS: usize = (BUDGET - 2064) / 10 * 256;

/// One image of P = 16 priors (a 4 × 4 grid) and C classes, random logits, one object.
fn many_classes(c: usize) -> OwnedBatch {
    let p = 16;
    let mut rng = Lcg(c as u64);
    let mut values = |n: usize, r: f32| (0..n).map(|_| rng.uniform(-r, r)).collect::<Vec<f32>>();
    let priors: Vec<f32> = (0..p)
        .flat_map(|i| {
            let (x, y) = ((i % 4) as f32 * 0.25 + 0.125, (i / 4) as f32 * 0.25 + 0.125);
            [x, y, 0.3, 0.3]
        })
        .collect();
    let shape = BatchShape {
        batch: 1,
        priors: p,
        classes: c,
        objects: 1,
    };
    let student_conf = values(p * c, 4.0);
    let teacher_conf = values(p * c, 4.0);
    let student_loc = values(p * 4, 1.0);
    let teacher_loc = values(p * 4, 1.0);
    let targets = vec![0.3, 0.3, 0.6, 0.6, (c - 2) as f32];
    OwnedBatch::new(
        shape,
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        priors,
    )
    .unwrap()
}

fn unsupported(gpu: &mut GpuBackend, what: &str, generated: &OwnedBatch, request: Request) {
    let config = LossConfig {
        ..LossConfig::default()
    };
    match gpu.evaluate(&generated.batch(), &config, request) {
        Err(e @ ssdkd::Error::GpuUnsupported(_)) => {
            assert!(
                e.to_string()
                    .starts_with("the GPU backend cannot take this batch: "),
                "{e}"
            );
            eprintln!("{what}: refused: {e}");
        }
        other => panic!("{what}: {other:?}"),
    }
}

#[test]
fn classes_at_the_limit_agree_and_beyond_are_refused() {
    let Some(mut gpu) =
        ssdkd_tests::gpu::backend("classes_at_the_limit_agree_and_beyond_are_refused")
    else {
        return;
    };
    let config = LossConfig::default();
    let c = MAX_CLASSES_WITH_GRADIENTS;
    compare(
        &mut gpu,
        "C at the limit with gradients",
        &many_classes(c),
        &config,
    );
    unsupported(
        &mut gpu,
        "C over the limit with gradients",
        &many_classes(c + 1),
        ALL,
    );

    let losses = Request {
        gradients: false,
        decisions: true,
        validate: true,
    };
    let c = MAX_CLASSES;
    let generated = many_classes(c);
    let batch = generated.batch();
    let cpu_eval = ssdkd::cpu::evaluate(&batch, &config, losses).unwrap();
    let gpu_eval = gpu.evaluate(&batch, &config, losses).unwrap();
    assert_agree("C at the limit without gradients", &gpu_eval, &cpu_eval);
    assert!(cpu_eval.terms.soft_loss > 1.0, "a soft loss worth checking");
    unsupported(&mut gpu, "C over the limit", &many_classes(c + 1), losses);
}

/// One image of P priors (a grid of small, disjoint boxes), C = 2, one object equal to
/// prior 1000 (one positive). Every negative row has the same logits, so mining selects
/// the lowest-index negatives on both sides exactly.
fn many_priors(p: usize) -> OwnedBatch {
    let side = (p as f64).sqrt().ceil() as usize;
    let cell = 1.0 / side as f32;
    let priors: Vec<f32> = (0..p)
        .flat_map(|i| {
            let (x, y) = (
                ((i % side) as f32 + 0.5) * cell,
                ((i / side) as f32 + 0.5) * cell,
            );
            [x, y, 0.6 * cell, 0.6 * cell]
        })
        .collect();
    let object = &priors[4000..4004];
    let (hw, hh) = (object[2] * 0.5, object[3] * 0.5);
    let mut rng = Lcg(p as u64);
    let mut values = |n: usize| (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
    let shape = BatchShape {
        batch: 1,
        priors: p,
        classes: 2,
        objects: 1,
    };
    let student_loc = values(p * 4);
    let teacher_loc = values(p * 4);
    let targets = vec![
        object[0] - hw,
        object[1] - hh,
        object[0] + hw,
        object[1] + hh,
        0.0,
    ];
    OwnedBatch::new(
        shape,
        student_loc,
        [0.5, -0.5].repeat(p),
        teacher_loc,
        [0.2, 0.1].repeat(p),
        targets,
        priors,
    )
    .unwrap()
}

#[test]
fn priors_at_the_limit_agree_and_beyond_are_refused_or_fall_back() {
    let Some(mut gpu) =
        ssdkd_tests::gpu::backend("priors_at_the_limit_agree_and_beyond_are_refused_or_fall_back")
    else {
        return;
    };
    let config = LossConfig {
        ..LossConfig::default()
    };
    let eval = compare(
        &mut gpu,
        "P at the limit",
        &many_priors(MAX_PRIORS),
        &config,
    );
    assert_eq!((eval.sums.num_pos, eval.sums.num_neg), (1, 3));
    let over = many_priors(MAX_PRIORS + 1);
    unsupported(&mut gpu, "P over the limit", &over, ALL);

    // A Backend with a fallback (as `Backend::auto` sets it up) hands it to the CPU.
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&heard);
    let mut backend = ssdkd::Backend::with_fallback(gpu, move |e| {
        sink.lock().unwrap().push(e.to_string());
    });
    let batch = over.batch();
    let fallback = backend.evaluate(&batch, &config, ALL).unwrap();
    let cpu_eval = ssdkd::cpu::evaluate(&batch, &config, ALL).unwrap();
    assert_eq!(fallback, cpu_eval);
    let heard = heard.lock().unwrap();
    assert_eq!(heard.len(), 1);
    assert!(heard[0].contains("ssdkd.mine.mine"), "{heard:?}");
}

#[test]
fn object_rows_at_the_limit_agree_and_beyond_are_refused() {
    let Some(mut gpu) =
        ssdkd_tests::gpu::backend("object_rows_at_the_limit_agree_and_beyond_are_refused")
    else {
        return;
    };
    // `match_priors` loops 3 M times in an invocation.
    let m = BUDGET / 3;
    let with_rows = |m: usize| {
        let generated = many_classes(21);
        let mut shape = generated.shape();
        shape.objects = m;
        let [student_loc, student_conf, teacher_loc, teacher_conf, _, priors] =
            generated.into_tensors();
        let mut targets = [0.0, 0.0, 0.0, 0.0, -1.0].repeat(m);
        for (row, object) in [
            (0, [0.1, 0.1, 0.4, 0.4, 3.0]),
            (m / 2, [0.5, 0.5, 0.9, 0.8, 7.0]),
            (m - 1, [0.3, 0.3, 0.6, 0.6, 1.0]),
        ] {
            targets[5 * row..5 * row + 5].copy_from_slice(&object);
        }
        OwnedBatch::new(
            shape,
            student_loc,
            student_conf,
            teacher_loc,
            teacher_conf,
            targets,
            priors,
        )
        .unwrap()
    };
    let config = LossConfig {
        ..LossConfig::default()
    };
    compare(&mut gpu, "M at the limit", &with_rows(m), &config);
    unsupported(&mut gpu, "M over the limit", &with_rows(m + 1), ALL);
}

/// Random configurations over the range the GPU accepts (temperature up to its limit of
/// 20, plain and class-weighted soft terms, any weights) and logits from ±1 up to ±1e6:
/// CPU = GPU to SPEC §7, every loss and gradient finite; a temperature over the limit is
/// refused.
#[test]
fn random_configs_and_extreme_logits_agree_with_the_cpu() {
    let Some(mut gpu) =
        ssdkd_tests::gpu::backend("random_configs_and_extreme_logits_agree_with_the_cpu")
    else {
        return;
    };
    let mut rng = Lcg(97);
    for case in 0..24 {
        let c = 2 + rng.below(30) as usize;
        let mut generated = many_classes(c);
        let magnitude = [1.0, 30.0, 1e3, 1e4, 1e6][case % 5];
        for v in generated.student_conf_mut() {
            *v *= magnitude / 4.0;
        }
        for v in generated.teacher_conf_mut() {
            *v *= magnitude / 4.0;
        }
        let temperature = [0.05, 0.5, 1.0, 3.0, 8.0, 20.0][case % 6];
        let config = LossConfig {
            temperature,
            neg_w: if case % 2 == 0 {
                1.0
            } else {
                rng.uniform(1.01, 4.0)
            },
            pos_w: rng.uniform(0.1, 3.0),
            negatives_for_hard: rng.below(16),
            weights: ssdkd::LossWeights {
                soft: rng.uniform(0.0, 5.0),
                conf: rng.uniform(0.0, 5.0),
                l2: rng.uniform(0.0, 5.0),
                loc: rng.uniform(0.0, 5.0),
            },
            ..LossConfig::default()
        };
        let what = format!("case {case}: C {c}, |logits| ≤ {magnitude:e}, T {temperature}");
        let eval = compare(&mut gpu, &what, &generated, &config);
        let t = eval.terms;
        assert!(
            [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l, t.total]
                .iter()
                .all(|v| v.is_finite()),
            "{what}: {t:?}"
        );
        let g = eval.gradients.unwrap();
        assert!(
            g.student_conf
                .iter()
                .chain(&g.student_loc)
                .all(|v| v.is_finite()),
            "{what}"
        );
    }
    let generated = many_classes(5);
    let config = LossConfig {
        temperature: 20.5,
        ..LossConfig::default()
    };
    let batch = generated.batch();
    assert!(matches!(
        gpu.evaluate(&batch, &config, ALL),
        Err(ssdkd::Error::GpuUnsupported(_))
    ));
}

/// An image over the storage-binding size is refused with the typed error (before any
/// upload), and handed to the CPU backend where the GPU was set to fall back.
#[test]
fn an_image_over_the_binding_size_is_refused_or_falls_back() {
    let Some(mut gpu) =
        ssdkd_tests::gpu::backend("an_image_over_the_binding_size_is_refused_or_falls_back")
    else {
        return;
    };
    let generated = many_classes(300); // 16 × 300 × 4 = 19,200 bytes of logits per image
    gpu.set_binding_cap(Some(16 << 10));
    unsupported(&mut gpu, "an image over a 16 KiB binding", &generated, ALL);
    let config = LossConfig::default();
    let batch = generated.batch();
    let mut backend = ssdkd::Backend::with_fallback(gpu, |e| eprintln!("fell back: {e}"));
    assert_eq!(
        backend.evaluate(&batch, &config, ALL).unwrap(),
        ssdkd::cpu::evaluate(&batch, &config, ALL).unwrap()
    );
    let ssdkd::Backend::Gpu(mut gpu, _) = backend else {
        unreachable!("made with a GPU")
    };
    gpu.set_binding_cap(None);
    compare(
        &mut gpu,
        "the same image within the binding",
        &generated,
        &config,
    );
}
