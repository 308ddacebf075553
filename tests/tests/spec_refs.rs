//! Every section cite in the code and the docs ("SPEC \u{a7}7", "\u{a7}3.5", "\u{a7}\u{a7}3–4",
//! "SPEC.md \u{a7}8", "\u{a7}5-7") names a heading of `docs/SPEC.md`, the project's contract,
//! and none cites a section of a tracker issue instead.
//!
//! The section sign is written `\u{a7}` in this file so that its own examples are not cites.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The section sign.
const SIGN: char = '\u{a7}';

/// What is scanned, relative to the repository root: folders (recursively) and files.
const SCANNED: &[&str] = &[
    "core",
    "host",
    "shaders",
    "tests",
    "python/src",
    "python/ssdkd",
    "python/tests",
    "examples",
    "bench",
    "burn",
    "fuzz",
    ".ci",
    "README.md",
    "docs",
];

/// Folders never scanned: build outputs, caches, binary corpora.
const SKIPPED_DIRS: &[&str] = &[
    "target",
    ".git",
    "__pycache__",
    ".venv",
    "venv",
    "node_modules",
    ".pytest_cache",
    "corpus",
    "artifacts",
];

/// Binary files never scanned (other files that are not UTF-8 are skipped too).
const SKIPPED_EXTENSIONS: &[&str] = &["safetensors", "png", "jpg", "so", "pyd", "whl", "bin"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The section numbers of a Markdown file's headings: `## 5. Title`, `### 5.2 Title`,
/// `## \u{a7}5 Title` give `5` and `5.2`.
fn headings(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let text = line.trim_start_matches('#').trim_start();
        let text = text.trim_start_matches(SIGN).trim_start();
        let (number, _) = section_number(text);
        if !number.is_empty() {
            out.push(number);
        }
    }
    out
}

/// The section number `\d+(\.\d+)*` at the start of `text` (a trailing `.` that no digit
/// follows is punctuation) and the rest of the text; an empty number when there is none.
fn section_number(text: &str) -> (String, &str) {
    let bytes = text.as_bytes();
    let mut end = 0;
    loop {
        let start = end;
        while end < bytes.len() && bytes[end].is_ascii_digit() {
            end += 1;
        }
        if end == start {
            break; // no number at all (a dot is only taken when a digit follows it)
        }
        if end + 1 < bytes.len() && bytes[end] == b'.' && bytes[end + 1].is_ascii_digit() {
            end += 1;
        } else {
            break;
        }
    }
    (text[..end].to_owned(), &text[end..])
}

/// One cite: its line (1-based) and the sections it names.
#[derive(Debug, PartialEq)]
struct Cite {
    line: usize,
    sections: Vec<String>,
    /// The text from the section sign, for messages.
    text: String,
    /// Preceded by "issue N": a section of a tracker issue, not of the contract.
    of_issue: bool,
}

/// Strips a range separator (`-`, `–`, `—`, ` to `) followed by a number.
fn range_end(rest: &str) -> Option<(String, &str)> {
    for separator in ["\u{2013}", "\u{2014}", "-", " to "] {
        if let Some(after) = rest.strip_prefix(separator) {
            let after = after.trim_start_matches(SIGN);
            let (number, rest) = section_number(after);
            if !number.is_empty() {
                return Some((number, rest));
            }
        }
    }
    None
}

/// Strips a list separator (`, `, ` and `, `, and `, ` & `, `/`) followed by a number.
fn list_next(rest: &str) -> Option<(String, &str)> {
    for separator in [", and ", ", ", " and ", " & ", " or ", "/"] {
        if let Some(after) = rest.strip_prefix(separator) {
            let after = after.trim_start_matches(SIGN);
            let (number, rest) = section_number(after);
            if !number.is_empty() {
                return Some((number, rest));
            }
        }
    }
    None
}

/// The sections `from` to `to`: both ends, and every top-level section between two
/// top-level ends.
fn expand(from: String, to: String) -> Vec<String> {
    match (from.parse::<u32>(), to.parse::<u32>()) {
        (Ok(a), Ok(b)) if a <= b => (a..=b).map(|n| n.to_string()).collect(),
        _ => vec![from, to],
    }
}

/// Every cite in `text`. A section sign followed by no number (prose about the sign
/// itself) is not a cite. After a double sign, lists and ranges continue the cite.
fn cites(text: &str) -> Vec<Cite> {
    let mut out = Vec::new();
    let mut search = 0;
    while let Some(found) = text[search..].find(SIGN) {
        let at = search + found;
        let mut rest = &text[at + SIGN.len_utf8()..];
        let double = rest.starts_with(SIGN);
        rest = rest.trim_start_matches(SIGN);
        search = text.len() - rest.len();
        let rest = rest.trim_start_matches([' ', '\u{a0}', '\u{202f}']);
        let (first, mut rest) = section_number(rest);
        if first.is_empty() {
            continue;
        }
        let mut sections = Vec::new();
        let mut current = first;
        loop {
            if let Some((end, after)) = range_end(rest) {
                sections.extend(expand(current, end));
                rest = after;
            } else {
                sections.push(current);
            }
            match list_next(rest).filter(|_| double) {
                Some((next, after)) => {
                    current = next;
                    rest = after;
                }
                None => break,
            }
        }
        let end = text.len() - rest.len();
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        out.push(Cite {
            line,
            sections,
            text: text[at..end].to_owned(),
            of_issue: cites_issue(before),
        });
        search = end;
    }
    out
}

