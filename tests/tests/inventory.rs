//! The `unsafe` inventory: how many `unsafe` blocks, functions and impls each workspace crate
//! has, counted from its source, must equal the table in ARCHITECTURE.md (between the
//! `unsafe-inventory` markers). A new `unsafe` is then a reviewed change to that table; that each
//! one carries a `// SAFETY:` comment is clippy's `undocumented_unsafe_blocks` (denied for the
//! workspace). A crate whose `src/` has none must say `#![forbid(unsafe_code)]` in every crate
//! root there, so it keeps none.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The workspace members, from the root manifest.
fn members(root: &Path) -> Vec<String> {
    let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    let doc: toml::Table = manifest.parse().expect("root Cargo.toml is TOML");
    doc["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .map(|m| m.as_str().expect("member is a string").to_string())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.map(|e| e.expect("readdir").path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Rust source with comments, string and character literals blanked out (lengths and line
/// breaks kept), so that only code is left to search.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == b'r'
            && (next == Some(b'"') || next == Some(b'#'))
            && (i == 0 || !is_ident(b[i - 1]))
        {
            // A raw string r"..." or r#"..."# (r#ident is a raw identifier: no quote follows).
            let mut j = i + 1;
            while j < b.len() && b[j] == b'#' {
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            let mut k = j + 1;
            loop {
                if k >= b.len() {
                    break;
                }
                if b[k] == b'"'
                    && b[k + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == b'#')
                        .count()
                        == hashes
                {
                    k += 1 + hashes;
                    break;
                }
                k += 1;
            }
            out.extend(b[i..k].iter().map(|&c| blank(c)));
            i = k;
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): a lifetime has no
            // closing quote right after its first character.
            let close = if next == Some(b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                // A multi-byte character between quotes.
                std::str::from_utf8(&b[i + 1..(i + 6).min(b.len())])
                    .ok()
                    .or_else(|| std::str::from_utf8(&b[i + 1..(i + 5).min(b.len())]).ok())
                    .and_then(|s| s.chars().next())
                    .filter(|ch| ch.len_utf8() > 1 && b.get(i + 1 + ch.len_utf8()) == Some(&b'\''))
                    .map(|ch| i + 1 + ch.len_utf8())
            };
            match close {
                Some(end) => {
                    out.extend(b[i..=end].iter().map(|&c| blank(c)));
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// How often the keyword `unsafe` stands in this code (not `unsafe_code` or `is_unsafe`).
fn count_unsafe(code: &str) -> usize {
    let b = code.as_bytes();
    code.match_indices("unsafe")
        .filter(|&(at, w)| {
            let before = at.checked_sub(1).map(|p| b[p]);
            let after = b.get(at + w.len()).copied();
            !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
        })
        .count()
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Count {
    src: usize,
    tests: usize,
}

fn counted(root: &Path, member: &str) -> (Count, Vec<String>) {
    let dir = root.join(member);
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let mut count = Count::default();
    let mut seen = Vec::new();
    for f in files {
        let src = fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let n = count_unsafe(&code_only(&src));
        let rel = f.strip_prefix(&dir).expect("under the member");
        if rel.starts_with("src") {
            count.src += n;
        } else {
            count.tests += n;
        }
        if n > 0 {
            seen.push(format!("{member}/{}: {n}", rel.display()));
        }
    }
    (count, seen)
}

/// The table in ARCHITECTURE.md: `| member/ | src | tests and benches |` rows.
fn documented(root: &Path) -> BTreeMap<String, Count> {
    let arch = fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let begin = arch
        .find("<!-- unsafe-inventory: begin -->")
        .expect("ARCHITECTURE.md has the unsafe-inventory table");
    let end = arch[begin..]
        .find("<!-- unsafe-inventory: end -->")
        .expect("the table's end marker")
        + begin;
    let mut table = BTreeMap::new();
    for line in arch[begin..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 || !cells[1].starts_with('`') {
            continue;
        }
        let member = cells[1].trim_matches('`').trim_end_matches('/').to_string();
        let num = |s: &str| {
            s.parse::<usize>().unwrap_or_else(|_| {
                panic!("ARCHITECTURE.md: count {s:?} for {member} is not a number")
            })
        };
        table.insert(
            member.clone(),
            Count {
                src: num(cells[2]),
                tests: num(cells[3]),
            },
        );
    }
    table
}

#[test]
fn every_unsafe_is_in_the_architecture_table() {
    let root = workspace_root();
    let table = documented(&root);
    let mut wrong = Vec::new();
    for member in members(&root) {
        let (count, seen) = counted(&root, &member);
        match table.get(&member) {
            Some(doc) if *doc == count => {}
            Some(doc) => wrong.push(format!(
                "{member}: the source has {} in src/ and {} in tests and benches, the table says \
                 {} and {} (files: {seen:?})",
                count.src, count.tests, doc.src, doc.tests
            )),
            None => wrong.push(format!(
                "{member}: no row in the table ({count:?}, {seen:?})"
            )),
        }
    }
    for member in table.keys() {
        if !members(&root).contains(member) {
            wrong.push(format!("{member}: a row for no workspace member"));
        }
    }
    assert!(
        wrong.is_empty(),
        "the unsafe inventory in ARCHITECTURE.md is out of date; review each new unsafe, then \
         update the table:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn a_crate_without_unsafe_forbids_it() {
    let root = workspace_root();
    let mut missing = Vec::new();
    let mut forbidding = 0;
    for member in members(&root) {
        let (count, _) = counted(&root, &member);
        if count.src != 0 {
            continue;
        }
        let src = root.join(&member).join("src");
        let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
            .iter()
            .map(|f| src.join(f))
            .filter(|p| p.exists())
            .collect();
        if let Ok(bins) = fs::read_dir(src.join("bin")) {
            roots.extend(bins.map(|e| e.expect("readdir").path()));
        }
        for r in roots {
            let text = fs::read_to_string(&r).expect("crate root");
            if text.lines().any(|l| l.trim() == "#![forbid(unsafe_code)]") {
                forbidding += 1;
            } else {
                missing.push(
                    r.strip_prefix(&root)
                        .expect("in root")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    assert!(
        missing.is_empty(),
        "crate roots of crates without unsafe that do not forbid it: {missing:?}"
    );
    assert!(
        forbidding > 0,
        "no crate forbids unsafe code: the scan found no crate root"
    );
}

#[test]
fn the_scanner_sees_code_and_not_comments_or_strings() {
    let src = r####"
        // unsafe in a comment
        /* unsafe /* nested unsafe */ still comment unsafe */
        let a = "unsafe in a string \" unsafe";
        let b = r#"unsafe "raw" unsafe"#;
        let c = 'u'; let d: &'static str = "x"; let e = '\'';
        #![forbid(unsafe_code)]
        fn is_unsafe() {}
        let f = unsafe { g() };
        unsafe fn h() {}
        unsafe impl Send for X {}
        let i = 'é'; unsafe {}
    "####;
    assert_eq!(count_unsafe(&code_only(src)), 4);
    assert_eq!(code_only(src).len(), src.len());
    assert_eq!(code_only(src).lines().count(), src.lines().count());
}
