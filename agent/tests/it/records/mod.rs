//! Integration tests of the record pipeline (identity, sealer, spool, verify, CLI): one test
//! binary, one module per concern.

mod bad_input;
mod cli;
pub(crate) mod common;
mod eio;
mod every_fault;
mod faults;
mod model;
mod reader;
mod small;
mod sweep;
mod tamper;
mod totals;
