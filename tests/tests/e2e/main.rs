//! End-to-end tests across crates: the real `wattd` binary on the simulated host, with real
//! cgroups and real processes in them.

// Helpers outside #[test] functions are test code too: a panic is how they report a failure.
#![allow(clippy::unwrap_used)]

mod calibrate;
mod failover;
mod faults;
mod harness;
mod kill;
mod ledger;
mod packages;
mod release;
mod reload;
mod report;
mod simhost_attribution;
mod systemd_unit;
mod top;
