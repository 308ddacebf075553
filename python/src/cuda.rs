//! The CUDA path of `ssdkd._ssdkd` (cargo feature `cuda`): `CudaShared`, the library's
//! `ssdkd::gpu::shared::CudaShared` for one CUDA device, evaluating tensors given as CUDA
//! device pointers (their inputs copied device to device on the caller's stream into
//! buffers shared with the GPU backend's Vulkan device, the gradients copied back the same
//! way), and `cuda_unavailable_reason`, which says why it cannot open a device. Failing to
//! open raises `NoAdapterError` naming the reason.

use crate::{py_ok, PyEvaluation};
use pyo3::prelude::*;
use ssdkd::io::file::ConfigOverrides;
use ssdkd::gpu::shared::{self, CudaInputs, CudaShared};
use ssdkd::{BatchShape, Error};
use std::sync::Mutex;

/// The GPU backend sharing buffers with CUDA device `device_index` (CUDA's numbering,
/// `CUDA_VISIBLE_DEVICES` applied): the Vulkan adapter with that device's UUID.
#[pyclass(name = "CudaShared", module = "ssdkd", frozen)]
pub struct PyCudaShared {
    shared: Mutex<CudaShared>,
    /// `"timeline-semaphore"` or `"full-sync"`: how work is ordered with the stream.
    #[pyo3(get)]
    ordering: &'static str,
    /// The Vulkan adapter's name.
    #[pyo3(get)]
    adapter: String,
    /// The device UUID, 32 hex digits.
    #[pyo3(get)]
    uuid: String,
}

#[pymethods]
impl PyCudaShared {
    #[new]
    fn new(py: Python<'_>, device_index: usize) -> PyResult<Self> {
        let shared = py_ok(py, py.detach(|| CudaShared::open(device_index)))?;
        Ok(Self {
            ordering: shared.ordering().name(),
            adapter: shared.adapter().name.clone(),
            uuid: shared::uuid_hex(&shared.adapter().uuid),
            shared: Mutex::new(shared),
        })
    }

    /// Bytes mapped back to the host so far: the sums of each evaluation.
    #[getter]
    fn bytes_read_back(&self) -> u64 {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes_read_back()
    }

    /// Evaluates the float32 tensors at the CUDA device pointers `ptrs` (SPEC §1's order;
    /// the teacher's both 0 for the plain MultiBox loss) of `shape` `(B, P, C, M)` with the
    /// config of SPEC §8 as JSON, ordered on CUDA stream `stream`; the gradients are copied
    /// on the stream to `grad_conf_ptr` / `grad_loc_ptr` where non-zero. The returned
    /// evaluation has no NumPy gradients or decisions. The values are checked on the device
    /// whatever `validate` says (the validate stage costs no host copy). The GIL is released.
    #[pyo3(signature = (ptrs, shape, config_json, stream, grad_conf_ptr, grad_loc_ptr, validate))]
    #[allow(clippy::too_many_arguments)] // as the Python signature
    fn evaluate(
        &self,
        py: Python<'_>,
        ptrs: Vec<u64>,
        shape: (usize, usize, usize, usize),
        config_json: &str,
        stream: u64,
        grad_conf_ptr: u64,
        grad_loc_ptr: u64,
        validate: bool,
    ) -> PyResult<PyEvaluation> {
        // Accepted for the signature's sake: the device checks the values either way.
        let _ = validate;
        let pointers: [u64; 6] = ptrs.try_into().map_err(|given: Vec<u64>| {
            crate::error::to_py(
                py,
                &Error::Config {
                    key: "ptrs".into(),
                    problem: format!("{} pointers where SPEC §1 has 6 tensors", given.len()),
                },
                false,
            )
        })?;
        let (batch, priors, classes, objects) = shape;
        let shape = BatchShape {
            batch,
            priors,
            classes,
            objects,
        };
        let config = ConfigOverrides::from_config_json(config_json)
            .and_then(|overrides| overrides.config_for(classes));
        let config = py_ok(py, config)?;
        let inputs = CudaInputs {
            pointers,
            shape,
            stream,
            grad_conf: grad_conf_ptr,
            grad_loc: grad_loc_ptr,
        };
        let eval = py.detach(|| {
            self.shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .evaluate(&inputs, &config)
        });
        let eval = py_ok(py, eval)?;
        PyEvaluation::new(py, eval, shape, "gpu", &self.adapter)
    }

    fn __repr__(&self) -> String {
        format!(
            "CudaShared({} {}, ordering {:?})",
            self.adapter, self.uuid, self.ordering
        )
    }
}

/// None when `CudaShared(device_index)` can be opened, else the reason ("libcuda not
/// found", "no Vulkan adapter with the UUID of CUDA device N", "missing Vulkan extension
/// VK_…", "not an NVIDIA GPU"). Opens no device.
#[pyfunction]
pub fn cuda_unavailable_reason(py: Python<'_>, device_index: usize) -> Option<String> {
    py.detach(|| shared::cuda_unavailable_reason(device_index))
}
