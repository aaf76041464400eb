//! Test support shared by every crate of the workspace. No workspace crate is a dependency, so
//! the collectors' own tests can use it too.
//!
//! - [`need`]: one way for a test to say it cannot run here (`SKIPPED <test>: needs <what>`),
//!   which the strict switch (`WATTD_TEST_STRICT=1`, set by `.ci/run`) turns into a failure.
//! - [`host_fixture`]: the captured host trees kept in the repository
//!   (`collectors/testdata/hosts/`); nothing outside the repository is ever read.
//! - [`cgroups`]: real cgroup v2 directories with real processes, always cleaned up.
//! - [`fds`]: counts only the descriptors that point at something a test owns, never the whole
//!   test process (other tests of the same binary open and close descriptors concurrently).
//! - [`golden`]: golden files of what users see, rewritten with `WATTD_UPDATE_GOLDEN=1`.

pub mod cgroups;
pub mod fds;
pub mod golden;
pub mod need;

pub use need::{is_root, skip, strict};

use std::path::{Path, PathBuf};

/// A captured host tree from `collectors/testdata/hosts/<name>` (see the `SOURCES.md` there).
/// Panics if it is missing: the trees are part of the repository, so that is a broken checkout,
/// never a reason to skip.
pub fn host_fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../collectors/testdata/hosts")
        .join(name);
    assert!(
        p.exists(),
        "fixture {} is missing from the repository (collectors/testdata/hosts/SOURCES.md lists them)",
        p.display()
    );
    p
}
