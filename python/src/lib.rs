//! `ssdkd._ssdkd`: the compiled part of the `ssdkd` Python package. `Backend` and
//! `Evaluation` wrap the library's own types; the names, defaults, presets and SPEC §7
//! tolerances are the library's; errors map to exception classes in `error.rs`. All loss
//! logic stays in the `ssdkd` library; `ssdkd/__init__.py` is the public API over this.

#[cfg(all(feature = "cuda", target_os = "linux"))]
mod cuda;
mod error;

use error::to_py;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;
use ssdkd::agreement::{self, gradient_elements, loss_difference_within, TERM_NAMES};
use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::io::config_keys::CONFIG_KEYS;
use ssdkd::io::file::{
    config_json, parse_preset, write_batch_file_cancellable, BatchFile, ConfigOverrides,
};
use ssdkd::{teacher_pair, Batch, BatchShape, CancelToken, Error, LossConfig, OwnedBatch};
use ssdkd::{PriorPreset, Request, Tensors, TENSOR_NAMES};
use ssdkd_core::prior::{FeatureMap, PriorConfig};
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

/// The six arrays of a batch, float32; the teacher's may be absent.
type Arrays<'py> = Tensors<Option<PyReadonlyArrayDyn<'py, f32>>>;

/// How often a running evaluation lets Python's signal handlers run (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(20);

/// `r` with a library error as its exception.
fn py_ok<T>(py: Python<'_>, r: Result<T, Error>) -> PyResult<T> {
    r.map_err(|e| to_py(py, &e, false))
}

/// The shape of tensors of these dimensions (SPEC §1; the teacher's both or neither),
/// checked against the memory available for `request` (`ssdkd::limits::check`, as `ssdkd
/// eval`) before any array is read or converted.
fn checked_shape(dims: Tensors<Option<&[usize]>>, request: &Request) -> Result<BatchShape, Error> {
    let shape = BatchShape::from_dims(dims)?;
    ssdkd::limits::check(&shape, request)?;
    Ok(shape)
}

/// The arrays as the library's batch of `shape`.
fn batch_of<'a>(arrays: &'a Arrays<'_>, shape: BatchShape) -> Result<Batch<'a>, Error> {
    let slices = arrays.as_ref().named().try_map(|(name, array)| {
        array
            .as_ref()
            .map(|array| {
                array.as_slice().map_err(|_| Error::Shape {
                    tensor: name,
                    problem: "not C-contiguous".into(),
                })
            })
            .transpose()
    })?;
    // A missing student tensor, target or prior is an empty slice, whose length is refused.
    let [sl, sc, _, _, tg, pr] = slices.to_array().map(Option::unwrap_or_default);
    match teacher_pair(slices.teacher_loc, slices.teacher_conf)? {
        Some((tl, tc)) => Batch::new(shape, sl, sc, tl, tc, tg, pr),
        None => Batch::without_teacher(shape, sl, sc, tg, pr),
    }
}

/// The arrays' dimensions.
fn dims_of<'a>(arrays: &'a Arrays<'_>) -> Tensors<Option<&'a [usize]>> {
    arrays.as_ref().map(|a| a.as_ref().map(|a| a.shape()))
}

/// `work()`, a panic inside it caught as [`Error::Internal`] carrying its message.
fn catching<T>(work: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|payload| Err(Error::from_panic(payload.as_ref())))
}

/// How a run of [`run_interruptible`] ended.
enum Run<T> {
    /// `work` ran to its end, uninterrupted.
    Done(Result<T, Error>),
    /// A signal handler raised `interrupt` (Ctrl-C's `KeyboardInterrupt`) while `work` ran;
    /// `work` was cancelled, and `result` is what it returned once it had stopped
    /// (`Err(Error::Cancelled)`, or its own result when it was past its last check).
    Interrupted {
        interrupt: PyErr,
        result: Result<T, Error>,
    },
}

