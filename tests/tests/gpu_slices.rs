//! The GPU backend on a caller's device and buffers, as a training framework (Burn) hands
//! them over: tensors as slices of shared pages at non-zero offsets, gradients written
//! into the caller's slices, slices that change between steps, bad slices refused, and a
//! device opened by someone else. Skipped loudly without an adapter.

use ssdkd::gpu::{wgpu, GpuBackend, GpuGradients, GpuRequest, GpuSlice, GpuTensors};
use ssdkd::{Error, Evaluation, OwnedBatch, Request};
use ssdkd_tests::load_golden;
use std::sync::{Arc, Mutex};

const ALL: Request = Request {
    gradients: true,
    decisions: true,
    validate: true,
};

const READ_ALL: GpuRequest = GpuRequest {
    gradients: true,
    read_gradients: true,
    decisions: true,
};

fn golden(name: &str) -> OwnedBatch {
    let path = ssdkd_tests::golden_dir().join(format!("{name}.safetensors"));
    load_golden(&path).file.tensors
}

fn alignment(gpu: &GpuBackend) -> u64 {
    u64::from(gpu.device().limits().min_storage_buffer_offset_alignment)
}

/// One buffer (a "page") holding `parts` one after another, each at an aligned offset with
/// at least one aligned gap of NaN before it, so that reading from offset 0, or past a
/// part, gives NaN rather than a plausible number.
fn page(gpu: &GpuBackend, parts: &[&[f32]], usage: wgpu::BufferUsages) -> Vec<GpuSlice> {
    let align = alignment(gpu);
    let mut offsets = Vec::new();
    let mut end = 0;
    for part in parts {
        let offset = (end + align).next_multiple_of(align);
        offsets.push(offset);
        end = offset + part.len() as u64 * 4;
    }
    let size = end + align;
    let buffer = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("test.page"),
        size,
        usage: usage | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let filler = vec![f32::NAN; (size / 4) as usize];
    gpu.queue()
        .write_buffer(&buffer, 0, bytemuck::cast_slice(&filler));
    parts
        .iter()
        .zip(offsets)
        .map(|(part, offset)| {
            gpu.queue()
                .write_buffer(&buffer, offset, bytemuck::cast_slice(part));
            GpuSlice::new(buffer.clone(), offset, part.len() as u64 * 4)
        })
        .collect()
}

fn tensors(slices: &[GpuSlice]) -> GpuTensors {
    GpuTensors {
        student_loc: slices[0].clone(),
        student_conf: slices[1].clone(),
        teacher_loc: slices[2].clone(),
        teacher_conf: slices[3].clone(),
        targets: slices[4].clone(),
        priors: slices[5].clone(),
    }
}

fn input_parts(batch: &OwnedBatch) -> [&[f32]; 6] {
    [
        batch.student_loc(),
        batch.student_conf(),
        batch.teacher_loc(),
        batch.teacher_conf(),
        batch.targets(),
        batch.priors(),
    ]
}

/// The f32s of `slice`, copied to a mappable buffer and read.
fn read(gpu: &GpuBackend, slice: &GpuSlice) -> Vec<f32> {
    let staging = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("test.read"),
        size: slice.size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = gpu
        .device()
        .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
    encoder.copy_buffer_to_buffer(&slice.buffer, slice.offset, &staging, 0, slice.size);
    gpu.queue().submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.unwrap());
    gpu.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    let values = bytemuck::cast_slice(&staging.slice(..).get_mapped_range().unwrap()).to_vec();
    staging.unmap();
    values
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|x| x.to_bits()).collect()
}

