//! The `wattd` agent as a library: the modules the binary (`src/main.rs`) wires together, exposed
//! so integration tests and benchmarks can drive them directly.
pub mod attribution;
pub mod bmc;
// The records crate's modules, under the paths the agent has always used.
pub use wattd_records::{batch, durable, energy_table, identity, verify};
pub mod config;
pub mod control;
pub mod daemon;
pub mod gpu;
pub mod metrics;
pub mod platform;
pub mod records;
pub mod resident;
pub mod sampler;
pub mod schema;
pub mod sealer;
pub mod shipper;
pub mod spool;