/// Runs `work` on a worker thread while this one, the GIL released, lets Python's signal
/// handlers run every [`SIGNAL_POLL`] and once more when `work` is done: when one raises
/// (Ctrl-C's `KeyboardInterrupt`), the token cancels `work`, which is waited for.
fn run_interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(&CancelToken) -> Result<T, Error> + Send,
) -> Run<T> {
    let token = CancelToken::new();
    std::thread::scope(|scope| {
        let (sender, mut receiver) = channel();
        let cancel = &token;
        // A panic inside the library becomes `Error::Internal` with its message, never a
        // `PanicException` (which `except Exception` does not catch).
        scope.spawn(move || sender.send(catching(|| work(cancel))));
        loop {
            let (got, back) = py.detach(move || (receiver.recv_timeout(SIGNAL_POLL), receiver));
            receiver = back;
            let result = match got {
                Ok(result) => Some(result),
                Err(RecvTimeoutError::Timeout) => None,
                // The worker ended without sending (cannot happen: `catching` returns).
                Err(RecvTimeoutError::Disconnected) => {
                    Some(Err(Error::Internal("the worker thread ended early".into())))
                }
            };
            if let Err(interrupt) = py.check_signals() {
                token.cancel();
                let result = result.unwrap_or_else(|| {
                    py.detach(move || receiver.recv()).unwrap_or_else(|_| {
                        Err(Error::Internal("the worker thread ended early".into()))
                    })
                });
                return Run::Interrupted { interrupt, result };
            }
            if let Some(result) = result {
                return Run::Done(result);
            }
        }
    })
}

/// [`run_interruptible`]: `work`'s result, or the exception a signal handler raised (which
/// cancelled `work`).
fn interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(&CancelToken) -> Result<T, Error> + Send,
) -> PyResult<T> {
    match run_interruptible(py, work) {
        Run::Done(result) => py_ok(py, result),
        Run::Interrupted { interrupt, .. } => Err(interrupt),
    }
}

/// A new NumPy array that owns `data` (no copy), with `shape`.
fn array<T: numpy::Element>(
    py: Python<'_>,
    data: Vec<T>,
    shape: &[usize],
) -> PyResult<Py<PyArrayDyn<T>>> {
    Ok(PyArray1::from_vec(py, data).reshape(shape)?.unbind())
}

/// A device that evaluates batches: the library's `Backend`, owned by this object (its
/// CPU workspaces are reused from call to call; nothing is shared with other objects).
#[pyclass(name = "Backend", module = "ssdkd", frozen)]
struct PyBackend {
    backend: Mutex<ssdkd::Backend>,
    /// The choice it was made from: `"auto"`, `"cpu"` or `"gpu"`.
    #[pyo3(get)]
    kind: String,
    /// `"cpu"` or `"gpu"`.
    #[pyo3(get)]
    name: &'static str,
    /// The device's name.
    #[pyo3(get)]
    adapter: String,
    /// Why `"auto"` took the CPU, else None.
    #[pyo3(get)]
    fallback: Option<String>,
    /// Where the library's fallback notice (`Backend::auto`) writes why a batch went to
    /// the CPU backend; `evaluate` turns it into a `RuntimeWarning`.
    heard: std::sync::Arc<Mutex<Option<String>>>,
}

#[pymethods]
impl PyBackend {
    #[new]
    #[pyo3(signature = (kind = None))]
    fn new(py: Python<'_>, kind: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        // Anything but a string is an unknown kind, named in the InputError below.
        let kind = match kind {
            None => "auto".to_owned(),
            Some(k) => k
                .extract::<String>()
                .or_else(|_| k.repr().map(|r| r.to_string()))?,
        };
        let kind = kind.as_str();
        let heard = std::sync::Arc::new(Mutex::new(None::<String>));
        let sink = std::sync::Arc::clone(&heard);
        let backend = py.detach(|| match kind {
            "cpu" => Ok(ssdkd::Backend::cpu()),
            "gpu" => ssdkd::Backend::gpu(),
            "auto" => Ok(ssdkd::Backend::auto(move |e| {
                *sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            })),
            other => Err(Error::Config {
                key: "backend".into(),
                problem: format!("{other:?}: expected \"auto\", \"cpu\" or \"gpu\""),
            }),
        });
        let backend = py_ok(py, backend)?;
        let fallback = heard.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(Self {
            kind: kind.to_owned(),
            name: backend.name(),
            adapter: backend.adapter(),
            backend: Mutex::new(backend),
            fallback,
            heard,
        })
    }

