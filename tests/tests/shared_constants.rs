//! Every module-scope `const` of `shaders/*.wgsl`, evaluated by naga, equals the Rust
//! constant of the same meaning, bit for bit: the pairs are listed in [`pairs`], and a
//! constant the kernels keep to themselves is listed, with the reason, in [`WGSL_ONLY`].
//! A constant in neither list fails, as does an entry whose constant is gone, so that a new
//! constant cannot pass unchecked; and no WGSL-only name may be declared as a Rust constant
//! in `core/src` or `host/src` (there it would be shared, and belong in [`pairs`]).
//!
//! Each file is parsed as the host compiles a stage (`host/src/gpu/shader.rs`): after
//! `shared.wgsl`, and after `logits.wgsl`, which the host puts before the stages that read
//! the logits. Here every file comes after both, a superset of each stage's includes that
//! gives the same constants; each constant belongs to the file its declaration lies in.

use naga::{Expression, Literal};
use ssdkd_core::stages::r#match::{FORCED, POSITIVE, ROW};
use ssdkd_core::stages::validate::{Check, ROW_BITS};
use ssdkd_core::stages::{RADIX, RADIX_BITS, WORKGROUP_SIZE};
use ssdkd_core::validate::{BOX_TOLERANCE, MAX_LOGIT, MAX_OFFSET, MIN_PRIOR_SIZE};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A constant's value, compared by type and bits (an f32 by `to_bits`).
#[derive(Clone, Copy, PartialEq)]
enum Value {
    U32(u32),
    I32(i32),
    F32(u32),
    Bool(bool),
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::U32(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::I32(v)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::F32(v.to_bits())
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::U32(v) => write!(f, "{v}u32 ({v:#x})"),
            Value::I32(v) => write!(f, "{v}i32"),
            Value::F32(bits) => write!(f, "{:e}f32 (bits {bits:#010x})", f32::from_bits(bits)),
            Value::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// A WGSL constant and the Rust value of the same meaning.
struct Pair {
    /// The file that declares it, in `shaders/`.
    file: &'static str,
    /// Its WGSL name.
    name: &'static str,
    /// The Rust expression it equals, as written in [`pairs`].
    rust: &'static str,
    /// That expression's value.
    value: Value,
}

/// `file NAME = rust_expression;` rows of [`Pair`].
macro_rules! pairs {
    ($($file:literal $name:ident = $rust:expr;)*) => {
        vec![$(Pair {
            file: $file,
            name: stringify!($name),
            rust: stringify!($rust),
            value: Value::from($rust),
        }),*]
    };
}

/// Every constant the WGSL shares with Rust, with the Rust value of the same meaning.
fn pairs() -> Vec<Pair> {
    pairs! {
        "shared.wgsl" WORKGROUP_SIZE = WORKGROUP_SIZE;
        // SPEC §3: the tie band of two overlaps, and the words `match_priors`,
        // `match_objects` and `match_finish` pass on in `conf_target`.
        "match.wgsl" TIE_TOLERANCE = ssdkd_core::boxes::TIE_TOLERANCE;
        "match.wgsl" POSITIVE = POSITIVE;
        "match.wgsl" FORCED = FORCED;
        "match.wgsl" ROW = ROW;
        // SPEC §4: the radix select's digit (the host's loop budget counts its rounds).
        "mine.wgsl" RADIX_BITS = RADIX_BITS;
        "mine.wgsl" RADIX = RADIX;
        // SPEC §1.3, §8.3: the accepted domain, and the findings' keys.
        "validate.wgsl" MAX_LOGIT = MAX_LOGIT;
        "validate.wgsl" MAX_OFFSET = MAX_OFFSET;
        "validate.wgsl" MIN_PRIOR_SIZE = MIN_PRIOR_SIZE;
        "validate.wgsl" BOX_TOLERANCE = BOX_TOLERANCE;
        // The limit of a finiteness check (`Check::tensor`), compared as bits (`beyond`).
        "validate.wgsl" FINITE_BITS = f32::MAX.to_bits();
        "validate.wgsl" ROW_BITS = ROW_BITS;
        "validate.wgsl" CHECK_PRIOR_VALUE = Check::PriorValue as u32;
        "validate.wgsl" CHECK_PRIOR_SIZE = Check::PriorSize as u32;
        "validate.wgsl" CHECK_STUDENT_LOC = Check::StudentLoc as u32;
        "validate.wgsl" CHECK_STUDENT_CONF = Check::StudentConf as u32;
        "validate.wgsl" CHECK_TEACHER_LOC = Check::TeacherLoc as u32;
        "validate.wgsl" CHECK_TEACHER_CONF = Check::TeacherConf as u32;
        "validate.wgsl" CHECK_TARGET_VALUE = Check::TargetValue as u32;
        "validate.wgsl" CHECK_TARGET_ROW = Check::TargetRow as u32;
    }
}

/// The constants only the kernels have, `(file, name, why Rust has none)`.
const WGSL_ONLY: &[(&str, &str, &str)] = &[
    (
        "logits.wgsl",
        "STUDENT",
        "which storage buffer a logits helper reads (WGSL takes no storage pointers as \
         arguments); the core passes the row's slice",
    ),
    ("logits.wgsl", "TEACHER", "as STUDENT"),
    (
        "match.wgsl",
        "NONE",
        "no object row or no tied prior; the core's `Option::None`",
    ),
    (
        "validate.wgsl",
        "NO_KEY",
        "no finding in a thread's checks; the core's `Option::None` (a slot stores \
         `~key`, so the cleared 0 is `~NO_KEY`, which `validate_report` reads as nothing \
         found)",
    ),
];

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Module-scope constants by (file, name), with their values (`None` for one naga does not
/// keep: an abstract type).
type Constants = BTreeMap<(String, String), Option<Value>>;

/// Every module-scope constant of every `shaders/*.wgsl`; and the names of any `override`
/// declarations.
fn wgsl_constants() -> (Constants, Vec<String>) {
    let dir = root().join("shaders");
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let includes = ["shared.wgsl", "logits.wgsl"];
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".wgsl"))
        .collect();
    files.sort();
    assert!(files.len() > includes.len(), "{files:?}");
    let mut constants = BTreeMap::new();
    let mut overrides = Vec::new();
    for file in &files {
        for name in declared_in_text(&read(file)) {
            constants.insert((file.clone(), name), None);
        }
    }
    for file in &files {
        // The pieces in order, with where each starts in the source.
        let mut pieces: Vec<&str> = includes.to_vec();
        if !includes.contains(&file.as_str()) {
            pieces.push(file);
        }
        let mut source = String::new();
        let mut starts = Vec::new();
        for piece in &pieces {
            starts.push((source.len(), *piece));
            source += &read(piece);
        }
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(&source)));
        let file_of = |span: naga::Span| {
            let at = span.to_range().expect("a declaration's span").start;
            starts
                .iter()
                .rev()
                .find(|(start, _)| *start <= at)
                .unwrap()
                .1
        };
        for (handle, constant) in module.constants.iter() {
            let name = constant.name.clone().expect("a named constant");
            let value = match module.global_expressions[constant.init] {
                Expression::Literal(Literal::U32(v)) => Value::U32(v),
                Expression::Literal(Literal::I32(v)) => Value::I32(v),
                Expression::Literal(Literal::F32(v)) => Value::F32(v.to_bits()),
                Expression::Literal(Literal::Bool(v)) => Value::Bool(v),
                ref other => panic!("{file}: {name} evaluates to {other:?}, not a number"),
            };
            let from = file_of(module.constants.get_span(handle));
            constants.insert((from.to_string(), name), Some(value));
        }
        overrides.extend(
            module
                .overrides
                .iter()
                .map(|(_, o)| format!("{file}: {o:?}")),
        );
    }
    (constants, overrides)
}

