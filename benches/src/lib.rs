//! Shared helpers for the criterion benchmarks under `benches/`.

#![forbid(unsafe_code)]
