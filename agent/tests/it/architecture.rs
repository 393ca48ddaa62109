//! The agent's shape, checked: its modules import one another in one direction only (no
//! circle, between stages or between the files of one stage), and `main.rs` stays a thin
//! command line over the library. A newcomer reads the stages off the tree (docs/
//! ARCHITECTURE.md); this keeps them true as the code grows.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// `agent/src`.
fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module file of the library, by module path (`assemble::requests`, `model`, …).
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                walk(&p, &format!("{prefix}{name}::"), out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let path = match name.as_str() {
                    "mod" => prefix.trim_end_matches("::").to_string(),
                    _ => format!("{prefix}{name}"),
                };
                out.insert(path, p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), "", &mut out);
    out.remove("lib");
    out.remove("main");
    out
}

/// The code of a file before its unit tests (test modules may use any helper), comments left
/// out (a doc link to another stage is not an import).
fn non_test_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules `module`'s code refers to: `crate::a::b…` and `super::…` paths, each resolved
/// to the deepest module file it names (an item's path ends at its module).
fn references(module: &str, code: &str, all: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    // Within `use crate::{a::b, c}` groups, the group's prefix applies to each path.
    let mut paths = Vec::new();
    // `use child::…` (and `self::child::…`) in a module that declares `mod child`.
    for line in code.lines() {
        let l = line.trim_start().trim_start_matches("pub ");
        if let Some(rest) = l.strip_prefix("use ") {
            let rest = rest.strip_prefix("self::").unwrap_or(rest);
            let head = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("");
            let child = format!("{module}::{head}");
            if !head.is_empty() && all.contains_key(&child) {
                paths.push(format!(
                    "{child}{}",
                    &rest[head.len()..].split(';').next().unwrap_or("")
                ));
            }
        }
    }
    for (prefix, root) in [("crate::", String::new()), ("super::", parent.to_string())] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let group = if rest.starts_with('{') {
                let end = matching_brace(rest);
                let inner = &rest[1..end];
                split_group(inner)
            } else {
                vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .next()
                    .unwrap_or("")
                    .to_string()]
            };
            for g in group {
                let full = if root.is_empty() {
                    g
                } else {
                    format!("{root}::{g}")
                };
                paths.push(full);
            }
        }
    }
    let mut out = BTreeSet::new();
    for p in paths {
        let segs: Vec<&str> = p.split("::").filter(|s| !s.is_empty()).collect();
        for n in (1..=segs.len()).rev() {
            let m = segs[..n].join("::");
            if all.contains_key(&m) {
                if m != module {
                    out.insert(m);
                }
                break;
            }
        }
    }
    out
}

fn matching_brace(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// `a::{b, c}, d` → `a::b`, `a::c`, `d`.
fn split_group(inner: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    let mut parts = Vec::new();
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    for p in parts {
        let p = p.trim();
        if let Some(i) = p.find("::{") {
            let head = &p[..i];
            let sub = &p[i + 2..];
            let end = matching_brace(sub);
            for s in split_group(&sub[1..end]) {
                out.push(format!("{head}::{s}"));
            }
        } else {
            out.push(p.split(" as ").next().unwrap().trim().to_string());
        }
    }
    out.into_iter()
        .filter(|s| !s.is_empty() && s != "self")
        .collect()
}

/// A circle in the graph, if any.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let i = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[i..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let all = modules();
    all.iter()
        .map(|(m, p)| (m.clone(), references(m, &non_test_code(p), &all)))
        .collect()
}

#[test]
fn the_agents_modules_import_one_way() {
    let g = graph();
    // The checker itself sees what it must: a few edges that are known to exist.
    for (from, to) in [
        ("assemble", "model"),
        ("app::session", "attach"),
        ("resolve", "discover"),
    ] {
        assert!(
            g[from].contains(to),
            "{from} → {to} not seen: {:?}",
            g[from]
        );
    }
    if let Some(c) = find_circle(&g) {
        panic!("import circle: {}", c.join(" → "));
    }
    // And it finds a circle where there is one.
    let mut with_circle = g.clone();
    with_circle
        .entry("model".into())
        .or_default()
        .insert("assemble".into());
    assert!(find_circle(&with_circle).is_some());
}

#[test]
fn main_is_a_thin_command_line() {
    let main = std::fs::read_to_string(src().join("main.rs")).unwrap();
    let lines = main.lines().count();
    assert!(
        lines < 60,
        "main.rs has {lines} lines: move the work into the library"
    );
}
