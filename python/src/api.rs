//! Every use of the `ssdkd` library's Rust API, in one place: the rest of the binding only
//! converts Python objects to and from the plain types here. When the library's API
//! changes, this file is the one to adapt.

use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::file::{config_json, parse_preset, write_batch_file, BatchFile, ConfigOverrides};
use ssdkd::{Backend, Batch, BatchShape, Error, InputError, LossConfig, OwnedBatch, Request};
use ssdkd_core::prior::{FeatureMap, PriorConfig};
use std::path::Path;
use std::sync::Mutex;

/// Which backend the caller asked for (`backend=` in Python).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// A GPU when one is found, else the CPU.
    Auto,
    /// The CPU reference.
    Cpu,
    /// A GPU adapter, or an error.
    Gpu,
}

/// Borrowed input tensors, flat row-major f32, with `[B, P, C, M]`.
pub struct Inputs<'a> {
    /// `[B, P, C, M]`.
    pub dims: [usize; 4],
    /// `[B, P, 4]`.
    pub student_loc: &'a [f32],
    /// `[B, P, C]`.
    pub student_conf: &'a [f32],
    /// `(teacher_loc, teacher_conf)`; `None` is the plain MultiBox loss (SPEC §10).
    pub teacher: Option<(&'a [f32], &'a [f32])>,
    /// `[B, M, 5]`.
    pub targets: &'a [f32],
    /// `[P, 4]`.
    pub priors: &'a [f32],
}

/// What to compute beyond the losses.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    /// Both gradients (SPEC §6).
    pub gradients: bool,
    /// Labels, offsets and the negative mask.
    pub decisions: bool,
    /// Scan every input value first.
    pub validate: bool,
}

/// `(grad_student_conf, grad_student_loc)`, flat.
pub type GradientVecs = (Vec<f32>, Vec<f32>);

/// One evaluation in plain types.
pub struct Output {
    /// soft_loss, l2_loss, loss_c, loss_l, total (SPEC §5).
    pub terms: [f64; 5],
    /// Un-normalised soft, l2, conf, loc sums.
    pub sums: [f64; 4],
    /// num_pos, num_neg, num_bounded.
    pub counts: [u32; 3],
    /// `"cpu"` or `"gpu"`.
    pub backend: &'static str,
    /// The device's name.
    pub adapter: String,
    /// Why `auto` fell back to the CPU, the first time it did.
    pub fallback: Option<String>,
    /// `(grad_student_conf, grad_student_loc)`.
    pub gradients: Option<GradientVecs>,
    /// `(conf_target, loc_target, neg_mask)`.
    pub decisions: Option<(Vec<u32>, Vec<f32>, Vec<u8>)>,
}

/// One backend per `backend=` choice, created on first use and kept for the process: a
/// GPU costs an adapter request, and the CPU backend owns workspaces that a training loop
/// reuses from call to call. `auto` remembers why it fell back, reported on its first call.
struct Cache {
    cpu: Option<Backend>,
    auto: Option<Backend>,
    /// `Err` remembers why there is no GPU, so that `gpu` does not ask again on every call.
    gpu: Option<Result<Backend, String>>,
}

static BACKENDS: Mutex<Cache> = Mutex::new(Cache {
    cpu: None,
    auto: None,
    gpu: None,
});

/// The config of SPEC §8 from its JSON form (defaults ← `json`), through the batch-file
/// parser so that key names, types and messages are the file's, checked against the
/// tensors' C (`ConfigOverrides::config_for`); and the shape of tensors of `dims`
/// `[B, P, C, M]`.
fn config_and_shape(json: &str, dims: [usize; 4]) -> Result<(LossConfig, BatchShape), Error> {
    let [b, p, c, m] = dims;
    // `num_classes`, when given, must equal the tensors' C (as the CLI's config key).
    let config = ConfigOverrides::from_config_json(json)?.config_for(c)?;
    let shape = BatchShape {
        batch: b,
        priors: p,
        classes: c,
        objects: m,
    };
    Ok((config, shape))
}

