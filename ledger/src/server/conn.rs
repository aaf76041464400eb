//! Accepted connections: the accept loop with its limits (connections per source, handshake
//! time, idle HTTP/2 connections), and `Conn`, the TLS stream that tonic serves.

use super::*;

/// Who may hold a connection past its TLS handshake. The node port: a certificate naming an
/// enrolled node (anything else is closed at once, so it holds no slot). The query port: any
/// certificate of the readers' CA; a reader the readers file does not name is refused per call
/// (PERMISSION_DENIED, audited), so it learns why and the audit shows who tried.
#[derive(Clone, Debug)]
pub(super) enum Admit {
    Enrolled(Arc<RwLock<Arc<Enrolment>>>),
    Readers,
}

impl Admit {
    fn admits(&self, cn: &str) -> bool {
        match self {
            Admit::Enrolled(e) => e
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .node(cn)
                .is_some(),
            Admit::Readers => true,
        }
    }
}

/// The HTTP/2 client preface: what a connection must send first.
const PREFACE_BYTES: usize = 24;

/// The streams open on one connection, and since when it has had none: the service counts
/// them (it finds a connection by its peer address), the connection closes itself once it has
/// been without a stream for `--idle-timeout-s`.
#[derive(Debug)]
pub struct ConnActivity {
    streams: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::Mutex<std::time::Instant>,
}

