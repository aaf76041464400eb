//! The agent's integration tests, one binary: the CLI contract and the control socket.

// Helpers outside #[test] functions are test code too: a panic is how they report a failure.
#![allow(clippy::unwrap_used)]

mod cli;
mod control;
