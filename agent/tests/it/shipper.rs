//! The shipper against a scripted ledger over real mutual TLS on loopback: every batch arrives
//! once, in order, with its chain intact; acknowledgements move the spool's cursor; the window
//! bounds what is in flight; a dropped stream resumes where the ledger stands; an Ack beyond
//! what the node has sealed is refused; a ledger with the wrong certificate gets nothing.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use wattd::batch::{chain_hash, decode_header};
use wattd::sealer::Sealer;
use wattd::shipper::{signed_heartbeat, ShipState, Shipper, ShipperConfig, ShipperStats};
use wattd_proto::v1::ledger_server::{Ledger, LedgerServer};
use wattd_proto::v1::{node_message, Ack, NodeMessage, SignedBatch};
use wattd_tests::tls::TestCa;

use crate::records::common::{config, fill, sealer};

/// What the scripted ledger does, and what it saw.
#[derive(Debug, Default)]
struct FakeState {
    /// seq -> chain hash of what was stored.
    stored: BTreeMap<u64, [u8; 32]>,
    duplicates: u64,
    chain_breaks: Vec<String>,
    heartbeats: u64,
    streams: u64,
    client_certs_seen: Vec<usize>,
    /// Acknowledge only the first message of each stream (the opening heartbeat).
    withhold_acks: bool,
    /// End the stream with UNAVAILABLE after this many batches stored in one stream.
    fail_after: Option<usize>,
    /// Acknowledge this seq, whatever was stored.
    lie_ack: Option<u64>,
    /// Batches received per stream.
    received_per_stream: Vec<usize>,
    /// The node's public key, to check loss statements with.
    node_key: Option<ed25519_dalek::VerifyingKey>,
    /// Loss statements taken: (first, last, reason), in order.
    losses: Vec<(u64, u64, i32)>,
    /// The signed rotations each statement taken carried.
    loss_rotations: Vec<Vec<wattd_proto::v1::SignedKeyRotation>>,
}

impl FakeState {
    fn acked(&self) -> u64 {
        let mut n = 0;
        while self.stored.contains_key(&(n + 1)) {
            n += 1;
        }
        n
    }

    /// A loss statement, checked against the node's key and taken as the real ledger does:
    /// only right after what is stored; the chain continues from its last hash.
    fn take_loss(
        &mut self,
        l: &wattd_proto::v1::SignedLossStatement,
        key: &ed25519_dalek::VerifyingKey,
    ) {
        use ed25519_dalek::Verifier as _;
        let sig = ed25519_dalek::Signature::from_slice(&l.signature).expect("64 bytes");
        if key.verify(&l.statement_bytes, &sig).is_err() {
            self.chain_breaks
                .push("loss statement: bad signature".into());
            return;
        }
        let st =
            wattd_proto::v1::LossStatement::decode(l.statement_bytes.as_slice()).expect("decodes");
        if st.first_seq != self.acked() + 1 {
            return;
        }
        let hash: [u8; 32] = st.last_hash.as_slice().try_into().expect("32 bytes");
        // The lost seqs count as acknowledged; the last one carries the chain's hash.
        for seq in st.first_seq..st.last_seq {
            self.stored.insert(seq, [0xEE; 32]);
        }
        self.stored.insert(st.last_seq, hash);
        self.losses.push((st.first_seq, st.last_seq, st.reason));
        self.loss_rotations.push(st.rotations);
    }

    fn take(&mut self, b: &SignedBatch) {
        let bytes = b.encode_to_vec();
        let (_, h) = match decode_header(&bytes) {
            Ok(x) => x,
            Err(e) => {
                self.chain_breaks.push(e.to_string());
                return;
            }
        };
        let hash = chain_hash(&bytes);
        if let Some(old) = self.stored.get(&h.seq) {
            if *old == hash {
                self.duplicates += 1;
            } else {
                self.chain_breaks.push(format!("fork at {}", h.seq));
            }
            return;
        }
        let prev = if h.seq == 1 {
            Some([0u8; 32])
        } else {
            self.stored.get(&(h.seq - 1)).copied()
        };
        if prev.map(|p| p.as_slice() == h.prev_hash.as_slice()) != Some(true) {
            self.chain_breaks.push(format!(
                "seq {} does not chain to a stored predecessor",
                h.seq
            ));
            return;
        }
        self.stored.insert(h.seq, hash);
    }
}

