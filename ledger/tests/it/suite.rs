//! The same suite against SQLite and PostgreSQL: real TLS on loopback, real stores. Each body
//! is a plain async fn over a [`Backend`]; `both!` instantiates it for each store.

use std::time::Duration;

use prost::Message as _;
use tonic::Code;
use wattd_ledger::metrics::Reason;
use wattd_ledger::server::Limits;
use wattd_ledger::store::Store as _;
use wattd_proto::v1::{node_message, Batch, NodeMessage, SignedBatch};
use wattd_records::seal::{sign_batch, BatchContent};

use crate::common::*;

both!(
    stores_each_batch_once_and_totals_match,
    reordered_batches_are_held_then_stored_in_order,
    held_batches_are_bounded,
    fork_is_rejected_recorded_and_counted,
    chain_break_is_rejected_and_recorded,
    bad_signature_and_modified_byte_are_rejected,
    unknown_key_is_rejected,
    node_id_must_match_the_certificate,
    unenrolled_certificate_is_refused,
    no_client_certificate_fails_the_handshake,
    certificate_of_another_ca_fails_the_handshake,
    oversized_message_is_refused,
    truncated_tail_is_detected_through_heartbeats,
    key_rotation_is_followed_and_the_old_key_refused_after_it,
    conservation_break_is_rejected,
    malformed_messages_get_an_error_status,
    streams_per_node_are_limited,
    concurrent_streams_of_one_node_store_each_batch_once,
    commit_races_are_decided_by_the_primary_key,
    concurrent_commits_of_many_nodes_each_get_their_own_outcome,
    node_rate_is_limited_by_delay,
    connections_and_handshakes_are_bounded,
    a_declared_loss_continues_the_chain_and_its_energy_is_known,
    loss_statements_are_checked_like_batches,
    the_audit_finds_totals_that_do_not_add_up,
    a_loss_statement_must_chain_to_the_batch_after_it_and_use_a_current_key,
    a_lost_batch_that_announced_a_rotation_is_declared_with_the_signed_rotation,
    hostile_names_are_refused_and_huge_values_cannot_break_runs,
    runs_are_billed_per_node,
    a_platform_meter_is_stored_and_billed,
    a_forged_kilowatt_hour_in_one_nanosecond_is_quarantined,
    fork_evidence_is_bounded_per_node,
    revocation_ends_open_streams_at_once,
    a_certificate_the_crl_revokes_is_refused_and_its_open_stream_ended,
    a_revoked_key_epoch_signs_nothing_more,
    the_enrolment_directory_is_watched,
    a_connection_without_a_stream_is_closed_when_idle,
    a_heartbeat_from_a_key_in_the_backlog_is_answered_not_believed,
    run_labels_name_the_account_and_hostile_ones_are_refused,
    admission_bounds_each_source_and_the_preface,
    a_lost_range_is_priced_per_run_from_the_checkpoints_around_it,
    the_server_certificate_is_reloaded_without_a_restart,
    run_totals_are_maintained_per_hour_and_the_audit_checks_them,
    detail_past_the_retention_is_decoded_from_the_batches,
    a_version_5_store_is_upgraded_and_its_old_rows_pruned_like_any,
    pruning_while_batches_stream_in_loses_and_doubles_nothing,
    without_detail_rows_every_read_is_decoded_and_rows_can_come_back,
);

fn limits() -> Limits {
    Limits::default()
}

/// The store's fixture with node `n1` enrolled, and `n1`'s chain; `None` when the store is not
/// available here (`Fixture::new` says so).
async fn one_node(b: Backend, name: &str) -> Option<(Fixture, Chain)> {
    let f = Fixture::new(b, name).await?;
    let chain = Chain::new(key("n1", 1, 1));
    f.enrol(&chain.key);
    Some((f, chain))
}

async fn count_rows(f: &Fixture) -> u64 {
    f.query_store()
        .await
        .nodes()
        .await
        .expect("nodes")
        .iter()
        .map(|n| n.batches)
        .sum()
}

async fn stores_each_batch_once_and_totals_match(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    let batches: Vec<_> = (0..5).map(|_| chain.next(3)).collect();
    for (i, bt) in batches.iter().enumerate() {
        let ack = s.send(msg(bt)).await?;
        assert_eq!(ack.acked_seq, i as u64 + 1);
        assert_eq!(ack.missing_from_seq, 0);
        assert_eq!(ack.node_id, "n1");
    }
    // Replays of old batches: acknowledged again, not stored again.
    for bt in [&batches[2], &batches[0], &batches[4]] {
        let ack = s.send(msg(bt)).await?;
        assert_eq!(ack.acked_seq, 5);
    }
    assert_eq!(
        l.metrics
            .batches_duplicate
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(
        l.metrics
            .batches_stored
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    // A new stream (reconnect) resends everything: still stored once.
    drop(s);
    let mut s = connect(&f, &l, "n1").await;
    for bt in &batches {
        assert_eq!(s.send(msg(bt)).await?.acked_seq, 5);
    }
    assert_eq!(count_rows(&f).await, 5);
    let totals = f.query_store().await.run_totals().await?;
    // 5 batches x 3 intervals: run-a 15 uJ, run-b 25 uJ per interval.
    let get = |r: &str| {
        totals
            .iter()
            .find(|t| t.run_id == r && t.domain == "package:0")
            .map(|t| t.energy_uj)
    };
    assert_eq!(get("run-a"), Some(15 * 15));
    assert_eq!(get("run-b"), Some(15 * 25));
    assert_eq!(totals.len(), 2);
    let nodes = f.query_store().await.nodes().await?;
    assert_eq!(nodes.len(), 1);
    assert_eq!((nodes[0].last_seq, nodes[0].intervals), (5, 15));
    l.stop().await;
    Ok(())
}

async fn reordered_batches_are_held_then_stored_in_order(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let bs: Vec<_> = (0..5).map(|_| chain.next(1)).collect();
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&bs[0])).await?.acked_seq, 1);
    // 4 and 3 arrive before 2: held, the Ack names the hole.
    for i in [3, 2] {
        let ack = s.send(msg(&bs[i])).await?;
        assert_eq!(
            (ack.acked_seq, ack.missing_from_seq),
            (1, 2),
            "after seq {}",
            i + 1
        );
    }
    // Held and sent again: a duplicate of the held one.
    let ack = s.send(msg(&bs[3])).await?;
    assert_eq!((ack.acked_seq, ack.missing_from_seq), (1, 2));
    assert_eq!(count_rows(&f).await, 1, "nothing above the hole is stored");
    let nodes = f.query_store().await.nodes().await?;
    assert_eq!(nodes[0].highest_seen_seq, 4);
    // The hole fills: everything held is committed, in order.
    let ack = s.send(msg(&bs[1])).await?;
    assert_eq!((ack.acked_seq, ack.missing_from_seq), (4, 0));
    assert_eq!(s.send(msg(&bs[4])).await?.acked_seq, 5);
    assert_eq!(count_rows(&f).await, 5);
    assert_eq!(
        l.metrics
            .batches_held
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let report = wattd_ledger::query::nodes_report(f.query_store().await.nodes().await?);
    assert!(
        report.nodes[0].gaps.is_empty(),
        "{:?}",
        report.nodes[0].gaps
    );
    l.stop().await;
    Ok(())
}

async fn held_batches_are_bounded(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut lim = limits();
    lim.service.session.max_held_batches = 2;
    let l = f.start(lim).await;
    let bs: Vec<_> = (0..6).map(|_| chain.next(1)).collect();
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&bs[0])).await?;
    s.send(msg(&bs[2])).await?;
    s.send(msg(&bs[3])).await?;
    let err = s.send(msg(&bs[4])).await.expect_err("third held batch");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("missing seq 2"), "{}", err.message());
    assert_eq!(l.rejections(Reason::HeldLimit), 1);
    // A new stream starts from the stored tip: nothing held was acknowledged or stored.
    let mut s = connect(&f, &l, "n1").await;
    for bt in &bs {
        s.send(msg(bt)).await?;
    }
    assert_eq!(count_rows(&f).await, 6);
    l.stop().await;
    Ok(())
}

/// A batch with the same seq as `b` but other content, genuinely signed by the node's key.
fn forked(chain_key: &wattd_records::identity::NodeKey, seq: u64, prev: [u8; 32]) -> NodeMessage {
    let b = wattd_records::seal::sign_batch(
        chain_key,
        seq,
        prev,
        42,
        BatchContent {
            intervals: vec![interval(900, &[("run-evil", 1000, 0)], 0)],
            ..Default::default()
        },
    );
    msg(&b)
}

async fn fork_is_rejected_recorded_and_counted(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let bs: Vec<_> = (0..4).map(|_| chain.next(1)).collect();
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&bs[0])).await?;
    s.send(msg(&bs[1])).await?;
    // A different seq 2 (same predecessor, other content).
    let err = s
        .send(forked(&chain.key, 2, bs[0].hash))
        .await
        .expect_err("fork");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("seq 2") && err.message().contains("fork"),
        "{}",
        err.message()
    );
    assert_eq!(
        err.metadata()
            .get("wattd-reason")
            .and_then(|v| v.to_str().ok()),
        Some("fork")
    );
    // A fork of a held batch.
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&bs[3])).await?;
    let err = s
        .send(forked(&chain.key, 4, bs[2].hash))
        .await
        .expect_err("held fork");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(l.rejections(Reason::Fork), 2);
    // The stored batch 2 is untouched; the forks are kept as evidence.
    let store = f.query_store().await;
    assert_eq!(store.batch_hash("n1", 2).await?, Some(bs[1].hash));
    let nodes = store.nodes().await?;
    let forks = &nodes[0].forks;
    assert_eq!(forks.len(), 2, "{forks:?}");
    assert_eq!((forks[0].seq, forks[0].kind.as_str()), (2, "stored"));
    assert_eq!((forks[1].seq, forks[1].kind.as_str()), (4, "held"));
    // The same fork again is one row seen twice.
    let mut s = connect(&f, &l, "n1").await;
    let _ = s.send(forked(&chain.key, 2, bs[0].hash)).await;
    let nodes = f.query_store().await.nodes().await?;
    assert_eq!(nodes[0].forks[0].times_seen, 2);
    assert_eq!(count_rows(&f).await, 2);
    l.stop().await;
    Ok(())
}

async fn chain_break_is_rejected_and_recorded(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let b1 = chain.next(1);
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&b1)).await?;
    // Seq 2, authentic, but chained to something that is not the stored seq 1.
    let err = s
        .send(forked(&chain.key, 2, [7; 32]))
        .await
        .expect_err("chain break");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("chain"), "{}", err.message());
    assert_eq!(l.rejections(Reason::ChainBreak), 1);
    // Seq 1 that does not start from the genesis hash.
    let mut other = Chain::new(key("n2", 1, 2));
    f.enrol(&other.key);
    let l2 = f.start(limits()).await;
    other.prev = [1; 32];
    let bad1 = other.next(1);
    let mut s = connect(&f, &l2, "n2").await;
    let err = s.send(msg(&bad1)).await.expect_err("bad genesis");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(count_rows(&f).await, 1);
    let nodes = f.query_store().await.nodes().await?;
    assert_eq!(nodes[0].forks[0].kind, "chain_link");
    l.stop().await;
    l2.stop().await;
    Ok(())
}

async fn bad_signature_and_modified_byte_are_rejected(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let b1 = chain.next(2);
    let good = SignedBatch::decode(b1.bytes.as_slice())?;
    // A flipped bit in the signature.
    let mut bad_sig = good.clone();
    bad_sig.signature[10] ^= 1;
    // A modified byte of the batch: an allocation's energy, found by its encoding.
    let mut batch = Batch::decode(good.batch_bytes.as_slice())?;
    batch.intervals[0].domains[0].allocations[0].active_uj += 1;
    batch.intervals[0].domains[0].host_active_uj -= 1;
    let mut modified = good.clone();
    modified.batch_bytes = batch.encode_to_vec();
    assert_eq!(modified.batch_bytes.len(), good.batch_bytes.len());
    // A modified byte anywhere: the last byte of the batch bytes.
    let mut last = good.clone();
    if let Some(x) = last.batch_bytes.last_mut() {
        *x ^= 0x01;
    }
    for (what, s) in [
        ("signature", bad_sig),
        ("allocation", modified),
        ("last byte", last),
    ] {
        let mut st = connect(&f, &l, "n1").await;
        let err = st.send(signed_msg(s)).await.expect_err(what);
        assert!(
            matches!(err.code(), Code::Unauthenticated | Code::InvalidArgument),
            "{what}: {err:?}"
        );
        if err.code() == Code::Unauthenticated {
            assert!(
                err.message().contains("signature"),
                "{what}: {}",
                err.message()
            );
        }
    }
    assert!(l.rejections(Reason::BadSignature) >= 2);
    // A heartbeat with a bad signature.
    let mut hb = chain.heartbeat(1);
    if let Some(node_message::Kind::SignedHeartbeat(h)) = &mut hb.kind {
        h.signature[0] ^= 0x80;
    }
    let mut st = connect(&f, &l, "n1").await;
    let err = st.send(hb).await.expect_err("bad heartbeat");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(count_rows(&f).await, 0);
    // The genuine batch still goes in.
    let mut st = connect(&f, &l, "n1").await;
    assert_eq!(st.send(msg(&b1)).await?.acked_seq, 1);
    l.stop().await;
    Ok(())
}

