//! wattd's records, shared by the agent (which writes them) and every reader, the reference
//! ledger among them (which must not compile the agent): the batch and its chain hash, the
//! spool's segments read-only, signing and verifying, the node's keys, durable file writes and
//! the per-run energy table.
pub mod batch;
pub mod durable;
pub mod energy_table;
pub mod error;
pub mod identity;
pub mod loss;
pub mod seal;
pub mod segment;
pub mod totals;
pub mod verify;

pub use error::{Error, Result};
