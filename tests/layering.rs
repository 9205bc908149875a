//! The module layering of ARCHITECTURE.md ("Imports go one way"), checked on the source: no import
//! cycle between modules, and no module importing from a layer above its own.
//!
//! The graph is read from the text of `src/` (`crate::…`, `super::…` and `self::…` paths outside
//! comments and outside `#[cfg(test)] mod tests`), at the granularity of files. A path counts
//! as an edge to the longest module prefix it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the bottom up; a module may use its own layer and those below. Modules are
/// matched by their first path segment, except `core`, matched as a whole.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "vocabulary",
        &["lsn", "table", "error", "backoff", "secret", "failpoint"],
    ),
    ("pure core", &["core"]),
    ("stages", &["pg", "sink", "observe"]),
    ("assembly", &["config", "reload"]),
    ("drivers", &["daemon", "consume", "status", "main", "crate"]),
];

fn layer_of(module: &str) -> usize {
    let first = module.split("::").next().unwrap_or(module);
    LAYERS
        .iter()
        .position(|(_, mods)| mods.contains(&first))
        .unwrap_or_else(|| panic!("module {module} is in no layer of ARCHITECTURE.md's table"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/pg/wire/mod.rs` → `pg::wire`; `src/lib.rs` → `crate`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    if parts.is_empty() {
        "crate".into()
    } else {
        parts.join("::")
    }
}

/// The code of a file without comments and without its unit-test module.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines.peek().is_some_and(|l| l.starts_with("mod tests {"))
        {
            break;
        }
        if !trimmed.starts_with("//") {
            code.push_str(line);
            code.push('\n');
        }
    }
    code
}

/// Every `crate::a::b`, `super::a` or `self::a` path in `code`, as its segments.
fn paths(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start).map(|i| i + from) {
            from = i + start.len();
            if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
                continue;
            }
            let end = code[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| e + i);
            out.push(
                code[i..end]
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            );
        }
    }
    out
}

fn resolve(from: &str, path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    let mut base: Vec<&str> = if from == "crate" {
        vec![]
    } else {
        from.split("::").collect()
    };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => base.clear(),
        Some("self") => {}
        Some("super") => {
            base.pop();
            while rest.get(1).map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    rest = &rest[1..];
    let mut found = None;
    for n in 1..=rest.len() {
        let mut candidate: Vec<&str> = base.clone();
        candidate.extend(rest[..n].iter().map(String::as_str));
        let name = candidate.join("::");
        if modules.contains(&name) {
            found = Some(name);
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| f.file_name().is_some_and(|n| n != "tests.rs"));
    let code: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            (
                module_of(&src, f),
                code_of(&std::fs::read_to_string(f).unwrap()),
            )
        })
        .collect();
    let modules: BTreeSet<String> = code.keys().cloned().collect();
    let mut edges = BTreeMap::new();
    for (m, text) in &code {
        let targets: BTreeSet<String> = paths(text)
            .iter()
            .filter_map(|p| resolve(m, p, &modules))
            .filter(|t| {
                t != m && !m.starts_with(&format!("{t}::")) && !t.starts_with(&format!("{m}::"))
            })
            .collect();
        edges.insert(m.clone(), targets);
    }
    edges
}

#[test]
fn modules_import_without_cycles() {
    let edges = graph();
    assert!(edges.len() > 40, "the source was not read: {edges:?}");
    // A module is on a cycle when it can reach itself.
    let mut on_cycles = Vec::new();
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = edges[start].iter().collect();
        while let Some(m) = todo.pop() {
            if m == start {
                on_cycles.push(start.clone());
                break;
            }
            if seen.insert(m) {
                todo.extend(edges[m].iter());
            }
        }
    }
    assert!(
        on_cycles.is_empty(),
        "modules on an import cycle: {on_cycles:?}"
    );
}

#[test]
fn no_module_imports_from_a_layer_above() {
    let mut upward = Vec::new();
    for (m, targets) in graph() {
        for t in targets {
            if layer_of(&t) > layer_of(&m) {
                upward.push(format!(
                    "{m} → {t} ({} uses {})",
                    LAYERS[layer_of(&m)].0,
                    LAYERS[layer_of(&t)].0
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports against the layering:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_checker_sees_an_edge_and_a_cycle() {
    let modules: BTreeSet<String> = ["a", "a::b", "c"].iter().map(|s| s.to_string()).collect();
    let p = paths(&code_of(
        "use crate::a::b::Thing;\nlet x = super::c::f();\n// crate::c::commented\n",
    ));
    assert_eq!(p.len(), 2);
    assert_eq!(resolve("x", &p[0], &modules).as_deref(), Some("a::b"));
    assert_eq!(
        resolve("x::y", &p[1], &modules),
        None,
        "super of x::y is x; x::c does not exist"
    );
    assert_eq!(resolve("a", &p[1], &modules).as_deref(), Some("c"));
    assert!(code_of("// crate::c::x\nfn f() {}\n").contains("fn f"));
    assert!(!code_of("// crate::c::x\n").contains("crate::"));
}