async fn unknown_key_is_rejected(b: Backend, name: &str) -> TestResult {
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    f.enrol(&key("n1", 1, 1));
    let l = f.start(limits()).await;
    // The node's id, a key nobody enrolled (same epoch).
    let mut forger = Chain::new(key("n1", 1, 99));
    let mut s = connect(&f, &l, "n1").await;
    let err = s.send(msg(&forger.next(1))).await.expect_err("forged");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("key"), "{}", err.message());
    // An epoch that is not enrolled.
    let mut forger = Chain::new(key("n1", 5, 98));
    let mut s = connect(&f, &l, "n1").await;
    let err = s.send(msg(&forger.next(1))).await.expect_err("epoch 5");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("epoch 5"), "{}", err.message());
    // A heartbeat signed by an unknown key.
    let mut s = connect(&f, &l, "n1").await;
    let err = s
        .send(heartbeat(&key("n1", 1, 97), 3))
        .await
        .expect_err("heartbeat");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(l.rejections(Reason::UnknownKey), 3);
    assert_eq!(count_rows(&f).await, 0);
    l.stop().await;
    Ok(())
}

async fn node_id_must_match_the_certificate(b: Backend, name: &str) -> TestResult {
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    let mut a = Chain::new(key("node-a", 1, 1));
    let mut bb = Chain::new(key("node-b", 1, 2));
    f.enrol(&a.key);
    f.enrol(&bb.key);
    let l = f.start(limits()).await;
    // node-b's genuine batch, sent on node-a's connection.
    let mut s = connect(&f, &l, "node-a").await;
    let err = s.send(msg(&bb.next(1))).await.expect_err("foreign batch");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("node-a") && err.message().contains("node-b"),
        "{}",
        err.message()
    );
    let mut s = connect(&f, &l, "node-a").await;
    let err = s
        .send(bb.heartbeat(1))
        .await
        .expect_err("foreign heartbeat");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(l.rejections(Reason::NodeMismatch), 2);
    let mut s = connect(&f, &l, "node-a").await;
    assert_eq!(s.send(msg(&a.next(1))).await?.acked_seq, 1);
    l.stop().await;
    Ok(())
}

async fn unenrolled_certificate_is_refused(b: Backend, name: &str) -> TestResult {
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    f.enrol(&key("n1", 1, 1));
    let l = f.start(limits()).await;
    // A certificate of the right CA for a name nobody enrolled: the connection is closed right
    // after the handshake, so it never holds a slot.
    let ch = channel(l.addr, &f.ca.ca_pem, Some(&f.client_cert("ghost"))).await?;
    let err = NodeStream::open(ch).await.expect_err("ghost");
    assert_ne!(err.code(), Code::Ok, "{err:?}");
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(load(&l.metrics.connections_unenrolled) >= 1);
    eventually("the slot is free again", || {
        load(&l.metrics.connections_open) == 0
    })
    .await;
    l.stop().await;
    Ok(())
}

async fn no_client_certificate_fails_the_handshake(b: Backend, name: &str) -> TestResult {
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    f.enrol(&key("n1", 1, 1));
    let l = f.start(limits()).await;
    handshake_is_refused(&f, l, None, "a client without a certificate").await;
    Ok(())
}

/// A client with `cert` (or none) gets no stream: the TLS handshake fails, and is counted.
async fn handshake_is_refused(
    f: &Fixture,
    l: Ledger,
    cert: Option<&wattd_tests::tls::CertFiles>,
    who: &str,
) {
    let refused = match channel(l.addr, &f.ca.ca_pem, cert).await {
        Err(_) => true,
        Ok(ch) => NodeStream::open(ch).await.is_err(),
    };
    assert!(refused, "{who} got a stream");
    let m = l.metrics.clone();
    eventually("handshake failure counted", || {
        m.tls_handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    assert_eq!(m.streams.load(std::sync::atomic::Ordering::Relaxed), 0);
    l.stop().await;
}

async fn certificate_of_another_ca_fails_the_handshake(b: Backend, name: &str) -> TestResult {
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    f.enrol(&key("n1", 1, 1));
    let l = f.start(limits()).await;
    // An enrolled CN, but issued by a CA the ledger does not trust.
    let other_dir = tempfile::tempdir()?;
    let rogue = wattd_tests::tls::TestCa::new(other_dir.path(), "rogue");
    let cert = rogue.client("n1");
    handshake_is_refused(&f, l, Some(&cert), "a certificate of another CA").await;
    Ok(())
}

async fn oversized_message_is_refused(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut lim = limits();
    lim.max_message_bytes = 8 * 1024;
    let l = f.start(lim).await;
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 1);
    let big = chain.next(200);
    assert!(big.bytes.len() > 8 * 1024);
    let err = s.send(msg(&big)).await.expect_err("oversized");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    assert_eq!(l.rejections(Reason::Oversized), 1);
    assert_eq!(count_rows(&f).await, 1);
    l.stop().await;
    Ok(())
}

async fn truncated_tail_is_detected_through_heartbeats(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let bs: Vec<_> = (0..5).map(|_| chain.next(1)).collect();
    let mut s = connect(&f, &l, "n1").await;
    for bt in &bs[..3] {
        s.send(msg(bt)).await?;
    }
    // Seqs 4 and 5 never arrive (dropped in flight); the heartbeat says the node sealed 5.
    let ack = s.send(chain.heartbeat(5)).await?;
    assert_eq!((ack.acked_seq, ack.announced_sealed_seq), (3, 5));
    assert_eq!(
        l.metrics
            .tail_missing
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A stream opened by a heartbeat announces the node's backlog before sending it: that is
    // no missing tail (the shipper always opens this way after a reconnect).
    let mut s2 = connect(&f, &l, "n1").await;
    let ack = s2.send(chain.heartbeat(5)).await?;
    assert_eq!((ack.acked_seq, ack.announced_sealed_seq), (3, 5));
    assert_eq!(
        l.metrics
            .tail_missing
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(s2);
    let report = wattd_ledger::query::nodes_report(f.query_store().await.nodes().await?);
    let n = &report.nodes[0];
    assert_eq!(n.announced_sealed_seq, 5);
    assert!(n.last_heartbeat_received_unix_ns.is_some());
    assert_eq!(
        n.gaps,
        vec![wattd_ledger::query::GapRow {
            first_seq: 4,
            last_seq: 5,
            reason: "announced_not_received"
        }]
    );
    // An older heartbeat never lowers what was announced; the tail arrives and the gap closes.
    assert_eq!(s.send(chain.heartbeat(2)).await?.announced_sealed_seq, 5);
    for bt in &bs[3..] {
        s.send(msg(bt)).await?;
    }
    let ack = s.send(chain.heartbeat(5)).await?;
    assert_eq!((ack.acked_seq, ack.announced_sealed_seq), (5, 5));
    let report = wattd_ledger::query::nodes_report(f.query_store().await.nodes().await?);
    assert!(report.nodes[0].gaps.is_empty());
    l.stop().await;
    Ok(())
}

async fn key_rotation_is_followed_and_the_old_key_refused_after_it(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    let old = key("n1", 1, 1);
    let old_again = key("n1", 1, 1);
    let mut chain = Chain::new(old);
    f.enrol(&chain.key);
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&chain.next(1))).await?;
    let announce = chain.rotate(key("n1", 2, 2));
    assert_eq!(s.send(msg(&announce)).await?.acked_seq, 2);
    let after = chain.next(1);
    assert_eq!(s.send(msg(&after)).await?.acked_seq, 3);
    // A heartbeat with the new key.
    s.send(chain.heartbeat(3)).await?;
    // After a restart of the ledger the new key is known from the stored chain.
    l.stop().await;
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    let b4 = chain.next(1);
    assert_eq!(s.send(msg(&b4)).await?.acked_seq, 4);
    // The old key (maybe the leaked one) signing seq 5: refused.
    let stale = wattd_records::seal::sign_batch(&old_again, 5, b4.hash, 1, BatchContent::default());
    let err = s
        .send(msg(&stale))
        .await
        .expect_err("old key after rotation");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("epoch"), "{}", err.message());
    assert_eq!(l.rejections(Reason::StaleKey), 1);
    assert_eq!(count_rows(&f).await, 4);
    l.stop().await;
    Ok(())
}

async fn conservation_break_is_rejected(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut iv = interval(0, &[("run-a", 10, 0)], 5);
    iv.domains[0].measured_uj += 1; // 1 uJ created from nothing
    let bad = chain.next_with(BatchContent {
        intervals: vec![iv],
        ..Default::default()
    });
    let mut s = connect(&f, &l, "n1").await;
    let err = s.send(msg(&bad)).await.expect_err("conservation");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("measured 16 uJ"),
        "{}",
        err.message()
    );
    assert_eq!(l.rejections(Reason::Conservation), 1);
    assert_eq!(count_rows(&f).await, 0);
    l.stop().await;
    Ok(())
}

async fn malformed_messages_get_an_error_status(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let good = SignedBatch::decode(chain.next(1).bytes.as_slice())?;
    let mut cases: Vec<(&str, NodeMessage)> = vec![
        ("empty message", NodeMessage { kind: None }),
        (
            "garbage batch bytes",
            signed_msg(SignedBatch {
                batch_bytes: vec![0xff; 40],
                ..good.clone()
            }),
        ),
        ("empty signed batch", signed_msg(SignedBatch::default())),
    ];
    // Every truncation of the batch bytes.
    for cut in [1, 5, good.batch_bytes.len() / 2, good.batch_bytes.len() - 1] {
        let mut t = good.clone();
        t.batch_bytes.truncate(cut);
        cases.push(("truncated", signed_msg(t)));
    }
    for (what, m) in cases {
        let mut s = connect(&f, &l, "n1").await;
        let err = s.send(m).await.expect_err(what);
        assert!(
            matches!(
                err.code(),
                Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
            ),
            "{what}: {err:?}"
        );
    }
    // The ledger is still up and sound.
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(signed_msg(good)).await?.acked_seq, 1);
    l.stop().await;
    Ok(())
}

async fn streams_per_node_are_limited(b: Backend, name: &str) -> TestResult {
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    f.enrol(&key("n1", 1, 1));
    let mut lim = limits();
    lim.service.streams_per_node = 1;
    let l = f.start(lim).await;
    let first = connect(&f, &l, "n1").await;
    let ch = channel(l.addr, &f.ca.ca_pem, Some(&f.client_cert("n1"))).await?;
    let err = NodeStream::open(ch).await.expect_err("second stream");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(l.rejections(Reason::StreamsLimit), 1);
    drop(first);
    // The slot is released when the stream ends.
    let m = l.metrics.clone();
    eventually("stream closed", || {
        m.streams_open.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    let _again = connect(&f, &l, "n1").await;
    // The counters are served on /metrics.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = scrape(l.metrics_addr.expect("metrics")).await;
    assert!(
        text.contains("wattd_ledger_rejections_total{reason=\"streams_limit\"} 1"),
        "{text}"
    );
    l.stop().await;
    Ok(())
}

async fn concurrent_streams_of_one_node_store_each_batch_once(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let bs: Vec<_> = (0..30).map(|_| chain.next(2)).collect();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&f, &l, "n1").await;
        let bs = bs.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for bt in &bs {
                last = s.send(msg(bt)).await.expect("ack").acked_seq;
            }
            last
        }));
    }
    for t in tasks {
        assert_eq!(t.await?, 30);
    }
    assert_eq!(count_rows(&f).await, 30);
    let m = &l.metrics;
    assert_eq!(
        m.batches_stored.load(std::sync::atomic::Ordering::Relaxed)
            + m.batches_duplicate
                .load(std::sync::atomic::Ordering::Relaxed),
        60
    );
    let totals = f.query_store().await.run_totals().await?;
    assert_eq!(totals[0].energy_uj, 30 * 2 * 15);
    l.stop().await;
    Ok(())
}

/// What the ledger knows of `chain`'s node: its key, enrolled as epoch 1.
fn known_keys(chain: &Chain) -> wattd_ledger::check::KnownKeys {
    let mut enrolled = std::collections::BTreeMap::new();
    enrolled.insert(
        1,
        wattd_ledger::enrol::EnrolledKey {
            identity: chain.key.public(),
            key_id: chain.key.key_id(),
            file: "test".into(),
        },
    );
    wattd_ledger::check::KnownKeys::new(chain.key.node_id(), &enrolled)
}

async fn commit_races_are_decided_by_the_primary_key(b: Backend, name: &str) -> TestResult {
    use wattd_ledger::check::verify_batch;
    use wattd_ledger::store::{AnyStore, Commit, OpenMode};
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    let mut chain = Chain::new(key("n1", 1, 1));
    let keys = known_keys(&chain);
    // Two independent store handles (two pools, as two processes have).
    let s1 = std::sync::Arc::new(AnyStore::open(&f.store_url, OpenMode::Serve).await?);
    let s2 = std::sync::Arc::new(AnyStore::open(&f.store_url, OpenMode::Serve).await?);
    for _ in 0..40 {
        let bt = chain.next(2);
        let SignedBatch { .. } = SignedBatch::decode(bt.bytes.as_slice())?;
        let vb = std::sync::Arc::new(verify_batch(
            "n1",
            &keys,
            &SignedBatch::decode(bt.bytes.as_slice())?,
        )?);
        let limits = std::sync::Arc::new(wattd_ledger::plausible::NodeLimits::new(
            &Default::default(),
            i64::MAX,
        ));
        let (a, c) = tokio::join!(
            s1.commit(vb.clone(), limits.clone(), 1),
            s2.commit(vb.clone(), limits, 2)
        );
        let mut outcomes = [a?, c?];
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            [
                Commit::Duplicate,
                Commit::Stored {
                    verdict: Default::default()
                }
            ],
            "seq {}",
            bt.seq
        );
    }
    assert_eq!(s1.tip("n1").await?.seq, 40);
    assert_eq!(count_rows(&f).await, 40);
    Ok(())
}

