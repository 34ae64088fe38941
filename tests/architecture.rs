//! The layout stays readable: no module of the library depends on a module
//! that depends back on it, and no source file grows past a screenful of
//! screens. Read from the source files themselves: no database needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files allowed to be longer than [`MAX_LINES`]: the SQL lexer, which is
/// one state machine with its tests.
const LONG_FILES: &[&str] = &["source/sql.rs"];
const MAX_LINES: usize = 700;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, as paths relative to `src/`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.strip_prefix(src()).unwrap().to_path_buf());
        }
    }
}

/// The module path of a library file (`deferred/mod.rs` -> `deferred`,
/// `deferred/leader.rs` -> `deferred::leader`); `None` for `lib.rs` and the
/// binaries.
fn module_of(file: &Path) -> Option<String> {
    if file.starts_with("bin") || file == Path::new("lib.rs") {
        return None;
    }
    let mut parts: Vec<String> = file
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    Some(parts.join("::"))
}

/// The code of a file without comments and string literals, so only real
/// paths are read.
fn code_only(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut in_str = false;
        let mut prev = ' ';
        for c in line.chars() {
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                out.push(c);
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// The modules a file uses: every `crate::a::b` path (in `use` lines and
/// inline), and `super::` / `self::` paths, resolved to the longest module
/// that exists.
fn dependencies(module: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    for (prefix, base) in [("crate::", ""), ("super::", parent), ("self::", module)] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let preceded = rest[..i].chars().last().is_some_and(is_ident);
            rest = &rest[i + prefix.len()..];
            if preceded {
                continue;
            }
            let path: String = rest
                .chars()
                .take_while(|c| is_ident(*c) || *c == ':' || *c == '{')
                .collect();
            let mut target = base.to_string();
            let mut best = None;
            for part in path.split("::").map(|p| p.trim_matches('{')) {
                if part.is_empty() {
                    break;
                }
                target = if target.is_empty() {
                    part.to_string()
                } else {
                    format!("{target}::{part}")
                };
                if modules.contains(&target) {
                    best = Some(target.clone());
                }
            }
            if let Some(dep) = best {
                if dep != module {
                    deps.insert(dep);
                }
            }
        }
    }
    deps
}

#[test]
fn no_module_depends_on_a_module_that_depends_back_on_it() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    assert!(modules.contains("migrator") && modules.contains("deferred"));
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(module) = module_of(f) else { continue };
        let code = code_only(&std::fs::read_to_string(src().join(f)).unwrap());
        graph.insert(module.clone(), dependencies(&module, &code, &modules));
    }
    // A cycle is a path from a module back to itself.
    let mut cycles = Vec::new();
    for start in graph.keys() {
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == start {
                    cycles.push(format!("{} -> {start}", path.join(" -> ")));
                } else if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles (each module must depend one way):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn no_source_file_is_longer_than_a_few_screens() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|f| !LONG_FILES.contains(&f.to_string_lossy().as_ref()))
        .filter_map(|f| {
            let n = std::fs::read_to_string(src().join(f))
                .unwrap()
                .lines()
                .count();
            (n > MAX_LINES).then(|| format!("src/{} has {n} lines", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "split these files by concern (at most {MAX_LINES} lines):\n{}",
        long.join("\n")
    );
}
