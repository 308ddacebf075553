//! The host's module files form no import circle: every `crate::`, `super::` and `self::`
//! path of a file of `host/src` (in `use` lines and in code), and every path through a
//! module it declares, is mapped to the module file it names (the longest prefix of the
//! path that is a module file, followed through that file's imports when the rest is a
//! name it imports), and the graph of those references has no cycle. `#[cfg(test)]`
//! modules, comments and string literals are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A token of Rust source, as far as paths need: identifiers and punctuation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// The tokens of `source` with their line numbers; comments, string, byte-string, raw
/// string and character literals and lifetimes are dropped.
fn tokens(source: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if (c == 'r' || (c == 'b' && at(i + 1) == 'r'))
            && matches!(at(i + 1 + usize::from(c == 'b')), '"' | '#')
            && {
                // A raw string: r"…", r#"…"#, br"…".
                let mut j = i + 1 + usize::from(c == 'b');
                while at(j) == '#' {
                    j += 1;
                }
                at(j) == '"'
            }
        {
            let mut j = i + 1 + usize::from(c == 'b');
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '\n' {
                    line += 1;
                }
                if chars[j] == '"' && (0..hashes).all(|h| at(j + 1 + h) == '#') {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
        } else if c == '"' || (c == 'b' && at(i + 1) == '"') {
            let mut j = i + 1 + usize::from(c == 'b');
            while j < chars.len() && chars[j] != '"' {
                if chars[j] == '\\' {
                    j += 1;
                }
                if at(j) == '\n' {
                    line += 1;
                }
                j += 1;
            }
            i = j + 1;
        } else if c == '\'' || (c == 'b' && at(i + 1) == '\'') {
            // A character literal ('a', '\n', '\u{a7}', b'x') or a lifetime ('a).
            let start = i + 1 + usize::from(c == 'b');
            if at(start) == '\\' {
                let mut j = start + 2;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
            } else if at(start + 1) == '\'' {
                i = start + 2;
            } else {
                // A lifetime: skip the quote, the name is read as an identifier and dropped.
                let mut j = start;
                while at(j).is_alphanumeric() || at(j) == '_' {
                    j += 1;
                }
                i = j;
            }
        } else if c.is_alphabetic() || c == '_' {
            let mut j = i;
            while at(j).is_alphanumeric() || at(j) == '_' {
                j += 1;
            }
            let mut word: String = chars[i..j].iter().collect();
            if let Some(raw) = word.strip_prefix("r#") {
                word = raw.to_owned();
            }
            out.push((Token::Ident(word), line));
            i = j;
        } else if c.is_ascii_digit() {
            while at(i).is_alphanumeric()
                || at(i) == '_'
                || at(i) == '.' && at(i + 1).is_ascii_digit()
            {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push((Token::PathSep, line));
            i += 2;
        } else {
            out.push((Token::Punct(c), line));
            i += 1;
        }
    }
    // `r#ident`: the `r` and `#` came out as an identifier and a `#`; join them.
    let mut joined: Vec<(Token, usize)> = Vec::with_capacity(out.len());
    let mut k = 0;
    while k < out.len() {
        if out[k].0 == Token::Ident("r".into())
            && out.get(k + 1).map(|t| &t.0) == Some(&Token::Punct('#'))
            && matches!(out.get(k + 2).map(|t| &t.0), Some(Token::Ident(_)))
        {
            joined.push(out[k + 2].clone());
            k += 3;
        } else {
            joined.push(out[k].clone());
            k += 1;
        }
    }
    joined
}

/// What one file says about modules: the module files it declares (`mod x;`), the paths
/// it refers to (with the inline module they appear in and their line), and the names its
/// `use` lines bring into scope (name → path), per inline module.
#[derive(Debug, Default)]
struct FileModules {
    declared: Vec<String>,
    /// (inline module path inside the file, path segments, line)
    references: Vec<(Vec<String>, Vec<String>, usize)>,
    /// (inline module path, imported name) → path segments
    imports: BTreeMap<(Vec<String>, String), Vec<String>>,
}

fn ident(token: Option<&(Token, usize)>) -> Option<&str> {
    match token {
        Some((Token::Ident(name), _)) => Some(name),
        _ => None,
    }
}

/// The index just past the item that starts at `i` (a `{ … }` block or up to `;`).
fn skip_item(tokens: &[(Token, usize)], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < tokens.len() {
        match tokens[i].0 {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            Token::Punct(';') if depth == 0 => return i + 1,
            _ => {}
        }
        i += 1;
    }
    i
}

/// Expands a `use` tree starting at `i` (after `use`) into (imported name, path) pairs;
/// returns them and the index after the `;`.
fn use_tree(tokens: &[(Token, usize)], mut i: usize) -> (Vec<(String, Vec<String>)>, usize) {
    fn tree(
        tokens: &[(Token, usize)],
        i: &mut usize,
        prefix: &[String],
        out: &mut Vec<(String, Vec<String>)>,
    ) {
        let mut path = prefix.to_vec();
        if tokens.get(*i).map(|t| &t.0) == Some(&Token::PathSep) {
            *i += 1;
        }
        loop {
            match tokens.get(*i).map(|t| &t.0) {
                Some(Token::Ident(name)) => {
                    path.push(name.clone());
                    *i += 1;
                    if tokens.get(*i).map(|t| &t.0) == Some(&Token::PathSep) {
                        *i += 1;
                        continue;
                    }
                    let mut last = path.last().cloned().unwrap_or_default();
                    if last == "self" {
                        path.pop();
                        last = path.last().cloned().unwrap_or_default();
                    }
                    if ident(tokens.get(*i)) == Some("as") {
                        last = ident(tokens.get(*i + 1)).unwrap_or("_").to_owned();
                        *i += 2;
                    }
                    out.push((last, path));
                    return;
                }
                Some(Token::Punct('*')) => {
                    *i += 1;
                    out.push(("*".into(), path));
                    return;
                }
                Some(Token::Punct('{')) => {
                    *i += 1;
                    loop {
                        match tokens.get(*i).map(|t| &t.0) {
                            Some(Token::Punct('}')) => {
                                *i += 1;
                                return;
                            }
                            Some(Token::Punct(',')) => *i += 1,
                            None => return,
                            _ => tree(tokens, i, &path, out),
                        }
                    }
                }
                _ => return,
            }
        }
    }
    let mut out = Vec::new();
    tree(tokens, &mut i, &[], &mut out);
    while i < tokens.len() && tokens[i].0 != Token::Punct(';') {
        i += 1;
    }
    (out, i + 1)
}

/// Reads one file's module declarations, references and imports.
fn read_file(source: &str) -> FileModules {
    let tokens = tokens(source);
    let mut file = FileModules::default();
    // Inline modules open around the current token: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let here = |inline: &Vec<(String, usize)>| -> Vec<String> {
        inline.iter().map(|(name, _)| name.clone()).collect()
    };
    while i < tokens.len() {
        let (token, line) = &tokens[i];
        match token {
            Token::Punct('#') if tokens.get(i + 1).map(|t| &t.0) == Some(&Token::Punct('[')) => {
                // An attribute: `#[cfg(test)]` drops the item it applies to when that is a
                // module (the unit tests); any other attribute is skipped over.
                let start = i;
                let mut j = i + 2;
                let mut brackets = 1;
                while j < tokens.len() && brackets > 0 {
                    match tokens[j].0 {
                        Token::Punct('[') => brackets += 1,
                        Token::Punct(']') => brackets -= 1,
                        _ => {}
                    }
                    j += 1;
                }
                let words: Vec<&str> = tokens[start..j]
                    .iter()
                    .filter_map(|t| ident(Some(t)))
                    .collect();
                let test_only = words == ["cfg", "test"];
                i = j;
                if test_only {
                    // Further attributes, visibility, then the item.
                    let mut k = j;
                    loop {
                        match tokens.get(k).map(|t| &t.0) {
                            Some(Token::Punct('#')) => {
                                let mut b = 0;
                                k += 1;
                                while k < tokens.len() {
                                    match tokens[k].0 {
                                        Token::Punct('[') => b += 1,
                                        Token::Punct(']') => {
                                            b -= 1;
                                            if b == 0 {
                                                k += 1;
                                                break;
                                            }
                                        }
                                        _ => {}
                                    }
                                    k += 1;
                                }
                            }
                            Some(Token::Ident(w)) if w == "pub" => {
                                k += 1;
                                if tokens.get(k).map(|t| &t.0) == Some(&Token::Punct('(')) {
                                    while k < tokens.len() && tokens[k].0 != Token::Punct(')') {
                                        k += 1;
                                    }
                                    k += 1;
                                }
                            }
                            _ => break,
                        }
                    }
                    if ident(tokens.get(k)) == Some("mod") {
                        i = skip_item(&tokens, k);
                    }
                }
                continue;
            }
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Token::Ident(word) if word == "mod" => {
                if let Some(name) = ident(tokens.get(i + 1)) {
                    match tokens.get(i + 2).map(|t| &t.0) {
                        Some(Token::Punct(';')) if inline.is_empty() => {
                            file.declared.push(name.to_owned());
                        }
                        Some(Token::Punct('{')) => {
                            inline.push((name.to_owned(), depth + 1));
                            depth += 1;
                            i += 3;
                            continue;
                        }
                        _ => {}
                    }
                }
            }
            Token::Ident(word) if word == "use" => {
                let (imported, next) = use_tree(&tokens, i + 1);
                let module = here(&inline);
                for (name, path) in imported {
                    file.references.push((module.clone(), path.clone(), *line));
                    if name != "*" {
                        file.imports.insert((module.clone(), name), path);
                    }
                }
                i = next;
                continue;
            }
            Token::Ident(first)
                if tokens.get(i + 1).map(|t| &t.0) == Some(&Token::PathSep)
                    && (i == 0 || tokens[i - 1].0 != Token::PathSep) =>
            {
                let mut path = vec![first.clone()];
                let mut j = i + 1;
                while tokens.get(j).map(|t| &t.0) == Some(&Token::PathSep) {
                    match ident(tokens.get(j + 1)) {
                        Some(name) => {
                            path.push(name.to_owned());
                            j += 2;
                        }
                        None => break,
                    }
                }
                file.references.push((here(&inline), path, *line));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    file
}

/// A module file of a crate: its module path and what it says.
struct ModuleFile {
    path: PathBuf,
    module: Vec<String>,
    modules: FileModules,
}

/// The module files of the crate rooted at `root`, found by following `mod x;`.
fn crate_files(root: &Path) -> Vec<ModuleFile> {
    let mut files = Vec::new();
    let mut pending = vec![(root.to_owned(), Vec::new())];
    while let Some((path, module)) = pending.pop() {
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let modules = read_file(&source);
        let name = path.file_stem().unwrap().to_str().unwrap();
        let children_dir = if path == root || name == "mod" {
            path.parent().unwrap().to_owned()
        } else {
            path.with_extension("")
        };
        for child in &modules.declared {
            let flat = children_dir.join(format!("{child}.rs"));
            let nested = children_dir.join(child).join("mod.rs");
            let file = if flat.exists() { flat } else { nested };
            assert!(
                file.exists(),
                "{}: `mod {child};` names no file",
                path.display()
            );
            let mut child_module = module.clone();
            child_module.push(child.clone());
            pending.push((file, child_module));
        }
        files.push(ModuleFile {
            path,
            module,
            modules,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

/// One reference between module files: the path as written and its line.
type Edges = BTreeMap<usize, BTreeMap<usize, (String, usize)>>;

/// The references between the module files of one crate.
fn crate_edges(files: &[ModuleFile]) -> Edges {
    let by_module: BTreeMap<&[String], usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.module.as_slice(), i))
        .collect();
    // Resolves an absolute path (from the crate root) to the module file it names, following
    // the imports of that file when the rest of the path starts with a name it imports.
    let resolve = |mut absolute: Vec<String>| -> Option<usize> {
        for _ in 0..32 {
            let (file, len) = (0..=absolute.len())
                .rev()
                .find_map(|n| by_module.get(&absolute[..n]).map(|&f| (f, n)))?;
            let Some(next) = absolute.get(len) else {
                return Some(file);
            };
            let key = (Vec::new(), next.clone());
            match files[file].modules.imports.get(&key) {
                Some(target) => match absolutize(&files[file].module, &[], target, files, file) {
                    Some(mut through) => {
                        through.extend(absolute[len + 1..].iter().cloned());
                        absolute = through;
                    }
                    None => return None, // an import from another crate
                },
                None => return Some(file),
            }
        }
        None
    };
    let mut edges = Edges::new();
    for (from, file) in files.iter().enumerate() {
        for (inline, path, line) in &file.modules.references {
            let Some(absolute) = absolutize(&file.module, inline, path, files, from) else {
                continue;
            };
            if let Some(to) = resolve(absolute) {
                if to != from {
                    edges
                        .entry(from)
                        .or_default()
                        .entry(to)
                        .or_insert_with(|| (path.join("::"), *line));
                }
            }
        }
    }
    edges
}

/// `path`, written in the file of `module` inside its inline module `inline`, from the
/// crate root; `None` when it does not start inside the crate (`std::`, another crate, a
/// type's associated item).
fn absolutize(
    module: &[String],
    inline: &[String],
    path: &[String],
    files: &[ModuleFile],
    file: usize,
) -> Option<Vec<String>> {
    let mut here: Vec<String> = module.iter().chain(inline).cloned().collect();
    let first = path.first()?;
    let rest = match first.as_str() {
        "crate" => {
            here.clear();
            &path[1..]
        }
        "self" => &path[1..],
        "super" => {
            let mut rest = path;
            while rest.first().map(String::as_str) == Some("super") {
                here.pop()?;
                rest = &rest[1..];
            }
            rest
        }
        name if inline.is_empty() && files[file].modules.declared.iter().any(|d| d == name) => path,
        _ => return None,
    };
    here.extend(rest.iter().cloned());
    Some(here)
}

/// One cycle through each strongly connected component of `edges` that has more than one
/// file, as file indices (first = last): every circle, each named once.
fn find_cycles(edges: &Edges, nodes: usize) -> Vec<Vec<usize>> {
    let next = |n: usize| edges.get(&n).into_iter().flat_map(|e| e.keys().copied());
    // Which files reach which (the graph is small: a breadth-first search from each).
    let reach: Vec<BTreeSet<usize>> = (0..nodes)
        .map(|start| {
            let mut seen = BTreeSet::new();
            let mut queue: Vec<usize> = next(start).collect();
            while let Some(n) = queue.pop() {
                if seen.insert(n) {
                    queue.extend(next(n));
                }
            }
            seen
        })
        .collect();
    let mut done = BTreeSet::new();
    let mut cycles = Vec::new();
    for start in 0..nodes {
        if done.contains(&start) || !reach[start].contains(&start) {
            continue;
        }
        let component: BTreeSet<usize> = (0..nodes)
            .filter(|&n| reach[start].contains(&n) && reach[n].contains(&start))
            .collect();
        done.extend(component.iter().copied());
        // The shortest way back to `start` inside the component.
        let mut previous = BTreeMap::new();
        let mut frontier = vec![start];
        'search: while !frontier.is_empty() {
            let mut further = Vec::new();
            for &n in &frontier {
                for m in next(n).filter(|m| component.contains(m)) {
                    if m == start {
                        let mut cycle = vec![start, n];
                        let mut at = n;
                        while at != start {
                            at = previous[&at];
                            cycle.push(at);
                        }
                        cycle.reverse();
                        cycles.push(cycle);
                        break 'search;
                    }
                    if let std::collections::btree_map::Entry::Vacant(slot) = previous.entry(m) {
                        slot.insert(n);
                        further.push(m);
                    }
                }
            }
            frontier = further;
        }
    }
    cycles
}

/// The crate roots of a package's `src`: `lib.rs`, `main.rs`, `bin/*.rs`, `bin/*/main.rs`.
fn crate_roots(src: &Path) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|name| src.join(name))
        .filter(|p| p.exists())
        .collect();
    if let Ok(entries) = std::fs::read_dir(src.join("bin")) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "rs") {
                roots.push(path);
            } else if path.join("main.rs").exists() {
                roots.push(path.join("main.rs"));
            }
        }
    }
    roots.sort();
    roots
}

