//! Golden files: what users see (the `/metrics` text, `wattd validate`'s report) kept in the
//! repository, so that any change to it is a reviewed diff. A test renders the text and calls
//! [`check`]; with `WATTD_UPDATE_GOLDEN=1` the file is rewritten instead (then review and commit
//! the diff, as with rust-analyzer's `expect` tests).

use std::path::Path;

/// The environment variable that rewrites golden files instead of comparing.
pub const UPDATE: &str = "WATTD_UPDATE_GOLDEN";

/// Compares `actual` with the file at `path` (relative to the calling crate's manifest dir when
/// relative), or rewrites the file when [`UPDATE`] is `1`. Panics naming the first line that
/// differs, both versions of it, and the command to accept the change.
pub fn check(manifest_dir: &str, path: &str, actual: &str) {
    let file = Path::new(manifest_dir).join(path);
    if std::env::var(UPDATE).as_deref() == Ok("1") {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
        std::fs::write(&file, actual).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        return;
    }
    let expected = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "golden file {}: {e} (create it with {UPDATE}=1 and review it)",
            file.display()
        )
    });
    if expected == actual {
        return;
    }
    let (mut e, mut a) = (expected.lines(), actual.lines());
    let mut n = 1;
    loop {
        match (e.next(), a.next()) {
            (Some(x), Some(y)) if x == y => n += 1,
            (x, y) => panic!(
                "{} differs from line {n}:\n  expected: {}\n  actual:   {}\n\
                 If the change is intended, rerun with {UPDATE}=1 and review the diff.\n\
                 --- actual ---\n{actual}",
                file.display(),
                x.unwrap_or("<end of file>"),
                y.unwrap_or("<end of text>"),
            ),
        }
    }
}
