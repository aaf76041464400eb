//! `wattd-proto`: the wire contract (`wattd.ledger.v1`). Empty until the records issue adds the
//! .proto files and their checked-in generated Rust; the crate exists so the workspace has the
//! layout of the design brief from the start.