/// Sixteen nodes commit through one store handle at once, each batch twice (SQLite commits
/// what is queued in one transaction, a savepoint each): every commit is answered with its own
/// outcome, one `Stored` and one `Duplicate` per batch, never another batch's, and each batch
/// is stored once.
async fn concurrent_commits_of_many_nodes_each_get_their_own_outcome(
    b: Backend,
    name: &str,
) -> TestResult {
    use std::collections::BTreeMap;
    use wattd_ledger::check::verify_batch;
    use wattd_ledger::store::{AnyStore, Commit, OpenMode};
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    let store = std::sync::Arc::new(AnyStore::open(&f.store_url, OpenMode::Serve).await?);
    let limits = std::sync::Arc::new(wattd_ledger::plausible::NodeLimits::new(
        &Default::default(),
        i64::MAX,
    ));
    let mut nodes = Vec::new();
    for i in 0..16u8 {
        let id = format!("n{i}");
        let chain = Chain::new(key(&id, 1, 100 + i));
        let keys = known_keys(&chain);
        nodes.push((id, chain, keys));
    }
    for round in 0..5u64 {
        let mut commits = Vec::new();
        for (id, chain, keys) in &mut nodes {
            let bt = chain.next(2);
            let vb = std::sync::Arc::new(verify_batch(
                id,
                keys,
                &SignedBatch::decode(bt.bytes.as_slice())?,
            )?);
            for twice in 0..2 {
                let (store, vb, limits) = (store.clone(), vb.clone(), limits.clone());
                commits.push(tokio::spawn(async move {
                    (
                        vb.node_id.clone(),
                        vb.seq,
                        store.commit(vb, limits, twice).await,
                    )
                }));
            }
        }
        let mut outcomes: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        for c in commits {
            let (node, seq, r) = c.await?;
            assert_eq!(seq, round + 1, "{node}");
            let o = match r? {
                Commit::Stored { .. } => "stored".to_owned(),
                other => format!("{other:?}"),
            };
            outcomes.entry((node, seq)).or_default().push(o);
        }
        assert_eq!(outcomes.len(), 16);
        for (k, mut v) in outcomes {
            v.sort();
            assert_eq!(v, ["Duplicate", "stored"], "{k:?}");
        }
    }
    assert_eq!(count_rows(&f).await, 16 * 5);
    for (id, ..) in &nodes {
        assert_eq!(store.tip(id).await?.seq, 5, "{id}");
    }
    Ok(())
}

async fn node_rate_is_limited_by_delay(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut lim = limits();
    lim.service.node_batches_per_s = std::num::NonZeroU32::new(10);
    let l = f.start(lim).await;
    let mut s = connect(&f, &l, "n1").await;
    let started = std::time::Instant::now();
    // A burst of 10 passes at once; the next 10 are paced at 10/s: about 1 s more.
    for _ in 0..20 {
        s.send(msg(&chain.next(1))).await?;
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    assert!(
        l.metrics
            .rate_limited
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 9
    );
    assert_eq!(count_rows(&f).await, 20, "delayed, never dropped");
    l.stop().await;
    Ok(())
}

/// `--max-connections` and `--handshake-timeout-s`: a connection that never starts its TLS
/// handshake holds its slot only until the deadline; while every slot is taken, a new connection
/// is closed at accept and counted; a slot freed by a closed stream is usable again.
async fn connections_and_handshakes_are_bounded(b: Backend, name: &str) -> TestResult {
    use tokio::io::AsyncReadExt as _;
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut lim = limits();
    lim.max_connections = 1;
    lim.handshake_timeout = Duration::from_millis(300);
    let l = f.start(lim).await;
    let m = l.metrics.clone();
    let relaxed = std::sync::atomic::Ordering::Relaxed;

    // A silent client: holds the only slot, then the handshake deadline frees it.
    let mut silent = tokio::net::TcpStream::connect(l.addr).await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await??;
    assert_eq!(n, 0, "the server closes a connection that never handshakes");
    assert!(m.tls_handshake_failures.load(relaxed) >= 1);

    // A real stream takes the slot; one more connection is refused at accept.
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 1);
    let mut extra = tokio::net::TcpStream::connect(l.addr).await?;
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0, "a connection beyond the limit is closed");
    assert!(m.connections_refused.load(relaxed) >= 1);

    // The slot comes back when the stream's connection closes.
    drop(s);
    let m2 = m.clone();
    let before = m2.connections_refused.load(relaxed);
    let second = chain.next(1);
    let mut again = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(ch) = channel(l.addr, &f.ca.ca_pem, Some(&f.client_cert("n1"))).await else {
            continue;
        };
        let Ok(mut s) = NodeStream::open(ch).await else {
            continue;
        };
        if let Ok(ack) = s.send(msg(&second)).await {
            again = Some(ack.acked_seq);
            break;
        }
    }
    assert_eq!(again, Some(2), "the freed slot serves a new stream");
    assert!(m.connections_refused.load(relaxed) >= before);
    l.stop().await;
    Ok(())
}

/// A node declares 4..=5 lost (damaged in its spool): the ledger records the range with its
/// evidence, the chain continues at 6 from the statement's hash, the range's energy follows
/// exactly from the running totals of batches 3 and 6, a late authentic copy of a lost batch
/// is counted and not stored, and a restarted ledger resumes after the range.
async fn a_declared_loss_continues_the_chain_and_its_energy_is_known(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let bs: Vec<_> = (0..8).map(|_| chain.next(2)).collect();
    let mut s = connect(&f, &l, "n1").await;
    for bt in &bs[..3] {
        s.send(msg(bt)).await?;
    }
    // A statement above a hole is not held: the Ack names the hole.
    let ack = s.send(chain.loss(5, 5)).await?;
    assert_eq!((ack.acked_seq, ack.missing_from_seq), (3, 4));
    // Kept until the batch after the range arrives and chains to it.
    let ack = s.send(chain.loss(4, 5)).await?;
    assert_eq!((ack.acked_seq, ack.missing_from_seq), (3, 0));
    for (i, bt) in bs[5..].iter().enumerate() {
        let ack = s.send(msg(bt)).await?;
        assert_eq!((ack.acked_seq, ack.missing_from_seq), (6 + i as u64, 0));
    }
    let ack = s.send(msg(&bs[3])).await?;
    assert_eq!(ack.acked_seq, 8, "a lost seq sent late changes nothing");
    // Again, and a statement for what the chain already has: both acknowledged, no change.
    assert_eq!(s.send(chain.loss(4, 5)).await?.acked_seq, 8);
    assert_eq!(s.send(chain.loss(2, 3)).await?.acked_seq, 8);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&l.metrics.lost_ranges), 1);
    assert_eq!(load(&l.metrics.lost_batches), 2);
    assert_eq!(load(&l.metrics.batches_in_lost_range), 1);
    assert_eq!(load(&l.metrics.batches_stored), 6);
    let report = wattd_ledger::query::nodes_report(f.query_store().await.nodes().await?);
    let n = &report.nodes[0];
    assert_eq!((n.last_seq, n.batches), (8, 6));
    assert!(n.gaps.is_empty(), "{:?}", n.gaps);
    assert_eq!(n.lost.len(), 1);
    let lost = &n.lost[0];
    assert_eq!((lost.first_seq, lost.last_seq), (4, 5));
    assert_eq!((lost.reason.as_str(), lost.energy), ("damaged", "exact"));
    // Two batches of two intervals of 47 uJ each.
    assert_eq!(lost.energy_uj, Some(4 * 47));
    assert_eq!(lost.energy_by_meter.get("package:0"), Some(&(4 * 47)));
    assert_eq!(n.lost_uj, 4 * 47);
    let text = wattd_ledger::query::nodes_text(&report);
    assert!(text.contains("LOST  seq 4..=5 (damaged): 188 uJ"), "{text}");
    // Stored energy plus lost energy is what the node measured (its last running total).
    let totals = f.query_store().await.run_totals().await?;
    let runs: u128 = totals.iter().map(|t| t.energy_uj).sum();
    assert_eq!(runs, 6 * 2 * 40, "runs get 40 of each interval's 47 uJ");
    // A ledger restarted from its database resumes after the range.
    drop(s);
    l.stop().await;
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    let ack = s.send(chain.heartbeat(8)).await?;
    assert_eq!((ack.acked_seq, ack.missing_from_seq), (8, 0));
    let next = chain.next(1);
    assert_eq!(s.send(msg(&next)).await?.acked_seq, 9);
    // The audit: stored + lost == the node's own running total, per meter.
    let audit = wattd_ledger::audit::audit(&f.query_store().await).await?;
    assert!(audit.ok(), "{}", wattd_ledger::audit::audit_text(&audit));
    let m = &audit.nodes[0].meters["package:0"];
    assert_eq!(
        (m.stored_uj, m.lost_uj, m.node_total_uj),
        (13 * 47, 4 * 47, Some(17 * 47))
    );
    l.stop().await;
    Ok(())
}

/// Loss statements get the batches' checks: a forged signature, another node's name, a next
/// key the ledger never saw (the range would hide a rotation) and nonsense ranges are refused
/// with a status that says why, and nothing is recorded.
async fn loss_statements_are_checked_like_batches(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let bs: Vec<_> = (0..4).map(|_| chain.next(1)).collect();
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&bs[0])).await?;
    let statement = |m: NodeMessage| match m.kind {
        Some(node_message::Kind::Loss(l)) => l,
        _ => unreachable!("a loss message"),
    };
    let wrap = |l: wattd_proto::v1::SignedLossStatement| NodeMessage {
        kind: Some(node_message::Kind::Loss(l)),
    };
    let mut forged = statement(chain.loss(2, 3));
    let last = forged.statement_bytes.len() - 1;
    forged.statement_bytes[last] ^= 1;
    let err = s.send(wrap(forged)).await.expect_err("forged");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut s = connect(&f, &l, "n1").await;
    // Signed by n1's key, naming another node.
    let mut named = Chain::new(key("n2", 1, 1));
    named.next(1);
    let err = s.send(named.loss(1, 1)).await.expect_err("node mismatch");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut s = connect(&f, &l, "n1").await;
    // The batch after the range would be signed by a key nobody enrolled or announced.
    let unknown = key("n1", 2, 9);
    let hiding = wattd_records::loss::sign_loss(
        &chain.key,
        &wattd_records::loss::Loss {
            first_seq: 2,
            last_seq: 3,
            last_hash: bs[2].hash,
            reason: wattd_proto::v1::LossReason::Damaged,
            next_key_epoch: unknown.epoch(),
            next_key_id: unknown.key_id().to_vec(),
            detail: String::new(),
            rotations: Vec::new(),
        },
        0,
    );
    let err = s.send(wrap(hiding)).await.expect_err("unknown next key");
    assert!(err.message().contains("enrol that key"), "{err:?}");
    let mut s = connect(&f, &l, "n1").await;
    // An empty range.
    let mut st = wattd_proto::v1::LossStatement::decode(
        statement(chain.loss(2, 3)).statement_bytes.as_slice(),
    )?;
    st.last_seq = 1;
    let bytes = st.encode_to_vec();
    let bad = wattd_proto::v1::SignedLossStatement {
        signature: chain.key.sign(&bytes).to_vec(),
        key_id: chain.key.key_id().to_vec(),
        statement_bytes: bytes,
    };
    let err = s.send(wrap(bad)).await.expect_err("empty range");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&l.metrics.lost_ranges), 0);
    let report = wattd_ledger::query::nodes_report(f.query_store().await.nodes().await?);
    assert!(report.nodes[0].lost.is_empty());
    assert_eq!(report.nodes[0].last_seq, 1);
    l.stop().await;
    Ok(())
}

/// A node whose running totals skip energy (authentic, but wrong): every batch is stored (each
/// conserves its own energy), and the audit says which seq's totals do not follow and that the
/// meter's sum is off, and fails.
async fn the_audit_finds_totals_that_do_not_add_up(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    for _ in 0..3 {
        let bt = chain.next(1);
        s.send(msg(&bt)).await?;
    }
    let mut wrong = wattd_records::totals::RunningTotals::starting_at(1);
    wrong = wrong.after(&[interval(99, &[("run-a", 1, 0)], 0)]);
    let bt = chain.next_with(BatchContent {
        intervals: vec![interval(3, &[("run-a", 10, 5)], 7)],
        totals: Some(wrong),
        ..Default::default()
    });
    s.send(msg(&bt)).await?;
    let audit = wattd_ledger::audit::audit(&f.query_store().await).await?;
    assert!(!audit.ok());
    let text = wattd_ledger::audit::audit_text(&audit);
    assert!(
        text.contains("seq 4: running totals are not seq 3's"),
        "{text}"
    );
    assert!(
        text.contains("package:0: stored 163 + lost 0 uJ != the node's total 1 uJ"),
        "{text}"
    );
    l.stop().await;
    Ok(())
}

/// A statement is recorded only when the authentic batch after its range chains to it, and
/// only if neither its key nor the key it names is older than the key the chain is at: a
/// statement with an invented hash, or signed by a key retired by a rotation (with a batch
/// forged by that key after it), records nothing.
async fn a_loss_statement_must_chain_to_the_batch_after_it_and_use_a_current_key(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let old = key("n1", 1, 1);
    let b1 = chain.next(1);
    let b2 = chain.rotate(key("n1", 2, 2));
    let b3 = chain.next(1);
    let b4 = chain.next(1);
    let mut s = connect(&f, &l, "n1").await;
    for bt in [&b1, &b2, &b3] {
        s.send(msg(bt)).await?;
    }
    let wrap = |st: wattd_proto::v1::SignedLossStatement| NodeMessage {
        kind: Some(node_message::Kind::Loss(st)),
    };
    // An invented hash: the real batch 5 does not chain to it.
    let b5 = chain.next(1);
    let invented = wattd_records::loss::sign_loss(
        &chain.key,
        &wattd_records::loss::Loss {
            first_seq: 4,
            last_seq: 4,
            last_hash: [9; 32],
            reason: wattd_proto::v1::LossReason::Damaged,
            next_key_epoch: 2,
            next_key_id: chain.key.key_id().to_vec(),
            detail: String::new(),
            rotations: Vec::new(),
        },
        0,
    );
    assert_eq!(s.send(wrap(invented)).await?.acked_seq, 3);
    let err = s.send(msg(&b5)).await.expect_err("does not chain");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("does not chain to the statement"),
        "{err:?}"
    );
    // The retired key declares 4 lost and forges the batch after it.
    let mut s = connect(&f, &l, "n1").await;
    let forged5 = sign_batch(
        &old,
        5,
        b4.hash,
        0,
        BatchContent {
            intervals: vec![interval(50, &[("run-a", 1, 1)], 1)],
            ..Default::default()
        },
    );
    let retired = wattd_records::loss::sign_loss(
        &old,
        &wattd_records::loss::Loss {
            first_seq: 4,
            last_seq: 4,
            last_hash: b4.hash,
            reason: wattd_proto::v1::LossReason::Damaged,
            next_key_epoch: 1,
            next_key_id: old.key_id().to_vec(),
            detail: String::new(),
            rotations: Vec::new(),
        },
        0,
    );
    assert_eq!(s.send(wrap(retired)).await?.acked_seq, 3);
    let err = s.send(msg(&forged5)).await.expect_err("retired key");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("chain is at epoch 2"), "{err:?}");
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&l.metrics.lost_ranges), 0);
    // The real batches still go in.
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&b4)).await?.acked_seq, 4);
    assert_eq!(s.send(msg(&b5)).await?.acked_seq, 5);
    l.stop().await;
    Ok(())
}

