//! The ledger's counters, rendered in the Prometheus text format and served on
//! `--metrics-listen` by a bounded `/metrics` endpoint on hyper
//! ([`wattd_web::MetricsEndpoint`]). Labels are bounded: `reason` takes the values of
//! [`Reason`] only; nothing is labelled by node (a fleet would make that unbounded).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use wattd_web::exposition::Writer;

use crate::plausible::Implausible;

/// Why a connection, stream or message was refused: the `reason` label of
/// `wattd_ledger_rejections_total`, and the `wattd-reason` metadata of the error status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    NoNodeId,
    Unenrolled,
    Revoked,
    CertificateExpired,
    NodeMismatch,
    Malformed,
    UnknownKey,
    StaleKey,
    BadSignature,
    UnsupportedFormat,
    BadRotation,
    Conservation,
    ChainBreak,
    Fork,
    Oversized,
    HeldLimit,
    StreamsLimit,
    Store,
    Internal,
    ShuttingDown,
}

impl Reason {
    pub const ALL: [Reason; 20] = [
        Reason::NoNodeId,
        Reason::Unenrolled,
        Reason::Revoked,
        Reason::CertificateExpired,
        Reason::NodeMismatch,
        Reason::Malformed,
        Reason::UnknownKey,
        Reason::StaleKey,
        Reason::BadSignature,
        Reason::UnsupportedFormat,
        Reason::BadRotation,
        Reason::Conservation,
        Reason::ChainBreak,
        Reason::Fork,
        Reason::Oversized,
        Reason::HeldLimit,
        Reason::StreamsLimit,
        Reason::Store,
        Reason::Internal,
        Reason::ShuttingDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoNodeId => "no_node_id",
            Reason::Unenrolled => "unenrolled_node",
            Reason::Revoked => "revoked",
            Reason::CertificateExpired => "certificate_expired",
            Reason::NodeMismatch => "node_mismatch",
            Reason::Malformed => "malformed",
            Reason::UnknownKey => "unknown_key",
            Reason::StaleKey => "stale_key",
            Reason::BadSignature => "bad_signature",
            Reason::UnsupportedFormat => "unsupported_format",
            Reason::BadRotation => "bad_rotation",
            Reason::Conservation => "conservation",
            Reason::ChainBreak => "chain_break",
            Reason::Fork => "fork",
            Reason::Oversized => "oversized",
            Reason::HeldLimit => "held_limit",
            Reason::StreamsLimit => "streams_limit",
            Reason::Store => "store_unavailable",
            Reason::Internal => "internal",
            Reason::ShuttingDown => "shutting_down",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Plain counters (and two gauges), updated lock-free from every stream.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_refused_source: AtomicU64,
    pub connections_unenrolled: AtomicU64,
    pub preface_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub connections_open: AtomicU64,
    pub streams: AtomicU64,
    pub streams_open: AtomicU64,
    pub batches_stored: AtomicU64,
    pub intervals_stored: AtomicU64,
    pub allocations_stored: AtomicU64,
    pub batches_duplicate: AtomicU64,
    pub batches_held: AtomicU64,
    pub heartbeats: AtomicU64,
    pub heartbeats_unverified: AtomicU64,
    pub tail_missing: AtomicU64,
    pub lost_ranges: AtomicU64,
    pub lost_batches: AtomicU64,
    pub batches_in_lost_range: AtomicU64,
    pub forks_not_kept: AtomicU64,
    pub heartbeat_regressed: AtomicU64,
    pub rate_limited: AtomicU64,
    pub acks: AtomicU64,
    pub commit_ns_sum: AtomicU64,
    pub commits: AtomicU64,
    pub allocations_quarantined: AtomicU64,
    pub reads: AtomicU64,
    pub reads_refused: AtomicU64,
    pub changes_sent: AtomicU64,
    pub changes_stalled: AtomicU64,
    pub changes_streams_open: AtomicU64,
    pub detail_rows_pruned: AtomicU64,
    pub detail_partitions_dropped: AtomicU64,
    pub detail_upkeep_failures: AtomicU64,
    /// Unix seconds before which batches have no allocation rows (0: none pruned).
    pub detail_from_unix_s: AtomicU64,
    rejections: [AtomicU64; Reason::ALL.len()],
    implausible: [AtomicU64; Implausible::ALL.len()],
    changed: Notify,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// What one round of the detail upkeep did (store/detail.rs).
    pub fn note_detail_upkeep(&self, done: &crate::store::DetailUpkeep) {
        // A refresh of the planner statistics that failed is an upkeep failure too (logged).
        if done.statistics_refreshed == Some(false) {
            self.inc(&self.detail_upkeep_failures);
        }
        self.add(&self.detail_rows_pruned, done.rows_deleted);
        self.add(&self.detail_partitions_dropped, done.partitions_dropped);
        let from_s = done.detail_from_unix_ns.map_or(0, |ns| {
            u64::try_from(ns.div_euclid(1_000_000_000)).unwrap_or(0)
        });
        self.detail_from_unix_s.store(from_s, Ordering::Relaxed);
    }

    /// Adds one to `counter` and wakes the renderer.
    pub fn inc(&self, counter: &AtomicU64) {
        self.add(counter, 1);
    }

    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        self.changed.notify_one();
    }

