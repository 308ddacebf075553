//! The loss on Burn's tensors against ssdkd's CPU backend on the same data (SPEC §7), on
//! Burn's wgpu device (the resident path) and on Flex; autodiff's gradient of a weighted
//! combination of the terms against the library's weighted gradient; slices at offsets and
//! slices that change between steps; no host copy.
//!
//! Without a wgpu adapter the wgpu tests say they were skipped, unless `SSDKD_REQUIRE_GPU=1`
//! (as CI sets), which makes them fail.

use burn::tensor::{Device, Tensor, TensorData};
use ssdkd::agreement::{gradient_elements, loss_difference};
use ssdkd::io::file::{BatchFile, ConfigOverrides};
use ssdkd::{Backend, Evaluation, LossConfig, LossWeights, OwnedBatch, Request};
use ssdkd_burn::{LossPath, MultiBoxLoss, MultiBoxLossKd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Burn's default wgpu device shared with ssdkd (autodiff off), with its wgpu handles;
/// `None` (after saying so) where there is no adapter and `SSDKD_REQUIRE_GPU` is not set.
fn wgpu() -> Option<&'static (Device, ssdkd::gpu::wgpu::Device, ssdkd::gpu::wgpu::Queue)> {
    static DEVICE: OnceLock<Option<(Device, ssdkd::gpu::wgpu::Device, ssdkd::gpu::wgpu::Queue)>> =
        OnceLock::new();
    let device = DEVICE.get_or_init(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            // Mesa's device-select layer complains without it (README).
            std::env::set_var("NODEVICE_SELECT", "1");
        }
        match Device::wgpu_options().init_with_setup() {
            Ok((device, setup)) => {
                ssdkd_burn::share_wgpu_device(&device, setup.device.clone(), setup.queue.clone())
                    .expect("ssdkd's backend on Burn's device");
                Some((device, setup.device, setup.queue))
            }
            Err(why) => {
                assert!(
                    std::env::var("SSDKD_REQUIRE_GPU").as_deref() != Ok("1"),
                    "SSDKD_REQUIRE_GPU=1 but Burn found no wgpu adapter: {why}"
                );
                None
            }
        }
    });
    if device.is_none() {
        eprintln!("skipped: no wgpu adapter");
    }
    device.as_ref()
}

fn golden_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", dir.display());
    files
}

fn read(path: &Path) -> BatchFile {
    BatchFile::read(path, &ConfigOverrides::default()).unwrap()
}

/// The library's evaluation with gradients on the CPU backend.
fn cpu_evaluation(tensors: &OwnedBatch, config: &LossConfig) -> Evaluation {
    let mut cpu = Backend::Cpu(ssdkd::cpu::CpuBackend::new());
    cpu.evaluate(&tensors.batch(), config, Request::with_gradients()).unwrap()
}