/// The lost batch is the one that announced a key rotation: the statement (signed by the new
/// key) carries the rotation as the old key signed it on its own; the ledger verifies it from
/// the key it knows, learns the new key, records the range, stores the batches after it, and
/// still knows the key on the next stream. Without that rotation the statement's key is unknown.
async fn a_lost_batch_that_announced_a_rotation_is_declared_with_the_signed_rotation(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let old = key("n1", 1, 1);
    let new = key("n1", 2, 2);
    let b1 = chain.next(1);
    let b2 = chain.rotate(key("n1", 2, 2));
    let b3 = chain.next(1);
    let b4 = chain.next(1);
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&b1)).await?;
    let rotation = wattd_proto::v1::KeyRotation {
        new_key_epoch: 2,
        new_public_key: new.public_key().to_vec(),
        new_key_id: new.key_id().to_vec(),
        effective_seq: 3,
        rotated_unix_ns: 1_700_000_000,
    };
    let bytes = rotation.encode_to_vec();
    let cert = wattd_proto::v1::SignedKeyRotation {
        signature: old.sign(&bytes).to_vec(),
        key_id: old.key_id().to_vec(),
        rotation_bytes: bytes,
    };
    let statement = |rotations: Vec<wattd_proto::v1::SignedKeyRotation>| NodeMessage {
        kind: Some(node_message::Kind::Loss(wattd_records::loss::sign_loss(
            &new,
            &wattd_records::loss::Loss {
                first_seq: 2,
                last_seq: 2,
                last_hash: b2.hash,
                reason: wattd_proto::v1::LossReason::Damaged,
                next_key_epoch: 2,
                next_key_id: new.key_id().to_vec(),
                detail: "the rotation batch".into(),
                rotations,
            },
            0,
        ))),
    };
    let err = s
        .send(statement(Vec::new()))
        .await
        .expect_err("new key unknown");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut s = connect(&f, &l, "n1").await;
    // A rotation "signed" by the new key itself proves nothing.
    let mut forged = cert.clone();
    forged.signature = new.sign(&forged.rotation_bytes).to_vec();
    let err = s
        .send(statement(vec![forged]))
        .await
        .expect_err("forged rotation");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(statement(vec![cert])).await?.acked_seq, 1);
    assert_eq!(s.send(msg(&b3)).await?.acked_seq, 3);
    assert_eq!(s.send(msg(&b4)).await?.acked_seq, 4);
    drop(s);
    let b5 = chain.next(1);
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(
        s.send(msg(&b5)).await?.acked_seq,
        5,
        "the new key is remembered"
    );
    let report = wattd_ledger::query::nodes_report(f.query_store().await.nodes().await?);
    let n = &report.nodes[0];
    assert_eq!((n.lost.len(), n.lost[0].energy), (1, "exact"));
    assert_eq!(n.lost[0].energy_uj, Some(3));
    let audit = wattd_ledger::audit::audit(&f.query_store().await).await?;
    assert!(audit.ok(), "{}", wattd_ledger::audit::audit_text(&audit));
    l.stop().await;
    Ok(())
}

/// Run ids and domains are checked with the contract's own rule (shared with the agent): a
/// newline in a run id or an unknown domain is refused as malformed, nothing stored. Two
/// allocations of 2^62 + 1 uJ each (authentic, conserving) are stored, and `runs` still answers
/// with their exact sum, 2^63 + 2 (SQLite's SUM failed with an overflow, for everyone).
async fn hostile_names_are_refused_and_huge_values_cannot_break_runs(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    let evil = wattd_records::seal::sign_batch(
        &chain.key,
        1,
        [0; 32],
        0,
        BatchContent {
            intervals: vec![interval(0, &[("run-a\nrun-b 9", 1, 0)], 0)],
            ..Default::default()
        },
    );
    let err = s.send(msg(&evil)).await.expect_err("newline in a run id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("run id"), "{err:?}");
    let mut s = connect(&f, &l, "n1").await;
    let mut iv = interval(0, &[("run-a", 1, 0)], 0);
    iv.domains[0].domain = "pkg".into();
    let odd = wattd_records::seal::sign_batch(
        &chain.key,
        1,
        [0; 32],
        0,
        BatchContent {
            intervals: vec![iv],
            ..Default::default()
        },
    );
    let err = s.send(msg(&odd)).await.expect_err("unknown domain");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("domain"), "{err:?}");
    // A run checkpoint's names get the same rules.
    let mut s = connect(&f, &l, "n1").await;
    let forged_cp = wattd_records::seal::sign_batch(
        &chain.key,
        1,
        [0; 32],
        0,
        BatchContent {
            intervals: vec![interval(0, &[("run-a", 1, 0)], 0)],
            run_checkpoint: Some(vec![wattd_proto::v1::RunCheckpoint {
                run_id: "run-a".into(),
                meter: "package:0\nrun-x package:0 9".into(),
                energy_uj: 1,
                since_seq: 1,
            }]),
            ..Default::default()
        },
    );
    let err = s.send(msg(&forged_cp)).await.expect_err("bad meter");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("run checkpoint"), "{err:?}");
    assert_eq!(count_rows(&f).await, 0);
    // 2^62 + 1 uJ in an interval of one second (4.6 EW): authentic and conserving, but
    // implausible. Stored and chained (the stream goes on), quarantined, in no total; `nodes`
    // flags the node and sums the quarantined energy exactly (2^63 + 2).
    let mut s = connect(&f, &l, "n1").await;
    let huge = (1u64 << 62) + 1;
    let big = chain.next_with(BatchContent {
        intervals: vec![
            interval(0, &[("run-big", huge, 0)], 0),
            interval(1, &[("run-big", huge, 0)], 0),
        ],
        ..Default::default()
    });
    assert_eq!(s.send(msg(&big)).await?.acked_seq, 1);
    let next = chain.next_with(BatchContent {
        intervals: vec![interval(2, &[("run-a", 10, 5)], 7)],
        ..Default::default()
    });
    assert_eq!(s.send(msg(&next)).await?.acked_seq, 2, "the chain goes on");
    let q = f.query_store().await;
    let report = wattd_ledger::query::runs_report(q.run_totals().await?);
    let ids: Vec<&str> = report.runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["run-a"], "quarantined energy is billed");
    let nodes = wattd_ledger::query::nodes_report(q.nodes().await?);
    let n = &nodes.nodes[0];
    assert_eq!(n.status, "implausible");
    assert_eq!(n.quarantined.len(), 1, "{:?}", n.quarantined);
    assert_eq!(n.quarantined[0].reason, "above_max_watts");
    assert_eq!(n.quarantined[0].allocations, 2);
    assert_eq!(n.quarantined_uj, 2 * u128::from(huge));
    let text = l.metrics.render();
    assert!(
        text.contains("wattd_ledger_implausible_total{reason=\"above_max_watts\"} 2")
            && text.contains("wattd_ledger_allocations_quarantined_total 2"),
        "{text}"
    );
    l.stop().await;

    // A node whose enrolment declares hardware that can draw it (10 MW), under a ledger that
    // allows any backlog, bills the same values over intervals long enough: `runs` answers
    // with their exact sum, 2^63 + 2 (SQLite's SUM failed with an overflow, for everyone).
    let mut big_node = Chain::new(key("n2", 1, 2));
    std::fs::write(
        f.enrolled.join("n2.toml"),
        format!(
            "{}\n[limits]\nmax_watts = {{ package = 10000000, total = 10000000 }}\n",
            big_node.key.public().to_toml()?
        ),
    )?;
    let mut permissive = limits();
    permissive.service.session.max_ahead_ns = i64::MAX;
    let l = f.start(permissive).await;
    let mut s = connect(&f, &l, "n2").await;
    let long = |index: u64| {
        let mut iv = interval(index, &[("run-big", huge, 0)], 0);
        iv.start_monotonic_ns = index * 500_000_000_000_000;
        iv.end_monotonic_ns = (index + 1) * 500_000_000_000_000;
        iv
    };
    let big = big_node.next_with(BatchContent {
        intervals: vec![long(0), long(1)],
        ..Default::default()
    });
    assert_eq!(s.send(msg(&big)).await?.acked_seq, 1);
    let report = wattd_ledger::query::runs_report(f.query_store().await.run_totals().await?);
    let billed: Vec<_> = report
        .runs
        .iter()
        .filter(|r| r.run_id == "run-big")
        .collect();
    assert_eq!(billed.len(), 1, "{:?}", report.runs);
    assert_eq!(billed[0].energy_uj, 2 * u128::from(huge));
    assert_eq!(billed[0].node_id.as_deref(), Some("n2"));
    l.stop().await;
    Ok(())
}

/// Two nodes allocate to the same run id: `runs` lists it once per node with each node's
/// total, so a node billing someone else's run shows as itself.
async fn runs_are_billed_per_node(b: Backend, name: &str) -> TestResult {
    let Some((f, mut a)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut other = Chain::new(key("n2", 1, 2));
    f.enrol(&other.key);
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&a.next(2))).await?;
    let mut s2 = connect(&f, &l, "n2").await;
    let forged = other.next_with(BatchContent {
        intervals: vec![interval(0, &[("run-a", 1_000_000, 0)], 0)],
        ..Default::default()
    });
    s2.send(msg(&forged)).await?;
    let report = wattd_ledger::query::runs_report(f.query_store().await.run_totals().await?);
    let rows: Vec<(Option<&str>, &str, u128)> = report
        .runs
        .iter()
        .map(|r| (r.node_id.as_deref(), r.run_id.as_str(), r.energy_uj))
        .collect();
    assert_eq!(
        rows,
        vec![
            (Some("n1"), "run-a", 30),
            (Some("n1"), "run-b", 50),
            (Some("n2"), "run-a", 1_000_000)
        ]
    );
    let text = wattd_ledger::query::runs_text(&report);
    assert!(text.starts_with("NODE"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("n2") && l.contains("run-a")),
        "{text}"
    );
    l.stop().await;
    Ok(())
}

/// The agent's platform meter (the BMC's wall less the other meters) is a domain of its own:
/// stored, checked for conservation like any meter, and billed per run; a platform meter that
/// does not conserve is refused like a package that does not.
async fn a_platform_meter_is_stored_and_billed(b: Backend, name: &str) -> TestResult {
    let Some((f, mut a)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    let platform = |measured_uj: u64, run_uj: u64, host_uj: u64| wattd_proto::v1::DomainEnergy {
        domain: "platform".into(),
        source: "redfish".into(),
        quality: 1,
        measured_uj,
        allocations: vec![wattd_proto::v1::Allocation {
            run_id: "run-a".into(),
            active_uj: run_uj,
            idle_uj: 0,
            usage_us: 100,
        }],
        host_active_uj: host_uj,
        usage_basis: "component_energy".into(),
        ..Default::default()
    };
    let mut good = interval(0, &[("run-a", 100, 0)], 50);
    good.domains.push(platform(60, 40, 20));
    let ack = s
        .send(msg(&a.next_with(BatchContent {
            intervals: vec![good],
            ..Default::default()
        })))
        .await?;
    assert_eq!(ack.acked_seq, 1);
    let report = wattd_ledger::query::runs_report(f.query_store().await.run_totals().await?);
    let rows: Vec<(&str, u128)> = report
        .runs
        .iter()
        .map(|r| (r.run_id.as_str(), r.energy_uj))
        .collect();
    assert_eq!(rows, vec![("run-a", 140)]);
    // 40 + 20 is not 61: refused, as any meter that does not conserve.
    let mut bad = interval(1, &[("run-a", 100, 0)], 50);
    bad.domains.push(platform(61, 40, 20));
    let refused = s
        .send(msg(&a.next_with(BatchContent {
            intervals: vec![bad],
            ..Default::default()
        })))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    l.stop().await;
    Ok(())
}

/// Node B, enrolled with its own valid certificate and key, adds 1 kWh to node A's run through
/// one interval 1 ns long (conserving). The batch is stored and chained, its allocation
/// quarantined with its reason; A's run is unchanged and B bills nothing; B is flagged in
/// `nodes` and keeps streaming honest batches, which are billed.
async fn a_forged_kilowatt_hour_in_one_nanosecond_is_quarantined(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut a)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut forger = Chain::new(key("n2", 1, 2));
    f.enrol(&forger.key);
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&a.next(2))).await?;
    let before = wattd_ledger::query::runs_report(f.query_store().await.run_totals().await?);
    let mut s2 = connect(&f, &l, "n2").await;
    let honest = forger.next_with(BatchContent {
        intervals: vec![interval(0, &[("run-z", 5, 0)], 0)],
        ..Default::default()
    });
    assert_eq!(s2.send(msg(&honest)).await?.acked_seq, 1);
    let kwh = 3_600_000_000_000u64;
    let mut iv = interval(1, &[("run-a", kwh, 0)], 0);
    iv.end_monotonic_ns = iv.start_monotonic_ns + 1;
    let forged = forger.next_with(BatchContent {
        intervals: vec![iv],
        ..Default::default()
    });
    assert_eq!(
        s2.send(msg(&forged)).await?.acked_seq,
        2,
        "stored and chained"
    );
    // Still streaming: the next honest batch is billed.
    let mut next = interval(2, &[("run-z", 7, 0)], 0);
    next.start_monotonic_ns = 1_000_000_001;
    let after = forger.next_with(BatchContent {
        intervals: vec![next],
        ..Default::default()
    });
    assert_eq!(s2.send(msg(&after)).await?.acked_seq, 3);
    let q = f.query_store().await;
    let report = wattd_ledger::query::runs_report(q.run_totals().await?);
    let rows = |r: &wattd_ledger::query::RunsReport| -> Vec<(Option<String>, String, u128)> {
        r.runs
            .iter()
            .map(|r| (r.node_id.clone(), r.run_id.clone(), r.energy_uj))
            .collect()
    };
    let mut expected = rows(&before);
    expected.push((Some("n2".into()), "run-z".into(), 12));
    assert_eq!(
        rows(&report),
        expected,
        "A's runs unchanged, B bills only run-z"
    );
    let nodes = wattd_ledger::query::nodes_report(q.nodes().await?);
    let by = |id: &str| nodes.nodes.iter().find(|n| n.node_id == id).expect("node");
    assert_ne!(by("n1").status, "implausible");
    let b = by("n2");
    assert_eq!(b.status, "implausible", "{:?}", b.quarantined);
    assert_eq!(b.last_seq, 3);
    assert_eq!(b.quarantined.len(), 1);
    let qr = &b.quarantined[0];
    assert_eq!(
        (
            qr.reason.as_str(),
            qr.allocations,
            qr.energy_uj,
            qr.first_seq
        ),
        ("above_max_watts", 1, u128::from(kwh), 2)
    );
    let text = wattd_ledger::query::nodes_text(&nodes);
    assert!(
        text.contains("QUARANTINED above_max_watts: 1 allocation(s), 3600000000000 uJ"),
        "{text}"
    );
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&l.metrics.allocations_quarantined), 1);
    l.stop().await;
    Ok(())
}

