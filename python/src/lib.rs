//! `ssdkd._ssdkd`: the compiled part of the `ssdkd` Python package. It only converts
//! NumPy arrays and Python values to the plain types of [`api`] and back, and maps errors
//! to exception classes; all loss logic stays in the `ssdkd` library. The public Python
//! API (`ssdkd.evaluate`, ...) lives in `ssdkd/__init__.py` over these functions.

mod api;

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

pyo3::create_exception!(
    ssdkd,
    InputError,
    PyValueError,
    "Bad input: a tensor's shape, dtype or value, or a config key. Attributes `tensor`, \
     `image`, `index`, `key`, `path` name what is at fault (None where not applicable)."
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

/// Builds the exception of `info`, its structured fields set as attributes.
fn exception(py: Python<'_>, info: api::ErrorInfo) -> PyErr {
    let err = match info.kind {
        api::Kind::Input => InputError::new_err(info.message),
        api::Kind::NoAdapter => NoAdapterError::new_err(info.message),
        api::Kind::Gpu => GpuError::new_err(info.message),
        api::Kind::Numerical => NumericalError::new_err(info.message),
        api::Kind::Io => PyOSError::new_err(info.message),
    };
    if matches!(info.kind, api::Kind::Input | api::Kind::Numerical) {
        let value = err.value(py);
        // Setting attributes on a fresh exception instance cannot fail in practice; if it
        // did, the exception is still raised with its message.
        let _ = value.setattr("tensor", info.tensor);
        let _ = value.setattr("image", info.image);
        let _ = value.setattr("index", info.index);
        let _ = value.setattr("key", info.key);
        let _ = value.setattr("path", info.path);
    }
    err
}

fn to_py(py: Python<'_>, e: &ssdkd::Error) -> PyErr {
    exception(py, api::describe(e, api::Io::Reading))
}

/// As [`to_py`], for errors while writing a file: an I/O failure is an `OSError`.
fn to_py_writing(py: Python<'_>, e: &ssdkd::Error) -> PyErr {
    exception(py, api::describe(e, api::Io::Writing))
}

/// An `InputError` raised by the binding itself (shapes of the arrays), worded like the
/// library's shape errors.
fn input_error(py: Python<'_>, tensor: &str, problem: String) -> PyErr {
    exception(
        py,
        api::ErrorInfo {
            kind: api::Kind::Input,
            message: format!("tensor `{tensor}`: {problem}"),
            tensor: Some(tensor.to_owned()),
            key: None,
            image: None,
            index: None,
            path: None,
        },
    )
}

/// The array's shape, checked against `want` (`None`: any size; `Some(n)`: exactly n).
fn shape_of(
    py: Python<'_>,
    name: &str,
    array: &PyReadonlyArrayDyn<'_, f32>,
    want: &[Option<usize>],
) -> PyResult<Vec<usize>> {
    let shape = array.shape().to_vec();
    let ok = shape.len() == want.len()
        && shape
            .iter()
            .zip(want)
            .all(|(s, w)| w.is_none_or(|w| *s == w));
    if ok {
        return Ok(shape);
    }
    let expected: Vec<String> = want
        .iter()
        .map(|w| w.map_or("_".to_owned(), |w| w.to_string()))
        .collect();
    Err(input_error(
        py,
        name,
        format!("shape {shape:?} where [{}] is needed", expected.join(", ")),
    ))
}

fn slice<'a>(
    py: Python<'_>,
    name: &str,
    array: &'a PyReadonlyArrayDyn<'_, f32>,
) -> PyResult<&'a [f32]> {
    array
        .as_slice()
        .map_err(|_| input_error(py, name, "not C-contiguous".into()))
}

fn choice(py: Python<'_>, backend: &str) -> PyResult<api::Choice> {
    match backend {
        "auto" => Ok(api::Choice::Auto),
        "cpu" => Ok(api::Choice::Cpu),
        "gpu" => Ok(api::Choice::Gpu),
        other => Err(exception(
            py,
            api::ErrorInfo {
                kind: api::Kind::Input,
                message: format!("backend `{other}`: expected \"auto\", \"cpu\" or \"gpu\""),
                tensor: None,
                key: Some("backend".into()),
                image: None,
                index: None,
                path: None,
            },
        )),
    }
}

/// A new NumPy array that owns `data` (no copy), with `shape`.
fn array<'py, T: numpy::Element>(
    py: Python<'py>,
    data: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    PyArray1::from_vec(py, data).reshape(shape)
}