/// The same terms, sums, gradients and decisions, bit for bit.
fn assert_identical(what: &str, a: &Evaluation, b: &Evaluation) {
    let terms = |e: &Evaluation| ssdkd::agreement::terms(e).map(f64::to_bits);
    assert_eq!(terms(a), terms(b), "{what}: terms");
    assert_eq!(a.sums, b.sums, "{what}: sums");
    let (ga, gb) = (a.gradients.as_ref().unwrap(), b.gradients.as_ref().unwrap());
    assert!(
        bits(&ga.student_conf) == bits(&gb.student_conf),
        "{what}: grad_student_conf"
    );
    assert!(
        bits(&ga.student_loc) == bits(&gb.student_loc),
        "{what}: grad_student_loc"
    );
    assert!(a.decisions == b.decisions, "{what}: decisions");
}

/// The six inputs in one page at non-zero offsets, the gradients in another page at
/// non-zero offsets (NaN before the run): the result is the uploaded batch's, bit for bit,
/// and the gradients are in the caller's slices.
#[test]
fn slices_at_offsets_give_the_uploaded_result() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("slices_at_offsets_give_the_uploaded_result")
    else {
        return;
    };
    let owned = golden("voc_default_b4");
    let config = ssdkd::LossConfig::default();
    let expected = gpu.evaluate(&owned.batch(), &config, ALL).unwrap();

    let inputs = page(&gpu, &input_parts(&owned), wgpu::BufferUsages::STORAGE);
    assert!(inputs.iter().all(|s| s.offset > 0));
    let conf_len = owned.student_conf().len();
    let loc_len = owned.student_loc().len();
    let out = page(
        &gpu,
        &[&vec![f32::NAN; conf_len], &vec![f32::NAN; loc_len]],
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    );
    let gradients = GpuGradients {
        student_conf: out[0].clone(),
        student_loc: out[1].clone(),
    };
    let resident = gpu
        .wrap_with_gradients(owned.shape(), tensors(&inputs), gradients)
        .unwrap();
    assert!(!resident.gradients_copied());
    let eval = gpu.evaluate_resident(&resident, &config, READ_ALL).unwrap();
    assert_identical("slices at offsets", &expected, &eval);

    let grads = expected.gradients.as_ref().unwrap();
    assert!(bits(&read(&gpu, &out[0])) == bits(&grads.student_conf));
    assert!(bits(&read(&gpu, &out[1])) == bits(&grads.student_loc));

    // Bound as windows of one image each, every window offset past the slice's base.
    gpu.set_binding_cap(Some(1 << 20));
    let chunked = gpu.evaluate_resident(&resident, &config, READ_ALL).unwrap();
    assert_identical("slices at offsets, chunked", &expected, &chunked);
}

/// Gradient slices in the same page as the inputs (a pooled allocator does that) are
/// written by a copy on the device; the inputs are left as they were.
#[test]
fn gradients_in_the_inputs_page_are_copied_there() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("gradients_in_the_inputs_page_are_copied_there")
    else {
        return;
    };
    let owned = golden("mobilenet_c5_t4_b2");
    let config = load_golden(&ssdkd_tests::golden_dir().join("mobilenet_c5_t4_b2.safetensors"))
        .file
        .config;
    let expected = gpu.evaluate(&owned.batch(), &config, ALL).unwrap();

    let conf_nan = vec![f32::NAN; owned.student_conf().len()];
    let loc_nan = vec![f32::NAN; owned.student_loc().len()];
    let mut parts = input_parts(&owned).to_vec();
    parts.extend([conf_nan.as_slice(), loc_nan.as_slice()]);
    let slices = page(
        &gpu,
        &parts,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    );
    let gradients = GpuGradients {
        student_conf: slices[6].clone(),
        student_loc: slices[7].clone(),
    };
    let resident = gpu
        .wrap_with_gradients(owned.shape(), tensors(&slices), gradients)
        .unwrap();
    assert!(resident.gradients_copied());
    let request = GpuRequest {
        gradients: true,
        ..GpuRequest::default()
    };
    let eval = gpu.evaluate_resident(&resident, &config, request).unwrap();
    assert!(eval.gradients.is_none());
    let grads = expected.gradients.as_ref().unwrap();
    assert!(bits(&read(&gpu, &slices[6])) == bits(&grads.student_conf));
    assert!(bits(&read(&gpu, &slices[7])) == bits(&grads.student_loc));
    assert!(bits(&read(&gpu, &slices[1])) == bits(owned.student_conf()));
    assert_eq!(resident.grad_student_conf().offset, slices[6].offset);
}