/// A node that sends distinct authentic batches for a stored seq, one per reconnect, gets each
/// refused as a fork; the evidence kept stops at the per-node bound, the rest is counted only.
async fn fork_evidence_is_bounded_per_node(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let b1 = chain.next(1);
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&b1)).await?;
    let bound = usize::try_from(wattd_ledger::store::FORK_ROWS_PER_NODE)?;
    for i in 0..bound + 3 {
        let fork = wattd_records::seal::sign_batch(
            &chain.key,
            1,
            [0; 32],
            i as i64,
            BatchContent {
                intervals: vec![interval(0, &[("run-a", 1, 0)], 0)],
                ..Default::default()
            },
        );
        let mut s = connect(&f, &l, "n1").await;
        let err = s.send(msg(&fork)).await.expect_err("fork");
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    }
    let nodes = f.query_store().await.nodes().await?;
    assert_eq!(nodes[0].forks.len(), bound);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&l.metrics.forks_not_kept), 3);
    l.stop().await;
    Ok(())
}

/// Removing a node's enrolment and reloading (SIGHUP) ends its open stream at once, with
/// PERMISSION_DENIED and reason `revoked`, before it sends anything more; other nodes' streams
/// go on; the node's next connection is refused; nothing of it is stored after the revocation.
async fn revocation_ends_open_streams_at_once(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut other = Chain::new(key("n2", 1, 2));
    f.enrol(&other.key);
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    let mut s2 = connect(&f, &l, "n2").await;
    s.send(msg(&chain.next(1))).await?;
    s2.send(msg(&other.next(1))).await?;
    f.unenrol("n1");
    l.reload.reload().map_err(|e| format!("reload: {e}"))?;
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(1), s.recv())
        .await
        .map_err(|_| "the stream was not ended within a second")?
        .expect_err("revoked");
    eprintln!(
        "revoked stream ended {:?} after the reload",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        err.metadata()
            .get("wattd-reason")
            .and_then(|v| v.to_str().ok()),
        Some("revoked")
    );
    assert_eq!(l.rejections(Reason::Revoked), 1);
    // The other node's stream is untouched.
    assert_eq!(s2.send(msg(&other.next(1))).await?.acked_seq, 2);
    // The revoked node cannot come back, and nothing more of it is stored.
    let ch = channel(l.addr, &f.ca.ca_pem, Some(&f.client_cert("n1"))).await?;
    NodeStream::open(ch).await.expect_err("unenrolled");
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(load(&l.metrics.connections_unenrolled) >= 1);
    let _ = chain.next(1);
    let nodes = f.query_store().await.nodes().await?;
    let n1 = nodes.iter().find(|n| n.node_id == "n1").ok_or("n1")?;
    assert_eq!(n1.last_seq, 1);
    l.stop().await;
    Ok(())
}

/// `--crl`: a node certificate the CRL revokes fails the TLS handshake. A CRL loaded by a reload
/// (SIGHUP) ends the open stream of a certificate it newly revokes within a second
/// (PERMISSION_DENIED, `revoked`); the same node with another certificate goes on, and a broken
/// CRL file is refused at reload with the current list kept.
async fn a_certificate_the_crl_revokes_is_refused_and_its_open_stream_ended(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let crl = f.dir.path().join("nodes-crl.pem");
    f.ca.crl(&crl, 1, &[999]);
    let mut opts = f.options(limits());
    opts.crl = Some(crl.clone());
    let l = f.start_with(opts).await;
    let old = f.ca.client_with_serial("n1", 1001);
    let new = f.ca.client_with_serial("n1", 1002);
    let listed = f.ca.client_with_serial("n1", 999);
    // Revoked from the start: the handshake fails.
    let refused = match channel(l.addr, &f.ca.ca_pem, Some(&listed)).await {
        Ok(ch) => NodeStream::open(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a certificate on the CRL opened a stream");
    let mut s = NodeStream::open(channel(l.addr, &f.ca.ca_pem, Some(&old)).await?).await?;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 1);
    // The CA revokes the certificate in use; the ledger reloads.
    f.ca.crl(&crl, 2, &[999, 1001]);
    assert_eq!(
        l.reload.reload_tls().map_err(|e| format!("reload: {e}"))?,
        2
    );
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(1), s.recv())
        .await
        .map_err(|_| "the stream was not ended within a second")?
        .expect_err("revoked");
    eprintln!(
        "revoked certificate's stream ended {:?} after the reload",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("CRL"), "{err:?}");
    assert_eq!(l.rejections(Reason::Revoked), 1);
    let again = match channel(l.addr, &f.ca.ca_pem, Some(&old)).await {
        Ok(ch) => NodeStream::open(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(again, "the revoked certificate connected again");
    // The node's renewed certificate works, and nothing was lost.
    let mut s = NodeStream::open(channel(l.addr, &f.ca.ca_pem, Some(&new)).await?).await?;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 2);
    // A broken CRL is refused at reload, naming the file; the current list stays.
    std::fs::write(&crl, "-----BEGIN X509 CRL-----\ngarbage")?;
    let e = l.reload.reload_tls().expect_err("a broken CRL").to_string();
    assert!(e.contains("--crl"), "{e}");
    let still = match channel(l.addr, &f.ca.ca_pem, Some(&old)).await {
        Ok(ch) => NodeStream::open(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(
        still,
        "the revoked certificate connected after a failed reload"
    );
    l.stop().await;
    Ok(())
}

/// Revoking one key epoch (`revoked_epochs` in the node's enrolment file): the open stream is
/// ended at the reload; the node goes on with its current key; anything signed by the revoked
/// epoch (here a leaked old key forging a different seq 1) is refused as `revoked`, not kept as
/// fork evidence; revoking the current epoch stops the node's batches.
async fn a_revoked_key_epoch_signs_nothing_more(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let old_key = key("n1", 1, 1);
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    s.send(msg(&chain.next(1))).await?;
    s.send(msg(&chain.rotate(key("n1", 2, 2)))).await?;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 3);
    let file = f.enrolled.join("n1-1.toml");
    let text = std::fs::read_to_string(&file)?;
    std::fs::write(&file, format!("{text}\nrevoked_epochs = [1]\n"))?;
    l.reload.reload().map_err(|e| format!("reload: {e}"))?;
    let err = tokio::time::timeout(Duration::from_secs(1), s.recv())
        .await
        .map_err(|_| "the stream was not ended within a second")?
        .expect_err("revoked");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Epoch 2 goes on.
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 4);
    // The leaked epoch-1 key forges another seq 1: refused as revoked, no fork row.
    let forged = wattd_records::seal::sign_batch(
        &old_key,
        1,
        [0; 32],
        7,
        BatchContent {
            intervals: vec![interval(100, &[("run-a", 1, 0)], 0)],
            ..Default::default()
        },
    );
    let mut s2 = connect(&f, &l, "n1").await;
    let err = s2.send(msg(&forged)).await.expect_err("revoked epoch");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("key epoch 1"), "{err:?}");
    assert!(f.query_store().await.nodes().await?[0].forks.is_empty());
    // Its heartbeats too.
    let mut s2 = connect(&f, &l, "n1").await;
    let err = s2
        .send(heartbeat(&old_key, 4))
        .await
        .expect_err("heartbeat of a revoked epoch");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    drop(s2);
    // Revoking the current epoch stops the node's batches.
    std::fs::write(&file, format!("{text}\nrevoked_epochs = [1, 2]\n"))?;
    l.reload.reload().map_err(|e| format!("reload: {e}"))?;
    let _ = tokio::time::timeout(Duration::from_secs(1), s.recv()).await;
    let mut s = connect(&f, &l, "n1").await;
    let err = s
        .send(msg(&chain.next(1)))
        .await
        .expect_err("current epoch revoked");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(f.query_store().await.nodes().await?[0].last_seq, 4);
    l.stop().await;
    Ok(())
}

/// No SIGHUP: the ledger watches its enrolment directory. A half-written file that does not
/// load changes nothing (the stream goes on); removing the node's file ends its open stream
/// within a second of the quiet period; emptying the directory is refused.
async fn the_enrolment_directory_is_watched(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut other = Chain::new(key("n2", 1, 2));
    f.enrol(&other.key);
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 1);
    let broken = f.enrolled.join("broken.toml");
    std::fs::write(&broken, "node_id = ")?;
    tokio::time::sleep(wattd_ledger::server::WATCH_QUIET * 3).await;
    assert_eq!(
        s.send(msg(&chain.next(1))).await?.acked_seq,
        2,
        "a bad file changes nothing"
    );
    std::fs::remove_file(&broken)?;
    f.unenrol("n1");
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(1) + wattd_ledger::server::WATCH_QUIET,
        s.recv(),
    )
    .await
    .map_err(|_| "the stream was not ended by the watch")?
    .expect_err("revoked");
    eprintln!(
        "watch: stream ended {:?} after the file was removed",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(l.rejections(Reason::Revoked), 1);
    // A directory emptied (a copy in progress) would revoke every node: refused, n2 stays.
    f.unenrol("n2");
    let e = l.reload.reload().expect_err("no node would be enrolled");
    assert!(
        matches!(e, wattd_ledger::server::ReloadError::NoNode { .. }),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("no node would be enrolled"), "{e}");
    let mut s2 = connect(&f, &l, "n2").await;
    assert_eq!(s2.send(msg(&other.next(1))).await?.acked_seq, 1);
    l.stop().await;
    Ok(())
}

/// `--idle-timeout-s`: an HTTP/2 connection (TLS and preface done, a valid enrolled
/// certificate) that never opens a stream is closed after the timeout; one whose stream is open
/// but quiet for longer is not.
async fn a_connection_without_a_stream_is_closed_when_idle(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut lim = limits();
    lim.idle_timeout = Duration::from_millis(500);
    let l = f.start(lim).await;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    // A stream, quiet for four idle timeouts, still works.
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 2);
    assert_eq!(load(&l.metrics.idle_timeouts), 0);
    // A connection that never streams is closed.
    let idle = channel(l.addr, &f.ca.ca_pem, Some(&f.client_cert("n1"))).await?;
    eventually("the idle connection closed", || {
        load(&l.metrics.idle_timeouts) == 1
    })
    .await;
    drop(idle);
    // The streaming one was not touched.
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 3);
    l.stop().await;
    Ok(())
}

/// The node was SIGKILLed with a backlog that rotates its key: it reopens with a heartbeat
/// signed by its current key, which the ledger cannot know before the backlog's rotation
/// arrives. The ledger answers (where it stands) without recording it, the backlog flows and
/// teaches the key, and the next heartbeat is verified. (Refusing it made every reconnect
/// fail for ever: found by a 5-minute rotation run with SIGKILLs.) A heartbeat claiming a
/// known epoch with an unknown key is still refused.
async fn a_heartbeat_from_a_key_in_the_backlog_is_answered_not_believed(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 1);
    drop(s);
    // The backlog: a rotation to epoch 2 and batches signed by it.
    let backlog = vec![chain.rotate(key("n1", 2, 2)), chain.next(1), chain.next(1)];
    let mut s = connect(&f, &l, "n1").await;
    let ack = s.send(chain.heartbeat(4)).await?;
    assert_eq!(ack.acked_seq, 1, "answered with where the ledger stands");
    assert_eq!(ack.announced_sealed_seq, 0, "not believed");
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&l.metrics.heartbeats_unverified), 1);
    for bt in &backlog {
        s.send(msg(bt)).await?;
    }
    let ack = s.send(chain.heartbeat(4)).await?;
    assert_eq!(
        (ack.acked_seq, ack.announced_sealed_seq),
        (4, 4),
        "now verified"
    );
    // A forged key for a known epoch: refused.
    let mut s = connect(&f, &l, "n1").await;
    let err = s
        .send(heartbeat(&key("n1", 2, 99), 4))
        .await
        .expect_err("unknown key for a known epoch");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    l.stop().await;
    Ok(())
}