/// The teacher's tensors, both or neither (a batch without teacher), checked against
/// `[B, P, C]`.
fn teacher_slices<'a>(
    py: Python<'_>,
    teacher_loc: &'a Option<PyReadonlyArrayDyn<'_, f32>>,
    teacher_conf: &'a Option<PyReadonlyArrayDyn<'_, f32>>,
    [b, p, c]: [usize; 3],
) -> PyResult<Option<(&'a [f32], &'a [f32])>> {
    match (teacher_loc, teacher_conf) {
        (Some(tl), Some(tc)) => {
            shape_of(py, "teacher_loc", tl, &[Some(b), Some(p), Some(4)])?;
            shape_of(py, "teacher_conf", tc, &[Some(b), Some(p), Some(c)])?;
            Ok(Some((
                slice(py, "teacher_loc", tl)?,
                slice(py, "teacher_conf", tc)?,
            )))
        }
        (None, None) => Ok(None),
        (None, Some(_)) => Err(input_error(
            py,
            "teacher_loc",
            "missing while teacher_conf is given (give both or neither)".into(),
        )),
        (Some(_), None) => Err(input_error(
            py,
            "teacher_conf",
            "missing while teacher_loc is given (give both or neither)".into(),
        )),
    }
}

/// The six input arrays of `evaluate` and `gradients_of_last`.
struct Arrays<'py> {
    student_loc: PyReadonlyArrayDyn<'py, f32>,
    student_conf: PyReadonlyArrayDyn<'py, f32>,
    teacher_loc: Option<PyReadonlyArrayDyn<'py, f32>>,
    teacher_conf: Option<PyReadonlyArrayDyn<'py, f32>>,
    targets: PyReadonlyArrayDyn<'py, f32>,
    priors: PyReadonlyArrayDyn<'py, f32>,
}

impl Arrays<'_> {
    /// The arrays as the library's inputs, their shapes checked against each other
    /// (SPEC §1): `student_loc` [B, P, 4] gives B and P, `student_conf` C, `targets` M.
    fn inputs(&self, py: Python<'_>) -> PyResult<api::Inputs<'_>> {
        let sl = shape_of(py, "student_loc", &self.student_loc, &[None, None, Some(4)])?;
        let (b, p) = (sl[0], sl[1]);
        let sc = shape_of(
            py,
            "student_conf",
            &self.student_conf,
            &[Some(b), Some(p), None],
        )?;
        let c = sc[2];
        let tg = shape_of(py, "targets", &self.targets, &[Some(b), None, Some(5)])?;
        shape_of(py, "priors", &self.priors, &[Some(p), Some(4)])?;
        let teacher = teacher_slices(py, &self.teacher_loc, &self.teacher_conf, [b, p, c])?;
        Ok(api::Inputs {
            dims: [b, p, c, tg[1]],
            student_loc: slice(py, "student_loc", &self.student_loc)?,
            student_conf: slice(py, "student_conf", &self.student_conf)?,
            teacher,
            targets: slice(py, "targets", &self.targets)?,
            priors: slice(py, "priors", &self.priors)?,
        })
    }
}

/// Evaluates one batch; arrays are C-contiguous float32 (the Python wrapper converts).
#[pyfunction]
#[pyo3(signature = (student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                    backend, gradients, decisions, validate, config_json))]
#[allow(clippy::too_many_arguments)] // one argument per tensor and flag, as in Python
fn evaluate<'py>(
    py: Python<'py>,
    student_loc: PyReadonlyArrayDyn<'py, f32>,
    student_conf: PyReadonlyArrayDyn<'py, f32>,
    teacher_loc: Option<PyReadonlyArrayDyn<'py, f32>>,
    teacher_conf: Option<PyReadonlyArrayDyn<'py, f32>>,
    targets: PyReadonlyArrayDyn<'py, f32>,
    priors: PyReadonlyArrayDyn<'py, f32>,
    backend: &str,
    gradients: bool,
    decisions: bool,
    validate: bool,
    config_json: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let choice = choice(py, backend)?;
    let arrays = Arrays {
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        priors,
    };
    let inputs = arrays.inputs(py)?;
    let [b, p, c, _] = inputs.dims;
    let wanted = api::Wanted {
        gradients,
        decisions,
        validate,
    };
    let out = py
        .detach(|| api::evaluate(choice, &inputs, config_json, wanted))
        .map_err(|e| to_py(py, &e))?;
    let d = PyDict::new(py);
    let names = ["soft_loss", "l2_loss", "loss_c", "loss_l", "total"];
    for (name, value) in names.iter().zip(out.terms) {
        d.set_item(name, value)?;
    }
    for (name, value) in ["soft_sum", "l2_sum", "conf_sum", "loc_sum"]
        .iter()
        .zip(out.sums)
    {
        d.set_item(name, value)?;
    }
    for (name, value) in ["num_pos", "num_neg", "num_bounded"].iter().zip(out.counts) {
        d.set_item(name, value)?;
    }
    d.set_item("backend", out.backend)?;
    d.set_item("adapter", out.adapter)?;
    d.set_item("fallback", out.fallback)?;
    if let Some(gradients) = out.gradients {
        let (conf, loc) = gradient_arrays(py, gradients, [b, p, c])?;
        d.set_item("grad_student_conf", conf)?;
        d.set_item("grad_student_loc", loc)?;
    }
    if let Some((ct, lt, nm)) = out.decisions {
        d.set_item("conf_target", array(py, ct, &[b, p])?)?;
        d.set_item("loc_target", array(py, lt, &[b, p, 4])?)?;
        d.set_item("neg_mask", array(py, nm, &[b, p])?)?;
    }
    Ok(d)
}

