//! The engine's modules depend on one another without cycles (issue 15): read from the
//! `crate::module` paths of engine/src/*.rs (use lines and paths written in place), test
//! modules left out. Cycles still to be taken apart are listed in `KNOWN`; a new one, or a
//! longer one, fails the test, and so does a listed one once it is gone (so that the list
//! shrinks with the code).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Strongly connected module groups that remain, each sorted (docs/architecture.md,
/// "Module dependencies", says what is left to do).
const KNOWN: &[&[&str]] = &[&["datapath", "dispatch", "reactor", "snapshot"]];

/// The non-test code of a file.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source");
    text.split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or("")
        .to_string()
}

/// Module → modules it names, from the non-test code of each file; a folder (`backend/`)
/// is one module with all of its files.
fn dependencies(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut deps = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("engine/src") {
        let path = entry.expect("entry").path();
        let Some(module) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let code = if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(&path)
                .expect("module folder")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("rs"))
                .collect();
            files.sort();
            files
                .iter()
                .map(|f| code_of(f))
                .collect::<Vec<_>>()
                .join("\n")
        } else if path.extension().and_then(|e| e.to_str()) == Some("rs") && module != "lib" {
            code_of(&path)
        } else {
            continue;
        };
        let mut named = BTreeSet::new();
        for line in code.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                let rest = &line[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    named.insert(name);
                }
            }
        }
        deps.insert(module.to_string(), named);
    }
    // Names that are not modules (items re-exported at the crate root) are no edges.
    let modules: BTreeSet<String> = deps.keys().cloned().collect();
    for named in deps.values_mut() {
        named.retain(|m| modules.contains(m));
    }
    deps
}

/// The strongly connected groups of more than one module (Tarjan's algorithm).
fn cycles(deps: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    struct State<'a> {
        deps: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: BTreeSet<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.deps[v] {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                group.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                s.out.insert(group);
            }
        }
    }
    let mut s = State {
        deps,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: BTreeSet::new(),
    };
    for v in deps.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn engine_modules_form_no_cycle_beyond_the_known_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let deps = dependencies(&src);
    assert!(deps.len() > 10, "read the modules: {deps:?}");
    let found = cycles(&deps);
    let known: BTreeSet<Vec<String>> = KNOWN
        .iter()
        .map(|g| g.iter().map(|m| m.to_string()).collect())
        .collect();
    assert_eq!(
        found, known,
        "module cycles in engine/src changed; dependencies: {deps:#?}"
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle_and_nothing_else() {
    let deps: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
        ("e", vec![]),
    ]
    .into_iter()
    .map(|(m, to)| (m.into(), to.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        cycles(&deps),
        BTreeSet::from([vec!["a".to_string(), "b".into(), "c".into()]])
    );
}