#[derive(Clone, Debug, Default)]
struct Fake(Arc<Mutex<FakeState>>);

type AckStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Ack, Status>> + Send>>;

#[tonic::async_trait]
impl Ledger for Fake {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        req: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<AckStream>, Status> {
        let certs = req.peer_certs().map_or(0, |c| c.len());
        let stream_no = {
            let mut s = self.0.lock().unwrap();
            s.client_certs_seen.push(certs);
            s.streams += 1;
            s.received_per_stream.push(0);
            s.received_per_stream.len() - 1
        };
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let state = self.0.clone();
        tokio::spawn(async move {
            let mut in_stream = 0usize;
            let mut seen = 0usize;
            while let Ok(Some(msg)) = inbound.message().await {
                let reply = {
                    let mut s = state.lock().unwrap();
                    let opened = seen > 0;
                    seen += 1;
                    let is_batch = match msg.kind {
                        Some(node_message::Kind::Batch(b)) => {
                            s.take(&b);
                            s.received_per_stream[stream_no] += 1;
                            in_stream += 1;
                            true
                        }
                        Some(node_message::Kind::SignedHeartbeat(_)) => {
                            s.heartbeats += 1;
                            false
                        }
                        Some(node_message::Kind::Loss(l)) => {
                            let key = s.node_key.expect("the test sets the node's key");
                            s.take_loss(&l, &key);
                            false
                        }
                        None => false,
                    };
                    if s.fail_after.is_some_and(|n| in_stream >= n) {
                        Err(Status::unavailable("scripted failure"))
                    } else if s.withhold_acks && (is_batch || opened) {
                        continue;
                    } else {
                        Ok(Ack {
                            node_id: String::new(),
                            acked_seq: s.lie_ack.unwrap_or_else(|| s.acked()),
                            missing_from_seq: 0,
                            announced_sealed_seq: 0,
                        })
                    }
                };
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct World {
    spool: tempfile::TempDir,
    ca_dir: tempfile::TempDir,
    ca: TestCa,
    fake: Fake,
    endpoint: String,
    stop_server: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn serve(
    fake: Fake,
    ca: &TestCa,
    server_ca: &TestCa,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let s = server_ca.server("server");
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(&s.cert).unwrap(),
            std::fs::read(&s.key).unwrap(),
        ))
        .client_ca_root(Certificate::from_pem(std::fs::read(&ca.ca_pem).unwrap()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(LedgerServer::new(fake))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            })
            .await;
    });
    (format!("https://localhost:{}", addr.port()), stop_tx)
}

impl World {
    async fn new() -> World {
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(ca_dir.path(), "ledger");
        let fake = Fake::default();
        let (endpoint, stop) = serve(fake.clone(), &ca, &ca).await;
        World {
            spool: tempfile::tempdir().unwrap(),
            ca_dir,
            ca,
            fake,
            endpoint,
            stop_server: Some(stop),
        }
    }

