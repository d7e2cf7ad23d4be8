//! The shape rules of the tree, checked rather than hoped for (issue 21):
//! - no two modules of a crate import each other (one `.rs` file is one
//!   module; a parent using its own child, the facade pattern
//!   `mod rocks; pub use rocks::RocksStore;`, is not a cycle);
//! - no function is longer than 150 lines unless the comment block above it
//!   says why, with the words "long because".
//!
//! Both read the sources with a small lexer that blanks out comments and
//! string literals, so braces and paths inside them do not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FN_LINES: usize = 150;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments and the contents of string and char literals
/// replaced by spaces; newlines are kept so line numbers still match.
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if (c == 'r' || (c == 'b' && next == Some('r')))
            && !prev_is_ident(&b, i)
            && raw_string_start(&b, i + usize::from(c == 'b') + 1).is_some()
        {
            let start = i + usize::from(c == 'b') + 1;
            let hashes = raw_string_start(&b, start).unwrap_or(0);
            // r, ###, opening quote
            let open = start + hashes + 1;
            for _ in i..open {
                out.push(' ');
            }
            i = open;
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == '"' && (1..=hashes).all(|k| b.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(b[i]));
                i += 1;
            }
        } else if c == '"' || (c == '\'' && is_char_literal(&b, i)) {
            i = blank_quoted(&b, i, &mut out);
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Blanks the literal opening with the quote at `i` (escapes included, newlines
/// kept) and returns the index just past its closing quote.
fn blank_quoted(b: &[char], mut i: usize, out: &mut String) -> usize {
    let quote = b[i];
    out.push(' ');
    i += 1;
    while i < b.len() && b[i] != quote {
        if b[i] == '\\' {
            out.push(' ');
            i += 1;
        }
        if i < b.len() {
            out.push(if b[i] == '\n' { '\n' } else { ' ' });
            i += 1;
        }
    }
    out.push(' ');
    i + 1
}

fn prev_is_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// At `i` (just after `r`): `#`s followed by `"` start a raw string.
fn raw_string_start(b: &[char], i: usize) -> Option<usize> {
    let hashes = b[i..].iter().take_while(|&&c| c == '#').count();
    (b.get(i + hashes) == Some(&'"')).then_some(hashes)
}

/// `'x'`, `'\n'`, `'\u{..}'` are char literals; `'a` in `&'a str` is a lifetime.
fn is_char_literal(b: &[char], i: usize) -> bool {
    match b.get(i + 1) {
        Some('\\') => true,
        Some(_) => b.get(i + 2) == Some(&'\''),
        None => false,
    }
}

/// The module path of a file inside a crate's source directory:
/// `store/mod.rs` → `store`, `store/rocks.rs` → `store::rocks`, `lib.rs` → ``.
fn module_path(src_dir: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src_dir).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// What a module's non-test code names through `crate::` and `super::`.
fn imports(module: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    // Test modules may reach anywhere; only the shipped code's shape counts.
    let code = code.split("#[cfg(test)]").next().unwrap_or("");
    let here: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    let mut found = BTreeSet::new();
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.contains("::"))
        .collect();
    for w in words {
        let segs: Vec<&str> = w.split("::").filter(|s| !s.is_empty()).collect();
        let target: Vec<&str> = match segs.first() {
            Some(&"crate") => segs[1..].to_vec(),
            Some(&"super") => {
                let ups = segs.iter().take_while(|s| **s == "super").count();
                let keep = here.len().saturating_sub(ups);
                here[..keep]
                    .iter()
                    .copied()
                    .chain(segs[ups..].iter().copied())
                    .collect()
            }
            _ => continue,
        };
        // The longest prefix that is a module of this crate.
        for k in (0..=target.len()).rev() {
            let cand = target[..k].join("::");
            if modules.contains(&cand) {
                if cand != module {
                    found.insert(cand);
                }
                break;
            }
        }
    }
    found
}

fn is_ancestor(a: &str, b: &str) -> bool {
    a.is_empty() || b.starts_with(&format!("{a}::"))
}

fn crate_source_dirs() -> Vec<PathBuf> {
    let r = root();
    let mut dirs = vec![r.join("src"), r.join("loadtest/src"), r.join("fuzz/src")];
    if let Ok(entries) = std::fs::read_dir(r.join("crates")) {
        for e in entries.flatten() {
            dirs.push(e.path().join("src"));
        }
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
}

fn import_cycles(src_dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    let code: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            (module_path(src_dir, f), code_only(&text))
        })
        .collect();
    let modules: BTreeSet<String> = code.keys().cloned().collect();
    let graph: BTreeMap<&String, BTreeSet<String>> = code
        .iter()
        .map(|(m, c)| (m, imports(m, c, &modules)))
        .collect();
    let mut cycles = Vec::new();
    for (a, deps) in &graph {
        for b in deps {
            let back = graph.get(b).is_some_and(|d| d.contains(*a));
            if a.as_str() < b.as_str() && back && !is_ancestor(a, b) && !is_ancestor(b, a) {
                cycles.push(format!("{}: {a} <-> {b}", src_dir.display()));
            }
        }
    }
    cycles
}