    /// Evaluates one batch of C-contiguous float32 arrays with the config of SPEC §8 as
    /// JSON; the GIL is released, and Ctrl-C stops it.
    #[pyo3(signature = (student_loc, student_conf, teacher_loc, teacher_conf, targets, priors,
                        config_json, gradients=false, decisions=false, validate=true))]
    #[allow(clippy::too_many_arguments)] // one argument per tensor and flag, as in Python
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        student_loc: PyReadonlyArrayDyn<'py, f32>,
        student_conf: PyReadonlyArrayDyn<'py, f32>,
        teacher_loc: Option<PyReadonlyArrayDyn<'py, f32>>,
        teacher_conf: Option<PyReadonlyArrayDyn<'py, f32>>,
        targets: PyReadonlyArrayDyn<'py, f32>,
        priors: PyReadonlyArrayDyn<'py, f32>,
        config_json: &str,
        gradients: bool,
        decisions: bool,
        validate: bool,
    ) -> PyResult<PyEvaluation> {
        let arrays: Arrays<'py> = Tensors {
            student_loc: Some(student_loc),
            student_conf: Some(student_conf),
            teacher_loc,
            teacher_conf,
            targets: Some(targets),
            priors: Some(priors),
        };
        let request = Request {
            gradients,
            decisions,
            validate,
        };
        let shape = py_ok(py, checked_shape(dims_of(&arrays), &request))?;
        let config = ConfigOverrides::from_config_json(config_json)
            .and_then(|overrides| overrides.config_for(shape.classes));
        let config = py_ok(py, config)?;
        let batch = py_ok(py, batch_of(&arrays, shape))?;
        let eval = interruptible(py, |cancel| {
            let mut backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
            backend.evaluate_cancellable(&batch, &config, request, Some(cancel))
        })?;
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(why) = heard {
            let message = std::ffi::CString::new(format!("ssdkd: {why}; using the CPU backend"))
                .unwrap_or_default();
            PyErr::warn(
                py,
                &py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
                &message,
                1,
            )?;
        }
        PyEvaluation::new(py, eval, shape, self.name, &self.adapter)
    }

    fn __repr__(&self) -> String {
        format!(
            "Backend({:?}: {} on {})",
            self.kind, self.name, self.adapter
        )
    }
}

/// The result of an evaluation (the library's `Evaluation`): the terms of SPEC §5, the
/// counts, the un-normalised sums, the backend, and on request the gradients (SPEC §6)
/// and decisions (§3-4) as NumPy arrays; what was not requested is None.
#[pyclass(name = "Evaluation", module = "ssdkd", frozen, get_all)]
struct PyEvaluation {
    soft_loss: f64,
    l2_loss: f64,
    loss_c: f64,
    loss_l: f64,
    total: f64,
    num_pos: u32,
    num_neg: u32,
    num_bounded: u32,
    soft_sum: f64,
    l2_sum: f64,
    conf_sum: f64,
    loc_sum: f64,
    backend: &'static str,
    adapter: String,
    grad_student_conf: Option<Py<PyArrayDyn<f32>>>,
    grad_student_loc: Option<Py<PyArrayDyn<f32>>>,
    conf_target: Option<Py<PyArrayDyn<u32>>>,
    loc_target: Option<Py<PyArrayDyn<f32>>>,
    neg_mask: Option<Py<PyArrayDyn<u8>>>,
}

impl PyEvaluation {
    fn new(
        py: Python<'_>,
        e: ssdkd::Evaluation,
        s: BatchShape,
        backend: &'static str,
        adapter: &str,
    ) -> PyResult<Self> {
        let (b, p, c) = (s.batch, s.priors, s.classes);
        let (t, sums) = (e.terms, e.sums);
        // The library's vectors become the arrays' memory (no copy).
        let (mut grad_student_conf, mut grad_student_loc) = (None, None);
        if let Some(g) = e.gradients {
            grad_student_conf = Some(array(py, g.student_conf, &[b, p, c])?);
            grad_student_loc = Some(array(py, g.student_loc, &[b, p, 4])?);
        }
        let (mut conf_target, mut loc_target, mut neg_mask) = (None, None, None);
        if let Some(d) = e.decisions {
            conf_target = Some(array(py, d.conf_target, &[b, p])?);
            loc_target = Some(array(py, d.loc_target, &[b, p, 4])?);
            neg_mask = Some(array(py, d.neg_mask, &[b, p])?);
        }
        Ok(Self {
            soft_loss: t.soft_loss,
            l2_loss: t.l2_loss,
            loss_c: t.loss_c,
            loss_l: t.loss_l,
            total: t.total,
            num_pos: sums.num_pos,
            num_neg: sums.num_neg,
            num_bounded: sums.num_bounded,
            soft_sum: sums.soft,
            l2_sum: sums.l2,
            conf_sum: sums.conf,
            loc_sum: sums.loc,
            backend,
            adapter: adapter.to_owned(),
            grad_student_conf,
            grad_student_loc,
            conf_target,
            loc_target,
            neg_mask,
        })
    }
}