fn tensor3(values: &[f32], dims: [usize; 3], device: &Device) -> Tensor<3> {
    Tensor::from_data(TensorData::new(values.to_vec(), dims), device)
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// What Burn computed: the four terms, the weighted total and both gradients.
struct BurnResult {
    terms: [f64; 4],
    total: f64,
    grad_conf: Vec<f32>,
    grad_loc: Vec<f32>,
}

/// Evaluates a batch's tensors on `device` (autodiff on) through the Burn loss, with the
/// total weighted by `weights`, and backpropagates.
fn burn_evaluate(
    tensors: &OwnedBatch, config: &LossConfig, weights: LossWeights, device: &Device,
    path: LossPath,
) -> BurnResult {
    burn_evaluate_with(tensors, config, weights, device, path, tensor3)
}

/// [`burn_evaluate`] with the input tensors made by `make` (values, dims, device).
fn burn_evaluate_with(
    tensors: &OwnedBatch, config: &LossConfig, weights: LossWeights, device: &Device,
    path: LossPath, make: impl Fn(&[f32], [usize; 3], &Device) -> Tensor<3>,
) -> BurnResult {
    let device = device.clone().autodiff();
    let tensors = tensors.batch();
    let s = tensors.shape();
    let (b, p, c, m) = (s.batch, s.priors, s.classes, s.objects);
    let priors: Vec<[f32; 4]> =
        tensors.priors().chunks(4).map(|r| [r[0], r[1], r[2], r[3]]).collect();
    let student_loc = make(tensors.student_loc(), [b, p, 4], &device).require_grad();
    let student_conf = make(tensors.student_conf(), [b, p, c], &device).require_grad();
    let targets = make(tensors.targets(), [b, m, 5], &device);
    let terms = if tensors.has_teacher() {
        let loss = MultiBoxLossKd::new(*config, priors).with_path(path);
        let teacher_loc = make(tensors.teacher_loc(), [b, p, 4], &device);
        let teacher_conf = make(tensors.teacher_conf(), [b, p, c], &device);
        loss.forward(student_loc.clone(), student_conf.clone(), teacher_loc, teacher_conf, targets)
            .unwrap()
    } else {
        let loss = MultiBoxLoss::new(*config, priors).with_path(path);
        let plain = loss.forward(student_loc.clone(), student_conf.clone(), targets).unwrap();
        let zero = plain.loss_c.zeros_like();
        ssdkd_burn::KdTerms {
            soft_loss: zero.clone(),
            l2_loss: zero,
            loss_c: plain.loss_c,
            loss_l: plain.loss_l,
        }
    };
    let total = terms.weighted(weights);
    let grads = total.backward();
    let scalar = |t: Tensor<1>| f64::from(values(t)[0]);
    BurnResult {
        terms: [
            scalar(terms.soft_loss),
            scalar(terms.l2_loss),
            scalar(terms.loss_c),
            scalar(terms.loss_l),
        ],
        total: scalar(total),
        grad_conf: values(student_conf.grad(&grads).expect("student_conf's gradient")),
        grad_loc: values(student_loc.grad(&grads).expect("student_loc's gradient")),
    }
}

/// Asserts SPEC §7's agreement of Burn's result with the library's.
fn assert_agrees(name: &str, burn: &BurnResult, library: &Evaluation) {
    let t = &library.terms;
    let expected = [t.soft_loss, t.l2_loss, t.loss_c, t.loss_l];
    for (i, what) in ssdkd::agreement::TERM_NAMES[..4].iter().copied().enumerate() {
        let d = loss_difference(what, burn.terms[i], expected[i]);
        assert!(d.agrees(), "{name}: {d}");
    }
    let d = loss_difference("total", burn.total, t.total);
    assert!(d.agrees(), "{name}: {d}");
    let grads = library.gradients.as_ref().unwrap();
    for (what, actual, expected) in [
        ("grad_student_conf", &burn.grad_conf, &grads.student_conf),
        ("grad_student_loc", &burn.grad_loc, &grads.student_loc),
    ] {
        let e = gradient_elements(what, actual, expected);
        assert!(e.agrees(), "{name}: {} elements off, worst {:?}", e.failures, e.worst);
    }
}

/// The same batch with the total weighted by `weights` (what autodiff backpropagates).
fn with_weights(config: &LossConfig, weights: LossWeights) -> LossConfig {
    LossConfig { weights, ..*config }
}

#[test]
fn golden_files_agree_on_wgpu() {
    let Some((device, _, _)) = wgpu() else { return };
    for path in golden_files() {
        let file = read(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let library = cpu_evaluation(&file.tensors, &file.config);
        let burn =
            burn_evaluate(&file.tensors, &file.config, file.config.weights, device, LossPath::Auto);
        assert_agrees(&name, &burn, &library);
    }
}

#[test]
fn golden_files_agree_on_flex() {
    for path in golden_files() {
        let file = read(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let library = cpu_evaluation(&file.tensors, &file.config);
        let burn = burn_evaluate(
            &file.tensors,
            &file.config,
            file.config.weights,
            &Device::flex(),
            LossPath::Auto,
        );
        assert_agrees(&name, &burn, &library);
    }
}

/// Autodiff's gradient of an arbitrary combination of the terms is the library's gradient
/// with those weights, on both devices.
#[test]
fn autodiff_weights_are_the_library_weights() {
    let weights = LossWeights { soft: 1.25, conf: -0.5, l2: 2.0, loc: 0.75 };
    let file = read(&golden_files()[0]);
    let library = cpu_evaluation(&file.tensors, &with_weights(&file.config, weights));
    let mut devices = vec![Device::flex()];
    devices.extend(wgpu().map(|(device, _, _)| device.clone()));
    for device in devices {
        let burn = burn_evaluate(&file.tensors, &file.config, weights, &device, LossPath::Auto);
        assert_agrees(&format!("{device:?}"), &burn, &library);
    }
}

/// The host path on wgpu tensors (what the benchmark compares with) agrees too.
#[test]
fn host_path_on_wgpu_agrees() {
    let Some((device, _, _)) = wgpu() else { return };
    let file = read(&golden_files()[0]);
    let library = cpu_evaluation(&file.tensors, &file.config);
    let burn =
        burn_evaluate(&file.tensors, &file.config, file.config.weights, device, LossPath::Host);
    assert_agrees("host path", &burn, &library);
}

/// Tensors that are views at a non-zero offset of a larger buffer (a leading image of other
/// values, then the batch) agree with the CPU: bound at their offset, or copied on the
/// device first where the offset is not one the device can bind.
#[test]
fn tensors_at_offsets_agree() {
    let Some((device, _, _)) = wgpu() else { return };
    let offset_view = |values: &[f32], dims: [usize; 3], device: &Device| {
        let mut padded: Vec<f32> = (0..dims[1] * dims[2]).map(|i| (i % 7) as f32 * 0.25).collect();
        padded.extend_from_slice(values);
        let whole = tensor3(&padded, [dims[0] + 1, dims[1], dims[2]], device);
        whole.narrow(0, 1, dims[0])
    };
    for path in golden_files() {
        let file = read(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let library = cpu_evaluation(&file.tensors, &file.config);
        let burn = burn_evaluate_with(
            &file.tensors,
            &file.config,
            file.config.weights,
            device,
            LossPath::Auto,
            offset_view,
        );
        assert_agrees(&format!("{name} at an offset"), &burn, &library);
    }
}

/// Batches of one shape evaluated in turn (the resident path rebinds one cached batch to
/// each step's slices): each result is its own batch's, never the previous slices'.
#[test]
fn changed_slices_are_rebound() {
    let Some((device, _, _)) = wgpu() else { return };
    let file = read(&golden_files()[0]);
    let [sl, sc, tl, tc, tg, pr] = file.tensors.clone().into_tensors();
    let scaled: Vec<f32> = sc.iter().map(|v| v * 0.5 + 0.25).collect();
    let shape = file.tensors.shape();
    let other = if file.tensors.has_teacher() {
        OwnedBatch::new(shape, sl, scaled, tl, tc, tg, pr)
    } else {
        OwnedBatch::without_teacher(shape, sl, scaled, tg, pr)
    }
    .unwrap();
    let first = cpu_evaluation(&file.tensors, &file.config);
    let second = cpu_evaluation(&other, &file.config);
    assert_ne!(first.terms.loss_c, second.terms.loss_c, "the two batches must differ");
    for (name, batch, library) in [
        ("first", &file.tensors, &first),
        ("second", &other, &second),
        ("first again", &file.tensors, &first),
    ] {
        let burn = burn_evaluate(batch, &file.config, file.config.weights, device, LossPath::Auto);
        assert_agrees(name, &burn, library);
    }
}

/// A step on the resident path maps back only the sums: far less than any tensor, and the
/// gradients stay on Burn's device.
#[test]
fn no_host_copy_on_wgpu() {
    let Some((device, _, _)) = wgpu() else { return };
    let file = read(&golden_files()[0]);
    let before = ssdkd_burn::bytes_read_back(device).expect("the device is shared with ssdkd");
    let burn =
        burn_evaluate(&file.tensors, &file.config, file.config.weights, device, LossPath::Auto);
    let after = ssdkd_burn::bytes_read_back(device).unwrap();
    let read_back = after - before;
    let gradient_bytes = 4 * (burn.grad_conf.len() + burn.grad_loc.len()) as u64;
    // One evaluation (the forward's, with the gradient; the backward's weights are the
    // predicted ones), sums only.
    assert!(read_back > 0, "the sums come back from the GPU");
    assert!(
        read_back <= 1024,
        "{read_back} bytes mapped back for one step (gradients are {gradient_bytes} bytes)"
    );
}

/// The library refuses a slice of one of Burn's buffers that it cannot bind: at an offset
/// the device cannot bind, or shorter than the shape needs (an error, never a number).
#[test]
fn misaligned_or_short_slices_are_errors() {
    use ssdkd::gpu::wgpu::{BufferDescriptor, BufferUsages};
    use ssdkd::gpu::{GpuBackend, GpuSlice, GpuTensors};
    let Some((_, wgpu_device, queue)) = wgpu() else {
        return;
    };
    let mut gpu = GpuBackend::from_device(wgpu_device.clone(), queue.clone()).unwrap();
    let shape = ssdkd::BatchShape { batch: 1, priors: 64, classes: 3, objects: 2 };
    let alignment = u64::from(wgpu_device.limits().min_storage_buffer_offset_alignment);
    let buffer = wgpu_device.create_buffer(&BufferDescriptor {
        label: Some("test"),
        size: 16 * 1024,
        usage: BufferUsages::STORAGE | BufferUsages::COPY_DST | BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let slice = |offset: u64, size: u64| GpuSlice::new(buffer.clone(), offset, size);
    let tensors = |student_conf: GpuSlice| GpuTensors {
        student_loc: slice(0, 1024),
        student_conf,
        teacher_loc: slice(2 * 1024, 1024),
        teacher_conf: slice(4 * 1024, 1024),
        targets: slice(6 * 1024, 256),
        priors: slice(8 * 1024, 1024),
    };
    assert!(gpu.wrap(shape, tensors(slice(10 * 1024, 1024))).is_ok());
    for (what, bad) in [
        ("misaligned", slice(10 * 1024 + alignment / 2, 1024)),
        ("short", slice(10 * 1024, 64 * 3 * 4 - 4)),
        ("past the buffer", slice(15 * 1024 + alignment, 1024)),
    ] {
        match gpu.wrap(shape, tensors(bad)) {
            Err(ssdkd::Error::Shape { tensor, .. }) => assert_eq!(tensor, "student_conf"),
            other => panic!("{what} slice: {other:?}"),
        }
    }
}

/// A configuration that cannot work (SPEC §8's accepted ranges) is an `Err` from
/// `forward`, naming the key, on Flex and on wgpu; never a panic.
#[test]
fn configurations_that_cannot_work_are_errors() {
    let file = read(&golden_files()[0]);
    let batch = file.tensors.batch();
    let s = batch.shape();
    let (b, p, c, m) = (s.batch, s.priors, s.classes, s.objects);
    let priors: Vec<[f32; 4]> =
        batch.priors().chunks(4).map(|r| [r[0], r[1], r[2], r[3]]).collect();
    let mut devices = vec![Device::flex()];
    devices.extend(wgpu().map(|(device, _, _)| device.clone()));
    type Spoil = fn(&mut LossConfig);
    let bad: [(&str, Spoil); 3] = [
        ("temperature", |c| c.temperature = 0.0),
        ("variance", |c| c.variance[1] = -0.2),
        ("eps", |c| c.eps = 0.0),
    ];
    for device in &devices {
        for (key, spoil) in bad {
            let mut config = file.config;
            spoil(&mut config);
            let loss = MultiBoxLossKd::new(config, priors.clone());
            let result = loss.forward(
                tensor3(batch.student_loc(), [b, p, 4], device),
                tensor3(batch.student_conf(), [b, p, c], device),
                tensor3(batch.teacher_loc(), [b, p, 4], device),
                tensor3(batch.teacher_conf(), [b, p, c], device),
                tensor3(batch.targets(), [b, m, 5], device),
            );
            match result {
                Err(ssdkd::Error::Config { key: got, .. }) => assert_eq!(got, key, "{device:?}"),
                other => panic!("{key} on {device:?}: {:?}", other.map(|_| "Ok")),
            }
            let plain = MultiBoxLoss::new(config, priors.clone()).forward(
                tensor3(batch.student_loc(), [b, p, 4], device),
                tensor3(batch.student_conf(), [b, p, c], device),
                tensor3(batch.targets(), [b, m, 5], device),
            );
            assert!(
                matches!(&plain, Err(ssdkd::Error::Config { key: got, .. }) if got == key),
                "{key} on {device:?}: plain loss {:?}",
                plain.map(|_| "Ok")
            );
        }
    }
}

/// The batch of a golden file as Burn tensors on `device`, and its priors.
fn inputs_on(batch: &ssdkd::Batch<'_>, device: &Device) -> ([Tensor<3>; 5], Vec<[f32; 4]>) {
    let s = batch.shape();
    let (b, p, c, m) = (s.batch, s.priors, s.classes, s.objects);
    let priors = batch.priors().chunks(4).map(|r| [r[0], r[1], r[2], r[3]]).collect();
    let tensors = [
        tensor3(batch.student_loc(), [b, p, 4], device),
        tensor3(batch.student_conf(), [b, p, c], device),
        tensor3(batch.teacher_loc(), [b, p, 4], device),
        tensor3(batch.teacher_conf(), [b, p, c], device),
        tensor3(batch.targets(), [b, m, 5], device),
    ];
    (tensors, priors)
}

/// Every device the tests run on: Flex, and Burn's wgpu device when there is an adapter.
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::flex()];
    devices.extend(wgpu().map(|(device, _, _)| device.clone()));
    devices
}

/// Input values the loss cannot take (SPEC §1) are an `Err` from `forward` on every
/// device, naming the same tensor, image and index as the library's CPU backend; never a
/// panic, never a number.
#[test]
fn bad_values_are_errors_on_every_device() {
    let file = read(&golden_files()[0]);
    let c = file.tensors.shape().classes;
    // The first real object row of image 0 (a label >= 0).
    let row = file.tensors.batch().targets().chunks(5).position(|r| r[4] >= 0.0).unwrap();
    type Spoil = fn(&mut OwnedBatch, usize, usize);
    let spoils: [(&str, Spoil); 5] = [
        ("NaN target", |t, row, _| t.targets_mut()[row * 5 + 1] = f32::NAN),
        ("label C + 4", |t, row, c| t.targets_mut()[row * 5 + 4] = (c + 4) as f32),
        ("label 3.7", |t, row, _| t.targets_mut()[row * 5 + 4] = 3.7),
        ("degenerate box", |t, row, _| {
            let r = &mut t.targets_mut()[row * 5..row * 5 + 5];
            r[2] = r[0];
        }),
        ("infinite logit", |t, _, c| t.student_conf_mut()[3 * c + 1] = f32::INFINITY),
    ];
    for (what, spoil) in spoils {
        let mut bad = file.tensors.clone();
        spoil(&mut bad, row, c);
        let mut cpu = Backend::cpu();
        let expected = match cpu.evaluate(&bad.batch(), &file.config, Request::default()) {
            Err(e @ ssdkd::Error::Input(_)) => format!("{e:?}"),
            other => panic!("{what}: the library gave {:?}", other.map(|e| e.terms)),
        };
        for device in devices() {
            for autodiff in [false, true] {
                let device = if autodiff { device.clone().autodiff() } else { device.clone() };
                let (t, priors) = inputs_on(&bad.batch(), &device);
                let [sl, sc, tl, tc, tg] = t;
                let kd = MultiBoxLossKd::new(file.config, priors.clone());
                let sl = if autodiff { sl.require_grad() } else { sl };
                let got = kd.forward(sl.clone(), sc.clone(), tl, tc, tg.clone());
                match got {
                    Err(e) => assert_eq!(format!("{e:?}"), expected, "{what} on {device:?}"),
                    Ok(terms) => panic!("{what} on {device:?}: Ok {:?}", values(terms.loss_c)),
                }
                let plain = MultiBoxLoss::new(file.config, priors).forward(sl, sc, tg);
                assert!(
                    matches!(&plain, Err(e) if format!("{e:?}") == expected),
                    "{what} on {device:?}: plain loss {:?}",
                    plain.map(|_| "Ok")
                );
            }
        }
    }
}

/// Compares gradients that may hold non-finite values: those must be where the expected
/// ones are (NaN for NaN, the same infinity), the others within SPEC §7.
fn assert_gradients_match(what: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    let (mut a, mut e) = (Vec::new(), Vec::new());
    for (i, (&x, &y)) in actual.iter().zip(expected).enumerate() {
        if y.is_finite() {
            a.push(x);
            e.push(y);
        } else {
            assert!(x.is_nan() == y.is_nan() && (y.is_nan() || x == y), "{what}[{i}]: {x} for {y}");
        }
    }
    let d = gradient_elements("gradient", &a, &e);
    assert!(d.agrees(), "{what}: {} elements off, worst {:?}", d.failures, d.worst);
}

/// A training step evaluates once: the forward evaluates the gradient with the weights the
/// loss's last backward brought, and the backward uses it. Weights that change make the
/// backward evaluate again; the gradients are the library's for any weights, zero ones
/// included, and for non-finite ones what `w × ∂term` gives.
#[test]
fn a_training_step_evaluates_once() {
    let file = read(&golden_files()[0]);
    let library = |w: [f32; 4]| {
        let [soft, l2, conf, loc] = w;
        let weights = LossWeights { soft, l2, conf, loc };
        let eval = cpu_evaluation(&file.tensors, &with_weights(&file.config, weights));
        let g = eval.gradients.unwrap();
        [g.student_conf, g.student_loc]
    };
    let c = file.config.weights;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % 4001) as f32 / 1000.0 - 2.0
    };
    let steps: Vec<([f32; 4], u64)> = vec![
        ([c.soft, c.l2, c.conf, c.loc], 1),
        ([c.soft, c.l2, c.conf, c.loc], 1),
        ([c.soft, c.l2, c.conf, c.loc], 1),
        ([random(), random(), random(), random()], 2),
        ([random(), 0.0, random(), random()], 2),
        ([0.0; 4], 2),
        ([0.0; 4], 1),
        ([f32::INFINITY, 0.0, 1.0, f32::NAN], 2 + 2),
        ([1.0, 1.0, 1.0, 1.0], 2),
        ([1.0, 1.0, 1.0, 1.0], 1),
    ];
    for device in devices() {
        let device = device.autodiff();
        let (t, priors) = inputs_on(&file.tensors.batch(), &device);
        let loss = MultiBoxLossKd::new(file.config, priors);
        for (step, (w, evaluations)) in steps.iter().enumerate() {
            let [sl, sc, tl, tc, tg] = t.clone();
            let (sl, sc) = (sl.require_grad(), sc.require_grad());
            let before = loss.evaluations();
            let terms = loss.forward(sl.clone(), sc.clone(), tl, tc, tg).unwrap();
            let [soft, l2, conf, loc] = *w;
            let grads = terms.weighted(LossWeights { soft, l2, conf, loc }).backward();
            let finite = w.map(|x| if x.is_finite() { x } else { 0.0 });
            let mut expected = library(finite);
            for (term, x) in w.iter().enumerate().filter(|(_, x)| !x.is_finite()) {
                let mut unit = [0.0; 4];
                unit[term] = 1.0;
                let reached = term % 2;
                let own = &library(unit)[reached];
                for (e, o) in expected[reached].iter_mut().zip(own) {
                    *e += x * o;
                }
            }
            let name = format!("step {step} on {device:?}");
            let conf = values(sc.grad(&grads).unwrap());
            assert_gradients_match(&format!("{name}: conf"), &conf, &expected[0]);
            let loc = values(sl.grad(&grads).unwrap());
            assert_gradients_match(&format!("{name}: loc"), &loc, &expected[1]);
            // Counted once the gradients are read: Burn's fusion runs them then.
            let run = loss.evaluations() - before;
            assert_eq!(run, *evaluations, "{name}: {run} evaluations");
        }
    }
}

/// The batches bound on a wgpu device are bounded: shapes beyond the last 4 used are
/// dropped (with their bind groups), however many shapes a run sees.
#[test]
fn bound_batches_are_bounded() {
    let Some((device, _, _)) = wgpu() else { return };
    let file = read(&golden_files()[0]);
    let (t, priors) = inputs_on(&file.tensors.batch(), device);
    let loss = MultiBoxLossKd::new(file.config, priors);
    let mut most = 0;
    for copies in 1..=7 {
        let [sl, sc, tl, tc, tg] = t.clone().map(|t| Tensor::cat(vec![t; copies], 0));
        let terms = loss.forward(sl, sc, tl, tc, tg).unwrap();
        assert!(values(terms.loss_c)[0].is_finite());
        let (batches, stats) = ssdkd_burn::cache_stats(device).expect("shared with ssdkd");
        assert!(batches <= 4, "{batches} bound batches after {copies} shapes ({stats:?})");
        most = most.max(batches);
    }
    assert_eq!(most, 4, "the bound is reached");
}