/// The names of the module-scope `const` declarations of WGSL `source`, read from its
/// text (naga's module keeps no constant of an abstract type, `const N = 3;`).
fn declared_in_text(source: &str) -> Vec<String> {
    // Comments out: `//` to the end of the line, and `/* */`, which nest.
    let mut text = String::new();
    let mut chars = source.chars().peekable();
    let mut nested = 0;
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('/', Some('*')) => {
                chars.next();
                nested += 1;
            }
            ('*', Some('/')) if nested > 0 => {
                chars.next();
                nested -= 1;
            }
            ('/', Some('/')) if nested == 0 => while chars.next_if(|&c| c != '\n').is_some() {},
            _ if nested > 0 => {}
            _ => text.push(c),
        }
    }
    let mut names = Vec::new();
    let mut depth = 0i32;
    let mut after_const = false;
    let mut word = String::new();
    for c in text.chars().chain([' ']) {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            if after_const {
                names.push(std::mem::take(&mut word));
            }
            after_const = depth == 0 && word == "const";
            word.clear();
        }
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
    }
    names
}

/// Whether `name` is declared as a Rust `const` or `static` in a file under `dir`.
fn declared_in_rust(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let declares = text
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| {
                        (w[0] == "const" || w[0] == "static")
                            && w[1].strip_suffix(':') == Some(name)
                    });
                if declares {
                    return Some(path);
                }
            }
        }
    }
    None
}