#[pymethods]
impl PyEvaluation {
    /// The four terms and the total as a dict.
    fn terms<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let values = [
            self.soft_loss,
            self.l2_loss,
            self.loss_c,
            self.loss_l,
            self.total,
        ];
        for (name, value) in TERM_NAMES.into_iter().zip(values) {
            d.set_item(name, value)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Evaluation(soft_loss={}, l2_loss={}, loss_c={}, loss_l={}, total={}, num_pos={}, \
             num_neg={}, num_bounded={}, backend={:?}, adapter={:?})",
            self.soft_loss,
            self.l2_loss,
            self.loss_c,
            self.loss_l,
            self.total,
            self.num_pos,
            self.num_neg,
            self.num_bounded,
            self.backend,
            self.adapter
        )
    }
}

/// Checks tensors of these shapes (the teacher's may be None) before any is converted:
/// their agreement (SPEC §1) and the memory an evaluation needs (`ssdkd::limits`).
#[pyfunction]
#[pyo3(signature = (shapes, gradients=false, decisions=false))]
fn check_shapes(
    py: Python<'_>,
    shapes: [Option<Vec<usize>>; 6],
    gradients: bool,
    decisions: bool,
) -> PyResult<()> {
    let request = Request {
        gradients,
        decisions,
        validate: true,
    };
    let dims = Tensors::from_array(shapes.each_ref().map(|s| s.as_deref()));
    py_ok(py, checked_shape(dims, &request).map(|_| ()))
}

/// Checks a config given as SPEC §8 JSON (keys, types and values) without a batch, as an
/// evaluation would: errors name the key.
#[pyfunction]
fn check_config(py: Python<'_>, config_json: &str) -> PyResult<()> {
    let config = ConfigOverrides::from_config_json(config_json)
        .map(|overrides| overrides.apply(LossConfig::DEFAULT))
        .and_then(|config| Ok(ssdkd_core::validate::validate_config(&config)?));
    py_ok(py, config)
}

/// A JSON value with every float as the shortest decimal of its f32 (`0.1`, not
/// `0.10000000149011612`): the library's config holds f32.
fn shortest(value: Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN) as f32;
            f.to_string()
                .parse::<f64>()
                .map_or(Value::Null, Value::from)
        }
        Value::Array(a) => a.into_iter().map(shortest).collect(),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, shortest(v))).collect()),
        other => other,
    }
}

/// `config` as the JSON of SPEC §8 (every key), floats as their f32's shortest decimal.
fn config_text(config: &LossConfig, classes: usize) -> String {
    let json = config_json(config, u32::try_from(classes).unwrap_or(u32::MAX));
    serde_json::from_str(&json).map_or(json, |v| shortest(v).to_string())
}