/// A batch pointed at other slices between two evaluations (a framework's next step)
/// evaluates the new slices: bind groups of the old ones would give the old result.
#[test]
fn a_slice_changed_between_steps_is_rebound() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("a_slice_changed_between_steps_is_rebound")
    else {
        return;
    };
    let first = golden("voc_default_b4");
    let mut second = first.clone();
    for (i, x) in second.student_conf_mut().iter_mut().enumerate() {
        *x = 0.5 * *x + 0.25 * (i % 7) as f32;
    }
    for x in second.student_loc_mut() {
        *x *= 0.75;
    }
    let config = ssdkd::LossConfig::default();
    let expected_first = gpu.evaluate(&first.batch(), &config, ALL).unwrap();
    let expected_second = gpu.evaluate(&second.batch(), &config, ALL).unwrap();
    assert_ne!(expected_first.terms.total, expected_second.terms.total);

    let mut parts = input_parts(&first).to_vec();
    parts.extend([second.student_loc(), second.student_conf()]);
    let slices = page(&gpu, &parts, wgpu::BufferUsages::STORAGE);
    let mut resident = gpu.wrap(first.shape(), tensors(&slices)).unwrap();
    let eval = gpu.evaluate_resident(&resident, &config, READ_ALL).unwrap();
    assert_identical("first step", &expected_first, &eval);

    let mut next = tensors(&slices);
    next.student_loc = slices[6].clone();
    next.student_conf = slices[7].clone();
    gpu.rebind(&mut resident, next, None).unwrap();
    let eval = gpu.evaluate_resident(&resident, &config, READ_ALL).unwrap();
    assert_identical("second step", &expected_second, &eval);

    gpu.rebind(&mut resident, tensors(&slices), None).unwrap();
    let eval = gpu.evaluate_resident(&resident, &config, READ_ALL).unwrap();
    assert_identical("back to the first", &expected_first, &eval);
}

fn refused(result: Result<impl std::fmt::Debug, Error>, tensor: &str, what: &str) {
    match result {
        Err(Error::Shape { tensor: t, problem }) if t == tensor => {
            eprintln!("{what}: {tensor}: {problem}");
        }
        other => panic!("{what}: expected a shape error naming {tensor}, got {other:?}"),
    }
}