/// Run labels travel in the records: an interval's `run_labels` and a summary's `labels`. The
/// ledger keeps the first value per (node, run, key); `runs` names each run's account and
/// filters by it, and says how each finished run's last usage was obtained (a run billed
/// nothing listed too). A label the contract does not allow (a newline in a value) is refused as
/// malformed, nothing stored.
async fn run_labels_name_the_account_and_hostile_ones_are_refused(
    b: Backend,
    name: &str,
) -> TestResult {
    use wattd_proto::v1::{Label, RunLabels, RunSummary};
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let label = |k: &str, v: &str| Label {
        key: k.into(),
        value: v.into(),
    };
    let mut s = connect(&f, &l, "n1").await;
    let mut iv = interval(0, &[("run-a", 10, 5), ("run-b", 20, 5)], 7);
    iv.run_labels = vec![RunLabels {
        run_id: "run-a".into(),
        labels: vec![label("account", "acme"), label("team", "blue")],
    }];
    s.send(msg(&chain.next_with(BatchContent {
        intervals: vec![iv],
        ..Default::default()
    })))
    .await?;
    // run-b's labels come with its summary only (its first interval's batch was lost, say);
    // its summary and a ghost's (a run billed nothing) say how their last usage was obtained.
    s.send(msg(&chain.next_with(BatchContent {
        intervals: vec![interval(1, &[("run-b", 20, 5)], 7)],
        run_summaries: vec![
            RunSummary {
                run_id: "run-b".into(),
                labels: vec![label("account", "globex")],
                final_usage: "reconciled".into(),
                reconciled_usage_us: 77,
                ..Default::default()
            },
            RunSummary {
                run_id: "run-ghost".into(),
                final_usage: "lost".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    })))
    .await?;
    let q = f.query_store().await;
    let mut report = wattd_ledger::query::runs_report(q.run_totals().await?);
    wattd_ledger::query::with_finals(&mut report, q.run_finals().await?);
    let finals: Vec<(&str, Option<&str>, Option<u64>, u128)> = report
        .runs
        .iter()
        .map(|r| {
            (
                r.run_id.as_str(),
                r.final_usage.as_deref(),
                r.reconciled_usage_us,
                r.energy_uj,
            )
        })
        .collect();
    assert_eq!(
        finals,
        [
            ("run-a", None, None, 15),
            ("run-b", Some("reconciled"), Some(77), 50),
            ("run-ghost", Some("lost"), Some(0), 0)
        ]
    );
    let q = f.query_store().await;
    let mut report = wattd_ledger::query::runs_report(q.run_totals().await?);
    wattd_ledger::query::with_accounts(&mut report, q.run_label("account").await?, None);
    let accounts: Vec<(&str, Option<&str>)> = report
        .runs
        .iter()
        .map(|r| (r.run_id.as_str(), r.account.as_deref()))
        .collect();
    assert_eq!(
        accounts,
        [("run-a", Some("acme")), ("run-b", Some("globex"))]
    );
    let mut report = wattd_ledger::query::runs_report(q.run_totals().await?);
    wattd_ledger::query::with_accounts(&mut report, q.run_label("account").await?, Some("acme"));
    assert_eq!(report.runs.len(), 1);
    assert_eq!(report.runs[0].energy_uj, 15);
    // A hostile label: refused as malformed.
    let mut iv = interval(2, &[("run-c", 1, 0)], 0);
    iv.run_labels = vec![RunLabels {
        run_id: "run-c".into(),
        labels: vec![label("account", "acme\nrun-x 9")],
    }];
    let bad = chain.next_with(BatchContent {
        intervals: vec![iv],
        ..Default::default()
    });
    let err = s.send(msg(&bad)).await.expect_err("a newline in a label");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("label"), "{err:?}");
    assert_eq!(f.query_store().await.run_label("account").await?.len(), 2);
    l.stop().await;
    Ok(())
}

/// A TLS connection to the ledger with `files` as the client certificate, and nothing more.
async fn raw_tls(
    addr: std::net::SocketAddr,
    ca_pem: &std::path::Path,
    files: &wattd_tests::tls::CertFiles,
) -> Result<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca_pem)? {
        roots.add(c?)?;
    }
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&files.cert)?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await?,
    )
}

/// An attacker on 127.0.0.2 holds plain TCP sockets: beyond the per-source bound its next one
/// is closed at accept, while the enrolled node on 127.0.0.1 keeps streaming. A client that
/// completes the TLS handshake and then says nothing is closed at the preface deadline.
async fn admission_bounds_each_source_and_the_preface(b: Backend, name: &str) -> TestResult {
    use tokio::io::AsyncReadExt as _;
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let mut lim = limits();
    lim.max_connections_per_source = 2;
    lim.preface_timeout = Duration::from_millis(400);
    let l = f.start(lim).await;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let attacker = || async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind("127.0.0.2:0".parse().map_err(std::io::Error::other)?)?;
        sock.connect(l.addr).await
    };
    let _a1 = attacker().await?;
    let _a2 = attacker().await?;
    let mut a3 = attacker().await?;
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(2), a3.read(&mut buf)).await??;
    assert_eq!(
        n, 0,
        "the third connection from 127.0.0.2 is closed at accept"
    );
    assert_eq!(load(&l.metrics.connections_refused_source), 1);
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 1);
    // Handshake, then silence: closed at the preface deadline.
    let mut quiet = raw_tls(l.addr, &f.ca.ca_pem, &f.client_cert("n1")).await?;
    let started = std::time::Instant::now();
    // (The server's own HTTP/2 settings arrive first; then the connection ends.)
    let mut big = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match quiet.read(&mut big).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the silent connection was not closed within 3 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    eventually("the preface timeout counted", || {
        load(&l.metrics.preface_timeouts) == 1
    })
    .await;
    l.stop().await;
    Ok(())
}

/// A node declares 70..=75 lost: each run's share of it is exact from the run checkpoints at
/// 60 and 120 and the stored batches between (runs a and b all along at 15 and 25 uJ per
/// interval, run c only inside the range); `pending` until checkpoint 120 is stored.
async fn a_lost_range_is_priced_per_run_from_the_checkpoints_around_it(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut bs = Vec::new();
    for seq in 1..=125u64 {
        let mut runs = vec![("run-a", 10, 5), ("run-b", 20, 5)];
        if (71..=73).contains(&seq) {
            runs.push(("run-c", 100, 0));
        }
        // Seq 80 (stored, between the checkpoints around the range) is implausible: 1 kWh
        // to run-z in a nanosecond. Its meter is quarantined, and the quarantined rows are
        // subtracted from the checkpoints' difference like billed ones: neither run-z's
        // kilowatt-hour nor run-a's and run-b's rows of seq 80 come back as lost energy.
        if seq == 80 {
            runs.push(("run-z", 3_600_000_000_000, 0));
        }
        let mut iv = interval(seq, &runs, 7);
        if seq == 80 {
            iv.end_monotonic_ns = iv.start_monotonic_ns + 1;
        }
        bs.push(chain.next_with(BatchContent {
            intervals: vec![iv],
            ..Default::default()
        }));
    }
    let mut s = connect(&f, &l, "n1").await;
    for bt in &bs[..69] {
        s.send(msg(bt)).await?;
    }
    s.send(chain.loss(70, 75)).await?;
    for bt in &bs[75..100] {
        s.send(msg(bt)).await?;
    }
    let store = f.query_store().await;
    let mut report = wattd_ledger::query::nodes_report(store.nodes().await?);
    wattd_ledger::lost::price_runs(&store, &mut report).await?;
    assert_eq!(
        report.nodes[0].lost[0].runs, "pending",
        "{:?}",
        report.nodes[0].lost[0]
    );
    for bt in &bs[100..] {
        s.send(msg(bt)).await?;
    }
    let mut report = wattd_ledger::query::nodes_report(store.nodes().await?);
    wattd_ledger::lost::price_runs(&store, &mut report).await?;
    let lost = &report.nodes[0].lost[0];
    assert_eq!(lost.runs, "exact", "{lost:?}");
    let get = |r: &str| {
        lost.energy_by_run
            .get(r)
            .and_then(|m| m.get("package:0"))
            .copied()
    };
    assert_eq!(get("run-a"), Some(6 * 15));
    assert_eq!(get("run-b"), Some(6 * 25));
    assert_eq!(get("run-c"), Some(3 * 100));
    assert_eq!(get("run-z"), None, "{lost:?}");
    assert_eq!(report.nodes[0].quarantined[0].allocations, 3);
    assert!(lost.runs_unknown.is_empty());
    // The runs' shares and the host's add up to the meter's lost energy.
    assert_eq!(lost.energy_uj, Some(6 * 47 + 300));
    let text = wattd_ledger::query::nodes_text(&report);
    assert!(text.contains("run run-c package:0: 300 uJ"), "{text}");
    l.stop().await;
    Ok(())
}

/// A renewed server certificate on disk is served to new connections after a reload (SIGHUP),
/// without a restart; a broken file on disk is refused and the current certificate stays.
async fn the_server_certificate_is_reloaded_without_a_restart(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let peer_cert = |t: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        t.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
    };
    let before = peer_cert(&raw_tls(l.addr, &f.ca.ca_pem, &f.client_cert("n1")).await?);
    // Renewed: a new key and certificate from the same CA, written over the files.
    let renewed = f.ca.server("server");
    l.reload.reload_tls().map_err(|e| format!("reload: {e}"))?;
    let after = peer_cert(&raw_tls(l.addr, &f.ca.ca_pem, &f.client_cert("n1")).await?);
    assert!(before.is_some() && after.is_some());
    assert_ne!(before, after, "the renewed certificate is served");
    // A half-written file: refused, the renewed certificate stays.
    std::fs::write(&renewed.cert, "-----BEGIN CERTIFICATE-----\ntruncated")?;
    assert!(l.reload.reload_tls().is_err());
    let still = peer_cert(&raw_tls(l.addr, &f.ca.ca_pem, &f.client_cert("n1")).await?);
    assert_eq!(still, after);
    // Streams work on the renewed certificate.
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(1))).await?.acked_seq, 1);
    l.stop().await;
    Ok(())
}

/// Runs `sql` on the fixture's database directly (what an operator's mistake, a bad restore or
/// an older ledger leaves behind).
async fn raw_sql(f: &Fixture, sql: &str) -> TestResult {
    match &f.store_url {
        wattd_ledger::store::StoreUrl::Sqlite(path) => {
            let c = rusqlite::Connection::open(path)?;
            c.execute_batch(sql)?;
        }
        wattd_ledger::store::StoreUrl::Postgres(url) => {
            let (client, conn) = url
                .parse::<tokio_postgres::Config>()?
                .connect(tokio_postgres::NoTls)
                .await?;
            let task = tokio::spawn(conn);
            client.batch_execute(sql).await?;
            drop(client);
            let _ = task.await;
        }
    }
    Ok(())
}

/// `runs` reads the totals maintained per hour in the commit's transaction: they equal the sums
/// of the allocations (read to the nanosecond when a time bound is not a whole hour); `audit`
/// names a maintained total that was changed behind the ledger's back; a database from before
/// the rollup (schema 4) gets it filled from its allocations when `serve` opens it.
async fn run_totals_are_maintained_per_hour_and_the_audit_checks_them(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    for _ in 0..4 {
        let bt = chain.next(2);
        s.send(msg(&bt)).await?;
    }
    l.stop().await;
    let store = f.query_store().await;
    let maintained = store.run_totals().await?;
    assert!(!maintained.is_empty());
    let scanned = store
        .run_totals_where(wattd_ledger::store::TotalsFilter {
            from_unix_ns: Some(1),
            ..Default::default()
        })
        .await?;
    assert_eq!(maintained, scanned, "the rollup against the allocations");
    let audit = wattd_ledger::audit::audit(&store).await?;
    assert!(audit.ok(), "{}", wattd_ledger::audit::audit_text(&audit));

    let text = audit_fails_after(
        &f,
        &store,
        "UPDATE run_totals_hourly SET energy_lo = energy_lo + 1 WHERE run_id = 'run-a'",
    )
    .await?;
    assert!(text.contains("run run-a package:0 hour"), "{text}");
    assert!(text.contains("maintained total"), "{text}");
    // A maintained total of a node that stored nothing is billed too, so it is a failure.
    raw_sql(
        &f,
        "INSERT INTO run_totals_hourly (node_id, run_id, domain, hour, energy_hi, energy_lo) \
         VALUES ('ghost', 'run-g', 'package:0', 1, 0, 5)",
    )
    .await?;
    let audit = wattd_ledger::audit::audit(&store).await?;
    let text = wattd_ledger::audit::audit_text(&audit);
    assert!(
        text.contains("FAIL node ghost (no stored batch): run run-g package:0 hour 1"),
        "{text}"
    );

    // An older ledger's database: no rollup rows, schema 4.
    raw_sql(
        &f,
        "DELETE FROM run_totals_hourly; UPDATE ledger_meta SET value = 4 WHERE key = 'schema_version'",
    )
    .await?;
    let served = f.query_store_serve().await;
    assert_eq!(
        served.run_totals().await?,
        maintained,
        "filled from the allocations"
    );
    let audit = wattd_ledger::audit::audit(&served).await?;
    assert!(audit.ok(), "{}", wattd_ledger::audit::audit_text(&audit));
    Ok(())
}

const DAY_NS: i64 = 86_400_000_000_000;