/// Every WGSL constant is paired or WGSL-only, every list entry is a WGSL constant, and
/// each pair's two sides are equal.
#[test]
fn every_wgsl_constant_equals_its_rust_twin() {
    let (wgsl, overrides) = wgsl_constants();
    assert!(
        overrides.is_empty(),
        "pipeline-overridable constants, which the host does not set: {overrides:?}"
    );
    let pairs = pairs();
    let listed: Vec<(&str, &str)> = pairs
        .iter()
        .map(|p| (p.file, p.name))
        .chain(WGSL_ONLY.iter().map(|&(file, name, _)| (file, name)))
        .collect();
    let mut failures = Vec::new();
    for (file, name) in wgsl.keys() {
        match listed.iter().filter(|&&l| l == (file, name)).count() {
            1 => {}
            0 => failures.push(format!(
                "{file}: {name} is in neither list: pair it with its Rust constant in \
                 pairs(), or list it in WGSL_ONLY with the reason Rust has none"
            )),
            times => failures.push(format!("{file}: {name} is listed {times} times")),
        }
    }
    for (file, name) in &listed {
        if !wgsl.contains_key(&(file.to_string(), name.to_string())) {
            failures.push(format!("{file}: {name} is listed but not declared there"));
        }
    }
    for ((file, name), value) in &wgsl {
        if value.is_none() {
            failures.push(format!(
                "{file}: {name} has no type, and naga keeps no abstract-typed constant: \
                 declare it `u32`, `i32`, `f32` or `bool`"
            ));
        }
    }
    for pair in &pairs {
        let key = (pair.file.to_string(), pair.name.to_string());
        if let Some(&Some(wgsl)) = wgsl.get(&key) {
            if wgsl != pair.value {
                failures.push(format!(
                    "{}: {} = {wgsl:?}, but Rust's {} = {:?}",
                    pair.file, pair.name, pair.rust, pair.value
                ));
            }
        }
    }
    for &(file, name, _) in WGSL_ONLY {
        for dir in ["core/src", "host/src"] {
            if let Some(path) = declared_in_rust(&root().join(dir), name) {
                failures.push(format!(
                    "{file}: {name} is listed as WGSL-only but {} declares it: pair them",
                    path.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // Every shared constant was compared.
    assert_eq!(wgsl.len(), pairs.len() + WGSL_ONLY.len());
}
