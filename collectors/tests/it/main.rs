//! The one integration-test binary of `wattd-collectors`: tests that need real host objects
//! (cgroups with processes in them) or generated host trees read end to end.

// Helpers outside #[test] functions are test code too: a panic is how they report a failure.
#![allow(clippy::unwrap_used)]

mod amd_smi;
mod cgroup;
mod hwmon;
mod sources;
mod trace;