/// The batch's tensors as a dict of arrays named as SPEC §1 (the teacher's None when absent).
fn tensors_dict(py: Python<'_>, owned: OwnedBatch) -> PyResult<Bound<'_, PyDict>> {
    let s = owned.shape();
    let has_teacher = owned.has_teacher();
    let d = PyDict::new(py);
    for ((name, data), shape) in TENSOR_NAMES
        .into_iter()
        .zip(owned.into_tensors())
        .zip(s.dims().to_array())
    {
        let absent = !has_teacher && name.starts_with("teacher");
        d.set_item(
            name,
            if absent {
                None
            } else {
                Some(array(py, data, &shape)?)
            },
        )?;
    }
    Ok(d)
}

/// Reads a batch file with the library's bounded reader: `(tensors, config JSON)`.
#[pyfunction]
fn read_batch(py: Python<'_>, path: PathBuf) -> PyResult<(Bound<'_, PyDict>, String)> {
    let file = py_ok(
        py,
        py.detach(|| catching(|| BatchFile::read(&path, &ConfigOverrides::default()))),
    )?;
    let config = config_text(&file.config, file.tensors.shape().classes);
    Ok((tensors_dict(py, file.tensors)?, config))
}

/// Writes a batch file through the library's safe writer, from C-contiguous float32
/// arrays (the teacher's both or neither) and a config as JSON. Ctrl-C cancels the write
/// ([`run_interruptible`]): the target is left unchanged, no temporary file remains, and
/// the `KeyboardInterrupt`'s one line names the target and what became of it.
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
    let arrays: Arrays<'_> = Tensors {
        student_loc: Some(student_loc),
        student_conf: Some(student_conf),
        teacher_loc,
        teacher_conf,
        targets: Some(targets),
        priors: Some(priors),
    };
    let owned = BatchShape::from_dims(dims_of(&arrays)).and_then(|shape| {
        let batch = batch_of(&arrays, shape)?;
        let config = ConfigOverrides::from_config_json(config_json)?.config_for(shape.classes)?;
        // Shapes and config only: a file may hold any values (they are checked when it is
        // evaluated).
        batch.shape().check_config(&config)?;
        let v = |t: &[f32]| t.to_vec();
        let owned = if batch.has_teacher() {
            OwnedBatch::new(
                shape,
                v(batch.student_loc()),
                v(batch.student_conf()),
                v(batch.teacher_loc()),
                v(batch.teacher_conf()),
                v(batch.targets()),
                v(batch.priors()),
            )?
        } else {
            OwnedBatch::without_teacher(
                shape,
                v(batch.student_loc()),
                v(batch.student_conf()),
                v(batch.targets()),
                v(batch.priors()),
            )?
        };
        Ok((owned, config))
    });
    let (owned, config) = py_ok(py, owned)?;
    let run = run_interruptible(py, |cancel| {
        write_batch_file_cancellable(&path, &owned, &config, Some(cancel))
    });
    match run {
        Run::Done(result) => result.map_err(|e| to_py(py, &e, true)),
        // Ctrl-C: one line saying what became of the target. Another exception raised by
        // a signal handler of the caller's is raised as it is.
        Run::Interrupted { interrupt, result } => {
            if !interrupt.is_instance_of::<PyKeyboardInterrupt>(py) {
                return Err(interrupt);
            }
            let target = path.display();
            Err(PyKeyboardInterrupt::new_err(match result {
                Ok(()) => format!("write_batch interrupted after {target} was written whole"),
                // Cancelled or failed: a write that does not finish leaves the old file.
                Err(_) => format!("write_batch interrupted; {target} left unchanged"),
            }))
        }
    }
}

/// A preset's priors (SPEC §2), `[P, 4]` float32.
#[pyfunction]
fn preset_priors(py: Python<'_>, name: &str) -> PyResult<Py<PyArrayDyn<f32>>> {
    let rows = py_ok(py, parse_preset(name))?.config().priors();
    array(py, rows.concat(), &[rows.len(), 4])
}

/// A preset's fields (SPEC §2) as `ssdkd.priors` takes them: `image_size`, and per map
/// `feature_maps`, `steps`, `min_sizes`, `max_sizes`, `aspect_ratios`; `clip`.
#[pyfunction]
fn preset_config<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
    let config = py_ok(py, parse_preset(name))?.config();
    let maps = config.feature_maps;
    let d = PyDict::new(py);
    d.set_item("image_size", config.image_size)?;
    d.set_item(
        "feature_maps",
        maps.iter().map(|m| m.size).collect::<Vec<_>>(),
    )?;
    d.set_item("steps", maps.iter().map(|m| m.step).collect::<Vec<_>>())?;
    d.set_item(
        "min_sizes",
        maps.iter().map(|m| m.min_size).collect::<Vec<_>>(),
    )?;
    d.set_item(
        "max_sizes",
        maps.iter().map(|m| m.max_size).collect::<Vec<_>>(),
    )?;
    let ratios: Vec<Vec<f32>> = maps.iter().map(|m| m.aspect_ratios.to_vec()).collect();
    d.set_item("aspect_ratios", ratios)?;
    d.set_item("clip", config.clip)?;
    Ok(d)
}

