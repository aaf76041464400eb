//! The `wattd` agent as a library: the modules the binary (`src/main.rs`) wires together, exposed
//! so integration tests and benchmarks can drive them directly.
pub mod attribution;
pub mod batch;
pub mod config;
pub mod control;
pub mod daemon;
pub mod durable;
pub mod energy_table;
pub mod gpu;
pub mod identity;
pub mod metrics;
pub mod records;
pub mod sampler;
pub mod sealer;
pub mod shipper;
pub mod spool;
pub mod verify;
