//! `wattd-ledger`: the reference receiver (verify, dedupe, store, query). Empty until the ledger
//! issue builds it; the crate exists so the workspace has the layout of the design brief.