/// Evaluates one batch on the chosen backend, after the memory check of `ssdkd eval`
/// (`ssdkd::limits::check`, issue 13).
pub fn evaluate(
    choice: Choice,
    inputs: &Inputs<'_>,
    config_json: &str,
    wanted: Wanted,
) -> Result<Output, Error> {
    let (config, shape) = config_and_shape(config_json, inputs.dims)?;
    let request = Request {
        gradients: wanted.gradients,
        decisions: wanted.decisions,
        validate: wanted.validate,
    };
    ssdkd::limits::check(&shape, &request)?;
    let batch = batch_of(inputs, shape)?;
    let mut fallback = None;
    let mut cache = BACKENDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let backend: &mut Backend = match choice {
        Choice::Cpu => cache.cpu.get_or_insert_with(Backend::cpu),
        Choice::Auto => cache
            .auto
            .get_or_insert_with(|| Backend::auto(|e| fallback = Some(e.to_string()))),
        Choice::Gpu => match cache.gpu.get_or_insert_with(|| {
            Backend::gpu().map_err(|e| match e {
                Error::NoAdapter(why) => why,
                other => other.to_string(),
            })
        }) {
            Ok(gpu) => gpu,
            Err(why) => return Err(Error::NoAdapter(why.clone())),
        },
    };
    let eval = backend.evaluate(&batch, &config, request)?;
    let (name, adapter) = (backend.name(), backend.adapter());
    drop(cache);
    let (terms, sums) = (eval.terms, eval.sums);
    Ok(Output {
        terms: [
            terms.soft_loss,
            terms.l2_loss,
            terms.loss_c,
            terms.loss_l,
            terms.total,
        ],
        sums: [sums.soft, sums.l2, sums.conf, sums.loc],
        counts: [sums.num_pos, sums.num_neg, sums.num_bounded],
        backend: name,
        adapter,
        fallback,
        gradients: eval.gradients.map(|g| (g.student_conf, g.student_loc)),
        decisions: eval
            .decisions
            .map(|d| (d.conf_target, d.loc_target, d.neg_mask)),
    })
}

/// The library's batch of `inputs`: with a teacher, or the plain MultiBox loss without one
/// (soft and L2 terms 0, issue 9 point 4, in the library).
fn batch_of<'a>(inputs: &Inputs<'a>, shape: BatchShape) -> Result<Batch<'a>, Error> {
    match inputs.teacher {
        Some((teacher_loc, teacher_conf)) => Batch::new(
            shape,
            inputs.student_loc,
            inputs.student_conf,
            teacher_loc,
            teacher_conf,
            inputs.targets,
            inputs.priors,
        ),
        None => Batch::without_teacher(
            shape,
            inputs.student_loc,
            inputs.student_conf,
            inputs.targets,
            inputs.priors,
        ),
    }
}

/// The gradients `(grad_student_conf, grad_student_loc)` of the last evaluation on the
/// backend of `choice`, for the weights of `config_json`, when that evaluation was of the
/// same tensors with the same settings (`Backend::gradients_of_last`: no forward pass
/// again); `None` otherwise (a GPU, another batch in between, no backend yet), and the
/// caller evaluates with gradients.
pub fn gradients_of_last(
    choice: Choice,
    inputs: &Inputs<'_>,
    config_json: &str,
) -> Result<Option<GradientVecs>, Error> {
    let (config, shape) = config_and_shape(config_json, inputs.dims)?;
    let batch = batch_of(inputs, shape)?;
    let mut cache = BACKENDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let backend = match choice {
        Choice::Cpu => cache.cpu.as_mut(),
        Choice::Auto => cache.auto.as_mut(),
        Choice::Gpu => None,
    };
    let Some(backend) = backend else {
        return Ok(None);
    };
    match backend.gradients_of_last(&batch, &config) {
        Some(gradients) => gradients.map(|g| Some((g.student_conf, g.student_loc))),
        None => Ok(None),
    }
}

/// Owned tensors of a batch file, flat, with `[B, P, C, M]`.
pub struct Tensors {
    /// `[B, P, C, M]`; the vectors below are the SPEC §1 tensors, flat.
    pub dims: [usize; 4],
    pub student_loc: Vec<f32>,
    pub student_conf: Vec<f32>,
    /// `(teacher_loc, teacher_conf)`, absent in a batch without teacher.
    pub teacher: Option<(Vec<f32>, Vec<f32>)>,
    pub targets: Vec<f32>,
    pub priors: Vec<f32>,
}

fn tensors_of(owned: OwnedBatch) -> Tensors {
    let s = owned.shape();
    let has_teacher = owned.has_teacher();
    let [student_loc, student_conf, teacher_loc, teacher_conf, targets, priors] =
        owned.into_tensors();
    Tensors {
        dims: [s.batch, s.priors, s.classes, s.objects],
        student_loc,
        student_conf,
        teacher: has_teacher.then_some((teacher_loc, teacher_conf)),
        targets,
        priors,
    }
}

