//! Tests that need something a machine may lack (root, cgroup v2, `setpriv`, `protoc`,
//! `promtool`, Chromium, `tmux`, PostgreSQL, `lintian`, `rpm`, ...) call [`skip`] when it is
//! missing and return. It prints `SKIPPED <test>: needs <what>` to stderr, where `cargo test`
//! shows it, or panics under the strict switch, so CI cannot pass by skipping.
//!
//! The switch is `WATTD_TEST_STRICT=1`; `WATTD_REQUIRE_CGROUPS` (its older name) is accepted as
//! an alias. Either set to anything but empty or `0` turns every skip into a failure.

/// The variable that turns skips into failures.
pub const STRICT_VAR: &str = "WATTD_TEST_STRICT";
/// Its older name, still honoured.
pub const STRICT_ALIAS: &str = "WATTD_REQUIRE_CGROUPS";

fn set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty() && v != "0")
}

/// True when skipping is forbidden.
pub fn strict() -> bool {
    set(STRICT_VAR) || set(STRICT_ALIAS)
}

/// Says loudly that `test` cannot run here because it needs `what`; under the strict switch
/// this is a failure instead. Call it and return.
///
/// # Panics
/// When [`strict`] is true.
pub fn skip(test: &str, what: impl std::fmt::Display) {
    if strict() {
        panic!("{test}: needs {what}, and {STRICT_VAR} (or {STRICT_ALIAS}) forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs {what} (set {STRICT_VAR}=1 to fail instead)");
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program` on `PATH` (or `None`).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|c| c.is_file())
}
