//! The Query API against both stores, over real mutual TLS with the readers' own CA: roles,
//! totals, the change feed (resumed across a ledger restart, with a cursor from the future or
//! garbage refused), a run's audit trail, and the read audit.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use tonic::Code;
use wattd_ledger::server::Limits;
use wattd_ledger::store::Store as _;
use wattd_proto::v1::query_client::QueryClient;
use wattd_proto::v1::{
    ChangesRequest, ChangesResponse, Label, RunIntervalsRequest, RunLabels, RunTotalsRequest,
};
use wattd_records::seal::BatchContent;

use crate::common::*;

both!(
    roles_decide_what_each_reader_sees_and_every_read_is_audited,
    the_change_feed_resumes_across_a_restart_and_adds_up_to_runs,
    a_cursor_from_the_future_or_garbage_is_refused,
    a_reader_that_stops_reading_does_not_slow_ingestion,
    a_run_labelled_late_is_attributed_when_read,
    a_reader_removed_from_the_file_loses_its_open_stream,
);

pub(crate) const READERS: &[(&str, &str)] = &[
    ("metering-pipeline", "metering"),
    ("view-acme", "account:acme"),
];

/// A ledger with the query API for [`READERS`] and node n1 enrolled, and n1's chain; None when
/// the store is not available here.
async fn n1_with_readers(b: Backend, name: &str) -> Option<(Fixture, Chain, Readers, Ledger)> {
    let f = Fixture::new(b, name).await?;
    let chain = Chain::new(key("n1", 1, 1));
    f.enrol(&chain.key);
    let readers = f.readers(READERS);
    let l = f
        .start_with(f.query_options(Limits::default(), &readers))
        .await;
    Some((f, chain, readers, l))
}

/// A Query client over TLS as reader `cn` (a certificate of `ca`).
async fn reader(
    f: &Fixture,
    addr: std::net::SocketAddr,
    ca: &wattd_tests::tls::TestCa,
    cn: &str,
) -> Result<QueryClient<tonic::transport::Channel>, tonic::transport::Error> {
    let ch = channel(addr, &f.ca.ca_pem, Some(&ca.client(cn))).await?;
    Ok(QueryClient::new(ch).max_decoding_message_size(64 << 20))
}

/// A batch of node `chain` where run-a (account acme) and run-b (account globex) each get
/// energy in every interval; their labels ride in the first batch's first interval.
pub(crate) fn labelled_batch(
    chain: &mut Chain,
    first: bool,
    intervals: u64,
) -> wattd_proto::v1::NodeMessage {
    let start = chain.take_indices(intervals);
    let mut ivs: Vec<_> = (0..intervals)
        .map(|i| interval(start + i, &[("run-a", 10, 5), ("run-b", 20, 5)], 7))
        .collect();
    if first {
        let label = |v: &str| Label {
            key: "account".into(),
            value: v.into(),
        };
        ivs[0].run_labels = vec![
            RunLabels {
                run_id: "run-a".into(),
                labels: vec![label("acme")],
            },
            RunLabels {
                run_id: "run-b".into(),
                labels: vec![label("globex")],
            },
        ];
    }
    msg(&chain.next_with(BatchContent {
        intervals: ivs,
        ..Default::default()
    }))
}

