//! The engine's layers, enforced: every `crate::` (and `super::` that
//! leaves its module) path in `apf/src` is checked against the layer table
//! below, which `docs/ARCHITECTURE.md` shows too (a test keeps the two the
//! same). A module may use modules of the layers below its own; modules of
//! the leaf layer may also use each other, modules of the other layers may
//! not (the fault path, pins and offline share what they need through the
//! core, never each other). Unit tests at the bottom of a file
//! (`#[cfg(test)] mod tests`) are left out: they drive a module through the
//! whole engine.

use std::collections::BTreeSet;
use std::path::Path;

/// The layers, bottom to top: name, modules, whether modules of the layer
/// may use each other.
const LAYERS: &[(&str, &[&str], bool)] = &[
    (
        "leaf",
        &[
            "uffd",
            "failpoints",
            "ram",
            "image",
            "source",
            "notifier",
            "config",
            "counters",
            "hostmem",
            "hugepool",
            "kpin",
            "span",
            "trace",
            "working_set",
        ],
        true,
    ),
    ("core", &["core"], false),
    ("services", &["fault", "pin", "offline", "baseline"], false),
    ("front", &["engine"], false),
    ("root", &["lib"], false),
];

/// The crate root's own items (re-exports, `set_thread_nice`) count as the
/// root module: only the root may name them.
const ROOT: &str = "lib";

/// The layer of `module`, as an index into [`LAYERS`].
fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules, _)| modules.contains(&module))
}

/// The top-level module a source file belongs to (`lib` for the root),
/// and how deep the file's own module sits under it (`fault/mod.rs`: 0,
/// `fault/event_loop.rs`: 1), for `super::`.
fn module_of(rel: &str) -> (String, usize) {
    let parts: Vec<&str> = rel.split('/').collect();
    let top = parts[0].trim_end_matches(".rs").to_string();
    let depth = match parts.last() {
        Some(&"mod.rs") => parts.len() - 2,
        _ => parts.len() - 1,
    };
    (top, depth)
}

/// The code of a file without comments and without its unit tests.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") && lines.peek().is_some_and(|l| l.trim_start().starts_with("mod tests"))
        {
            break;
        }
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first path segment of each item of a `{...}` group starting at
/// `rest` (after the brace), nested groups left to their own first
/// segments.
fn group_heads(rest: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    let mut chars = rest.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && depth == 0 && is_ident(c) => {
                let word: String = rest[i..].chars().take_while(|&c| is_ident(c)).collect();
                for _ in 1..word.len() {
                    chars.next();
                }
                heads.push(word);
                item_start = false;
            }
            _ => {}
        }
    }
    heads
}

/// The top-level modules (or [`ROOT`]) a file's code names through
/// `crate::` and through `super::` chains that climb out of its module.
fn uses(rel: &str, text: &str) -> BTreeSet<String> {
    let (top, depth) = module_of(rel);
    let code = code_of(text);
    let mut used = BTreeSet::new();
    let heads_at = |rest: &str| {
        if let Some(group) = rest.strip_prefix('{') {
            group_heads(group)
        } else {
            vec![rest.chars().take_while(|&c| is_ident(c)).collect::<String>()]
        }
    };
    let bytes = code.as_bytes();
    for (i, _) in code.match_indices("crate::") {
        if i > 0 && (is_ident(bytes[i - 1] as char) || bytes[i - 1] == b'$') {
            continue;
        }
        for head in heads_at(&code[i + "crate::".len()..]) {
            used.insert(head);
        }
    }
    for (i, _) in code.match_indices("super::") {
        if i > 0 && (is_ident(bytes[i - 1] as char) || code[..i].ends_with("super::")) {
            continue;
        }
        let mut rest = &code[i..];
        let mut climbs = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = r;
        }
        if climbs > depth {
            for head in heads_at(rest) {
                used.insert(head);
            }
        }
    }
    used.into_iter()
        .filter(|m| !m.is_empty() && *m != top && m != "self")
        .map(|m| if layer_of(&m).is_some() { m } else { ROOT.to_string() })
        .filter(|m| *m != top)
        .collect()
}