/// Misaligned, short, overrunning and overlapping slices, and buffers without the usage
/// they need, are errors naming the tensor, before anything runs.
#[test]
fn bad_slices_are_errors() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("bad_slices_are_errors") else {
        return;
    };
    let owned = golden("voc_empty_images_b2");
    let shape = owned.shape();
    let align = alignment(&gpu);
    let slices = page(
        &gpu,
        &input_parts(&owned),
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    );
    let good = tensors(&slices);
    assert!(gpu.wrap(shape, good.clone()).is_ok());

    let mut bad = good.clone();
    bad.student_conf.offset += 4;
    refused(gpu.wrap(shape, bad), "student_conf", "misaligned");
    if align > 16 {
        let mut bad = good.clone();
        bad.targets.offset += align / 2;
        refused(gpu.wrap(shape, bad), "targets", "misaligned by half");
    }

    let mut bad = good.clone();
    bad.teacher_loc.size -= 4;
    refused(gpu.wrap(shape, bad), "teacher_loc", "short");

    let mut bad = good.clone();
    bad.priors.size = bad.priors.buffer.size() - bad.priors.offset + 4;
    refused(gpu.wrap(shape, bad), "priors", "past the end of its buffer");

    let mut bad = good.clone();
    let no_storage = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("test.no_storage"),
        size: bad.targets.size,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    bad.targets = GpuSlice::whole(no_storage);
    refused(gpu.wrap(shape, bad), "targets", "no STORAGE usage");

    let overlapping = GpuGradients {
        student_conf: good.teacher_conf.clone(),
        student_loc: slices[0].clone(),
    };
    refused(
        gpu.wrap_with_gradients(shape, good.clone(), overlapping),
        "grad_student_conf",
        "gradient over an input",
    );

    let out = page(
        &gpu,
        &[&vec![0.0; owned.student_conf().len()]],
        wgpu::BufferUsages::STORAGE,
    );
    let each_other = GpuGradients {
        student_conf: out[0].clone(),
        student_loc: GpuSlice::new(
            out[0].buffer.clone(),
            out[0].offset,
            owned.student_loc().len() as u64 * 4,
        ),
    };
    refused(
        gpu.wrap_with_gradients(shape, good.clone(), each_other),
        "grad_student_loc",
        "gradients over each other",
    );

    // Gradients that cannot be read back are refused when a read-back is asked for.
    let conf = vec![0.0; owned.student_conf().len()];
    let loc = vec![0.0; owned.student_loc().len()];
    let out = page(&gpu, &[&conf, &loc], wgpu::BufferUsages::STORAGE);
    let gradients = GpuGradients {
        student_conf: out[0].clone(),
        student_loc: out[1].clone(),
    };
    let batch = gpu.wrap_with_gradients(shape, good, gradients).unwrap();
    let config = ssdkd::LossConfig::default();
    refused(
        gpu.evaluate_resident(&batch, &config, READ_ALL),
        "grad_student_conf",
        "no COPY_SRC to read back",
    );
    let request = GpuRequest {
        gradients: true,
        ..GpuRequest::default()
    };
    assert!(gpu.evaluate_resident(&batch, &config, request).is_ok());
}

/// A resident evaluation maps back only the sums: the same few bytes whatever the batch,
/// with the gradients left in their GPU slices.
#[test]
fn a_resident_evaluation_reads_back_only_the_sums() {
    let Some(mut gpu) = ssdkd_tests::gpu::backend("a_resident_evaluation_reads_back_only_the_sums")
    else {
        return;
    };
    let config = ssdkd::LossConfig::default();
    let request = GpuRequest {
        gradients: true,
        ..GpuRequest::default()
    };
    let mut read_back = Vec::new();
    for name in ["voc_default_b4", "strided_c21_b2"] {
        let owned = golden(name);
        let expected = gpu.evaluate(&owned.batch(), &config, ALL).unwrap();
        let slices = page(&gpu, &input_parts(&owned), wgpu::BufferUsages::STORAGE);
        let batch = gpu.wrap(owned.shape(), tensors(&slices)).unwrap();
        let before = gpu.bytes_read_back();
        let eval = gpu.evaluate_resident(&batch, &config, request).unwrap();
        read_back.push(gpu.bytes_read_back() - before);
        assert_eq!(eval.sums, expected.sums, "{name}");
        let grads = expected.gradients.as_ref().unwrap();
        assert!(bits(&read(&gpu, batch.grad_student_conf())) == bits(&grads.student_conf));
    }
    assert_eq!(read_back[0], read_back[1], "{read_back:?}");
    assert!(read_back[0] > 0 && read_back[0] < 1024, "{read_back:?}");
}