/// Every message of a Changes call until the stream ends (or `max` messages).
async fn drain(
    client: &mut QueryClient<tonic::transport::Channel>,
    cursor: &str,
    max: usize,
) -> Result<Vec<ChangesResponse>, tonic::Status> {
    let mut stream = client
        .changes(ChangesRequest {
            cursor: cursor.into(),
            follow: false,
            keepalive_s: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
        if out.len() == max {
            break;
        }
    }
    Ok(out)
}

/// (node, run, domain) -> uJ, from changes with repeated ids dropped.
fn summed(messages: &[ChangesResponse]) -> BTreeMap<(String, String, String), u128> {
    let mut seen = HashSet::new();
    let mut sums = BTreeMap::new();
    for c in messages.iter().flat_map(|m| &m.changes) {
        if seen.insert(c.id.clone()) {
            *sums
                .entry((c.node_id.clone(), c.run_id.clone(), c.domain.clone()))
                .or_default() += u128::from(c.energy_uj);
        }
    }
    sums
}

/// What `runs` bills: (node, run, domain) -> uJ.
pub(crate) async fn billed(f: &Fixture) -> BTreeMap<(String, String, String), u128> {
    f.query_store()
        .await
        .run_totals()
        .await
        .expect("run totals")
        .into_iter()
        .map(|t| ((t.node_id, t.run_id, t.domain), t.energy_uj))
        .collect()
}

fn reason(s: &tonic::Status) -> String {
    s.metadata()
        .get("wattd-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn roles_decide_what_each_reader_sees_and_every_read_is_audited(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain, readers, l)) = n1_with_readers(b, name).await else {
        return Ok(());
    };
    let q = l.query_addr.expect("query port");
    let mut s = connect(&f, &l, "n1").await;
    for i in 0..3 {
        s.send(labelled_batch(&mut chain, i == 0, 2)).await?;
    }

    // The metering pipeline sees every run, with its account, equal to `runs`.
    let mut metering = reader(&f, q, &readers.ca, "metering-pipeline").await?;
    let totals = metering
        .run_totals(RunTotalsRequest::default())
        .await?
        .into_inner()
        .totals;
    let got: BTreeMap<_, _> = totals
        .iter()
        .map(|t| {
            (
                (t.node_id.clone(), t.run_id.clone(), t.domain.clone()),
                u128::from(t.energy_uj),
            )
        })
        .collect();
    assert_eq!(got, billed(&f).await);
    let accounts: BTreeMap<_, _> = totals
        .iter()
        .map(|t| (t.run_id.as_str(), t.account.as_str()))
        .collect();
    assert_eq!(
        accounts,
        BTreeMap::from([("run-a", "acme"), ("run-b", "globex")])
    );
    // run-a: 3 batches x 2 intervals x 15 uJ.
    let a = totals.iter().find(|t| t.run_id == "run-a").expect("run-a");
    assert_eq!((a.energy_uj, a.energy_wh.as_str()), (90, "0.0000000250"));
    // A time range that holds no batch (the test batches are sealed at 1_700_000_000 ns).
    let none = metering
        .run_totals(RunTotalsRequest {
            from_unix_ns: 1_800_000_000,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(none.totals.is_empty(), "{none:?}");
    let changes = drain(&mut metering, "", usize::MAX).await?;
    assert_eq!(summed(&changes), billed(&f).await);
    assert_eq!(changes.len(), 3, "one message per batch");

    // The account view sees its own runs only, and is refused another account's.
    let mut acme = reader(&f, q, &readers.ca, "view-acme").await?;
    let own = acme
        .run_totals(RunTotalsRequest::default())
        .await?
        .into_inner();
    assert!(!own.totals.is_empty() && own.totals.iter().all(|t| t.run_id == "run-a"));
    let err = acme
        .run_totals(RunTotalsRequest {
            account: "globex".into(),
            ..Default::default()
        })
        .await
        .expect_err("another account");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::PermissionDenied, "other_account")
    );
    let err = acme
        .run_intervals(RunIntervalsRequest {
            run_id: "run-b".into(),
            ..Default::default()
        })
        .await
        .expect_err("another account's run");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let feed = drain(&mut acme, "", usize::MAX).await?;
    assert!(feed
        .iter()
        .flat_map(|m| &m.changes)
        .all(|c| c.run_id == "run-a" && c.account == "acme"));
    assert_eq!(
        summed(&feed).values().sum::<u128>(),
        90,
        "every change of run-a, nothing of run-b"
    );
    // A run's audit trail: the batches that billed it. An account view gets hashes and keys,
    // not the signed bytes (they hold the other runs of the node, other accounts' included).
    let trail = acme
        .run_intervals(RunIntervalsRequest {
            run_id: "run-a".into(),
            limit: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!((trail.batches.len(), trail.more), (2, true));
    let last = trail.batches.last().expect("a batch");
    let rest = acme
        .run_intervals(RunIntervalsRequest {
            run_id: "run-a".into(),
            after_node_id: last.node_id.clone(),
            after_seq: last.seq,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!((rest.batches.len(), rest.more), (1, false));
    for rb in trail.batches.iter().chain(&rest.batches) {
        let stored = &chain.batches[(rb.seq - 1) as usize];
        assert_eq!(rb.batch_hash, stored.hash.to_vec());
        assert!(
            rb.signed_batch.is_empty(),
            "an account view got another account's runs"
        );
        assert!(rb.allocations.iter().all(|a| a.energy_uj == 15));
        assert_eq!(rb.allocations.len(), 2);
    }

    // The metering pipeline gets the signed bytes, to verify.
    let full = metering
        .run_intervals(RunIntervalsRequest {
            run_id: "run-b".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(full.batches.len(), 3);
    for rb in &full.batches {
        assert_eq!(rb.signed_batch, chain.batches[(rb.seq - 1) as usize].bytes);
    }

    // A reader of the right CA the readers file does not name, and a node's certificate.
    let mut stranger = reader(&f, q, &readers.ca, "someone-else").await?;
    let err = stranger
        .run_totals(RunTotalsRequest::default())
        .await
        .expect_err("not a reader");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::PermissionDenied, "not_a_reader")
    );
    let node = match channel(q, &f.ca.ca_pem, Some(&f.client_cert("n1"))).await {
        Err(_) => None,
        Ok(ch) => Some(
            QueryClient::new(ch)
                .run_totals(RunTotalsRequest::default())
                .await,
        ),
    };
    // The handshake fails (the nodes' CA is not the readers'): no status of the service, which
    // would mean the certificate got in and was refused only by role.
    assert!(
        match &node {
            None => true,
            Some(Err(s)) => s.code() != Code::PermissionDenied && reason(s).is_empty(),
            Some(Ok(_)) => false,
        },
        "a node certificate read the ledger, or got past the handshake: {node:?}"
    );
    // Adding a reader takes effect without a restart.
    std::fs::write(
        &readers.file,
        "[readers]\n\"metering-pipeline\" = \"metering\"\n\"view-acme\" = \"account:acme\"\n\
         \"someone-else\" = \"account:globex\"\n",
    )?;
    let now = stranger
        .run_totals(RunTotalsRequest::default())
        .await?
        .into_inner();
    assert!(!now.totals.is_empty() && now.totals.iter().all(|t| t.run_id == "run-b"));

    // Every call is in the read audit, refused ones with their reason.
    let reads = f.query_store().await.reads(100).await?;
    let count = |reader: &str, call: &str, ok: bool| {
        reads
            .iter()
            .filter(|r| r.reader == reader && r.call == call && r.outcome.starts_with("ok") == ok)
            .count()
    };
    assert_eq!(count("metering-pipeline", "RunTotals", true), 2);
    assert!(count("metering-pipeline", "Changes", true) >= 1);
    assert_eq!(count("view-acme", "RunTotals", false), 1);
    assert_eq!(count("view-acme", "RunIntervals", false), 1);
    assert_eq!(count("view-acme", "RunIntervals", true), 2);
    assert_eq!(count("someone-else", "RunTotals", false), 1);
    let refused = reads
        .iter()
        .find(|r| r.reader == "view-acme" && r.call == "RunTotals" && !r.outcome.starts_with("ok"))
        .expect("the refused read");
    assert!(refused.filters.contains("globex"), "{refused:?}");
    assert!(refused.outcome.contains("other_account"), "{refused:?}");
    assert_eq!(refused.role, "account:acme");
    // A finished Changes stream's row is written as it ends (after its last message).
    let mut closed = false;
    for _ in 0..500 {
        closed = f
            .query_store()
            .await
            .reads(1000)
            .await?
            .iter()
            .any(|r| r.call == "Changes" && r.outcome.starts_with("closed") && r.rows > 0);
        if closed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "a finished Changes stream is audited with its rows");
    // Pruning keeps what is younger than the retention.
    let store = f.query_store_serve().await;
    assert_eq!(store.prune_reads(0).await?, 0);
    let all = store.reads(1000).await?.len() as u64;
    assert_eq!(store.prune_reads(i64::MAX).await?, all);
    l.stop().await;
    Ok(())
}

async fn the_change_feed_resumes_across_a_restart_and_adds_up_to_runs(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some(f) = Fixture::new(b, name).await else {
        return Ok(());
    };
    let mut c1 = Chain::new(key("n1", 1, 1));
    let mut c2 = Chain::new(key("n2", 1, 2));
    f.enrol(&c1.key);
    f.enrol(&c2.key);
    let readers = f.readers(READERS);
    let l = f
        .start_with(f.query_options(Limits::default(), &readers))
        .await;
    let mut s1 = connect(&f, &l, "n1").await;
    let mut s2 = connect(&f, &l, "n2").await;
    for i in 0..5 {
        s1.send(labelled_batch(&mut c1, i == 0, 1)).await?;
        s2.send(labelled_batch(&mut c2, i == 0, 3)).await?;
    }
    let mut m = reader(
        &f,
        l.query_addr.expect("query"),
        &readers.ca,
        "metering-pipeline",
    )
    .await?;
    // The consumer takes three messages, then "crashes" having applied the third but saved
    // only the second's cursor.
    let mut got = drain(&mut m, "", 3).await?;
    assert_eq!(got.len(), 3);
    let saved = got[1].cursor.clone();
    drop(m);
    drop((s1, s2));
    l.stop().await;

    // More batches arrive at a new ledger process on the same store; the consumer resumes.
    let l = f
        .start_with(f.query_options(Limits::default(), &readers))
        .await;
    let mut s1 = connect(&f, &l, "n1").await;
    for _ in 0..3 {
        s1.send(labelled_batch(&mut c1, false, 2)).await?;
    }
    let mut m = reader(
        &f,
        l.query_addr.expect("query"),
        &readers.ca,
        "metering-pipeline",
    )
    .await?;
    let rest = drain(&mut m, &saved, usize::MAX).await?;
    let repeated: usize = rest
        .iter()
        .flat_map(|r| &r.changes)
        .filter(|c| got.iter().flat_map(|g| &g.changes).any(|g| g.id == c.id))
        .count();
    assert!(
        repeated > 0,
        "the message after the saved cursor comes again"
    );
    got.extend(rest);
    assert_eq!(
        summed(&got),
        billed(&f).await,
        "after dropping repeated ids: nothing missing"
    );
    // Ids are deterministic: the whole feed again has the same ids.
    let again = drain(&mut m, "", usize::MAX).await?;
    let ids = |ms: &[ChangesResponse]| -> HashSet<String> {
        ms.iter()
            .flat_map(|r| &r.changes)
            .map(|c| c.id.clone())
            .collect()
    };
    assert_eq!(ids(&again), ids(&got));

    // Following: a new batch arrives on the open stream; keep-alives come while idle.
    let end = again.last().expect("messages").cursor.clone();
    let mut stream = m
        .changes(ChangesRequest {
            cursor: end,
            follow: true,
            keepalive_s: 1,
        })
        .await?
        .into_inner();
    let keepalive = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .expect("a keep-alive");
    assert!(keepalive.changes.is_empty());
    s1.send(labelled_batch(&mut c1, false, 1)).await?;
    let next = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await??
            .expect("a message");
        if !m.changes.is_empty() {
            break m;
        }
    };
    assert!(next
        .changes
        .iter()
        .all(|c| c.node_id == "n1" && c.seq == c1.seq));
    drop(stream);
    l.stop().await;
    Ok(())
}

async fn a_cursor_from_the_future_or_garbage_is_refused(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain, readers, l)) = n1_with_readers(b, name).await else {
        return Ok(());
    };
    let mut s = connect(&f, &l, "n1").await;
    for i in 0..4 {
        s.send(labelled_batch(&mut chain, i == 0, 1)).await?;
    }
    let mut m = reader(
        &f,
        l.query_addr.expect("query"),
        &readers.ca,
        "metering-pipeline",
    )
    .await?;
    let all = drain(&mut m, "", usize::MAX).await?;
    let end = all.last().expect("messages").cursor.clone();
    // The store "restored from an older backup": the consumer's cursor is ahead of it.
    let mut behind = wattd_ledger::query_api::Cursor::parse(&end)?;
    assert_eq!(behind.get("n1"), 4);
    let future = {
        let mut c = wattd_proto::v1::ChangeCursor::default();
        c.positions.push(wattd_proto::v1::CursorPosition {
            node_id: "n1".into(),
            seq: 9,
        });
        format!(
            "v1.{}",
            wattd_records::durable::hex(&prost::Message::encode_to_vec(&c))
        )
    };
    let err = drain(&mut m, &future, 1).await.expect_err("a cursor ahead");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::OutOfRange, "cursor_ahead")
    );
    assert!(
        err.message().contains("seq 9") && err.message().contains("backup"),
        "{err:?}"
    );
    for garbage in ["garbage", "v1.zz", "v1.0a0b", &"v1.00".repeat(300_000)] {
        let err = drain(&mut m, garbage, 1).await.expect_err("garbage");
        assert_eq!(err.code(), Code::InvalidArgument, "{garbage:.20}: {err:?}");
    }
    let err = m
        .changes(ChangesRequest {
            keepalive_s: 3600,
            follow: true,
            ..Default::default()
        })
        .await
        .expect_err("keep-alive out of range");
    assert_eq!(err.code(), Code::InvalidArgument);
    behind = wattd_ledger::query_api::Cursor::parse(&all[1].cursor)?;
    assert_eq!(behind.get("n1"), 2);
    let refused = f
        .query_store()
        .await
        .reads(100)
        .await?
        .into_iter()
        .filter(|r| r.call == "Changes" && r.outcome.contains("InvalidArgument"))
        .count();
    assert_eq!(refused, 5, "each refused cursor is audited");
    l.stop().await;
    Ok(())
}

