//! Each formula once: the host's sources (`host/src`) define no function under the name of
//! one of the core's formulas and hold no copy of the core's float constants
//! (`core/src/math.rs`). The CPU fast path hands the core's functions its exponentials or
//! lane blocks instead of keeping copies of them.

use std::fs;
use std::path::{Path, PathBuf};

/// Names a function in `host/src` may not take: the core's formulas, and the named pieces
/// its twins share with the WGSL kernels (each is a `fn` of `core/src`, which
/// [`every_listed_formula_is_a_core_function`] checks, so the list cannot go stale).
const CORE_FORMULAS: &[&str] = &[
    "shifted_log_sum_exp",
    "shifted_sum",
    "soft_term",
    "weighted_class_term",
    "kl_class_term",
    "soft_term_total",
    "conf_grad",
    "top_class",
    "row_softmax",
    "class_probs",
    "soft_ratio",
    "add_class",
    "direct_ce",
    "ce_grad",
    "direct_soft",
    "complement_soft",
    "soft_grad",
    "grad_entry",
    "row_max",
    "match_priors",
    "match_objects",
    "beats",
    "ties_with",
    "reaches",
    "prior_corners",
    "cross_entropy",
    "loc_terms",
    "prior_loss_record",
    "exp_f32",
    "exp_f64",
    "ln_f32",
    "ln_f64",
];

fn host_sources() -> Vec<PathBuf> {
    let files = sources_under(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(files.len() > 10, "host/src not found: {files:?}");
    files
}

/// The source without its `//` comments (doc comments cite numbers freely).
fn code_of(source: &str) -> String {
    source
        .lines()
        .map(|line| line.find("//").map_or(line, |at| &line[..at]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The names after each `fn` keyword.
fn function_names(code: &str) -> Vec<String> {
    let words: Vec<&str> = code
        .split(|c: char| !is_ident(c))
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|pair| pair[0] == "fn")
        .map(|pair| pair[1].to_string())
        .collect()
}

/// A numeric literal of the code.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Literal {
    /// A decimal with a point or an exponent, as an f64 (sign dropped).
    Float(f64),
    /// A hexadecimal integer.
    Hex(u64),
}

/// The float and hexadecimal literals of the code (integers in decimal are left out).
fn literals(code: &str) -> Vec<(Literal, String)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit() && (i == 0 || !is_ident(chars[i - 1]));
        // `x.0` is a field, not a literal.
        if !starts || (i > 0 && chars[i - 1] == '.') {
            i += 1;
            continue;
        }
        let start = i;
        let hex = chars[i] == '0' && chars.get(i + 1).is_some_and(|&c| c == 'x' || c == 'X');
        if hex {
            i += 2;
            while i < chars.len() && (chars[i].is_ascii_hexdigit() || chars[i] == '_') {
                i += 1;
            }
        } else {
            while i < chars.len() {
                let c = chars[i];
                let next = chars.get(i + 1).copied().unwrap_or(' ');
                let exponent_sign = (c == '+' || c == '-') && matches!(chars[i - 1], 'e' | 'E');
                // A point not starting a range (`1..n`) or a method call (`2.0.max(x)`).
                let point =
                    c == '.' && next != '.' && !is_ident(next) || c == '.' && next.is_ascii_digit();
                if c.is_ascii_digit() || matches!(c, '_' | 'e' | 'E') || exponent_sign || point {
                    i += 1;
                } else {
                    break;
                }
            }
        }
        let text: String = chars[start..i].iter().collect();
        // A type suffix (`_f32`, `f64`, `u32`, …) after the number.
        let mut end = i;
        while end < chars.len() && is_ident(chars[end]) {
            end += 1;
        }
        i = end;
        let digits: String = text.chars().filter(|&c| c != '_').collect();
        if hex {
            if let Ok(value) = u64::from_str_radix(&digits[2..], 16) {
                out.push((Literal::Hex(value), text));
            }
        } else if digits.contains(['.', 'e', 'E']) {
            if let Ok(value) = digits.parse::<f64>() {
                out.push((Literal::Float(value), text));
            }
        }
    }
    out
}

