//! `ssdkd._ssdkd`: the compiled part of the `ssdkd` Python package. `Backend` and
//! `Evaluation` wrap the library's own types; the names, defaults, presets and SPEC §7
//! tolerances are the library's; errors map to exception classes in `error.rs`. All loss
//! logic stays in the `ssdkd` library; `ssdkd/__init__.py` is the public API over this.

#[cfg(all(feature = "cuda", target_os = "linux"))]
mod cuda;
mod error;

use error::to_py;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;
use ssdkd::agreement::{self, gradient_elements, loss_difference_within, TERM_NAMES};
use ssdkd::config_keys::CONFIG_KEYS;
use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::file::{config_json, parse_preset, write_batch_file, BatchFile, ConfigOverrides};
use ssdkd::{teacher_pair, Batch, BatchShape, CancelToken, Error, LossConfig, OwnedBatch};
use ssdkd::{PriorPreset, Request, TENSOR_NAMES};
use ssdkd_core::prior::{FeatureMap, PriorConfig};
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

/// The six arrays of a batch in [`TENSOR_NAMES`]' order, float32; the teacher's may be absent.
type Arrays<'py> = [Option<PyReadonlyArrayDyn<'py, f32>>; 6];

/// How often a running evaluation lets Python's signal handlers run (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(20);

/// `r` with a library error as its exception.
fn py_ok<T>(py: Python<'_>, r: Result<T, Error>) -> PyResult<T> {
    r.map_err(|e| to_py(py, &e, false))
}

/// The shape of tensors of these dimensions (SPEC §1; the teacher's both or neither),
/// checked against the memory available for `request` (`ssdkd::limits::check`, as `ssdkd
/// eval`) before any array is read or converted.
fn checked_shape(dims: [Option<&[usize]>; 6], request: &Request) -> Result<BatchShape, Error> {
    let shape = BatchShape::from_dims(dims)?;
    ssdkd::limits::check(&shape, request)?;
    Ok(shape)
}

/// The arrays as the library's batch of `shape`.
fn batch_of<'a>(arrays: &'a Arrays<'_>, shape: BatchShape) -> Result<Batch<'a>, Error> {
    let mut slices: [&[f32]; 6] = [&[]; 6];
    for ((slot, array), name) in slices.iter_mut().zip(arrays).zip(TENSOR_NAMES) {
        if let Some(array) = array {
            *slot = array.as_slice().map_err(|_| Error::Shape {
                tensor: name,
                problem: "not C-contiguous".into(),
            })?;
        }
    }
    let [sl, sc, tl, tc, tg, pr] = slices;
    let given = |i: usize| arrays[i].is_some();
    match teacher_pair(given(2).then_some(tl), given(3).then_some(tc))? {
        Some((tl, tc)) => Batch::new(shape, sl, sc, tl, tc, tg, pr),
        None => Batch::without_teacher(shape, sl, sc, tg, pr),
    }
}

/// Runs `work` on a worker thread while this one, the GIL released, lets Python's signal
/// handlers run every [`SIGNAL_POLL`]: when one raises (Ctrl-C's `KeyboardInterrupt`), the
/// token cancels `work`, and that exception is raised once `work` has stopped.
fn interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(&CancelToken) -> Result<T, Error> + Send,
) -> PyResult<T> {
    let token = CancelToken::new();
    let result = std::thread::scope(|scope| {
        let (sender, mut receiver) = channel();
        let cancel = &token;
        scope.spawn(move || sender.send(work(cancel)));
        loop {
            let (got, back) = py.detach(move || (receiver.recv_timeout(SIGNAL_POLL), receiver));
            receiver = back;
            match got {
                Ok(result) => return Ok(result),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(interrupt) = py.check_signals() {
                        token.cancel();
                        py.detach(move || receiver.recv()).ok();
                        return Err(interrupt);
                    }
                }
                // The worker panicked: the scope raises its panic.
                Err(RecvTimeoutError::Disconnected) => return Ok(Err(Error::Cancelled)),
            }
        }
    })?;
    py_ok(py, result)
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
        let arrays: Arrays<'py> = [
            Some(student_loc),
            Some(student_conf),
            teacher_loc,
            teacher_conf,
            Some(targets),
            Some(priors),
        ];
        let request = Request {
            gradients,
            decisions,
            validate,
        };
        let dims = arrays.each_ref().map(|a| a.as_ref().map(|a| a.shape()));
        let shape = py_ok(py, checked_shape(dims, &request))?;
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
    let dims = shapes.each_ref().map(|s| s.as_deref());
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
    let (b, p, c, m) = (s.batch, s.priors, s.classes, s.objects);
    let has_teacher = owned.has_teacher();
    let shapes = [
        vec![b, p, 4],
        vec![b, p, c],
        vec![b, p, 4],
        vec![b, p, c],
        vec![b, m, 5],
        vec![p, 4],
    ];
    let d = PyDict::new(py);
    for ((name, data), shape) in TENSOR_NAMES
        .into_iter()
        .zip(owned.into_tensors())
        .zip(shapes)
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
        py.detach(|| BatchFile::read(&path, &ConfigOverrides::default())),
    )?;
    let config = config_text(&file.config, file.tensors.shape().classes);
    Ok((tensors_dict(py, file.tensors)?, config))
}

