//! The agent's integration tests, one binary: the CLI contract, the control socket, the metrics endpoint, systemd's notifications, GPUs on recorded NVML sequences, and the record pipeline (identity, sealer, spool, verify).

// Helpers outside #[test] functions are test code too: a panic is how they report a failure.
#![allow(clippy::unwrap_used)]

mod cli;
mod control;
mod gpu;
mod metrics;
mod notify;
mod records;
mod shipper;