impl ConnActivity {
    fn new() -> Self {
        Self {
            streams: std::sync::atomic::AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// How long the connection has been without a stream (zero while it has one).
    fn idle_for(&self) -> Duration {
        if self.streams.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.idle_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// The open connections' activity, by peer address.
pub type ConnRegistry =
    Arc<std::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<ConnActivity>>>>;

/// One open stream on a connection; the connection's idle clock starts again when the last one
/// is dropped.
#[derive(Debug)]
pub struct StreamActivity(Arc<ConnActivity>);

impl StreamActivity {
    /// Counts a stream on the connection of `peer`, if it is one of ours.
    pub fn start(registry: &ConnRegistry, peer: Option<SocketAddr>) -> Option<Self> {
        let a = Arc::clone(
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&peer?)?,
        );
        a.streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some(Self(a))
    }
}

impl Drop for StreamActivity {
    fn drop(&mut self) {
        // The idle clock is set before the count drops, so the connection never sees zero
        // streams with an old idle_since.
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        self.0
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A TLS connection that holds its connection slot (and its source's) until it closes, must
/// send its HTTP/2 preface within a deadline, and is closed once without a stream for
/// `idle_timeout`.
pub(super) struct Conn {
    tls: TlsStream<TcpStream>,
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
    metrics: Arc<Metrics>,
    /// Until the preface has been read: when it must have been.
    preface_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    read_bytes: usize,
    peer: SocketAddr,
    registry: ConnRegistry,
    activity: Arc<ConnActivity>,
    idle_timeout: Duration,
    /// When to look at the activity next.
    idle_check: Pin<Box<tokio::time::Sleep>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.dec(&self.metrics.connections_open);
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if r.get(&self.peer)
            .is_some_and(|a| Arc::ptr_eq(a, &self.activity))
        {
            r.remove(&self.peer);
        }
    }
}

impl Conn {
    /// Ready with an error once the connection has been without a stream for the idle
    /// timeout; otherwise re-arms its check (and its waker).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        while self.idle_check.as_mut().poll(cx).is_ready() {
            let idle = self.activity.idle_for();
            if idle >= self.idle_timeout {
                self.metrics.inc(&self.metrics.idle_timeouts);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no stream on the connection within the idle timeout",
                ));
            }
            let next = tokio::time::Instant::now() + (self.idle_timeout - idle);
            self.idle_check.as_mut().reset(next);
        }
        None
    }
}

/// What `--max-connections-per-source` counts by: an IPv4 address (an IPv4-mapped IPv6 one
/// too), or an IPv6 address cut to `v6_prefix` bits (`--source-prefix-v6`: 128 counts single
/// addresses; 64 counts a /64, for networks that give each host a whole /64, where one host
/// could otherwise take every slot from its many addresses).
pub fn source_key(ip: std::net::IpAddr, v6_prefix: u8) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(v6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// At most one log line per ten seconds for a repeated event, saying how many it stands for.
#[derive(Debug, Default)]
struct LogThrottle {
    last: Option<std::time::Instant>,
    count: u64,
}

impl LogThrottle {
    /// Counts one event; returns the count to log when a line is due.
    fn due(&mut self) -> Option<u64> {
        self.count += 1;
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Counts a source address's open connections; released on drop.
struct SourceSlot {
    ip: std::net::IpAddr,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl SourceSlot {
    fn take(
        ip: std::net::IpAddr,
        open: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        limit: usize,
    ) -> Option<Self> {
        let mut m = open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Self {
            ip,
            open: Arc::clone(open),
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tls).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            self.read_bytes += buf.filled().len() - before;
            if self.read_bytes >= PREFACE_BYTES {
                self.preface_deadline = None;
            }
        }
        if polled.is_pending() {
            if let Some(e) = self.poll_idle(cx) {
                return Poll::Ready(Err(e));
            }
            if let Some(d) = self.preface_deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    self.metrics.inc(&self.metrics.preface_timeouts);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the deadline",
                    )));
                }
            }
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn accept_loop(
    listener: TcpListener,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    admit: Admit,
    metrics: Arc<Metrics>,
    limits: Limits,
    registry: ConnRegistry,
    conns: mpsc::Sender<Result<Conn, io::Error>>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused_source_log = LogThrottle::default();
    let mut refused_log = LogThrottle::default();
    // Shared by the handshake tasks: a flood of bad handshakes must not flood the log either.
    let handshake_log = Arc::new(std::sync::Mutex::new(LogThrottle::default()));
    let sources = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // EMFILE and friends: back off rather than spin on a readable listener.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(source) = SourceSlot::take(
            source_key(peer.ip(), limits.source_prefix_v6),
            &sources,
            limits.max_connections_per_source,
        ) else {
            metrics.inc(&metrics.connections_refused_source);
            // A flood must not flood the log too: one line per ten seconds, with the count.
            if let Some(n) = refused_source_log.due() {
                tracing::warn!(%peer, limit = limits.max_connections_per_source, refused = n, "connections refused: --max-connections-per-source reached");
            }
            drop(tcp);
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.inc(&metrics.connections_refused);
            if let Some(n) = refused_log.due() {
                tracing::warn!(%peer, limit = limits.max_connections, refused = n, "connections refused: --max-connections reached");
            }
            drop(tcp);
            continue;
        };
        metrics.inc(&metrics.connections);
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.read().unwrap_or_else(|p| p.into_inner()).clone();
        let metrics = Arc::clone(&metrics);
        let conns = conns.clone();
        let admit = admit.clone();
        let registry = Arc::clone(&registry);
        let handshake_log = Arc::clone(&handshake_log);
        tokio::spawn(async move {
            let log_due = || {
                handshake_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .due()
            };
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // A certificate of the right CA for a name nobody enrolled never holds a
                    // slot past its handshake.
                    let admitted = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|leaf| crate::service::cert_common_name(leaf.as_ref()).ok())
                        .is_some_and(|cn| admit.admits(&cn));
                    if !admitted {
                        match admit {
                            Admit::Enrolled(_) => {
                                metrics.inc(&metrics.connections_unenrolled);
                                if let Some(n) = log_due() {
                                    tracing::warn!(%peer, failed_or_refused = n, "connection closed after the handshake: the certificate names no enrolled node");
                                }
                            }
                            Admit::Readers => {
                                metrics.inc(&metrics.reads_refused);
                                if let Some(n) = log_due() {
                                    tracing::warn!(%peer, failed_or_refused = n, "query connection closed after the handshake: the certificate has no CN");
                                }
                            }
                        }
                        return;
                    }
                    metrics.inc(&metrics.connections_open);
                    let activity = Arc::new(ConnActivity::new());
                    registry
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(peer, Arc::clone(&activity));
                    let conn = Conn {
                        tls,
                        _permit: permit,
                        _source: source,
                        metrics: Arc::clone(&metrics),
                        preface_deadline: Some(Box::pin(tokio::time::sleep(
                            limits.preface_timeout,
                        ))),
                        read_bytes: 0,
                        peer,
                        registry,
                        activity,
                        idle_timeout: limits.idle_timeout,
                        idle_check: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                    };
                    let _ = conns.send(Ok(conn)).await;
                }
                Ok(Err(error)) => {
                    metrics.inc(&metrics.tls_handshake_failures);
                    if let Some(n) = log_due() {
                        tracing::warn!(%peer, %error, failed_or_refused = n, "TLS handshake failed (one line per 10 s; the count since the last)");
                    }
                }
                Err(_) => {
                    metrics.inc(&metrics.tls_handshake_failures);
                    if let Some(n) = log_due() {
                        tracing::warn!(%peer, failed_or_refused = n, "TLS handshake timed out (one line per 10 s; the count since the last)");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_by_ipv4_address_or_ipv6_prefix() {
        let k = |a: &str, p| source_key(a.parse().unwrap(), p);
        assert_eq!(k("127.0.0.2", 64), k("127.0.0.2", 64));
        assert_ne!(k("127.0.0.1", 64), k("127.0.0.2", 64));
        assert_eq!(k("2001:db8:1:2::1", 64), k("2001:db8:1:2:ffff::9", 64));
        assert_ne!(k("2001:db8:1:2::1", 64), k("2001:db8:1:3::1", 64));
        assert_ne!(k("2001:db8:1:2::1", 128), k("2001:db8:1:2::2", 128));
        assert_eq!(k("2001:db8:1:2::1", 0), k("fe80::1", 0));
        assert_eq!(k("::ffff:10.0.0.1", 64), k("10.0.0.1", 64));
    }

    #[test]
    fn a_repeated_log_line_is_throttled_with_its_count() {
        let mut t = LogThrottle::default();
        assert_eq!(t.due(), Some(1));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        t.last = Some(std::time::Instant::now() - Duration::from_secs(11));
        assert_eq!(t.due(), Some(3));
    }
}