/// A backend on a device opened by someone else evaluates like one on its own device and
/// leaves the owner's error callback in place.
#[test]
fn a_shared_device_keeps_its_owners_callbacks() {
    let Some(mut own) = ssdkd_tests::gpu::backend("a_shared_device_keeps_its_owners_callbacks")
    else {
        return;
    };
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .expect("an adapter (ssdkd found one)");
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("the framework's"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .unwrap();
    let heard = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&heard);
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        sink.lock().unwrap().push(e.to_string());
    }));

    let mut shared = GpuBackend::from_device(device.clone(), queue).unwrap();
    assert_eq!(shared.adapter_name(), adapter.get_info().name);
    let owned = golden("voc_unweighted_t2_b2");
    let config = load_golden(&ssdkd_tests::golden_dir().join("voc_unweighted_t2_b2.safetensors"))
        .file
        .config;
    let on_own = own.evaluate(&owned.batch(), &config, ALL).unwrap();
    let on_shared = shared.evaluate(&owned.batch(), &config, ALL).unwrap();
    if adapter.get_info().name == own.adapter_name() {
        assert_identical("shared device", &on_own, &on_shared);
    }

    // An error of the owner's, outside any scope of ssdkd's, reaches the owner's callback.
    let _invalid = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("invalid"),
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::MAP_WRITE,
        mapped_at_creation: false,
    });
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    assert_eq!(
        heard.lock().unwrap().len(),
        1,
        "{:?}",
        heard.lock().unwrap()
    );
    let again = shared.evaluate(&owned.batch(), &config, ALL).unwrap();
    assert_identical("after the owner's error", &on_shared, &again);
}

/// A batch wrapped for terms only allocates no gradient buffer: its terms are the wrapped
/// batch's, bit for bit, also after a rebind to other slices; an evaluation asking for
/// gradients is refused naming the gradient; rebound with gradient slices, it evaluates the
/// gradients as a batch wrapped with them does.
#[test]
fn a_batch_wrapped_for_terms_only_has_no_gradient_buffer() {
    let Some(mut gpu) =
        ssdkd_tests::gpu::backend("a_batch_wrapped_for_terms_only_has_no_gradient_buffer")
    else {
        return;
    };
    let owned = golden("voc_default_b4");
    let config = ssdkd::LossConfig::default();
    let inputs = page(&gpu, &input_parts(&owned), wgpu::BufferUsages::STORAGE);
    let shape = owned.shape();
    let terms_of = |e: &Evaluation| ssdkd::agreement::terms(e).map(f64::to_bits);
    let wrapped = gpu.wrap(shape, tensors(&inputs)).unwrap();
    let expected = gpu
        .evaluate_resident(&wrapped, &config, GpuRequest::default())
        .unwrap();

    let mut batch = gpu.wrap_terms(shape, tensors(&inputs)).unwrap();
    assert!(batch.terms_only());
    // No buffer of its own: the gradient accessors name the student's slices.
    let same = |a: &GpuSlice, b: &GpuSlice| a.buffer == b.buffer && a.offset == b.offset;
    assert!(same(batch.grad_student_conf(), &inputs[1]));
    assert!(same(batch.grad_student_loc(), &inputs[0]));
    let terms = gpu
        .evaluate_resident(&batch, &config, GpuRequest::default())
        .unwrap();
    assert_eq!(terms_of(&terms), terms_of(&expected));

    let again = page(&gpu, &input_parts(&owned), wgpu::BufferUsages::STORAGE);
    gpu.rebind(&mut batch, tensors(&again), None).unwrap();
    assert!(batch.terms_only());
    assert!(same(batch.grad_student_conf(), &again[1]));
    let terms = gpu
        .evaluate_resident(&batch, &config, GpuRequest::default())
        .unwrap();
    assert_eq!(terms_of(&terms), terms_of(&expected));

    refused(
        gpu.evaluate_resident(&batch, &config, READ_ALL),
        "grad_student_conf",
        "gradients from a terms-only batch",
    );

    let out = page(
        &gpu,
        &[owned.student_conf(), owned.student_loc()],
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    );
    let gradients = || GpuGradients {
        student_conf: out[0].clone(),
        student_loc: out[1].clone(),
    };
    gpu.rebind(&mut batch, tensors(&again), Some(gradients()))
        .unwrap();
    assert!(!batch.terms_only());
    let with = gpu.evaluate_resident(&batch, &config, READ_ALL).unwrap();
    let reference = gpu
        .wrap_with_gradients(shape, tensors(&again), gradients())
        .unwrap();
    let reference = gpu
        .evaluate_resident(&reference, &config, READ_ALL)
        .unwrap();
    assert_identical("rebound with gradients", &with, &reference);
}