/// Functions longer than the limit, as (first line, name, length).
fn long_functions(text: &str) -> Vec<(usize, String, usize)> {
    let code = code_only(text);
    let lines: Vec<&str> = text.lines().collect();
    let code_lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (i, line) in code_lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let mut depth = 0i32;
        let mut opened = false;
        let mut end = None;
        'scan: for (j, l) in code_lines.iter().enumerate().skip(i) {
            for ch in l.chars() {
                match ch {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened => break 'scan,
                    _ => {}
                }
                if opened && depth == 0 {
                    end = Some(j);
                    break 'scan;
                }
            }
        }
        let Some(end) = end else { continue };
        let len = end - i + 1;
        if len > MAX_FN_LINES && !reason_above(&lines, i) {
            found.push((i + 1, name, len));
        }
    }
    found
}

/// `fn name` on this line of code (not `fn(` types, not `Fn` bounds).
fn fn_name(line: &str) -> Option<String> {
    let mut rest = line;
    while let Some(pos) = rest.find("fn ") {
        let before_ok = pos == 0 || {
            let c = rest.as_bytes()[pos - 1] as char;
            !(c.is_alphanumeric() || c == '_')
        };
        let after = &rest[pos + 3..];
        let name: String = after
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if before_ok && !name.is_empty() {
            return Some(name);
        }
        rest = after;
    }
    None
}

/// Whether the comments and attributes right above line `i` say why the
/// function is long.
fn reason_above(lines: &[&str], i: usize) -> bool {
    lines[..i]
        .iter()
        .rev()
        .map(|l| l.trim())
        .take_while(|l| l.starts_with("//") || l.starts_with("#["))
        .any(|l| l.to_ascii_lowercase().contains("long because"))
}

#[test]
fn no_two_modules_import_each_other() {
    let mut cycles = Vec::new();
    for dir in crate_source_dirs() {
        cycles.extend(import_cycles(&dir));
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other (move what both need into a third module):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn no_function_is_over_150_lines_without_a_reason() {
    let r = root();
    let mut files = Vec::new();
    for d in ["src", "crates", "tests", "loadtest", "fuzz"] {
        rust_files(&r.join(d), &mut files);
    }
    files.push(r.join("build.rs"));
    let mut long = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (line, name, len) in long_functions(&text) {
            let rel = f.strip_prefix(&r).unwrap().display().to_string();
            long.push(format!("{rel}:{line} fn {name}: {len} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines: split them, or say in a comment above \
         why one must stay long (\"long because …\"):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_lexer_ignores_braces_in_strings_and_comments() {
    let src = "fn a() {\n let s = \"}}\"; // }\n let r = r#\"{ \"# ; let c = '{';\n}\nfn b<'x>(v: &'x str) {}\n";
    let code = code_only(src);
    assert_eq!(code.lines().count(), src.lines().count());
    assert_eq!(code.matches('{').count(), 2, "{code}");
    assert_eq!(code.matches('}').count(), 2, "{code}");
    let long = "fn big() {\n".to_string() + &"    x();\n".repeat(160) + "}\n";
    assert_eq!(long_functions(&long).len(), 1);
    let excused = "// Long because: one scenario, one browser.\n".to_string() + &long;
    assert!(long_functions(&excused).is_empty());
}

#[test]
fn a_cycle_is_found_and_a_facade_is_not() {
    let modules: BTreeSet<String> = ["", "a", "b", "store", "store::rocks"]
        .into_iter()
        .map(String::from)
        .collect();
    assert!(imports("a", "use crate::b::X;", &modules).contains("b"));
    assert!(imports("store::rocks", "use super::Store;", &modules).contains("store"));
    let commented = code_only("// crate::b\nlet s = \"crate::b\";");
    assert!(imports("a", &commented, &modules).is_empty());
    assert!(is_ancestor("store", "store::rocks"));
    assert!(!is_ancestor("store", "storehouse"));
}