fn rust_files(dir: &Path, out: &mut BTreeSet<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.insert(path);
        }
    }
}

/// References the check leaves out, as (from, to) relative to `src`: each would close a
/// circle still to be removed (none today). The check fails once such a reference is gone,
/// so that the entry goes too.
const TOLERATED: &[(&str, &str)] = &[];

/// What the check of one `src` folder finds.
#[derive(Debug, Default)]
struct Findings {
    /// One import cycle through each circle of each crate of `src`, written as
    /// `a.rs → b.rs (line 12: crate::b::X) → a.rs (line 3: …)`.
    cycles: Vec<String>,
    /// The `.rs` files of `src` that no crate root reaches (test-only modules, and files
    /// this check would not read).
    unreached: Vec<PathBuf>,
    /// The entries of `tolerated` whose reference no longer exists.
    gone: Vec<(String, String)>,
}

/// Checks the crates of `src`, leaving out the references `tolerated` names.
fn module_cycles(src: &Path, tolerated: &[(&str, &str)]) -> Findings {
    let mut findings = Findings::default();
    let mut reached = BTreeSet::new();
    let mut left_out = BTreeSet::new();
    for root in crate_roots(src) {
        let files = crate_files(&root);
        reached.extend(files.iter().map(|f| f.path.clone()));
        let name = |i: usize| {
            files[i]
                .path
                .strip_prefix(src)
                .unwrap_or(&files[i].path)
                .display()
                .to_string()
        };
        let mut edges = crate_edges(&files);
        for from in 0..files.len() {
            for to in 0..files.len() {
                let pair = (name(from), name(to));
                if tolerated.contains(&(pair.0.as_str(), pair.1.as_str()))
                    && edges.get_mut(&from).and_then(|e| e.remove(&to)).is_some()
                {
                    left_out.insert(pair);
                }
            }
        }
        for cycle in find_cycles(&edges, files.len()) {
            let mut text = name(cycle[0]);
            for pair in cycle.windows(2) {
                let (path, line) = &edges[&pair[0]][&pair[1]];
                text += &format!(" → {} (line {line}: {path})", name(pair[1]));
            }
            findings.cycles.push(text);
        }
    }
    let mut all = BTreeSet::new();
    rust_files(src, &mut all);
    findings.unreached = all.difference(&reached).cloned().collect();
    findings.gone = tolerated
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .filter(|pair| !left_out.contains(pair))
        .collect();
    findings
}