/// A literal that no other code would write by chance: a float of at least five
/// significant digits, or a hexadecimal word that is neither a power of two nor a mask of
/// contiguous bits.
fn distinctive(literal: &Literal, text: &str) -> bool {
    match literal {
        Literal::Float(_) => {
            let mantissa = text.split(['e', 'E']).next().unwrap_or("");
            let significant = mantissa
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>();
            let significant = significant.trim_start_matches('0').trim_end_matches('0');
            significant.len() >= 5
        }
        Literal::Hex(value) => {
            let shifted = value >> value.trailing_zeros().min(63);
            *value != 0 && (shifted & shifted.wrapping_add(1)) != 0
        }
    }
}

/// The core's distinctive constants: the literals of `core/src/math.rs` outside its tests.
fn core_constants() -> Vec<(Literal, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/src/math.rs");
    let source = fs::read_to_string(&path).expect("core/src/math.rs");
    let code = code_of(source.split("#[cfg(all(test").next().expect("a prefix"));
    let constants: Vec<_> = literals(&code)
        .into_iter()
        .filter(|(literal, text)| distinctive(literal, text))
        .collect();
    // The split ln 2 and the rounding constants at least.
    assert!(constants.len() > 10, "{constants:?}");
    constants
}

/// The `.rs` files under `dir`.
fn sources_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("a readable directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn every_listed_formula_is_a_core_function() {
    let core = Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/src");
    let mut names = Vec::new();
    for path in sources_under(&core) {
        names.extend(function_names(&code_of(
            &fs::read_to_string(&path).expect("a source"),
        )));
    }
    let missing: Vec<_> = CORE_FORMULAS
        .iter()
        .filter(|f| !names.iter().any(|n| n == *f))
        .collect();
    assert!(
        missing.is_empty(),
        "listed but not a fn of core/src: {missing:?}"
    );
}

#[test]
fn host_defines_no_function_named_after_a_core_formula() {
    let mut found = Vec::new();
    for path in host_sources() {
        let code = code_of(&fs::read_to_string(&path).expect("a source file"));
        for name in function_names(&code) {
            if CORE_FORMULAS.contains(&name.as_str()) {
                found.push(format!("{}: fn {name}", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "core formulas defined again: {found:#?}");
}

#[test]
fn host_holds_no_copy_of_the_cores_float_constants() {
    let constants = core_constants();
    let mut found = Vec::new();
    for path in host_sources() {
        let code = code_of(&fs::read_to_string(&path).expect("a source file"));
        for (literal, text) in literals(&code) {
            if let Some((_, core_text)) = constants.iter().find(|(c, _)| *c == literal) {
                found.push(format!("{}: {text} (core: {core_text})", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "core constants copied: {found:#?}");
}

/// The scanner itself: it finds the functions and constants it is meant to find.
#[test]
fn the_scanner_finds_names_and_constants() {
    let code = code_of(
        "const LN2_HI: f32 = 0.693_359_4; // 0.5\nfn row_max(x: f32) -> f32 { x.0 + 1.5e-3_f32 }\n\
         let bits = 0x3f35_04f3; let mask = 0x007f_ffff; for i in 1..n {}",
    );
    assert_eq!(function_names(&code), ["row_max"]);
    let found = literals(&code);
    let values: Vec<Literal> = found.iter().map(|(l, _)| *l).collect();
    assert_eq!(
        values,
        [
            Literal::Float(0.693_359_4),
            Literal::Float(1.5e-3),
            Literal::Hex(0x3f35_04f3),
            Literal::Hex(0x007f_ffff),
        ]
    );
    let kept: Vec<_> = found.iter().filter(|(l, t)| distinctive(l, t)).collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    let constants = core_constants();
    assert!(constants.contains(&(Literal::Float(0.693_359_4), "0.693_359_4".into())));
    assert!(constants
        .iter()
        .any(|(l, _)| *l == Literal::Hex(0x3fe6_2e42_fee0_0000)));
}