/// `(grad_student_conf [B, P, C], grad_student_loc [B, P, 4])`.
type GradientArrays<'py> = (Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArrayDyn<f32>>);

/// The library's flat gradients of a `[B, P, C]` batch as NumPy arrays, without a copy.
fn gradient_arrays(
    py: Python<'_>,
    (conf, loc): api::GradientVecs,
    [b, p, c]: [usize; 3],
) -> PyResult<GradientArrays<'_>> {
    Ok((array(py, conf, &[b, p, c])?, array(py, loc, &[b, p, 4])?))
}

/// The gradients `(grad_student_conf, grad_student_loc)` of the last evaluation on the
/// `backend` choice's backend for the weights in `config_json`, without a forward pass,
/// when that evaluation was of these very arrays with the same settings; `None` otherwise
/// (the caller then evaluates with gradients). Arrays as for `evaluate`.
#[pyfunction]
#[pyo3(signature = (student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                    backend, config_json))]
#[allow(clippy::too_many_arguments)] // one argument per tensor, as `evaluate`
fn gradients_of_last<'py>(
    py: Python<'py>,
    student_loc: PyReadonlyArrayDyn<'py, f32>,
    student_conf: PyReadonlyArrayDyn<'py, f32>,
    teacher_loc: Option<PyReadonlyArrayDyn<'py, f32>>,
    teacher_conf: Option<PyReadonlyArrayDyn<'py, f32>>,
    targets: PyReadonlyArrayDyn<'py, f32>,
    priors: PyReadonlyArrayDyn<'py, f32>,
    backend: &str,
    config_json: &str,
) -> PyResult<Option<GradientArrays<'py>>> {
    let choice = choice(py, backend)?;
    let arrays = Arrays {
        student_loc,
        student_conf,
        teacher_loc,
        teacher_conf,
        targets,
        priors,
    };
    let inputs = arrays.inputs(py)?;
    let [b, p, c, _] = inputs.dims;
    let out = py
        .detach(|| api::gradients_of_last(choice, &inputs, config_json))
        .map_err(|e| to_py(py, &e))?;
    out.map(|gradients| gradient_arrays(py, gradients, [b, p, c]))
        .transpose()
}

fn tensors_dict<'py>(py: Python<'py>, t: api::Tensors) -> PyResult<Bound<'py, PyDict>> {
    let [b, p, c, m] = t.dims;
    let d = PyDict::new(py);
    d.set_item("student_loc", array(py, t.student_loc, &[b, p, 4])?)?;
    d.set_item("student_conf", array(py, t.student_conf, &[b, p, c])?)?;
    match t.teacher {
        Some((tl, tc)) => {
            d.set_item("teacher_loc", array(py, tl, &[b, p, 4])?)?;
            d.set_item("teacher_conf", array(py, tc, &[b, p, c])?)?;
        }
        None => {
            d.set_item("teacher_loc", py.None())?;
            d.set_item("teacher_conf", py.None())?;
        }
    }
    d.set_item("targets", array(py, t.targets, &[b, m, 5])?)?;
    d.set_item("priors", array(py, t.priors, &[p, 4])?)?;
    Ok(d)
}

/// Reads a batch file: `(tensors, config_json)`.
#[pyfunction]
fn read_batch<'py>(py: Python<'py>, path: PathBuf) -> PyResult<(Bound<'py, PyDict>, String)> {
    let (tensors, config) = py
        .detach(|| api::read_batch(&path))
        .map_err(|e| to_py(py, &e))?;
    Ok((tensors_dict(py, tensors)?, config))
}