/// A custom configuration's priors (SPEC §2), `[P, 4]` float32. `maps` holds one
/// `(size, step or None, min_size, max_size, aspect_ratios)` per feature map; the library
/// checks the values ([`ssdkd::priors::checked`]: errors name the field).
#[pyfunction]
#[allow(clippy::type_complexity)] // the tuple is the Python-side record
fn custom_priors(
    py: Python<'_>,
    image_size: f32,
    maps: Vec<(u64, Option<f32>, f32, f32, Vec<f32>)>,
    clip: bool,
) -> PyResult<Py<PyArrayDyn<f32>>> {
    let feature_maps: Vec<FeatureMap<'_>> = maps
        .iter()
        .map(|(size, step, min_size, max_size, ratios)| FeatureMap {
            // A size past u32 is past the library's bound on the priors too.
            size: u32::try_from(*size).unwrap_or(u32::MAX),
            step: *step,
            min_size: *min_size,
            max_size: *max_size,
            aspect_ratios: ratios,
        })
        .collect();
    let config = PriorConfig {
        image_size,
        feature_maps: &feature_maps,
        clip,
    };
    let rows = py_ok(py, ssdkd::priors::checked(&config))?;
    array(py, rows.concat(), &[rows.len(), 4])
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
    let preset = py_ok(py, parse_preset(preset))?;
    let spec = SyntheticSpec {
        batch,
        classes,
        preset,
        objects,
        vary_objects,
        seed,
    };
    py_ok(py, spec.check())?;
    tensors_dict(py, py.detach(|| synthetic_batch(&spec)))
}

/// A loss against its reference in units of its tolerance (SPEC §7 with `rel` and `abs`;
/// ≤ 1 agrees, NaN is infinitely far).
#[pyfunction]
fn compare_loss(actual: f64, expected: f64, rel: f64, abs: f64) -> f64 {
    loss_difference_within("loss", actual, expected, rel, abs).units
}

/// Gradient elements against their reference (SPEC §7 with `rel` and `abs`):
/// `(worst index, its actual, its expected, its units of tolerance, elements failing)`.
#[pyfunction]
fn compare_gradient(
    actual: PyReadonlyArrayDyn<'_, f32>,
    expected: PyReadonlyArrayDyn<'_, f32>,
    rel: f64,
    abs: f64,
) -> PyResult<(usize, f64, f64, f64, usize)> {
    let (a, e) = (actual.as_slice()?, expected.as_slice()?);
    let found = agreement::elements("gradient", a, e, rel, abs);
    let w = found.worst.unwrap_or(
        gradient_elements("gradient", &[0.0], &[0.0])
            .worst
            .expect("one element"),
    );
    Ok((
        w.index.unwrap_or(0),
        w.actual,
        w.expected,
        w.units,
        found.failures,
    ))
}

#[pymodule]
fn _ssdkd(m: &Bound<'_, PyModule>) -> PyResult<()> {
    error::register(m)?;
    m.add_class::<PyBackend>()?;
    m.add_class::<PyEvaluation>()?;
    #[cfg(all(feature = "cuda", target_os = "linux"))]
    {
        m.add_class::<cuda::PyCudaShared>()?;
        m.add_function(wrap_pyfunction!(cuda::cuda_unavailable_reason, m)?)?;
    }
    for f in [
        wrap_pyfunction!(check_shapes, m)?,
        wrap_pyfunction!(check_config, m)?,
        wrap_pyfunction!(read_batch, m)?,
        wrap_pyfunction!(write_batch, m)?,
        wrap_pyfunction!(preset_priors, m)?,
        wrap_pyfunction!(preset_config, m)?,
        wrap_pyfunction!(custom_priors, m)?,
        wrap_pyfunction!(synthetic, m)?,
        wrap_pyfunction!(compare_loss, m)?,
        wrap_pyfunction!(compare_gradient, m)?,
    ] {
        m.add_function(f)?;
    }
    let keys: Vec<&str> = CONFIG_KEYS.iter().map(|k| k.key).collect();
    m.add("CONFIG_KEYS", keys)?;
    m.add("DEFAULT_CONFIG_JSON", config_text(&LossConfig::DEFAULT, 0))?;
    m.add("PRESETS", PriorPreset::ALL.map(PriorPreset::name).to_vec())?;
    m.add("TENSORS", TENSOR_NAMES.to_vec())?;
    m.add("TERMS", TERM_NAMES.to_vec())?;
    m.add("LOSS_TOLERANCE", (agreement::LOSS_REL, agreement::LOSS_ABS))?;
    m.add(
        "GRADIENT_TOLERANCE",
        (agreement::GRAD_REL, agreement::GRAD_ABS),
    )?;
    Ok(())
}