/// Reads a batch file (SPEC §8) with the library's bounded reader: its tensors (priors
/// from the preset when absent) and its resolved config as JSON with every key.
pub fn read_batch(path: &Path) -> Result<(Tensors, String), Error> {
    let file = BatchFile::read(path, &ConfigOverrides::default())?;
    let classes = file.tensors.shape().classes;
    let config = config_json(&file.config, u32::try_from(classes).unwrap_or(u32::MAX));
    Ok((tensors_of(file.tensors), config))
}

/// Writes a batch file (SPEC §8) through the library's safe writer (atomic; a special
/// file is refused), after checking the shapes and the config.
pub fn write_batch(path: &Path, tensors: Tensors, config_json: &str) -> Result<(), Error> {
    let (config, shape) = config_and_shape(config_json, tensors.dims)?;
    let owned = match tensors.teacher {
        Some((teacher_loc, teacher_conf)) => OwnedBatch::new(
            shape,
            tensors.student_loc,
            tensors.student_conf,
            teacher_loc,
            teacher_conf,
            tensors.targets,
            tensors.priors,
        )?,
        None => OwnedBatch::without_teacher(
            shape,
            tensors.student_loc,
            tensors.student_conf,
            tensors.targets,
            tensors.priors,
        )?,
    };
    owned.batch().check(&config, false)?;
    write_batch_file(path, &owned, &config)
}

/// A preset's priors (SPEC §2), flat `[P, 4]`.
pub fn preset_priors(name: &str) -> Result<Vec<f32>, Error> {
    let rows = parse_preset(name)?.config().priors();
    Ok(rows.into_iter().flatten().collect())
}

/// One feature map of a custom prior configuration, owned.
pub struct MapSpec {
    /// f: the map is f × f cells.
    pub size: u32,
    /// Explicit step in pixels, if any.
    pub step: Option<f32>,
    /// Minimum box size in pixels.
    pub min_size: f32,
    /// Maximum box size in pixels.
    pub max_size: f32,
    /// Aspect ratios beyond 1.
    pub aspect_ratios: Vec<f32>,
}

/// The most priors a custom configuration may emit (a bound on the allocation).
const MAX_PRIORS: usize = 1 << 24;

/// Any prior configuration (SPEC §2), flat `[P, 4]`; values that cannot give boxes are
/// errors naming the field.
pub fn custom_priors(image_size: f32, maps: &[MapSpec], clip: bool) -> Result<Vec<f32>, Error> {
    let bad = |key: &str, problem: String| Error::Config {
        key: key.to_owned(),
        problem,
    };
    if !(image_size.is_finite() && image_size > 0.0) {
        return Err(bad("image_size", format!("{image_size} is not > 0")));
    }
    if maps.is_empty() {
        return Err(bad("feature_maps", "no feature map".into()));
    }
    let mut total = 0usize;
    for (k, map) in maps.iter().enumerate() {
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if map.size == 0 {
            return Err(bad("feature_maps", format!("map {k} has size 0")));
        }
        if map.step.is_some_and(|s| !positive(s)) {
            return Err(bad("steps", format!("map {k}: step is not > 0")));
        }
        if !positive(map.min_size) {
            return Err(bad(
                "min_sizes",
                format!("map {k}: {} is not > 0", map.min_size),
            ));
        }
        if !positive(map.max_size) {
            return Err(bad(
                "max_sizes",
                format!("map {k}: {} is not > 0", map.max_size),
            ));
        }
        if let Some(ar) = map.aspect_ratios.iter().find(|&&a| !positive(a)) {
            return Err(bad("aspect_ratios", format!("map {k}: {ar} is not > 0")));
        }
        let n = (map.size as usize)
            .checked_mul(map.size as usize)
            .and_then(|n| n.checked_mul(2 + 2 * map.aspect_ratios.len()));
        total = n.and_then(|n| n.checked_add(total)).unwrap_or(usize::MAX);
        if total > MAX_PRIORS {
            return Err(bad(
                "feature_maps",
                format!("more than {MAX_PRIORS} priors"),
            ));
        }
    }
    let feature_maps: Vec<FeatureMap<'_>> = maps
        .iter()
        .map(|m| FeatureMap {
            size: m.size,
            step: m.step,
            min_size: m.min_size,
            max_size: m.max_size,
            aspect_ratios: &m.aspect_ratios,
        })
        .collect();
    let config = PriorConfig {
        image_size,
        feature_maps: &feature_maps,
        clip,
    };
    Ok(config.priors().into_iter().flatten().collect())
}