/// Writes a batch file from C-contiguous float32 arrays (the teacher's both or neither).
#[pyfunction]
#[allow(clippy::too_many_arguments)] // one argument per tensor
fn write_batch(
    py: Python<'_>,
    path: PathBuf,
    student_loc: PyReadonlyArrayDyn<'_, f32>,
    student_conf: PyReadonlyArrayDyn<'_, f32>,
    teacher_loc: Option<PyReadonlyArrayDyn<'_, f32>>,
    teacher_conf: Option<PyReadonlyArrayDyn<'_, f32>>,
    targets: PyReadonlyArrayDyn<'_, f32>,
    priors: PyReadonlyArrayDyn<'_, f32>,
    config_json: &str,
) -> PyResult<()> {
    let sl = shape_of(py, "student_loc", &student_loc, &[None, None, Some(4)])?;
    let (b, p) = (sl[0], sl[1]);
    let c = shape_of(py, "student_conf", &student_conf, &[Some(b), Some(p), None])?[2];
    let teacher = teacher_slices(py, &teacher_loc, &teacher_conf, [b, p, c])?
        .map(|(tl, tc)| (tl.to_vec(), tc.to_vec()));
    let m = shape_of(py, "targets", &targets, &[Some(b), None, Some(5)])?[1];
    shape_of(py, "priors", &priors, &[Some(p), Some(4)])?;
    let tensors = api::Tensors {
        dims: [b, p, c, m],
        student_loc: slice(py, "student_loc", &student_loc)?.to_vec(),
        student_conf: slice(py, "student_conf", &student_conf)?.to_vec(),
        teacher,
        targets: slice(py, "targets", &targets)?.to_vec(),
        priors: slice(py, "priors", &priors)?.to_vec(),
    };
    py.detach(|| api::write_batch(&path, tensors, config_json))
        .map_err(|e| to_py_writing(py, &e))
}

/// A preset's priors, `[P, 4]` float32.
#[pyfunction]
fn preset_priors<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let flat = api::preset_priors(name).map_err(|e| to_py(py, &e))?;
    let p = flat.len() / 4;
    array(py, flat, &[p, 4])
}

/// A custom configuration's priors, `[P, 4]` float32. `maps` holds one
/// `(size, step or None, min_size, max_size, aspect_ratios)` per feature map.
#[pyfunction]
#[allow(clippy::type_complexity)] // the tuple is the Python-side record
fn custom_priors<'py>(
    py: Python<'py>,
    image_size: f32,
    maps: Vec<(u32, Option<f32>, f32, f32, Vec<f32>)>,
    clip: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let maps: Vec<api::MapSpec> = maps
        .into_iter()
        .map(
            |(size, step, min_size, max_size, aspect_ratios)| api::MapSpec {
                size,
                step,
                min_size,
                max_size,
                aspect_ratios,
            },
        )
        .collect();
    let flat = api::custom_priors(image_size, &maps, clip).map_err(|e| to_py(py, &e))?;
    let p = flat.len() / 4;
    array(py, flat, &[p, 4])
}

/// The deterministic synthetic batch of `ssdkd bench` (`seed=300`) / `demo` (`seed=2017`,
/// `vary_objects=True`).
#[pyfunction]
fn synthetic<'py>(
    py: Python<'py>,
    batch: usize,
    classes: usize,
    preset: &str,
    objects: usize,
    vary_objects: bool,
    seed: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let t = py
        .detach(|| api::synthetic(batch, classes, preset, objects, vary_objects, seed))
        .map_err(|e| to_py(py, &e))?;
    tensors_dict(py, t)
}

/// A new `InputError` with the given fields (for the pure-Python part to raise).
#[pyfunction]
#[pyo3(signature = (message, tensor=None, key=None))]
fn make_input_error(
    py: Python<'_>,
    message: String,
    tensor: Option<String>,
    key: Option<String>,
) -> Py<PyAny> {
    exception(
        py,
        api::ErrorInfo {
            kind: api::Kind::Input,
            message,
            tensor,
            key,
            image: None,
            index: None,
            path: None,
        },
    )
    .into_value(py)
    .into_any()
}

#[pymodule]
fn _ssdkd(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("NoAdapterError", py.get_type::<NoAdapterError>())?;
    m.add("GpuError", py.get_type::<GpuError>())?;
    m.add("NumericalError", py.get_type::<NumericalError>())?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(gradients_of_last, m)?)?;
    m.add_function(wrap_pyfunction!(read_batch, m)?)?;
    m.add_function(wrap_pyfunction!(write_batch, m)?)?;
    m.add_function(wrap_pyfunction!(preset_priors, m)?)?;
    m.add_function(wrap_pyfunction!(custom_priors, m)?)?;
    m.add_function(wrap_pyfunction!(synthetic, m)?)?;
    m.add_function(wrap_pyfunction!(make_input_error, m)?)?;
    Ok(())
}