/// n1 streams six batches: a labelled run, an interval quarantined (a forged kilowatt-hour in
/// one nanosecond) beside an honest one, and plain ones; returns the ledger's quarantine count.
async fn stream_for_detail(f: &Fixture, chain: &mut Chain) -> Result<u64, BoxError> {
    use wattd_proto::v1::{Label, RunLabels};
    let l = f.start(limits()).await;
    let mut s = connect(f, &l, "n1").await;
    let mut iv = interval(
        chain.take_indices(1),
        &[("run-a", 10, 5), ("run-b", 20, 5)],
        7,
    );
    iv.run_labels = vec![RunLabels {
        run_id: "run-a".into(),
        labels: vec![Label {
            key: "account".into(),
            value: "acme".into(),
        }],
    }];
    s.send(msg(&chain.next_with(BatchContent {
        intervals: vec![iv],
        ..Default::default()
    })))
    .await?;
    s.send(msg(&chain.next(3))).await?;
    let first = chain.take_indices(2);
    let honest = interval(first, &[("run-b", 20, 5)], 7);
    let mut forged = interval(first + 1, &[("run-a", 3_600_000_000_000, 0)], 0);
    forged.end_monotonic_ns = forged.start_monotonic_ns + 1;
    s.send(msg(&chain.next_with(BatchContent {
        intervals: vec![honest, forged],
        ..Default::default()
    })))
    .await?;
    for _ in 0..3 {
        s.send(msg(&chain.next(3))).await?;
    }
    let quarantined = l
        .metrics
        .allocations_quarantined
        .load(std::sync::atomic::Ordering::Relaxed);
    l.stop().await;
    Ok(quarantined)
}

/// Every read that needs per-interval detail, as text: run totals over ranges that are not
/// whole hours (all, one run, one node), the change feed with accounts, a run's batches a page
/// of two at a time, and the energy of a seq range (a lost range's price).
async fn detail_answers(q: &wattd_ledger::store::AnyStore) -> Result<String, BoxError> {
    use wattd_ledger::store::TotalsFilter;
    let mut out = String::new();
    let range = |run: Option<&str>, node: Option<&str>| TotalsFilter {
        run_id: run.map(str::to_owned),
        node_id: node.map(str::to_owned),
        from_unix_ns: Some(1),
        to_unix_ns: Some(1_700_000_001),
    };
    for f in [
        range(None, None),
        range(Some("run-a"), None),
        range(None, Some("n1")),
    ] {
        out += &format!("{:?}\n", q.run_totals_where(f).await?);
    }
    out += &format!("{:?}\n", q.run_totals().await?);
    // A batch as its node, seq, hash and allocations (the signed bytes are the store's own).
    let shown = |page: &[wattd_ledger::store::BatchEnergy]| -> String {
        page.iter()
            .map(|b| {
                format!(
                    "{} {} {:?} {:?}\n",
                    b.node_id,
                    b.seq,
                    &b.hash[..4],
                    b.allocations
                )
            })
            .collect()
    };
    out += &shown(&q.batch_energy("n1", 0, 100, "account").await?);
    out += &shown(&q.batch_energy("n1", 2, 2, "account").await?);
    for run in ["run-a", "run-b"] {
        let mut after = (String::new(), 0u64);
        loop {
            let page = q
                .run_batches(run, "", (&after.0, after.1), 2, "account")
                .await?;
            let Some(last) = page.last() else { break };
            after = (last.node_id.clone(), last.seq);
            out += &format!("{run} page:\n{}", shown(&page));
        }
    }
    out += &format!("{:?}\n", q.run_energy_between("n1", 1, 5).await?);
    Ok(out)
}

/// SQL that returns one number, on either store.
async fn raw_count(f: &Fixture, sql: &str) -> Result<i64, BoxError> {
    Ok(match &f.store_url {
        wattd_ledger::store::StoreUrl::Sqlite(path) => {
            rusqlite::Connection::open(path)?.query_row(sql, [], |r| r.get(0))?
        }
        wattd_ledger::store::StoreUrl::Postgres(url) => {
            let (client, conn) = url
                .parse::<tokio_postgres::Config>()?
                .connect(tokio_postgres::NoTls)
                .await?;
            let task = tokio::spawn(conn);
            let n = client.query_one(sql, &[]).await?.get(0);
            drop(client);
            let _ = task.await;
            n
        }
    })
}

fn assert_audit_clean(audit: &wattd_ledger::audit::AuditReport) {
    assert!(audit.ok(), "{}", wattd_ledger::audit::audit_text(audit));
}

/// Changes the store behind the ledger's back with `sql`; the audit must fail: its text.
async fn audit_fails_after(
    f: &Fixture,
    q: &wattd_ledger::store::AnyStore,
    sql: &str,
) -> Result<String, BoxError> {
    raw_sql(f, sql).await?;
    let audit = wattd_ledger::audit::audit(q).await?;
    let text = wattd_ledger::audit::audit_text(&audit);
    assert!(!audit.ok(), "{text}");
    Ok(text)
}

/// The allocation rows are pruned past the retention, first those of the batches received
/// long ago (the others keep theirs), then all: every read answers exactly as before (labels
/// and quarantined allocations included: the detail is decoded from the signed batches), the
/// audit stays clean, and still names a maintained total changed behind the ledger's back.
async fn detail_past_the_retention_is_decoded_from_the_batches(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let quarantined = stream_for_detail(&f, &mut chain).await?;
    assert!(quarantined > 0, "the forged interval is quarantined");
    let q = f.query_store().await;
    let before = detail_answers(&q).await?;
    assert!(before.contains("acme"), "{before}");
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    let rows = "SELECT count(*) FROM allocations";
    let all_rows = raw_count(&f, rows).await?;
    assert!(all_rows > 0);

    // Batches 1-3 were received ten days ago (their rows moved with them on PostgreSQL: to the
    // default partition, no day partition being that old).
    let moved = match b {
        Backend::Sqlite => {
            "UPDATE batches SET received_unix_ns = received_unix_ns - 10 * 86400000000000 \
             WHERE seq <= 3"
        }
        Backend::Postgres => {
            "UPDATE batches SET received_unix_ns = received_unix_ns - 10 * 86400000000000 \
             WHERE seq <= 3; UPDATE allocations SET received_day = received_day - 10 WHERE seq <= 3"
        }
    };
    raw_sql(&f, moved).await?;
    let old_rows = raw_count(&f, "SELECT count(*) FROM allocations WHERE seq <= 3").await?;
    assert!(old_rows > 0);
    let now = wattd_ledger::unix_now_ns();
    let serve = f.query_store_serve().await;
    let done = serve
        .upkeep_detail(now, Some(Duration::from_secs(86_400)))
        .await?;
    assert_eq!(done.rows_deleted, u64::try_from(old_rows)?, "{done:?}");
    assert_eq!(done.partitions_dropped, 0, "{done:?}");
    // PostgreSQL's autovacuum never analyzes the partitioned table itself: the upkeep does
    // (the serving ledger's, at its start, may have been first).
    let pg = b == Backend::Postgres;
    let refreshed = done.statistics_refreshed;
    assert!(
        refreshed == pg.then_some(true) || refreshed.is_none(),
        "{done:?}"
    );
    if pg {
        let analyzed = "SELECT count(*) FROM pg_stat_user_tables \
                        WHERE relname = 'allocations' AND last_analyze IS NOT NULL";
        assert_eq!(raw_count(&f, analyzed).await?, 1, "allocations analyzed");
    }
    let from = done.detail_from_unix_ns.ok_or("detail_from set")?;
    assert!(from <= now - DAY_NS && from > now - 2 * DAY_NS, "{done:?}");
    assert_eq!(raw_count(&f, rows).await?, all_rows - old_rows);
    // Again: nothing more to do.
    let again = serve
        .upkeep_detail(now, Some(Duration::from_secs(86_400)))
        .await?;
    assert_eq!((again.rows_deleted, again.partitions_dropped), (0, 0));
    // Analyzed a moment ago: not again within the hour (nor by another process sharing it).
    assert_eq!(again.statistics_refreshed, None, "{again:?}");
    assert_eq!(detail_answers(&q).await?, before, "partly pruned");
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    // A stored row changed behind the ledger's back is named (the batches say otherwise).
    let tamper = |d: i64| {
        format!(
            "UPDATE allocations SET energy_uj = energy_uj + ({d}) \
             WHERE seq = 4 AND run_id = 'run-a' AND interval_index = 6"
        )
    };
    let text = audit_fails_after(&f, &q, &tamper(1)).await?;
    assert!(
        text.contains("run run-a package:0 hour 0: allocation rows 136 uJ, batches 135 uJ"),
        "{text}"
    );
    raw_sql(&f, &tamper(-1)).await?;
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);

    // Three days on, a day's retention: every row goes. The statistics are due again.
    let done = serve
        .upkeep_detail(now + 3 * DAY_NS, Some(Duration::from_secs(86_400)))
        .await?;
    assert_eq!(done.statistics_refreshed, pg.then_some(true), "{done:?}");
    if b == Backend::Postgres {
        assert!(done.partitions_dropped >= 1, "{done:?}");
    }
    assert_eq!(raw_count(&f, rows).await?, 0);
    assert_eq!(detail_answers(&q).await?, before, "all pruned");
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    // The signed batches and the hourly totals stay, and the audit still checks them.
    let text = audit_fails_after(
        &f,
        &q,
        "UPDATE run_totals_hourly SET energy_lo = energy_lo + 1 WHERE run_id = 'run-b'",
    )
    .await?;
    assert!(
        text.contains("run run-b package:0 hour 0: maintained totals"),
        "{text}"
    );
    Ok(())
}