/// Whether `before` ends with "issue N" (any case, then spaces), as in "issue N \u{a7}M".
fn cites_issue(before: &str) -> bool {
    let trimmed = before.trim_end();
    let without_number = trimmed.trim_end_matches(|c: char| c.is_ascii_digit());
    without_number.len() < trimmed.len()
        && without_number
            .trim_end()
            .to_ascii_lowercase()
            .ends_with("issue")
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if SKIPPED_DIRS.contains(&name) {
            return;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(|entry| entry.expect("directory entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            collect_files(&entry, out);
        }
    } else if path.is_file() {
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !SKIPPED_EXTENSIONS.contains(&extension) {
            out.push(path.to_path_buf());
        }
    }
}

#[test]
fn the_contract_has_every_top_level_section() {
    let spec = std::fs::read_to_string(root().join("docs/SPEC.md")).expect("docs/SPEC.md");
    let sections = headings(&spec);
    for n in 1..=10 {
        assert!(
            sections.contains(&n.to_string()),
            "docs/SPEC.md has no heading for section {n}: {sections:?}"
        );
    }
    let unique: BTreeSet<&String> = sections.iter().collect();
    assert_eq!(
        unique.len(),
        sections.len(),
        "a section number is used twice: {sections:?}"
    );
}

#[test]
fn every_section_cite_resolves_to_a_heading_of_the_contract() {
    let root = root();
    let spec = std::fs::read_to_string(root.join("docs/SPEC.md")).expect("docs/SPEC.md");
    let sections: BTreeSet<String> = headings(&spec).into_iter().collect();
    let mut files = Vec::new();
    for path in SCANNED {
        collect_files(&root.join(path), &mut files);
    }
    let (mut count, mut failures) = (0, Vec::new());
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue; // not UTF-8: not source or documentation
        };
        let shown = file.strip_prefix(&root).unwrap_or(file).display();
        for cite in cites(&text) {
            count += 1;
            if cite.of_issue {
                failures.push(format!(
                    "{shown}:{}: `{}` cites a tracker issue's section; cite docs/SPEC.md or say it plainly",
                    cite.line, cite.text
                ));
            }
            for section in &cite.sections {
                if !sections.contains(section) {
                    failures.push(format!(
                        "{shown}:{}: `{}` names section {section}, which docs/SPEC.md has no heading for",
                        cite.line, cite.text
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} section cites do not resolve (docs/SPEC.md's sections: {:?}):\n{}",
        failures.len(),
        sections,
        failures.join("\n")
    );
    // The scan found the code's cites (a wrong root or sign would find none).
    assert!(
        count > 100,
        "only {count} section cites found in {} files",
        files.len()
    );
}

#[test]
fn cites_are_read_in_every_form_the_code_uses() {
    let s = SIGN;
    let sections =
        |text: &str| -> Vec<Vec<String>> { cites(text).into_iter().map(|c| c.sections).collect() };
    let v = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(sections(&format!("SPEC {s}7.")), [v(&["7"])]);
    assert_eq!(sections(&format!("SPEC {s}7's tolerance")), [v(&["7"])]);
    assert_eq!(sections(&format!("SPEC {s}3.5: encode")), [v(&["3.5"])]);
    assert_eq!(sections(&format!("SPEC.md {s}8")), [v(&["8"])]);
    assert_eq!(sections(&format!("SPEC {s}3 step 5")), [v(&["3"])]);
    assert_eq!(sections(&format!("({s}4, {s}5)")), [v(&["4"]), v(&["5"])]);
    assert_eq!(
        sections(&format!("{s}4\u{2013}5 per prior")),
        [v(&["4", "5"])]
    );
    assert_eq!(
        sections(&format!("SPEC {s}5-7.\"\"\"")),
        [v(&["5", "6", "7"])]
    );
    assert_eq!(sections(&format!("{s}{s}3\u{2013}4")), [v(&["3", "4"])]);
    assert_eq!(
        sections(&format!("{s}{s}3, 5 and 7.2")),
        [v(&["3", "5", "7.2"])]
    );
    assert_eq!(sections(&format!("{s} 9")), [v(&["9"])]);
    assert_eq!(
        sections(&format!("{s}5.2\u{2013}5.4")),
        [v(&["5.2", "5.4"])]
    );
    assert_eq!(sections(&format!("{s}7-compliant")), [v(&["7"])]);
    // The sign alone, in prose about it, is not a cite.
    assert!(cites(&format!("cite its sections ({s}).")).is_empty());

    let text = format!("a\nb ({} 14 {s}4, SPEC {s}7)\n", "issue");
    let found = cites(&text);
    assert_eq!(found.len(), 2);
    assert_eq!((found[0].line, found[0].of_issue), (2, true));
    assert_eq!((found[1].line, found[1].of_issue), (2, false));
    assert_eq!(found[0].text, format!("{s}4"));
}

#[test]
fn headings_are_read_with_or_without_a_trailing_dot() {
    let s = SIGN;
    let markdown = format!(
        "# Title\n## 1. One\n### 1.2 Sub\n## {s}3 Three\n```\n## 9. in a code block\n```\n## Unnumbered\n"
    );
    assert_eq!(headings(&markdown), ["1", "1.2", "3"]);
}