    pub fn dec(&self, gauge: &AtomicU64) {
        // Saturating: a gauge never wraps below zero.
        let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        self.changed.notify_one();
    }

    pub fn reject(&self, reason: Reason) {
        if let Some(c) = self.rejections.get(reason.index()) {
            self.inc(c);
        }
    }

    /// Counts one implausible interval (or domain of one).
    pub fn implausible(&self, reason: Implausible) {
        if let Some(c) = self.implausible.get(reason.index()) {
            self.inc(c);
        }
    }

    /// Batches and lost ranges this process has stored: the change feed's cue to look.
    pub fn stored_now(&self) -> u64 {
        self.batches_stored.load(Ordering::Relaxed) + self.lost_ranges.load(Ordering::Relaxed)
    }

    pub fn rejections(&self, reason: Reason) -> u64 {
        self.rejections
            .get(reason.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn observe_commit(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.commit_ns_sum.fetch_add(ns, Ordering::Relaxed);
        self.inc(&self.commits);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut w = Writer::with_capacity(8192);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            w.family(name, kind, help);
            w.sample(name, &[], v);
        };
        one(
            "wattd_ledger_connections_total",
            "counter",
            "TCP connections accepted.",
            get(&self.connections),
        );
        one(
            "wattd_ledger_connections_refused_total",
            "counter",
            "TCP connections closed at once because --max-connections were open.",
            get(&self.connections_refused),
        );
        one(
            "wattd_ledger_connections_refused_source_total",
            "counter",
            "Connections closed at accept: their source address had --max-connections-per-source \
             open.",
            get(&self.connections_refused_source),
        );
        one(
            "wattd_ledger_connections_unenrolled_total",
            "counter",
            "Connections refused because the client certificate names no enrolled node: in the \
             TLS handshake (also a failed handshake), or right after it when the enrolment \
             changed in between.",
            get(&self.connections_unenrolled),
        );
        one(
            "wattd_ledger_reads_total",
            "counter",
            "Query API calls answered (RunTotals, RunIntervals, Changes streams opened); each is a \
             row of the read audit.",
            get(&self.reads),
        );
        one(
            "wattd_ledger_reads_refused_total",
            "counter",
            "Query API calls and connections refused: no reader certificate, not in the readers \
             file, another account, a bad cursor or filter, or the store or audit unavailable.",
            get(&self.reads_refused),
        );
        one(
            "wattd_ledger_changes_sent_total",
            "counter",
            "Changes (per batch, run and domain) sent on Changes streams.",
            get(&self.changes_sent),
        );
        one(
            "wattd_ledger_changes_stalled_total",
            "counter",
            "Changes streams dropped because the consumer took no message for 60 s.",
            get(&self.changes_stalled),
        );
        one(
            "wattd_ledger_changes_streams_open",
            "gauge",
            "Changes streams open.",
            get(&self.changes_streams_open),
        );
        one(
            "wattd_ledger_preface_timeouts_total",
            "counter",
            "Connections closed for sending no HTTP/2 preface within --preface-timeout-s.",
            get(&self.preface_timeouts),
        );
        one(
            "wattd_ledger_idle_timeouts_total",
            "counter",
            "Connections closed for having no open stream for --idle-timeout-s.",
            get(&self.idle_timeouts),
        );
        one(
            "wattd_ledger_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed or timed out (no client certificate, unknown CA, ...).",
            get(&self.tls_handshake_failures),
        );
        one(
            "wattd_ledger_connections_open",
            "gauge",
            "TLS connections open.",
            get(&self.connections_open),
        );
        one(
            "wattd_ledger_streams_total",
            "counter",
            "Node streams opened (after the certificate and enrolment checks).",
            get(&self.streams),
        );
        one(
            "wattd_ledger_streams_open",
            "gauge",
            "Node streams open.",
            get(&self.streams_open),
        );
        one(
            "wattd_ledger_batches_stored_total",
            "counter",
            "Batches committed (each (node, seq) once, by this process).",
            get(&self.batches_stored),
        );
        one(
            "wattd_ledger_intervals_stored_total",
            "counter",
            "Intervals in the batches committed by this process.",
            get(&self.intervals_stored),
        );
        one(
            "wattd_ledger_allocations_stored_total",
            "counter",
            "Allocation rows committed by this process.",
            get(&self.allocations_stored),
        );
        one(
            "wattd_ledger_detail_rows_pruned_total",
            "counter",
            "Allocation rows pruned past --detail-retention-days by this process (their batches \
             and hourly totals stay; queries decode the detail from the batches).",
            get(&self.detail_rows_pruned),
        );
        one(
            "wattd_ledger_detail_partitions_dropped_total",
            "counter",
            "Day partitions of the allocation rows dropped past the retention (PostgreSQL).",
            get(&self.detail_partitions_dropped),
        );
        one(
            "wattd_ledger_detail_upkeep_failures_total",
            "counter",
            "Hourly detail upkeep rounds (partitions, retention) that failed.",
            get(&self.detail_upkeep_failures),
        );
        one(
            "wattd_ledger_detail_retained_from_seconds",
            "gauge",
            "Batches received before this Unix time have no allocation rows (0: none pruned; \
             9223372036, the year 2262: none kept, --detail-retention-days 0).",
            get(&self.detail_from_unix_s),
        );
        one(
            "wattd_ledger_batches_duplicate_total",
            "counter",
            "Batches received again (same seq, same bytes): acknowledged, not stored again.",
            get(&self.batches_duplicate),
        );
        one(
            "wattd_ledger_batches_held_total",
            "counter",
            "Batches received out of order (above a missing seq) and held in memory.",
            get(&self.batches_held),
        );
        one(
            "wattd_ledger_heartbeats_total",
            "counter",
            "Verified heartbeats.",
            get(&self.heartbeats),
        );
        one(
            "wattd_ledger_heartbeats_unverified_total",
            "counter",
            "Heartbeats signed by a key epoch the node's chain has not announced to this ledger \
             yet (its rotation is in the backlog): answered, not recorded.",
            get(&self.heartbeats_unverified),
        );
        one(
            "wattd_ledger_tail_missing_total",
            "counter",
            "Heartbeats announcing a sealed seq above every batch the ledger received (a \
             truncated or not yet sent tail).",
            get(&self.tail_missing),
        );
        one(
            "wattd_ledger_lost_ranges_total",
            "counter",
            "Loss statements recorded: ranges of batches a node declared it will never send \
             (damaged in its spool, or no longer retained).",
            get(&self.lost_ranges),
        );
        one(
            "wattd_ledger_lost_batches_total",
            "counter",
            "Batches inside recorded lost ranges.",
            get(&self.lost_batches),
        );
        one(
            "wattd_ledger_batches_in_lost_range_total",
            "counter",
            "Authentic batches received for a seq their node had declared lost (not stored).",
            get(&self.batches_in_lost_range),
        );
        one(
            "wattd_ledger_forks_not_kept_total",
            "counter",
            "Forks whose evidence was not stored: the node's fork rows or bytes were at their \
             bound.",
            get(&self.forks_not_kept),
        );
        one(
            "wattd_ledger_heartbeat_regressed_total",
            "counter",
            "Heartbeats announcing a sealed seq below what the ledger already stores.",
            get(&self.heartbeat_regressed),
        );
        one(
            "wattd_ledger_rate_limited_total",
            "counter",
            "Messages delayed by the per-node rate limit (--node-batches-per-s).",
            get(&self.rate_limited),
        );
        one(
            "wattd_ledger_acks_total",
            "counter",
            "Acknowledgements sent.",
            get(&self.acks),
        );
        one(
            "wattd_ledger_allocations_quarantined_total",
            "counter",
            "Allocation rows of authentic but implausible intervals: stored as evidence, never \
             billed (see wattd_ledger_implausible_total and `wattd-ledger nodes`).",
            get(&self.allocations_quarantined),
        );
        w.family(
            "wattd_ledger_implausible_total",
            "counter",
            "Intervals (or one domain of one) of authentic batches judged implausible, by \
             reason; their allocations are quarantined.",
        );
        for r in Implausible::ALL {
            let n = self
                .implausible
                .get(r.index())
                .map_or(0, |c| c.load(Ordering::Relaxed));
            w.sample(
                "wattd_ledger_implausible_total",
                &[("reason", r.as_str())],
                n,
            );
        }
        w.family(
            "wattd_ledger_commit_seconds",
            "summary",
            "Time to commit one batch (store transaction).",
        );
        w.sample(
            "wattd_ledger_commit_seconds_sum",
            &[],
            decimal_seconds(get(&self.commit_ns_sum)),
        );
        w.sample("wattd_ledger_commit_seconds_count", &[], get(&self.commits));
        w.family(
            "wattd_ledger_rejections_total",
            "counter",
            "Connections, streams and messages refused, by reason.",
        );
        for r in Reason::ALL {
            w.sample(
                "wattd_ledger_rejections_total",
                &[("reason", r.as_str())],
                self.rejections(r),
            );
        }
        w.finish()
    }

    /// Keeps `tx` holding the latest rendering: re-renders after every change (coalesced).
    pub async fn publish(self: Arc<Self>, tx: watch::Sender<Arc<String>>) {
        loop {
            let _ = tx.send(Arc::new(self.render()));
            self.changed.notified().await;
            // Coalesce a burst of increments into one rendering.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn decimal_seconds(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_rendered_once_with_its_count() {
        let m = Metrics::new();
        m.reject(Reason::Fork);
        m.reject(Reason::Fork);
        m.inc(&m.batches_stored);
        let text = m.render();
        for r in Reason::ALL {
            let line = format!(
                "wattd_ledger_rejections_total{{reason=\"{}\"}} ",
                r.as_str()
            );
            assert_eq!(text.matches(&line).count(), 1, "{line}");
        }
        assert!(text.contains("wattd_ledger_rejections_total{reason=\"fork\"} 2\n"));
        assert!(text.contains("wattd_ledger_batches_stored_total 1\n"));
        assert_eq!(decimal_seconds(1_500_000_000), "1.500000000");
    }
}