/// A store of the version before the retention (5; on PostgreSQL an unpartitioned
/// `allocations`) is upgraded when served: the old rows become one partition, every read
/// answers as before, and the retention prunes them like any other day's.
async fn a_version_5_store_is_upgraded_and_its_old_rows_pruned_like_any(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    stream_for_detail(&f, &mut chain).await?;
    let before = detail_answers(&f.query_store().await).await?;
    let v5 = match b {
        Backend::Sqlite => {
            "DROP INDEX batches_by_seal; DROP INDEX batches_by_received; \
             UPDATE ledger_meta SET value = 5 WHERE key = 'schema_version'"
        }
        Backend::Postgres => {
            "CREATE TABLE allocations_v5 (node_id TEXT NOT NULL, \
             seq BIGINT NOT NULL, interval_index BIGINT NOT NULL, domain TEXT NOT NULL, \
             run_id TEXT NOT NULL, active_uj BIGINT NOT NULL, idle_uj BIGINT NOT NULL, \
             energy_uj BIGINT NOT NULL, usage_us BIGINT NOT NULL, \
             FOREIGN KEY (node_id, seq) REFERENCES batches (node_id, seq)); \
             INSERT INTO allocations_v5 SELECT node_id, seq, interval_index, domain, run_id, \
             active_uj, idle_uj, energy_uj, usage_us FROM allocations; \
             DROP TABLE allocations; ALTER TABLE allocations_v5 RENAME TO allocations; \
             CREATE INDEX allocations_by_run ON allocations (run_id); \
             CREATE INDEX allocations_by_run_batch ON allocations (run_id, node_id, seq); \
             CREATE INDEX allocations_by_batch ON allocations (node_id, seq); \
             DROP INDEX batches_by_seal; DROP INDEX batches_by_received; \
             UPDATE ledger_meta SET value = 5 WHERE key = 'schema_version'"
        }
    };
    raw_sql(&f, v5).await?;
    let rows = raw_count(&f, "SELECT count(*) FROM allocations").await?;
    assert!(rows > 0);
    let serve = f.query_store_serve().await;
    assert_eq!(
        raw_count(
            &f,
            "SELECT value FROM ledger_meta WHERE key = 'schema_version'"
        )
        .await?,
        6
    );
    if b == Backend::Postgres {
        assert_eq!(
            raw_count(
                &f,
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'allocations'::regclass \
                 AND inhrelid = 'allocations_legacy'::regclass"
            )
            .await?,
            1,
            "the old table is a partition"
        );
    }
    let q = f.query_store().await;
    assert_eq!(
        raw_count(&f, "SELECT count(*) FROM allocations").await?,
        rows
    );
    assert_eq!(detail_answers(&q).await?, before, "upgraded");
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    // The retention passes batches 1-3 (received ten days ago) before it passes the upgrade's
    // day: their rows go, the legacy partition stays with the others'.
    raw_sql(
        &f,
        "UPDATE batches SET received_unix_ns = received_unix_ns - 10 * 86400000000000 \
         WHERE seq <= 3",
    )
    .await?;
    let old_rows = raw_count(&f, "SELECT count(*) FROM allocations WHERE seq <= 3").await?;
    let done = serve
        .upkeep_detail(
            wattd_ledger::unix_now_ns(),
            Some(Duration::from_secs(86_400)),
        )
        .await?;
    assert_eq!(done.rows_deleted, u64::try_from(old_rows)?, "{done:?}");
    assert_eq!(done.partitions_dropped, 0, "{done:?}");
    assert_eq!(
        raw_count(&f, "SELECT count(*) FROM allocations").await?,
        rows - old_rows
    );
    assert_eq!(detail_answers(&q).await?, before, "legacy partly pruned");
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    // The ledger goes on storing after the upgrade.
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    assert_eq!(s.send(msg(&chain.next(2))).await?.acked_seq, 7);
    l.stop().await;
    let after = detail_answers(&q).await?;
    let done = serve
        .upkeep_detail(
            wattd_ledger::unix_now_ns() + 3 * DAY_NS,
            Some(Duration::from_secs(86_400)),
        )
        .await?;
    if b == Backend::Postgres {
        assert!(done.partitions_dropped >= 2, "legacy and today's: {done:?}");
    }
    assert_eq!(raw_count(&f, "SELECT count(*) FROM allocations").await?, 0);
    assert_eq!(detail_answers(&q).await?, after, "pruned");
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    Ok(())
}
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pruning runs again and again (its clock days ahead, so each round creates partitions and
/// drops the one the batches are going into) while a node streams batches: every batch is
/// acknowledged (no commit fails on a lock: the partitions are created and dropped in the
/// order commits lock the tables), and the totals read from the rows and the decoded batches
/// equal the maintained ones, audit clean.
async fn pruning_while_batches_stream_in_loses_and_doubles_nothing(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    let l = f.start(limits()).await;
    let mut s = connect(&f, &l, "n1").await;
    let serve = f.query_store_serve().await;
    let pruner = tokio::spawn(async move {
        let now = wattd_ledger::unix_now_ns();
        let mut rounds = Vec::new();
        for i in 0..20i64 {
            let at = now + (i / 4) * DAY_NS + DAY_NS;
            rounds.push(
                serve
                    .upkeep_detail(at, Some(Duration::from_secs(86_400)))
                    .await
                    .map_err(|e| e.to_string()),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rounds
    });
    for seq in 1..=40u64 {
        assert_eq!(s.send(msg(&chain.next(3))).await?.acked_seq, seq);
    }
    let rounds = pruner.await?;
    let failed: Vec<&String> = rounds.iter().filter_map(|r| r.as_ref().err()).collect();
    // A round may give up on its 5 s lock timeout; none did here, and none may deadlock.
    assert!(failed.is_empty(), "{failed:?}");
    // The last rounds ran five days ahead: every batch so far, and the next ones, were
    // received before the retention's cutoff.
    let from = rounds
        .iter()
        .flatten()
        .filter_map(|d| d.detail_from_unix_ns)
        .max()
        .ok_or("no round pruned")?;
    assert!(from > wattd_ledger::unix_now_ns() + DAY_NS, "{from}");
    // So these store no rows: reads decode them, as they do the pruned ones.
    for seq in 41..=45u64 {
        assert_eq!(s.send(msg(&chain.next(3))).await?.acked_seq, seq);
    }
    assert_eq!(
        raw_count(&f, "SELECT count(*) FROM allocations").await?,
        0,
        "rows of batches received before the cutoff"
    );
    l.stop().await;
    let q = f.query_store().await;
    let maintained = maintained_equal_decoded(&q).await?;
    let run_a: u128 = maintained
        .iter()
        .filter(|t| t.run_id == "run-a")
        .map(|t| t.energy_uj)
        .sum();
    assert_eq!(run_a, 45 * 3 * 15, "every interval of run-a once");
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    Ok(())
}

/// The maintained run totals, after checking they equal the totals decoded and read from rows
/// over a range that is not whole hours (every batch's detail).
async fn maintained_equal_decoded(
    q: &wattd_ledger::store::AnyStore,
) -> Result<Vec<wattd_ledger::store::RunDomainTotal>, BoxError> {
    let maintained = q.run_totals().await?;
    let decoded = q
        .run_totals_where(wattd_ledger::store::TotalsFilter {
            from_unix_ns: Some(1),
            ..Default::default()
        })
        .await?;
    assert_eq!(maintained, decoded);
    Ok(maintained)
}

/// Polls `sql` (one number) until it is `want`, for up to 10 s (the upkeep runs in a task of
/// its own at the ledger's start).
async fn until_count(f: &Fixture, sql: &str, want: i64) -> TestResult {
    let mut last = raw_count(f, sql).await?;
    for _ in 0..200 {
        if last == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = raw_count(f, sql).await?;
    }
    Err(format!("{sql}: {last}, not {want} after 10 s").into())
}

/// With a retention of zero (`serve --detail-retention-days 0`) no allocation row is kept: a
/// ledger started so prunes every stored one (PostgreSQL: drops every partition) and stores none
/// for the batches it receives; every read answers as it did with the rows (decoded from the
/// signed batches), the audit is clean and still names a changed total. Started again without
/// it, the ledger stores rows for the batches received from then on, and every read still adds
/// up.
async fn without_detail_rows_every_read_is_decoded_and_rows_can_come_back(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain)) = one_node(b, name).await else {
        return Ok(());
    };
    stream_for_detail(&f, &mut chain).await?;
    let q = f.query_store().await;
    let before = detail_answers(&q).await?;
    let rows = "SELECT count(*) FROM allocations";
    assert!(raw_count(&f, rows).await? > 0);
    let from = "SELECT COALESCE((SELECT value FROM ledger_meta \
                WHERE key = 'detail_from_unix_ns'), 0)";

    let mut o = f.options(limits());
    o.detail_retention = Some(Duration::ZERO);
    let l = f.start_with(o.clone()).await;
    until_count(&f, from, i64::MAX).await?;
    assert_eq!(raw_count(&f, rows).await?, 0);
    let partitions = "SELECT count(*) FROM pg_inherits \
                      WHERE inhparent = 'allocations'::regclass \
                      AND inhrelid <> 'allocations_default'::regclass";
    if b == Backend::Postgres {
        assert_eq!(raw_count(&f, partitions).await?, 0, "every day dropped");
    }
    assert_eq!(detail_answers(&q).await?, before, "every row pruned");
    // What comes in now stores no rows.
    let mut s = connect(&f, &l, "n1").await;
    for seq in 7..=9u64 {
        assert_eq!(s.send(msg(&chain.next(3))).await?.acked_seq, seq);
    }
    drop(s);
    l.stop().await;
    // Started again with 0: the partitions its schema makes at start go at once.
    let l = f.start_with(o).await;
    if b == Backend::Postgres {
        until_count(&f, partitions, 0).await?;
    }
    l.stop().await;
    assert_eq!(
        raw_count(&f, rows).await?,
        0,
        "rows stored with a retention of 0"
    );
    maintained_equal_decoded(&q).await?;
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    let bump = |d: i64| {
        format!("UPDATE run_totals_hourly SET energy_lo = energy_lo + ({d}) WHERE run_id = 'run-b'")
    };
    let text = audit_fails_after(&f, &q, &bump(1)).await?;
    assert!(
        text.contains("run run-b package:0 hour 0: maintained totals"),
        "{text}"
    );
    raw_sql(&f, &bump(-1)).await?;
    let without = detail_answers(&q).await?;

    // Started without a retention: the batches received from now on have rows again.
    let l = f.start(limits()).await;
    let lowered = format!(
        "SELECT CAST(CASE WHEN ({from}) < 9223372036854775807 THEN 1 ELSE 0 END AS BIGINT)"
    );
    until_count(&f, &lowered, 1).await?;
    let mut s = connect(&f, &l, "n1").await;
    for seq in 10..=11u64 {
        assert_eq!(s.send(msg(&chain.next(3))).await?.acked_seq, seq);
    }
    drop(s);
    l.stop().await;
    assert_eq!(
        raw_count(&f, "SELECT count(*) FROM allocations WHERE seq <= 9").await?,
        0
    );
    assert_eq!(
        raw_count(
            &f,
            "SELECT count(DISTINCT seq) FROM allocations WHERE seq IN (10, 11)"
        )
        .await?,
        2,
        "the new batches have their rows"
    );
    maintained_equal_decoded(&q).await?;
    assert_ne!(detail_answers(&q).await?, without, "two more batches");
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);

    // Off, then on again while a node streams: each batch has its rows iff it was received
    // at or after the point the rows came back.
    let serve = f.query_store_serve().await;
    let now = wattd_ledger::unix_now_ns();
    serve.upkeep_detail(now, Some(Duration::ZERO)).await?;
    assert_eq!(raw_count(&f, rows).await?, 0);
    let l = f.start_with(f.options(limits())).await;
    // That start turned them on: off again, under the stream.
    until_count(&f, &lowered, 1).await?;
    serve.upkeep_detail(now, Some(Duration::ZERO)).await?;
    let mut s = connect(&f, &l, "n1").await;
    let again = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        serve.store_rows_again(wattd_ledger::unix_now_ns()).await
    });
    for seq in 12..=31u64 {
        assert_eq!(s.send(msg(&chain.next(3))).await?.acked_seq, seq);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(s);
    l.stop().await;
    let lowered_to = again.await?.map_err(|e| e.to_string())?;
    assert!(
        lowered_to.is_some(),
        "rows were off: this call turned them on"
    );
    let wrong = "SELECT count(*) FROM batches b WHERE b.seq >= 12 AND \
                 (b.received_unix_ns >= (SELECT value FROM ledger_meta \
                 WHERE key = 'detail_from_unix_ns')) <> EXISTS (SELECT 1 FROM allocations a \
                 WHERE a.node_id = b.node_id AND a.seq = b.seq)";
    assert_eq!(
        raw_count(&f, wrong).await?,
        0,
        "rows iff received at or after"
    );
    let with_rows = raw_count(
        &f,
        "SELECT count(DISTINCT seq) FROM allocations WHERE seq >= 12",
    )
    .await?;
    eprintln!("{with_rows} of the 20 batches streamed while the rows came back have rows");
    assert!(with_rows > 0, "the last batches have rows");
    maintained_equal_decoded(&q).await?;
    assert_audit_clean(&wattd_ledger::audit::audit(&q).await?);
    Ok(())
}

/// PostgreSQL orders node ids by the database's collation, which need not be byte order: in an
/// ICU en-US database "na" < "Nb" < "nc", where bytes put "Nb" first. A run's batches read two
/// at a time, some from their rows and some decoded from pruned batches, come each once, in the
/// database's order (the cursor's `node_id > $n` follows the collation, so a page merged in
/// Rust's order would skip or repeat batches).
#[tokio::test]
async fn a_runs_batches_page_in_the_databases_collation() -> TestResult {
    let icu = "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8' TEMPLATE template0";
    let Some(f) = Fixture::new_with(Backend::Postgres, "collation", icu).await else {
        return Ok(());
    };
    let nodes = ["nc", "Nb", "na"];
    let mut chains: Vec<Chain> = nodes
        .iter()
        .zip(1u8..)
        .map(|(n, seed)| {
            let c = Chain::new(key(n, 1, seed));
            f.enrol(&c.key);
            c
        })
        .collect();
    let l = f.start(limits()).await;
    for (n, c) in nodes.iter().zip(chains.iter_mut()) {
        let mut s = connect(&f, &l, n).await;
        for seq in 1..=3u64 {
            assert_eq!(s.send(msg(&c.next(3))).await?.acked_seq, seq);
        }
    }
    l.stop().await;
    assert_eq!(
        raw_count(
            &f,
            "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT 1 FROM batches \
             WHERE node_id < 'Nb' AND node_id = 'na') t"
        )
        .await?,
        3,
        "the database's collation puts na before Nb"
    );
    // Every node's first batch, and Nb's second, received ten days ago: their rows pruned.
    raw_sql(
        &f,
        "UPDATE batches SET received_unix_ns = received_unix_ns - 10 * 86400000000000 \
         WHERE seq = 1 OR (node_id = 'Nb' AND seq = 2); \
         UPDATE allocations SET received_day = received_day - 10 \
         WHERE seq = 1 OR (node_id = 'Nb' AND seq = 2)",
    )
    .await?;
    let done = f
        .query_store_serve()
        .await
        .upkeep_detail(
            wattd_ledger::unix_now_ns(),
            Some(Duration::from_secs(86_400)),
        )
        .await?;
    assert!(done.rows_deleted > 0, "{done:?}");
    let q = f.query_store().await;
    let mut seen = Vec::new();
    let mut after = (String::new(), 0u64);
    loop {
        let page = q
            .run_batches("run-a", "", (&after.0, after.1), 2, "account")
            .await?;
        let Some(last) = page.last() else { break };
        after = (last.node_id.clone(), last.seq);
        seen.extend(page.iter().map(|b| (b.node_id.clone(), b.seq)));
    }
    let want: Vec<(String, u64)> = ["na", "Nb", "nc"]
        .iter()
        .flat_map(|n| (1..=3u64).map(move |s| (n.to_string(), s)))
        .collect();
    assert_eq!(seen, want);
    Ok(())
}

/// `serve`'s schema transaction takes its table locks within 10 s or gives up, lets the
/// commits queued behind it go, and tries again 2 s later: with a reader idle in a transaction
/// over `allocations`, its lock request is seen to go away while the reader still holds the
/// table (a transaction waiting without a bound never lets go), and the store opens once the
/// reader is done.
#[tokio::test]
async fn the_schema_transaction_gives_up_a_held_lock_and_tries_again() -> TestResult {
    let Some(f) = Fixture::new(Backend::Postgres, "schema_lock_retry").await else {
        return Ok(());
    };
    drop(f.query_store_serve().await);
    let wattd_ledger::store::StoreUrl::Postgres(url) = f.store_url.clone() else {
        return Err("a PostgreSQL fixture".into());
    };
    let (reader, conn) = url
        .parse::<tokio_postgres::Config>()?
        .connect(tokio_postgres::NoTls)
        .await?;
    let conn = tokio::spawn(conn);
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM allocations")
        .await?;
    let store_url = f.store_url.clone();
    let opener = tokio::spawn(async move {
        wattd_ledger::store::AnyStore::open(&store_url, wattd_ledger::store::OpenMode::Serve)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let waiting = "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                   WHERE NOT l.granted AND d.datname = current_database()";
    let (mut seen_waiting, mut gave_up) = (false, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while std::time::Instant::now() < deadline && !gave_up {
        let n: i64 = reader.query_one(waiting, &[]).await?.get(0);
        if n > 0 {
            seen_waiting = true;
        } else if seen_waiting {
            gave_up = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen_waiting,
        "the schema transaction never waited for the lock"
    );
    assert!(
        gave_up,
        "the schema transaction waited on for 25 s behind a held lock"
    );
    assert!(!opener.is_finished(), "it opened while the table was held");
    reader.batch_execute("COMMIT").await?;
    opener.await??;
    drop(reader);
    let _ = conn.await;
    Ok(())
}