/// Writes a batch file through the library's safe writer, from C-contiguous float32
/// arrays (the teacher's both or neither) and a config as JSON.
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
    let arrays = [
        Some(student_loc),
        Some(student_conf),
        teacher_loc,
        teacher_conf,
        Some(targets),
        Some(priors),
    ];
    let dims = arrays.each_ref().map(|a| a.as_ref().map(|a| a.shape()));
    let owned = BatchShape::from_dims(dims).and_then(|shape| {
        let batch = batch_of(&arrays, shape)?;
        let config = ConfigOverrides::from_config_json(config_json)?.config_for(shape.classes)?;
        batch.check(&config, false)?;
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
    py.detach(|| write_batch_file(&path, &owned, &config))
        .map_err(|e| to_py(py, &e, true))
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

/// The most priors a custom configuration may emit (a bound on the allocation).
const MAX_PRIORS: u64 = 1 << 24;

/// A custom configuration's priors (SPEC §2), `[P, 4]` float32. `maps` holds one
/// `(size, step or None, min_size, max_size, aspect_ratios)` per feature map; values that
/// cannot give boxes are errors naming the field.
#[pyfunction]
#[allow(clippy::type_complexity)] // the tuple is the Python-side record
fn custom_priors(
    py: Python<'_>,
    image_size: f32,
    maps: Vec<(u64, Option<f32>, f32, f32, Vec<f32>)>,
    clip: bool,
) -> PyResult<Py<PyArrayDyn<f32>>> {
    let bad = |key: &str, problem: String| {
        to_py(
            py,
            &Error::Config {
                key: key.to_owned(),
                problem,
            },
            false,
        )
    };
    let positive = |v: f32| v.is_finite() && v > 0.0;
    if !positive(image_size) {
        return Err(bad("image_size", format!("{image_size} is not > 0")));
    }
    if maps.is_empty() {
        return Err(bad("feature_maps", "no feature map".into()));
    }
    let mut total = 0u64;
    for (k, (size, step, min_size, max_size, ratios)) in maps.iter().enumerate() {
        let fields = [
            ("steps", step.unwrap_or(1.0)),
            ("min_sizes", *min_size),
            ("max_sizes", *max_size),
        ];
        let ratio = ratios
            .iter()
            .find(|&&a| !positive(a))
            .map(|&a| ("aspect_ratios", a));
        if let Some((key, v)) = fields.into_iter().find(|(_, v)| !positive(*v)).or(ratio) {
            return Err(bad(key, format!("map {k}: {v} is not > 0")));
        }
        let per_cell = 2 + 2 * ratios.len() as u64;
        total = size
            .checked_mul(*size)
            .and_then(|n| n.checked_mul(per_cell)?.checked_add(total))
            .unwrap_or(u64::MAX);
        if *size == 0 || total > MAX_PRIORS {
            let problem = format!(
                "map {k} of size {size}: sizes must be ≥ 1 and give at most {MAX_PRIORS} priors"
            );
            return Err(bad("feature_maps", problem));
        }
    }
    let feature_maps: Vec<FeatureMap<'_>> = maps
        .iter()
        .map(|(size, step, min_size, max_size, ratios)| FeatureMap {
            size: *size as u32, // ≤ 2^12 by the bound above
            step: *step,
            min_size: *min_size,
            max_size: *max_size,
            aspect_ratios: ratios,
        })
        .collect();
    let rows = PriorConfig {
        image_size,
        feature_maps: &feature_maps,
        clip,
    }
    .priors();
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
    let ranges = [
        ("batch", batch, 1),
        ("classes", classes, 2),
        ("objects", objects, 1),
    ];
    if let Some((key, v, low)) = ranges
        .into_iter()
        .find(|&(_, v, low)| !(low..=4096).contains(&v))
    {
        let problem = format!("{v} is not in {low}..=4096");
        return Err(to_py(
            py,
            &Error::Config {
                key: key.into(),
                problem,
            },
            false,
        ));
    }
    let preset = py_ok(py, parse_preset(preset))?;
    let spec = SyntheticSpec {
        batch,
        classes,
        preset,
        objects,
        vary_objects,
        seed,
    };
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