/// The deterministic synthetic batch of `ssdkd bench`/`demo` (host `demo` module).
pub fn synthetic(
    batch: usize,
    classes: usize,
    preset: &str,
    objects: usize,
    vary_objects: bool,
    seed: u64,
) -> Result<Tensors, Error> {
    let bad = |key: &str, problem: &str| Error::Config {
        key: key.to_owned(),
        problem: problem.to_owned(),
    };
    if batch == 0 || batch > 4096 {
        return Err(bad("batch", "must be in 1..=4096"));
    }
    if !(2..=4096).contains(&classes) {
        return Err(bad("classes", "must be in 2..=4096"));
    }
    if objects == 0 || objects > 4096 {
        return Err(bad("objects", "must be in 1..=4096"));
    }
    let spec = SyntheticSpec {
        batch,
        classes,
        preset: parse_preset(preset)?,
        objects,
        vary_objects,
        seed,
    };
    Ok(tensors_of(synthetic_batch(&spec)))
}

/// What an error becomes in Python.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `ssdkd.InputError` (a `ValueError`): shapes, values, config, an unreadable input file.
    Input,
    /// `ssdkd.NoAdapterError` (a `RuntimeError`).
    NoAdapter,
    /// `ssdkd.GpuError` (a `RuntimeError`): a GPU failure, or a batch over the GPU's limits.
    Gpu,
    /// `ssdkd.NumericalError` (a `RuntimeError`): a non-finite result from accepted inputs.
    Numerical,
    /// `OSError`: an output that cannot be written.
    Io,
}

/// An error's class, one-line message (the CLI's) and structured fields.
pub struct ErrorInfo {
    /// The Python class.
    pub kind: Kind,
    /// The command line's one-line message.
    pub message: String,
    /// The tensor at fault (for a numerical failure, the term or gradient).
    pub tensor: Option<String>,
    /// The config key at fault.
    pub key: Option<String>,
    /// The image at fault.
    pub image: Option<usize>,
    /// The prior or object row at fault (for a numerical failure, the flat index).
    pub index: Option<usize>,
    /// The file at fault.
    pub path: Option<String>,
}

/// Whether an I/O failure was reading an input (an [`Kind::Input`] error) or writing an
/// output (`OSError`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// Reading a batch file.
    Reading,
    /// Writing a batch file.
    Writing,
}

/// The image and row of a core input error.
fn position(e: &InputError) -> (Option<usize>, Option<usize>) {
    match *e {
        InputError::NonFinite { image, row, .. } => (image, Some(row)),
        InputError::DegenerateBox { image, object, .. }
        | InputError::BoxOutOfRange { image, object, .. }
        | InputError::BadLabel { image, object, .. } => (Some(image), Some(object)),
        InputError::BadPrior { index, .. } => (None, Some(index)),
    }
}

/// Maps a library error to its Python class and fields; `io` says what an [`Error::Io`]
/// was doing.
pub fn describe(e: &Error, io: Io) -> ErrorInfo {
    let mut info = ErrorInfo {
        kind: Kind::Input,
        message: e.to_string(),
        tensor: None,
        key: None,
        image: None,
        index: None,
        path: None,
    };
    match e {
        Error::Shape { tensor, .. } => info.tensor = Some((*tensor).to_owned()),
        Error::Input(input) => {
            info.tensor = Some(input.tensor().name().to_owned());
            (info.image, info.index) = position(input);
        }
        Error::Config { key, .. } => info.key = Some(key.clone()),
        Error::File { path, .. } => info.path = Some(path.display().to_string()),
        Error::Io { path, .. } => {
            if io == Io::Writing {
                info.kind = Kind::Io;
            }
            info.path = Some(path.display().to_string());
        }
        Error::NoAdapter(_) => info.kind = Kind::NoAdapter,
        Error::Gpu(_) | Error::GpuUnsupported(_) => info.kind = Kind::Gpu,
        Error::Numerical { what, index, .. } => {
            info.kind = Kind::Numerical;
            info.tensor = Some((*what).to_owned());
            info.index = *index;
        }
        // `Error` is non-exhaustive: a variant added later is a runtime failure until it
        // is mapped here.
        _ => info.kind = Kind::Gpu,
    }
    info
}