/// Every use that breaks the layering, one line each.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (rel, text) in files {
        let (top, _) = module_of(rel);
        let Some(own) = layer_of(&top) else {
            found.push(format!("{rel}: module `{top}` is in no layer; add it to the table"));
            continue;
        };
        for used in uses(rel, text) {
            let Some(theirs) = layer_of(&used) else { continue };
            let allowed = theirs < own || (theirs == own && LAYERS[own].2);
            if !allowed {
                found.push(format!(
                    "{rel}: `{top}` ({} layer) uses `{used}` ({} layer)",
                    LAYERS[own].0, LAYERS[theirs].0
                ));
            }
        }
    }
    found
}

fn read_sources(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_sources(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(base).unwrap().to_string_lossy().replace('\\', "/");
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn no_module_uses_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_sources(&src, &src, &mut files);
    assert!(files.len() > 15, "read {} files from {}", files.len(), src.display());
    let found = violations(&files);
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

#[test]
fn the_table_in_the_architecture_doc_is_this_one() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ARCHITECTURE.md");
    let doc = std::fs::read_to_string(doc).unwrap();
    for (name, modules, _) in LAYERS {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("docs/ARCHITECTURE.md has no row for the {name} layer"));
        let cells: Vec<&str> = row.split('|').collect();
        let listed: BTreeSet<&str> =
            cells[2].split('`').enumerate().filter(|(i, _)| i % 2 == 1).map(|(_, m)| m).collect();
        let want: BTreeSet<&str> = modules.iter().copied().filter(|m| *m != ROOT).collect();
        let want = if *name == "root" { BTreeSet::from(["lib.rs"]) } else { want };
        assert_eq!(listed, want, "docs/ARCHITECTURE.md, {name} layer");
    }
}

fn one(rel: &str, text: &str) -> Vec<String> {
    violations(&[(rel.to_string(), text.to_string())])
}

#[test]
fn an_import_from_a_layer_above_is_caught() {
    // Upwards, in every spelling.
    assert_eq!(one("core/resolve.rs", "use crate::fault::prefetch::StreamTable;").len(), 1);
    assert_eq!(one("ram.rs", "fn f() { crate::core::panic_message(p) }").len(), 1);
    assert_eq!(one("pin.rs", "use crate::{ram::GuestRange, engine::Engine};").len(), 1);
    assert_eq!(one("offline.rs", "use crate::Engine;").len(), 1, "a root re-export is the root");
    assert_eq!(one("fault/event_loop.rs", "use super::super::engine::EngineError;").len(), 1);
    // Sideways in the middle layer.
    assert_eq!(one("pin.rs", "use crate::offline::Mode;").len(), 1);
    assert_eq!(one("offline.rs", "use crate::fault::WorkingSet;").len(), 1);
    // A module nobody placed.
    assert_eq!(one("newthing.rs", "").len(), 1);
}

#[test]
fn what_the_layering_allows_is_not_flagged() {
    // Downwards, sideways among leaves, within a module, in comments, in
    // unit tests, and other crates' `core`.
    assert!(one("engine.rs", "use crate::core::{Core, Job};\nuse crate::offline::Mode;").is_empty());
    assert!(one("ram.rs", "use crate::uffd::PAGE_SIZE;").is_empty());
    assert!(one("fault/event_loop.rs", "use super::prefetch::StreamTable;\nuse super::SpawnError;").is_empty());
    assert!(one("core/resolve.rs", "use super::{Core, Job};").is_empty());
    assert!(one("pin.rs", "/// See [`crate::Engine::pin`].\nfn f() {} // crate::offline").is_empty());
    assert!(one("pin.rs", "fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::{Engine, Mode};\n}").is_empty());
    assert!(one("uffd.rs", "use std::sync::Arc; fn f() { ::core::mem::drop(1) }").is_empty());
    assert!(one("lib.rs", "pub use engine::Engine;\nfn f() { crate::engine::x() }").is_empty());
}
