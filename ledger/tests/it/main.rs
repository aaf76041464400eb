//! The ledger's integration tests (one binary): the suite against both stores over real TLS,
//! and the real `wattd-ledger` binary (several processes on one PostgreSQL, SIGKILL, CLI).

mod common;
mod procs;
mod python;
mod query;
mod suite;
