//! `wattd-ledger`: the reference receiver of wattd batches. It accepts one gRPC stream per node
//! over mutual TLS, verifies every batch and heartbeat (signature, key, node id against the
//! client certificate, chain, sequence, conservation), stores each batch once (SQLite or
//! PostgreSQL), acknowledges only what is committed, and answers `runs` and `nodes` queries.
//!
//! Map: [`enrol`] (who may talk), [`check`] (is a message authentic and sound), [`store`]
//! (durable, deduplicated, chained storage behind one trait), [`session`] (one node stream's
//! state machine: commit, hold, duplicate, fork), [`service`] (the tonic `Ledger` service),
//! [`server`] (TLS, limits, accept loops, shutdown), [`metrics`] (counters), [`query`] (`runs`,
//! `nodes`), [`readers`] and [`query_api`] (the read side: roles, the `Query` gRPC service, the
//! read audit).

#![forbid(unsafe_code)]

pub mod audit;
pub mod check;
pub mod crl;
pub mod enrol;
pub mod events;
pub mod lost;
pub mod metrics;
pub mod plausible;
pub mod query;
pub mod query_api;
pub mod readers;
pub mod server;
pub mod service;
pub mod session;
pub mod store;

use metrics::Reason;

/// Why a stream (or a message on it) was refused. Every variant names the node and, where there
/// is one, the seq; [`Rejection::code`] is the gRPC status the node receives and
/// [`Rejection::reason`] the counter it is counted under.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("client certificate has no usable node id: {0}")]
    NoNodeId(String),
    #[error("node {node:?} (client certificate CN) is not enrolled")]
    Unenrolled { node: String },
    #[error("node {node:?}: enrolment revoked: {detail}")]
    Revoked { node: String, detail: String },
    #[error("node {node:?}: client certificate expired at {not_after} (Unix seconds); reconnect with a renewed one")]
    CertificateExpired { node: String, not_after: i64 },
    #[error("{what} claims node {claimed:?} but the client certificate is for node {cert_node:?}")]
    NodeMismatch {
        cert_node: String,
        claimed: String,
        what: String,
    },
    #[error("node {node:?}: malformed message: {detail}")]
    Malformed { node: String, detail: String },
    #[error("node {node:?}: {what}: unknown key: {detail}")]
    UnknownKey {
        node: String,
        what: String,
        detail: String,
    },
    #[error("node {node:?}: batch seq {seq}: wrong key for this point of the chain: {detail}")]
    StaleKey {
        node: String,
        seq: u64,
        detail: String,
    },
    #[error("node {node:?}: {what}: signature does not verify (modified or forged)")]
    BadSignature { node: String, what: String },
    #[error(
        "node {node:?}: batch seq {seq}: format_version {version} is not supported (this ledger \
         reads {})",
        wattd_records::batch::FORMAT_VERSION
    )]
    UnsupportedFormat {
        node: String,
        seq: u64,
        version: u32,
    },
    #[error("node {node:?}: batch seq {seq}: bad key rotation: {detail}")]
    BadRotation {
        node: String,
        seq: u64,
        detail: String,
    },
    #[error("node {node:?}: batch seq {seq}: conservation broken: {detail}")]
    Conservation {
        node: String,
        seq: u64,
        detail: String,
    },
    #[error("node {node:?}: batch seq {seq}: chain break: {detail}")]
    ChainBreak {
        node: String,
        seq: u64,
        detail: String,
    },
    #[error(
        "node {node:?}: batch seq {seq}: fork: a different batch with this seq is {where_} \
         (sha256 {stored}..., received {received}...); recorded"
    )]
    Fork {
        node: String,
        seq: u64,
        where_: &'static str,
        stored: String,
        received: String,
    },
    #[error("message too large: {0}")]
    Oversized(String),
    #[error(
        "node {node:?}: {held} batches already held above missing seq {missing_from} (limit \
         {limit}, {held_bytes} bytes); send seq {missing_from} first"
    )]
    HeldLimit {
        node: String,
        missing_from: u64,
        held: usize,
        held_bytes: usize,
        limit: usize,
    },
    #[error("node {node:?}: already {limit} open stream(s), the most allowed per node")]
    StreamsLimit { node: String, limit: usize },
    #[error("store unavailable: {0}")]
    Store(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the ledger is shutting down; reconnect")]
    ShuttingDown,
}

impl Rejection {
    /// The gRPC status code the node receives.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::NoNodeId(_)
            | Self::Unenrolled { .. }
            | Self::Revoked { .. }
            | Self::NodeMismatch { .. } => Code::PermissionDenied,
            Self::UnknownKey { .. }
            | Self::StaleKey { .. }
            | Self::BadSignature { .. }
            | Self::CertificateExpired { .. } => Code::Unauthenticated,
            Self::Malformed { .. } | Self::BadRotation { .. } | Self::Conservation { .. } => {
                Code::InvalidArgument
            }
            Self::UnsupportedFormat { .. } | Self::ChainBreak { .. } => Code::FailedPrecondition,
            Self::Fork { .. } => Code::AlreadyExists,
            Self::Oversized(_) | Self::HeldLimit { .. } | Self::StreamsLimit { .. } => {
                Code::ResourceExhausted
            }
            Self::Store(_) | Self::ShuttingDown => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The counter (and `wattd-reason` status metadata) this rejection is counted under.
    pub fn reason(&self) -> Reason {
        match self {
            Self::NoNodeId(_) => Reason::NoNodeId,
            Self::Unenrolled { .. } => Reason::Unenrolled,
            Self::Revoked { .. } => Reason::Revoked,
            Self::CertificateExpired { .. } => Reason::CertificateExpired,
            Self::NodeMismatch { .. } => Reason::NodeMismatch,
            Self::Malformed { .. } => Reason::Malformed,
            Self::UnknownKey { .. } => Reason::UnknownKey,
            Self::StaleKey { .. } => Reason::StaleKey,
            Self::BadSignature { .. } => Reason::BadSignature,
            Self::UnsupportedFormat { .. } => Reason::UnsupportedFormat,
            Self::BadRotation { .. } => Reason::BadRotation,
            Self::Conservation { .. } => Reason::Conservation,
            Self::ChainBreak { .. } => Reason::ChainBreak,
            Self::Fork { .. } => Reason::Fork,
            Self::Oversized(_) => Reason::Oversized,
            Self::HeldLimit { .. } => Reason::HeldLimit,
            Self::StreamsLimit { .. } => Reason::StreamsLimit,
            Self::Store(_) => Reason::Store,
            Self::Internal(_) => Reason::Internal,
            Self::ShuttingDown => Reason::ShuttingDown,
        }
    }

    /// The status sent to the node: the code, the message, and `wattd-reason: <reason>`.
    pub fn to_status(&self) -> tonic::Status {
        let mut meta = tonic::metadata::MetadataMap::new();
        meta.insert(
            "wattd-reason",
            tonic::metadata::MetadataValue::from_static(self.reason().as_str()),
        );
        tonic::Status::with_metadata(self.code(), self.to_string(), meta)
    }
}

/// Nanoseconds since the Unix epoch now (0 if the clock is before 1970, i64::MAX past 2262).
pub fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
