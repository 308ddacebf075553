//! The CUDA-sharing GPU path (`ssdkd::gpu::shared`, feature `cuda`). The Vulkan half runs
//! on any Vulkan driver with `VK_KHR_external_memory_fd` (lavapipe in CI): exportable
//! buffers on a wgpu device, an evaluation on them bit-identical to one on ordinary buffers
//! (and agreeing with the golden files, SPEC §7), the memory exported and imported into a
//! second Vulkan device with the bytes equal both ways, and the ordering chosen (a full
//! synchronisation where semaphores cannot be exported, as on lavapipe). The CUDA half
//! needs libcuda and an NVIDIA GPU: skipped with the reason printed, or failing where
//! `SSDKD_REQUIRE_CUDA=1`. Vulkan validation is on where the layers are installed, and
//! any validation error logged fails the test.

use ssdkd::gpu::shared::{
    ash::{self, vk},
    cuda_unavailable_reason, vulkan_adapters, CudaInputs, CudaShared, Ordering, SharedBatch,
    SharedDevice, VulkanAdapter,
};
use ssdkd::gpu::wgpu::{self, hal::api::Vulkan};
use ssdkd::gpu::{GpuBackend, GpuRequest};
use ssdkd::{Error, Evaluation, Request};
use ssdkd_tests::{check_golden, golden_files, load_golden};
use std::os::fd::IntoRawFd;
use std::sync::{Mutex, Once};

/// Error-level messages of wgpu and its Vulkan backend (the validation layers' errors
/// among them).
static LOGGED_ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct ErrorLog;

impl log::Log for ErrorLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() == log::Level::Error
    }
    fn log(&self, record: &log::Record<'_>) {
        if !(self.enabled(record.metadata()) && record.target().starts_with("wgpu")) {
            return;
        }
        let message = record.args().to_string();
        // The objects a message names come as a record of their own. The source-language
        // complaint is the installed layer's (Debian's 1.3.239) about every shader naga
        // compiles: it predates SPIR-V's value for WGSL, which naga writes.
        if message.starts_with("\tobjects:")
            || message.contains("SPIR-V module not valid: Invalid source language operand")
        {
            return;
        }
        let line = format!("{}: {message}", record.target());
        LOGGED_ERRORS.lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

fn watch_errors() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&ErrorLog).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Error);
    });
}

fn assert_no_logged_errors(test: &str) {
    let errors = LOGGED_ERRORS.lock().unwrap().clone();
    assert!(errors.is_empty(), "{test}: wgpu/Vulkan errors: {errors:#?}");
}

/// Validation on (wgpu-hal enables the Khronos layer where it is installed), its
/// messages logged through the debug messenger (`DEBUG`) into [`ErrorLog`].
fn flags() -> wgpu::InstanceFlags {
    wgpu::InstanceFlags::VALIDATION | wgpu::InstanceFlags::DEBUG
}

