//! The library's errors as Python exceptions: one class per kind of fault, with what is at
//! fault (`tensor`, `image`, `index`, `key`, `path`) as attributes.

use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use ssdkd::{Error, InputError as BadValue};

pyo3::create_exception!(
    ssdkd,
    InputError,
    PyValueError,
    "Bad input: a tensor's shape, dtype or value, a config key or argument, a batch too large \
     for memory (key `batch`), an unreadable batch file. Attributes `tensor`, `image`, \
     `index`, `key`, `path` name what is at fault (None where not applicable)."
);
pyo3::create_exception!(
    ssdkd,
    NoAdapterError,
    PyRuntimeError,
    "No GPU adapter where one was required (`backend=\"gpu\"`)."
);
pyo3::create_exception!(
    ssdkd,
    GpuError,
    PyRuntimeError,
    "The GPU failed (out of memory, device lost, a validation error), or the batch is over \
     a documented limit of the GPU backend (`backend=\"gpu\"`; `auto` hands such a batch to \
     the CPU)."
);
pyo3::create_exception!(
    ssdkd,
    NumericalError,
    PyRuntimeError,
    "A loss or gradient came out NaN or infinite although the inputs were accepted. \
     Attributes `tensor` (the term or gradient, e.g. `grad_student_conf`) and `index` \
     (the flat element index of a gradient, else None)."
);

pyo3::create_exception!(
    ssdkd,
    InternalError,
    PyRuntimeError,
    "A defect of ssdkd: a panic inside the library, caught at the binding; the message \
     carries its cause. Please report it."
);

/// What is at fault, as the exception's attributes.
#[derive(Default)]
struct Fields {
    tensor: Option<String>,
    image: Option<usize>,
    index: Option<usize>,
    key: Option<String>,
    path: Option<String>,
}

/// The exception of `e`; `writing`: an I/O failure was writing an output (`OSError`)
/// rather than reading an input (`InputError`). A cancelled evaluation is the
/// `KeyboardInterrupt` that cancelled it.
pub fn to_py(py: Python<'_>, e: &Error, writing: bool) -> PyErr {
    let message = e.to_string();
    let mut f = Fields::default();
    let err = match e {
        Error::Shape { tensor, .. } => {
            f.tensor = Some((*tensor).to_owned());
            InputError::new_err(message)
        }
        Error::Input(input) => {
            f.tensor = Some(input.tensor().name().to_owned());
            (f.image, f.index) = match *input {
                BadValue::NonFinite { image, row, .. } => (image, Some(row)),
                BadValue::OutOfRange { image, row, .. } => (Some(image), Some(row)),
                BadValue::DegenerateBox { image, object, .. }
                | BadValue::BoxOutOfRange { image, object, .. }
                | BadValue::BadLabel { image, object, .. } => (Some(image), Some(object)),
                BadValue::BadPrior { index, .. } => (None, Some(index)),
            };
            InputError::new_err(message)
        }
        Error::Config { key, .. } => {
            f.key = Some(key.clone());
            InputError::new_err(message)
        }
        Error::File { path, .. } | Error::Io { path, .. } => {
            f.path = Some(path.display().to_string());
            if writing && matches!(e, Error::Io { .. }) {
                return PyOSError::new_err(message);
            }
            InputError::new_err(message)
        }
        Error::Numerical { what, index, .. } => {
            (f.tensor, f.index) = (Some((*what).to_owned()), *index);
            NumericalError::new_err(message)
        }
        Error::NoAdapter(_) => return NoAdapterError::new_err(message),
        Error::Cancelled => return PyKeyboardInterrupt::new_err(message),
        Error::Internal(_) => return InternalError::new_err(message),
        // GPU failures, and any variant added later until it is mapped here.
        _ => return GpuError::new_err(message),
    };
    with_fields(py, err, f)
}

/// `err` with `f` as its attributes.
fn with_fields(py: Python<'_>, err: PyErr, f: Fields) -> PyErr {
    let value = err.value(py);
    // Setting attributes on a fresh exception cannot fail in practice; if it did, the
    // exception is still raised with its message.
    let _ = value.setattr("tensor", f.tensor);
    let _ = value.setattr("image", f.image);
    let _ = value.setattr("index", f.index);
    let _ = value.setattr("key", f.key);
    let _ = value.setattr("path", f.path);
    err
}

/// An `InputError` for a fault the Python layer finds while converting its arguments
/// (`ssdkd._input_error`), with the same attributes as the library's errors.
#[pyfunction]
#[pyo3(signature = (message, tensor = None, key = None))]
pub fn input_error(
    py: Python<'_>,
    message: String,
    tensor: Option<String>,
    key: Option<String>,
) -> Py<pyo3::exceptions::PyBaseException> {
    let f = Fields {
        tensor,
        key,
        ..Fields::default()
    };
    with_fields(py, InputError::new_err(message), f).into_value(py)
}

/// Registers the exception classes on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("NoAdapterError", py.get_type::<NoAdapterError>())?;
    m.add("GpuError", py.get_type::<GpuError>())?;
    m.add("NumericalError", py.get_type::<NumericalError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add_function(wrap_pyfunction!(input_error, m)?)
}