fn host_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("host/src")
}

#[test]
fn the_host_modules_import_no_circle() {
    let Findings {
        cycles,
        unreached,
        gone,
    } = module_cycles(&host_src(), TOLERATED);
    assert!(
        cycles.is_empty(),
        "import circles among host/src's module files:\n{}",
        cycles.join("\n")
    );
    assert!(
        gone.is_empty(),
        "tolerated references that no longer exist (remove them from TOLERATED): {gone:?}"
    );
    // A file that no `mod` declaration reaches is one this check did not read.
    assert!(
        unreached.is_empty(),
        "files of host/src outside every crate's module tree: {unreached:?}"
    );
}

/// The check finds circles through `crate::` paths, `super::`, a parent's `use child::`,
/// a re-export at the crate root and a path in code; and finds none where the imports only
/// go one way.
#[test]
fn a_probe_with_a_circle_fails_naming_it() {
    let probe = |files: &[(&str, &str)]| {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        module_cycles(dir.path(), &[]).cycles
    };
    // Through a crate-root re-export: b uses `crate::A`, which lib.rs re-exports from a.
    let cycles = probe(&[
        ("lib.rs", "mod a;\nmod b;\npub use a::A;\n"),
        ("a.rs", "pub struct A;\nfn f() { crate::b::g(); }\n"),
        ("b.rs", "use crate::A;\npub fn g() {}\n"),
    ]);
    assert_eq!(
        cycles,
        ["a.rs → b.rs (line 2: crate::b::g) → a.rs (line 1: crate::A)"]
    );
    // A parent and its child: `use child::X` one way, `super::Y` the other.
    let cycles = probe(&[
        ("lib.rs", "pub mod p;\n"),
        ("p.rs", "mod c;\nuse c::X;\npub struct Y;\n"),
        ("p/c.rs", "pub struct X(super::Y);\n"),
    ]);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(cycles[0].contains("p/c.rs"), "{cycles:?}");
    // One way only, with the other direction only in unit tests, comments and strings.
    let cycles = probe(&[
        ("lib.rs", "mod a;\nmod b;\n"),
        (
            "a.rs",
            "use crate::b::{self, g};\n#[cfg(test)]\nmod tests { use crate::b::g; }\n",
        ),
        (
            "b.rs",
            "// crate::a::f\npub fn g() { let _ = \"crate::a::f\"; }\n#[cfg(test)]\nmod tests {\n    use crate::a::*;\n}\n",
        ),
    ]);
    assert!(cycles.is_empty(), "{cycles:?}");
}