fn require_gpu() -> bool {
    std::env::var("SSDKD_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// A Vulkan adapter with `VK_KHR_external_memory_fd` (lavapipe in CI), or `None` after
/// printing why the test is skipped (failing instead where `SSDKD_REQUIRE_GPU=1`).
fn exporting_adapter(test: &str) -> Option<VulkanAdapter> {
    watch_errors();
    let adapters = vulkan_adapters(flags());
    let found = adapters.iter().find(|a| a.external_memory).cloned();
    if found.is_none() {
        let why = format!("no Vulkan adapter with VK_KHR_external_memory_fd in {adapters:?}");
        assert!(!require_gpu(), "{test}: {why} and SSDKD_REQUIRE_GPU=1");
        eprintln!("{test}: skipped: {why}");
    }
    found
}

fn open(test: &str) -> Option<SharedDevice> {
    let adapter = exporting_adapter(test)?;
    let device = SharedDevice::open(adapter.uuid, flags()).expect("the device opens");
    assert_eq!(device.adapter(), &adapter);
    eprintln!(
        "{test}: {} ({}), ordering {}",
        adapter.name,
        ssdkd::gpu::shared::uuid_hex(&adapter.uuid),
        device.ordering().name()
    );
    Some(device)
}

/// `bytes` of a buffer of `device` (through a mapped staging buffer).
fn read(device: &wgpu::Device, queue: &wgpu::Queue, buffer: &wgpu::Buffer, bytes: u64) -> Vec<u8> {
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test.staging"),
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    queue.submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let data = staging.slice(..).get_mapped_range().unwrap().to_vec();
    data
}

/// A byte pattern that differs from `seed` to `seed` and from byte to byte.
fn pattern(bytes: usize, seed: u32) -> Vec<u8> {
    (0..bytes as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

#[test]
fn exportable_buffers_hold_what_wgpu_writes() {
    let test = "exportable_buffers_hold_what_wgpu_writes";
    let Some(mut device) = open(test) else { return };
    let bytes = 1 << 20;
    let buffer = device.exportable_buffer("test.exportable", bytes).unwrap();
    assert!(buffer.allocation_size >= bytes);
    assert_eq!(buffer.buffer.size(), bytes);
    let written = pattern(bytes as usize, 7);
    let backend = device.backend();
    backend.queue().write_buffer(&buffer.buffer, 0, &written);
    let got = read(backend.device(), backend.queue(), &buffer.buffer, bytes);
    assert!(
        got == written,
        "{test}: the bytes read differ from those written"
    );
    // A descriptor of its memory can be exported (and is closed here).
    let fd = device.export_fd(&buffer).unwrap();
    drop(fd);
    // A batch of eight such buffers, sized as SPEC §1 and §6 give.
    let shape = ssdkd::BatchShape {
        batch: 3,
        priors: 10,
        classes: 5,
        objects: 2,
    };
    let shared = device.shared_batch(shape).unwrap();
    let sizes: Vec<u64> = shared.buffers().iter().map(|b| b.buffer.size()).collect();
    assert_eq!(
        sizes,
        [
            120 * 4,
            150 * 4,
            120 * 4,
            150 * 4,
            30 * 4,
            40 * 4,
            150 * 4,
            120 * 4
        ]
    );
    assert_eq!(SharedBatch::bytes(shape).to_vec(), sizes);
    drop(shared);
    drop(buffer);
    device.wait_idle().unwrap();
    assert_no_logged_errors(test);
}

fn assert_bit_identical(what: &str, shared: &Evaluation, ordinary: &Evaluation) {
    let s = |e: &Evaluation| {
        let x = e.sums;
        (
            [x.soft, x.l2, x.conf, x.loc].map(f64::to_bits),
            [x.num_pos, x.num_neg, x.num_bounded],
        )
    };
    assert_eq!(s(shared), s(ordinary), "{what}: sums");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (a, b) = (
        shared.gradients.as_ref().expect("gradients"),
        ordinary.gradients.as_ref().expect("gradients"),
    );
    assert!(
        bits(&a.student_conf) == bits(&b.student_conf),
        "{what}: grad_student_conf differs"
    );
    assert!(
        bits(&a.student_loc) == bits(&b.student_loc),
        "{what}: grad_student_loc differs"
    );
    assert_eq!(shared.decisions, ordinary.decisions, "{what}: decisions");
}

/// Every golden batch evaluated on the shared (exportable) buffers and on the backend's
/// ordinary buffers of the same device: the same bits, and the golden values (SPEC §7).
/// Also without the teacher (its inputs bound to the student's buffers).
#[test]
fn evaluation_on_shared_buffers_is_bit_identical_to_ordinary_buffers() {
    let test = "evaluation_on_shared_buffers_is_bit_identical_to_ordinary_buffers";
    let Some(mut device) = open(test) else { return };
    let read_all = GpuRequest {
        gradients: true,
        read_gradients: true,
        decisions: true,
    };
    let all = Request {
        gradients: true,
        decisions: true,
        validate: true,
    };
    for path in golden_files() {
        let case = load_golden(&path);
        let owned = &case.file.tensors;
        let batch = owned.batch();
        let config = case.file.config;
        let mut shared = device.shared_batch(batch.shape()).unwrap();
        let backend: &mut GpuBackend = device.backend();
        backend.write(shared.batch(), &batch).unwrap();
        let on_shared = backend
            .evaluate_resident(shared.batch(), &config, read_all)
            .unwrap();
        let ordinary = backend.evaluate(&batch, &config, all).unwrap();
        assert_bit_identical(&case.name, &on_shared, &ordinary);
        check_golden(&case, &on_shared);

        // The student's buffers standing in for the teacher's (SPEC §10.1) give the KD
        // evaluation of a batch whose teacher is the student.
        device.bind_teacher(&mut shared, false).unwrap();
        let student_only = owned.batch();
        let as_teacher = ssdkd::Batch::new(
            student_only.shape(),
            student_only.student_loc(),
            student_only.student_conf(),
            student_only.student_loc(),
            student_only.student_conf(),
            student_only.targets(),
            student_only.priors(),
        )
        .unwrap();
        let backend = device.backend();
        backend.write(shared.batch(), &as_teacher).unwrap();
        let on_shared = backend
            .evaluate_resident(shared.batch(), &config, read_all)
            .unwrap();
        let ordinary = backend.evaluate(&as_teacher, &config, all).unwrap();
        // The teacher's own buffers still hold the golden teacher: only the rebinding
        // makes the two agree.
        assert_bit_identical(
            &format!("{} without teacher", case.name),
            &on_shared,
            &ordinary,
        );
        device.bind_teacher(&mut shared, true).unwrap();
    }
    device.wait_idle().unwrap();
    assert_no_logged_errors(test);
}

/// The Vulkan device of `device`, as ash sees it.
fn raw_device(device: &wgpu::Device) -> ash::Device {
    // SAFETY: read only, while `device` lives.
    let hal = unsafe { device.as_hal::<Vulkan>() }.expect("a Vulkan device");
    hal.raw_device().clone()
}

/// Imports an opaque fd of `allocation_size` bytes (memory type `memory_type`) into
/// `device` as a wgpu buffer of `bytes` bytes.
fn import(
    device: &wgpu::Device,
    fd: std::os::fd::OwnedFd,
    allocation_size: u64,
    memory_type: u32,
    bytes: u64,
) -> wgpu::Buffer {
    let raw = raw_device(device);
    let mut external = vk::ExternalMemoryBufferCreateInfo::default()
        .handle_types(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
    let info = vk::BufferCreateInfo::default()
        .size(bytes)
        .usage(vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST)
        .sharing_mode(vk::SharingMode::EXCLUSIVE)
        .push_next(&mut external);
    // SAFETY: valid create and allocate infos on a live device; the imported allocation is
    // the exported one's size and type (same physical device), dedicated to the buffer as
    // it was exported.
    unsafe {
        let buffer = raw.create_buffer(&info, None).unwrap();
        let mut import = vk::ImportMemoryFdInfoKHR::default()
            .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD)
            .fd(fd.into_raw_fd());
        let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buffer);
        let allocate = vk::MemoryAllocateInfo::default()
            .allocation_size(allocation_size)
            .memory_type_index(memory_type)
            .push_next(&mut import)
            .push_next(&mut dedicated);
        let memory = raw.allocate_memory(&allocate, None).unwrap();
        raw.bind_buffer_memory(buffer, memory, 0).unwrap();
        let hal = wgpu::hal::vulkan::Buffer::from_raw_managed(buffer, memory, 0, allocation_size);
        device.create_buffer_from_hal::<Vulkan>(
            hal,
            &wgpu::BufferDescriptor {
                label: Some("test.imported"),
                size: bytes,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            },
        )
    }
}

/// 1 MiB exported from one Vulkan device and imported into a second (its own instance and
/// `VkDevice`): what either writes, the other reads.
#[test]
fn exported_memory_reads_equal_in_a_second_vulkan_device() {
    let test = "exported_memory_reads_equal_in_a_second_vulkan_device";
    let Some(mut first) = open(test) else { return };
    let mut second = SharedDevice::open(first.adapter().uuid, flags()).unwrap();
    let bytes = 1 << 20;
    let exported = first.exportable_buffer("test.exported", bytes).unwrap();
    let fd = first.export_fd(&exported).unwrap();
    let imported = {
        let backend = second.backend();
        import(
            backend.device(),
            fd,
            exported.allocation_size,
            exported.memory_type,
            bytes,
        )
    };

    let one = pattern(bytes as usize, 1);
    {
        let a = first.backend();
        a.queue().write_buffer(&exported.buffer, 0, &one);
        a.queue().submit([]);
        a.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
    }
    let b = second.backend();
    let seen = read(b.device(), b.queue(), &imported, bytes);
    assert!(
        seen == one,
        "{test}: the second device reads other bytes than the first wrote"
    );

    let two = pattern(bytes as usize, 2);
    b.queue().write_buffer(&imported, 0, &two);
    b.queue().submit([]);
    b.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    let a = first.backend();
    let seen = read(a.device(), a.queue(), &exported.buffer, bytes);
    assert!(
        seen == two,
        "{test}: the first device reads other bytes than the second wrote"
    );

    drop(imported);
    second.wait_idle().unwrap();
    drop(exported);
    first.wait_idle().unwrap();
    assert_no_logged_errors(test);
}

/// The ordering follows what the driver exports: a full synchronisation without
/// `VK_KHR_external_semaphore_fd` (lavapipe), reported as "full-sync", and no semaphore
/// to export then.
#[test]
fn ordering_is_full_sync_without_exportable_semaphores() {
    let test = "ordering_is_full_sync_without_exportable_semaphores";
    let Some(device) = open(test) else { return };
    let adapter = device.adapter().clone();
    if adapter.external_semaphores {
        assert_eq!(device.ordering(), Ordering::TimelineSemaphore);
        assert_eq!(device.ordering().name(), "timeline-semaphore");
        device.timeline_semaphore().unwrap();
    } else {
        assert_eq!(device.ordering(), Ordering::FullSync);
        assert_eq!(device.ordering().name(), "full-sync");
        let refused = device.timeline_semaphore().unwrap_err();
        assert!(
            refused.to_string().contains("VK_KHR_external_semaphore_fd"),
            "{refused}"
        );
    }
    if adapter.name.contains("llvmpipe") {
        // lavapipe (Mesa) has no VK_KHR_external_semaphore_fd.
        assert!(!adapter.external_semaphores);
        assert_eq!(device.ordering(), Ordering::FullSync);
    }
    assert_no_logged_errors(test);
}

/// A UUID no adapter has is refused with the reason, not a panic.
#[test]
fn unknown_uuid_is_refused_with_the_reason() {
    let test = "unknown_uuid_is_refused_with_the_reason";
    if exporting_adapter(test).is_none() {
        return;
    }
    let uuid = [0xa5; 16];
    assert!(vulkan_adapters(flags()).iter().all(|a| a.uuid != uuid));
    match SharedDevice::open(uuid, flags()) {
        Err(Error::NoAdapter(why)) => assert_eq!(
            why,
            "no Vulkan adapter with the UUID a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5"
        ),
        other => panic!("{test}: {other:?}"),
    }
}

fn require_cuda() -> bool {
    std::env::var("SSDKD_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

/// CUDA device 0 through `CudaShared`, or `None` after printing why the test is skipped
/// (failing instead where `SSDKD_REQUIRE_CUDA=1`).
fn cuda_shared(test: &str) -> Option<CudaShared> {
    watch_errors();
    if let Some(why) = cuda_unavailable_reason(0) {
        assert!(!why.is_empty());
        assert!(!require_cuda(), "{test}: {why} and SSDKD_REQUIRE_CUDA=1");
        eprintln!("==================================================================");
        eprintln!("{test}: skipped: {why}");
        eprintln!("==================================================================");
        let refused = CudaShared::open(0).unwrap_err();
        assert!(
            matches!(&refused, Error::NoAdapter(w) if *w == why),
            "{test}: open refuses with the same reason: {refused:?}"
        );
        return None;
    }
    let shared = CudaShared::open(0).expect("CUDA device 0 opens where nothing is missing");
    eprintln!(
        "{test}: CUDA device 0 on {} ({}), ordering {}",
        shared.adapter().name,
        ssdkd::gpu::shared::uuid_hex(&shared.adapter().uuid),
        shared.ordering().name()
    );
    Some(shared)
}

/// CUDA memory for the test, through the driver API.
mod cuda {
    use cudarc::driver::sys;

    fn ok(what: &str, r: sys::CUresult) {
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
    }

    /// Makes device 0's primary context current on this thread.
    pub fn current() {
        let mut device = 0;
        let mut context = std::ptr::null_mut();
        // SAFETY: driver calls with valid out-pointers.
        unsafe {
            ok("cuInit", sys::cuInit(0));
            ok("cuDeviceGet", sys::cuDeviceGet(&mut device, 0));
            ok(
                "cuDevicePrimaryCtxRetain",
                sys::cuDevicePrimaryCtxRetain(&mut context, device),
            );
            ok("cuCtxSetCurrent", sys::cuCtxSetCurrent(context));
        }
    }

    /// A device copy of `data`.
    pub fn upload(data: &[f32]) -> u64 {
        let mut pointer = 0;
        // SAFETY: a new allocation of the slice's bytes, written from the slice.
        unsafe {
            ok(
                "cuMemAlloc",
                sys::cuMemAlloc_v2(&mut pointer, data.len() * 4),
            );
            ok(
                "cuMemcpyHtoD",
                sys::cuMemcpyHtoD_v2(pointer, data.as_ptr().cast(), data.len() * 4),
            );
        }
        pointer
    }

    /// `len` floats of device memory, set to NaN.
    pub fn nans(len: usize) -> u64 {
        upload(&vec![f32::NAN; len])
    }

    /// The floats at `pointer`, after all work of the context.
    pub fn download(pointer: u64, len: usize) -> Vec<f32> {
        let mut data = vec![0f32; len];
        // SAFETY: `pointer` holds `len` floats.
        unsafe {
            ok("cuCtxSynchronize", sys::cuCtxSynchronize());
            ok(
                "cuMemcpyDtoH",
                sys::cuMemcpyDtoH_v2(data.as_mut_ptr().cast(), pointer, len * 4),
            );
        }
        data
    }

    pub fn free(pointer: u64) {
        // SAFETY: allocated by `upload`.
        unsafe { ok("cuMemFree", sys::cuMemFree_v2(pointer)) };
    }
}

/// Golden batches from CUDA memory through the shared buffers: the sums and gradients of
/// the resident path on the same Vulkan device, bit for bit, the golden values, and only
/// the sums read back; a bad value refused as on the CPU.
#[test]
fn cuda_tensors_evaluate_as_on_ordinary_buffers() {
    let test = "cuda_tensors_evaluate_as_on_ordinary_buffers";
    let Some(mut shared) = cuda_shared(test) else {
        return;
    };
    cuda::current();
    let mut reference = GpuBackend::new().unwrap();
    for path in golden_files() {
        let case = load_golden(&path);
        let batch = case.file.tensors.batch();
        let config = case.file.config;
        let shape = batch.shape();
        let pointers = [
            batch.student_loc(),
            batch.student_conf(),
            batch.teacher_loc(),
            batch.teacher_conf(),
            batch.targets(),
            batch.priors(),
        ]
        .map(cuda::upload);
        let (conf_len, loc_len) = (batch.student_conf().len(), batch.student_loc().len());
        let (grad_conf, grad_loc) = (cuda::nans(conf_len), cuda::nans(loc_len));
        let inputs = CudaInputs {
            pointers,
            shape,
            stream: 0,
            grad_conf,
            grad_loc,
        };
        let before = shared.bytes_read_back();
        let mut eval = shared.evaluate(&inputs, &config).unwrap();
        assert!(
            shared.bytes_read_back() - before < 1024,
            "{}: only the sums read back",
            case.name
        );
        let all = Request {
            gradients: true,
            decisions: false,
            validate: true,
        };
        let expected = reference.evaluate(&batch, &config, all).unwrap();
        eval.gradients = Some(ssdkd::Gradients {
            student_conf: cuda::download(grad_conf, conf_len),
            student_loc: cuda::download(grad_loc, loc_len),
        });
        let mut expected_no_decisions = expected.clone();
        expected_no_decisions.decisions = None;
        assert_bit_identical(&case.name, &eval, &expected_no_decisions);

        // A NaN in student_conf is refused, naming the tensor.
        let mut bad = batch.student_conf().to_vec();
        bad[1] = f32::NAN;
        let bad_pointer = cuda::upload(&bad);
        let refused = shared
            .evaluate(
                &CudaInputs {
                    pointers: [
                        pointers[0],
                        bad_pointer,
                        pointers[2],
                        pointers[3],
                        pointers[4],
                        pointers[5],
                    ],
                    ..inputs
                },
                &config,
            )
            .unwrap_err();
        assert!(
            matches!(&refused, Error::Input(e) if e.tensor().name() == "student_conf"),
            "{}: {refused:?}",
            case.name
        );
        for p in pointers
            .into_iter()
            .chain([grad_conf, grad_loc, bad_pointer])
        {
            cuda::free(p);
        }
    }
    assert_no_logged_errors(test);
}