async fn a_reader_that_stops_reading_does_not_slow_ingestion(b: Backend, name: &str) -> TestResult {
    let Some((f, mut chain, readers, l)) = n1_with_readers(b, name).await else {
        return Ok(());
    };
    let mut m = reader(
        &f,
        l.query_addr.expect("query"),
        &readers.ca,
        "metering-pipeline",
    )
    .await?;
    // Open a following stream and never read it.
    let _stalled = m
        .changes(ChangesRequest {
            follow: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut s = connect(&f, &l, "n1").await;
    let mut acked = 0;
    for i in 0..300 {
        acked = s
            .send(labelled_batch(&mut chain, i == 0, 4))
            .await?
            .acked_seq;
    }
    assert_eq!(
        acked, 300,
        "every batch stored while a reader holds a stream it does not read"
    );
    // A second reader still gets everything.
    let mut other = reader(
        &f,
        l.query_addr.expect("query"),
        &readers.ca,
        "metering-pipeline",
    )
    .await?;
    let all = drain(&mut other, "", usize::MAX).await?;
    assert_eq!(summed(&all), billed(&f).await);
    // One reader holds at most 4 Changes streams: the stalled one counts; a fifth is refused.
    let mut held = Vec::new();
    let refused = loop {
        match other
            .changes(ChangesRequest {
                follow: true,
                ..Default::default()
            })
            .await
        {
            Ok(s) => {
                held.push(s.into_inner());
                assert!(
                    held.len() < 4,
                    "a fifth Changes stream of one reader was opened"
                );
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::ResourceExhausted, "streams_per_reader")
    );
    drop(held);
    l.stop().await;
    Ok(())
}

/// A run whose account label arrives only with its summary (the batch of its first interval
/// lost, say): each change carries the account as stored when it is read, so a reader that
/// reads after the summary sees the run's earlier changes in that account too; the totals
/// always do.
async fn a_run_labelled_late_is_attributed_when_read(b: Backend, name: &str) -> TestResult {
    use wattd_proto::v1::RunSummary;
    let Some((f, mut chain, readers, l)) = n1_with_readers(b, name).await else {
        return Ok(());
    };
    let q = l.query_addr.expect("query");
    let mut s = connect(&f, &l, "n1").await;
    let first = chain.take_indices(1);
    s.send(msg(&chain.next_with(BatchContent {
        intervals: vec![interval(first, &[("run-c", 40, 0)], 1)],
        ..Default::default()
    })))
    .await?;
    let mut m = reader(&f, q, &readers.ca, "metering-pipeline").await?;
    let early = drain(&mut m, "", usize::MAX).await?;
    assert_eq!(early[0].changes[0].account, "", "no label yet");
    let mut acme = reader(&f, q, &readers.ca, "view-acme").await?;
    assert!(drain(&mut acme, "", usize::MAX)
        .await?
        .iter()
        .all(|m| m.changes.is_empty()));
    let next = chain.take_indices(1);
    s.send(msg(&chain.next_with(BatchContent {
        intervals: vec![interval(next, &[("run-c", 2, 0)], 1)],
        run_summaries: vec![RunSummary {
            run_id: "run-c".into(),
            labels: vec![Label {
                key: "account".into(),
                value: "acme".into(),
            }],
            final_usage: "read".into(),
            ..Default::default()
        }],
        ..Default::default()
    })))
    .await?;
    let again = drain(&mut acme, "", usize::MAX).await?;
    let seen: Vec<(u64, u64, &str)> = again
        .iter()
        .flat_map(|m| &m.changes)
        .map(|c| (c.seq, c.energy_uj, c.account.as_str()))
        .collect();
    assert_eq!(seen, [(1, 40, "acme"), (2, 2, "acme")]);
    let totals = acme
        .run_totals(RunTotalsRequest::default())
        .await?
        .into_inner();
    assert_eq!(totals.totals.iter().map(|t| t.energy_uj).sum::<u64>(), 42);
    l.stop().await;
    Ok(())
}

async fn a_reader_removed_from_the_file_loses_its_open_stream(
    b: Backend,
    name: &str,
) -> TestResult {
    let Some((f, mut chain, readers, l)) = n1_with_readers(b, name).await else {
        return Ok(());
    };
    let mut s = connect(&f, &l, "n1").await;
    s.send(labelled_batch(&mut chain, true, 1)).await?;
    let mut acme = reader(&f, l.query_addr.expect("query"), &readers.ca, "view-acme").await?;
    let mut stream = acme
        .changes(ChangesRequest {
            follow: true,
            keepalive_s: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .expect("the first batch");
    assert!(!first.changes.is_empty());
    std::fs::write(
        &readers.file,
        "[readers]\n\"metering-pipeline\" = \"metering\"\n",
    )?;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await? {
            Ok(Some(_keepalive)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(
        (end.code(), reason(&end).as_str()),
        (Code::PermissionDenied, "revoked")
    );
    // The nodes' CA as the readers' CA is refused at start: any node could then ask.
    let mut opts = f.query_options(Limits::default(), &readers);
    if let Some(q) = opts.query.as_mut() {
        q.reader_ca = f.ca.ca_pem.clone();
    }
    match wattd_ledger::server::bind(&opts).await {
        Err(wattd_ledger::server::ServeError::Config(p)) => {
            assert!(p.iter().any(|e| e.contains("nodes' CA")), "{p:?}")
        }
        other => panic!(
            "the nodes' CA was accepted as the readers': {:?}",
            other.err()
        ),
    }
    l.stop().await;
    Ok(())
}