    fn shipper_config(&self) -> ShipperConfig {
        let c = self.ca.client("node-a");
        let mut cfg = ShipperConfig::new(&self.endpoint, &self.ca.ca_pem, &c.cert, &c.key);
        cfg.backoff_min = Duration::from_millis(20);
        cfg.max_backoff = Duration::from_millis(100);
        cfg.heartbeat = Duration::from_millis(200);
        cfg
    }
}

/// Runs a shipper over the sealed spool until `done` says so (or `limit` passes).
async fn ship(
    cfg: ShipperConfig,
    s: &Sealer,
    done: impl Fn(&FakeState, u64) -> bool,
    fake: &Fake,
    limit: Duration,
) -> (u64, Arc<ShipperStats>) {
    let sealed = s.spool().sealed_seq();
    fake.0.lock().unwrap().node_key = Some(s.key().verifying_key());
    let (state_tx, state_rx) = watch::channel(ShipState {
        sealed_seq: sealed,
        heartbeat: Some(signed_heartbeat(s.key(), sealed, 0)),
        signer: Some(s.shared_key()),
    });
    let (ack_tx, mut ack_rx) = watch::channel(s.spool().acked_seq());
    let stats = Arc::new(ShipperStats::default());
    let shipper = Shipper::new(
        cfg,
        s.spool().dir(),
        s.spool().acked_seq(),
        state_rx,
        ack_tx,
        stats.clone(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(shipper.run(stop_rx));
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let acked = *ack_rx.borrow_and_update();
        if done(&fake.0.lock().unwrap(), acked) || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    task.await.unwrap();
    drop(state_tx);
    let acked = *ack_rx.borrow();
    (acked, stats)
}

#[tokio::test(flavor = "current_thread")]
async fn every_batch_arrives_once_in_order_and_acks_move_the_spool() {
    let w = World::new().await;
    let mut s = sealer(config(w.spool.path(), 1 << 10), 1).unwrap();
    let mut index = 0;
    fill(&mut s, &mut index, 40, 1, 3).unwrap();
    let sealed = s.spool().sealed_seq();
    let (acked, stats) = ship(
        w.shipper_config(),
        &s,
        |_, a| a == sealed,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(acked, sealed);
    let st = w.fake.0.lock().unwrap();
    assert_eq!(st.stored.len() as u64, sealed);
    assert_eq!(st.duplicates, 0);
    assert!(st.chain_breaks.is_empty(), "{:?}", st.chain_breaks);
    assert!(
        st.client_certs_seen.iter().all(|&n| n >= 1),
        "mutual TLS: the client showed a certificate"
    );
    assert_eq!(stats.batches_sent_total.load(Ordering::Relaxed), sealed);
    drop(st);
    // The daemon's side: the spool takes the ack and deletes whole acknowledged segments.
    let before = wattd::spool::list_segments(w.spool.path()).unwrap().len();
    s.spool_mut().ack(acked).unwrap();
    let after = wattd::spool::list_segments(w.spool.path()).unwrap().len();
    assert!(after < before && after >= 1, "{before} -> {after}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_window_bounds_unacknowledged_batches_and_an_ack_timeout_reconnects() {
    let w = World::new().await;
    w.fake.0.lock().unwrap().withhold_acks = true;
    let mut s = sealer(config(w.spool.path(), 1 << 20), 1).unwrap();
    let mut index = 0;
    fill(&mut s, &mut index, 20, 1, 1).unwrap();
    let mut cfg = w.shipper_config();
    cfg.window = 4;
    cfg.ack_timeout = Duration::from_millis(500);
    let (acked, stats) = ship(
        cfg,
        &s,
        |_, acked| acked >= 8,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    let st = w.fake.0.lock().unwrap();
    // Each stream carried exactly one window, and the next one resumed after it (the opening
    // heartbeat's Ack said where the ledger stood): nothing was sent twice.
    assert_eq!(
        st.received_per_stream[..2],
        [4, 4],
        "{:?}",
        st.received_per_stream
    );
    assert!(
        st.received_per_stream.iter().all(|&n| n <= 4),
        "{:?}",
        st.received_per_stream
    );
    assert_eq!(st.duplicates, 0);
    assert!(acked >= 8 && acked % 4 == 0, "acked {acked}");
    assert!(
        stats
            .session_errors()
            .iter()
            .any(|(r, n)| r == "ack_timeout" && *n >= 2),
        "{:?}",
        stats.session_errors()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_stream_resumes_where_the_ledger_stands() {
    let w = World::new().await;
    w.fake.0.lock().unwrap().fail_after = Some(7);
    let mut s = sealer(config(w.spool.path(), 1 << 20), 1).unwrap();
    let mut index = 0;
    fill(&mut s, &mut index, 30, 1, 2).unwrap();
    let sealed = s.spool().sealed_seq();
    let (acked, stats) = ship(
        w.shipper_config(),
        &s,
        |_, a| a == sealed,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(acked, sealed);
    let st = w.fake.0.lock().unwrap();
    assert_eq!(st.stored.len() as u64, sealed);
    assert!(st.chain_breaks.is_empty(), "{:?}", st.chain_breaks);
    assert!(
        st.streams >= 5,
        "30 batches at 7 per stream need at least 5 streams: {}",
        st.streams
    );
    assert!(
        stats
            .session_errors()
            .iter()
            .any(|(r, _)| r == "status_unavailable"),
        "{:?}",
        stats.session_errors()
    );
    // Resuming from the ledger's ack: nothing already stored is sent again, except what was in
    // flight when a stream broke (at most one window per break).
    let breaks = st.streams - 1;
    assert!(st.duplicates <= breaks * 64, "{} duplicates", st.duplicates);
}

#[tokio::test(flavor = "current_thread")]
async fn an_ack_beyond_what_was_sealed_is_refused() {
    let w = World::new().await;
    let mut s = sealer(config(w.spool.path(), 1 << 20), 1).unwrap();
    let mut index = 0;
    fill(&mut s, &mut index, 3, 1, 1).unwrap();
    w.fake.0.lock().unwrap().lie_ack = Some(1_000);
    let (acked, stats) = ship(
        w.shipper_config(),
        &s,
        |st, _| st.stored.len() == 3,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        acked, 0,
        "a lying ledger must not make the node delete its spool"
    );
    assert!(stats.bad_acks_total.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_ledger_whose_certificate_is_not_from_the_configured_ca_gets_nothing() {
    let mut w = World::new().await;
    // A second server, certificate from another CA: the shipper must refuse to talk to it.
    let other = TestCa::new(w.ca_dir.path(), "impostor");
    let (endpoint, stop) = serve(w.fake.clone(), &w.ca, &other).await;
    w.endpoint = endpoint;
    let _first = w.stop_server.replace(stop);
    let mut s = sealer(config(w.spool.path(), 1 << 20), 1).unwrap();
    let mut index = 0;
    fill(&mut s, &mut index, 3, 1, 1).unwrap();
    let (acked, stats) = ship(
        w.shipper_config(),
        &s,
        |_, _| false,
        &w.fake,
        Duration::from_millis(1500),
    )
    .await;
    let _ = acked;
    assert_eq!(w.fake.0.lock().unwrap().stored.len(), 0);
    assert!(
        stats
            .session_errors()
            .iter()
            .any(|(r, n)| r == "connect" && *n >= 2),
        "{:?}",
        stats.session_errors()
    );
}

/// Ships everything, then "restores the ledger from a backup" taken at seq 15: the next
/// session opens with an Ack of 15, below the node's cursor of 40, and the shipper re-sends
/// 16..=40 from the spool, which retained them.
#[tokio::test(flavor = "current_thread")]
async fn a_ledger_restored_from_a_backup_gets_everything_the_spool_retains() {
    let w = World::new().await;
    let mut cfg = config(w.spool.path(), 1 << 10);
    cfg.retain_acked = Duration::from_secs(3600);
    cfg.retain_acked_bytes = 1 << 30;
    let mut s = sealer(cfg, 1).unwrap();
    let mut index = 0;
    fill(&mut s, &mut index, 40, 1, 2).unwrap();
    let sealed = s.spool().sealed_seq();
    let (acked, _) = ship(
        w.shipper_config(),
        &s,
        |_, a| a == sealed,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(acked, 40);
    s.spool_mut().ack(acked).unwrap();
    assert_eq!(s.spool().first_held_seq(), 1, "retained, not freed");
    // The restore: the ledger now holds 1..=15 only.
    w.fake.0.lock().unwrap().stored.retain(|&seq, _| seq <= 15);
    let (acked, stats) = ship(
        w.shipper_config(),
        &s,
        |st, a| a == sealed && st.stored.len() == 40,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(acked, 40);
    assert_eq!(stats.rewinds_total.load(Ordering::Relaxed), 1);
    assert_eq!(stats.rewind_unheld_batches_total.load(Ordering::Relaxed), 0);
    let st = w.fake.0.lock().unwrap();
    assert_eq!(st.stored.len(), 40);
    assert!(st.chain_breaks.is_empty(), "{:?}", st.chain_breaks);
    drop(st);
    // The daemon's side: the cursor moves back to what the ledger holds, never further than
    // the spool holds, and forward again with the acks.
    assert_eq!(s.spool_mut().rewind_ack(15).unwrap(), 15);
    assert_eq!(s.spool().acked_seq(), 15);
    s.spool_mut().ack(40).unwrap();
    assert_eq!(s.spool().acked_seq(), 40);
}

/// Without retention the acknowledged batches are gone: a restored ledger cannot get them
/// again from this node. Counted and logged; the cursor never moves below what is held.
#[tokio::test(flavor = "current_thread")]
async fn a_restore_beyond_what_the_spool_holds_is_counted() {
    let w = World::new().await;
    let mut s = sealer(config(w.spool.path(), 1 << 10), 1).unwrap();
    let mut index = 0;
    fill(&mut s, &mut index, 40, 1, 2).unwrap();
    let sealed = s.spool().sealed_seq();
    let (acked, _) = ship(
        w.shipper_config(),
        &s,
        |_, a| a == sealed,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    s.spool_mut().ack(acked).unwrap();
    let held = s.spool().first_held_seq();
    assert!(held > 16, "segments were freed: first held {held}");
    w.fake.0.lock().unwrap().stored.retain(|&seq, _| seq <= 15);
    // The node goes on sealing: the first batch after the unheld range anchors the statement
    // (its prev_hash is the hash of the range's last batch).
    fill(&mut s, &mut index, 3, 1, 2).unwrap();
    let sealed = s.spool().sealed_seq();
    let (acked, stats) = ship(
        w.shipper_config(),
        &s,
        |st, a| a == sealed && st.acked() == sealed,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(stats.rewinds_total.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats.rewind_unheld_batches_total.load(Ordering::Relaxed),
        held - 16
    );
    // What the spool no longer held was declared in one signed statement, and the ledger
    // caught up past it with everything the spool still held.
    assert_eq!(acked, sealed);
    let st = w.fake.0.lock().unwrap();
    assert_eq!(
        st.losses,
        vec![(
            16,
            held - 1,
            wattd_proto::v1::LossReason::NotRetained as i32
        )]
    );
    assert!(st.chain_breaks.is_empty(), "{:?}", st.chain_breaks);
    assert_eq!(
        stats
            .lost_batches_not_retained_total
            .load(Ordering::Relaxed),
        held - 16
    );
    drop(st);
    assert_eq!(s.spool_mut().rewind_ack(15).unwrap(), held - 1);
}

/// A bit flipped in a sealed record in the middle of the spool: the shipper steps over it,
/// declares the damaged seq(s) lost in a signed statement anchored by the next intact batch's
/// prev_hash, and the ledger reaches the last sealed seq instead of waiting above a hole.
#[tokio::test(flavor = "current_thread")]
async fn a_damaged_middle_record_is_declared_and_delivery_goes_on() {
    let w = World::new().await;
    let mut s = sealer(config(w.spool.path(), 1 << 20), 1).unwrap();
    let mut index = 0;
    fill(&mut s, &mut index, 30, 1, 2).unwrap();
    let sealed = s.spool().sealed_seq();
    let segs = wattd::spool::list_segments(w.spool.path()).unwrap();
    let (_, path) = segs.last().unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
    let (acked, stats) = ship(
        w.shipper_config(),
        &s,
        |_, a| a == sealed,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(acked, sealed, "the ledger reached the last sealed seq");
    let st = w.fake.0.lock().unwrap();
    assert_eq!(st.losses.len(), 1, "{:?}", st.losses);
    let (first, last, reason) = st.losses[0];
    assert_eq!(reason, wattd_proto::v1::LossReason::Damaged as i32);
    assert!(
        first > 1 && last < sealed && first <= last,
        "{first}..={last}"
    );
    assert!(st.chain_breaks.is_empty(), "{:?}", st.chain_breaks);
    assert_eq!(
        stats.lost_batches_damaged_total.load(Ordering::Relaxed),
        last - first + 1
    );
    // Sent at most once more per reconnect; here one session sufficed.
    assert_eq!(
        stats.loss_statements_damaged_total.load(Ordering::Relaxed),
        1
    );
}

/// The damaged record is the batch that announced a key rotation: the statement (signed by the
/// new key) carries the rotation as the old key signed it on its own, so a ledger that never
/// saw the announcing batch can learn the new key.
#[tokio::test(flavor = "current_thread")]
async fn a_damaged_rotation_batch_is_declared_with_its_signed_rotation() {
    let w = World::new().await;
    let cfg = config(w.spool.path(), 1 << 20);
    let policy = wattd::sealer::SealPolicy::new(1, Duration::from_secs(10)).unwrap();
    let (mut s, _) = Sealer::open(cfg, policy).unwrap();
    let old = s.key().verifying_key();
    let mut index = 0;
    fill(&mut s, &mut index, 3, 1, 2).unwrap();
    let announcing = s.rotate_key(0).unwrap();
    fill(&mut s, &mut index, 3, 1, 2).unwrap();
    let sealed = s.spool().sealed_seq();
    // Damage the announcing batch's record.
    let segs = wattd::spool::list_segments(w.spool.path()).unwrap();
    let (_, path) = segs.last().unwrap();
    let bytes = std::fs::read(path).unwrap();
    let scan = wattd_records::segment::frame::scan_segment(bytes.clone());
    let payload = scan
        .items
        .iter()
        .find_map(|i| match i {
            wattd_records::segment::frame::ScanItem::Record { payload, .. } => {
                let (b, _) =
                    wattd::batch::StoredBatch::from_bytes(bytes[payload.clone()].to_vec()).ok()?;
                (b.seq == announcing).then(|| payload.clone())
            }
            _ => None,
        })
        .unwrap();
    let mut damaged = bytes.clone();
    damaged[payload.start + payload.len() / 2] ^= 0x20;
    std::fs::write(path, &damaged).unwrap();
    let (acked, _) = ship(
        w.shipper_config(),
        &s,
        |_, a| a == sealed,
        &w.fake,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(acked, sealed);
    let st = w.fake.0.lock().unwrap();
    assert_eq!(st.losses.len(), 1, "{:?}", st.losses);
    assert_eq!((st.losses[0].0, st.losses[0].1), (announcing, announcing));
    let certs = &st.loss_rotations[0];
    assert_eq!(certs.len(), 1);
    let r = wattd_proto::v1::KeyRotation::decode(certs[0].rotation_bytes.as_slice()).unwrap();
    assert_eq!((r.new_key_epoch, r.effective_seq), (2, announcing + 1));
    let sig = ed25519_dalek::Signature::from_slice(&certs[0].signature).unwrap();
    use ed25519_dalek::Verifier as _;
    assert!(
        old.verify(&certs[0].rotation_bytes, &sig).is_ok(),
        "signed by the retired key"
    );
}
