//! Every use of the `ssdkd` library's Rust API, in one place: the rest of the binding only
//! converts Python objects to and from the plain types here. When the library's API
//! changes, this file is the one to adapt.

use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::file::{config_json, parse_preset, write_batch_file, BatchFile, ConfigOverrides};
use ssdkd::{Backend, Batch, BatchShape, Error, LossConfig, OwnedBatch, Request};
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
    pub gradients: Option<(Vec<f32>, Vec<f32>)>,
    /// `(conf_target, loc_target, neg_mask)`.
    pub decisions: Option<(Vec<u32>, Vec<f32>, Vec<u8>)>,
}

/// The GPU backend, created on first use and kept (creating one costs an adapter request);
/// `Err` remembers why there is none, so `auto` does not ask again on every call.
static GPU: Mutex<Option<Result<Backend, String>>> = Mutex::new(None);

/// The config of SPEC §8 from its JSON form (defaults ← `json`), through the batch-file
/// parser so that key names, types and messages are the file's.
fn config_from_json(json: &str) -> Result<LossConfig, Error> {
    Ok(ConfigOverrides::from_config_json(json)?.apply(LossConfig::DEFAULT))
}

/// Evaluates one batch on the chosen backend.
pub fn evaluate(
    choice: Choice,
    inputs: &Inputs<'_>,
    config_json: &str,
    wanted: Wanted,
) -> Result<Output, Error> {
    let mut config = config_from_json(config_json)?;
    let [b, p, c, m] = inputs.dims;
    let shape = BatchShape {
        batch: b,
        priors: p,
        classes: c,
        objects: m,
    };
    // TODO(lead): library teacher-optional. Until the library accepts a batch without
    // teacher tensors, the student's stand in for them with the soft and L2 weights at 0:
    // loss_c, loss_l and their gradients never read the teacher, and a weight of 0 removes
    // the soft/L2 gradient; soft, l2 and num_bounded are zeroed below (SPEC §10).
    let (teacher_loc, teacher_conf) = inputs
        .teacher
        .unwrap_or((inputs.student_loc, inputs.student_conf));
    if inputs.teacher.is_none() {
        config.weights.soft = 0.0;
        config.weights.l2 = 0.0;
    }
    let batch = Batch::new(
        shape,
        inputs.student_loc,
        inputs.student_conf,
        teacher_loc,
        teacher_conf,
        inputs.targets,
        inputs.priors,
    )?;
    let request = Request {
        gradients: wanted.gradients,
        decisions: wanted.decisions,
        validate: wanted.validate,
    };
    let mut cpu = Backend::Cpu;
    let mut fallback = None;
    let mut gpu_slot = GPU
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let backend: &mut Backend = if choice == Choice::Cpu {
        &mut cpu
    } else {
        if gpu_slot.is_none() {
            let made = Backend::gpu().map_err(|e| e.to_string());
            if let (Err(why), Choice::Auto) = (&made, choice) {
                fallback = Some(why.clone());
            }
            *gpu_slot = Some(made);
        }
        match gpu_slot.as_mut().expect("filled above") {
            Ok(gpu) => gpu,
            Err(why) if choice == Choice::Gpu => return Err(Error::NoAdapter(why.clone())),
            Err(_) => &mut cpu,
        }
    };
    let eval = backend.evaluate(&batch, &config, request)?;
    let (name, adapter) = (backend.name(), backend.adapter());
    let mut terms = eval.terms;
    let mut sums = eval.sums;
    if inputs.teacher.is_none() {
        // TODO(lead): library teacher-optional (see above).
        terms.soft_loss = 0.0;
        terms.l2_loss = 0.0;
        sums.soft = 0.0;
        sums.l2 = 0.0;
        sums.num_bounded = 0;
    }
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

/// Owned tensors of a batch file, flat, with `[B, P, C, M]`.
pub struct Tensors {
    /// `[B, P, C, M]`; the vectors below are the SPEC §1 tensors, flat.
    pub dims: [usize; 4],
    pub student_loc: Vec<f32>,
    pub student_conf: Vec<f32>,
    pub teacher_loc: Vec<f32>,
    pub teacher_conf: Vec<f32>,
    pub targets: Vec<f32>,
    pub priors: Vec<f32>,
}

fn tensors_of(owned: OwnedBatch) -> Tensors {
    let s = owned.shape;
    Tensors {
        dims: [s.batch, s.priors, s.classes, s.objects],
        student_loc: owned.student_loc,
        student_conf: owned.student_conf,
        teacher_loc: owned.teacher_loc,
        teacher_conf: owned.teacher_conf,
        targets: owned.targets,
        priors: owned.priors,
    }
}

/// Reads a batch file (SPEC §8): its tensors (priors from the preset when absent) and its
/// resolved config as JSON with every key.
pub fn read_batch(path: &Path) -> Result<(Tensors, String), Error> {
    let file = BatchFile::read(path, &ConfigOverrides::default())?;
    let config = config_json(&file.config);
    Ok((tensors_of(file.tensors), config))
}

/// Writes a batch file (SPEC §8) atomically, after checking the shapes.
pub fn write_batch(path: &Path, tensors: Tensors, config_json: &str) -> Result<(), Error> {
    let config = config_from_json(config_json)?;
    let [b, p, c, m] = tensors.dims;
    let owned = OwnedBatch {
        shape: BatchShape {
            batch: b,
            priors: p,
            classes: c,
            objects: m,
        },
        student_loc: tensors.student_loc,
        student_conf: tensors.student_conf,
        teacher_loc: tensors.teacher_loc,
        teacher_conf: tensors.teacher_conf,
        targets: tensors.targets,
        priors: tensors.priors,
    };
    owned.batch()?.shape.check_config(&config)?;
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
    /// `ssdkd.InputError` (a `ValueError`).
    Input,
    /// `ssdkd.NoAdapterError`.
    NoAdapter,
    /// `ssdkd.GpuError`.
    Gpu,
    /// `OSError` (an output that cannot be written).
    Io,
}

/// An error's class, one-line message (the CLI's) and structured fields.
pub struct ErrorInfo {
    /// The Python class.
    pub kind: Kind,
    /// The command line's one-line message.
    pub message: String,
    /// The tensor at fault.
    pub tensor: Option<String>,
    /// The config key at fault.
    pub key: Option<String>,
    /// The image at fault.
    pub image: Option<usize>,
    /// The prior or object row at fault.
    pub index: Option<usize>,
    /// The file at fault.
    pub path: Option<String>,
}

/// The number after the first `word ` in `text` (`"image 3, prior 7"`).
fn number_after(text: &str, word: &str) -> Option<usize> {
    let at = text.find(&format!("{word} "))? + word.len() + 1;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Maps a library error to its Python class and fields.
// TODO(lead): with structured input errors, take image and index from their fields.
pub fn describe(e: &Error) -> ErrorInfo {
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
        Error::Value { tensor, problem } => {
            info.tensor = Some((*tensor).to_owned());
            info.image = number_after(problem, "image");
            info.index = number_after(problem, "prior").or_else(|| number_after(problem, "object"));
        }
        Error::Config { key, .. } => info.key = Some(key.clone()),
        Error::File { path, .. } => info.path = Some(path.display().to_string()),
        Error::Io { path, .. } => {
            info.kind = Kind::Io;
            info.path = Some(path.display().to_string());
        }
        Error::NoAdapter(_) => info.kind = Kind::NoAdapter,
        Error::Gpu(_) => info.kind = Kind::Gpu,
    }
    info
}
