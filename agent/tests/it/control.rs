//! The control socket end to end: a real Unix socket in a temp dir, a real run tracker on a
//! generated host tree answering it, real clients (one of them a child process running as
//! another uid).

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use wattd::control::{apply, ControlConfig, ControlError, ControlServer};
use wattd_collectors::cgroup::{RunTracker, TrackerConfig};
use wattd_collectors::synth::HostTree;
use wattd_collectors::HostRoot;

/// One test at a time: some count this process's descriptors.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Harness {
    dir: tempfile::TempDir,
    sock: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// A host tree with two cgroups (`jobs/a`, `jobs/b`), a tracker on it, the socket, and a
    /// daemon task answering requests from the tracker.
    async fn start(tune: impl FnOnce(&mut ControlConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let h = HostTree::new(dir.path());
        h.write(
            "proc/self/mountinfo",
            "22 1 0:20 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        )
        .unwrap();
        h.cpus(1, 2, 1).unwrap();
        h.proc_stat(&[(10, 10), (10, 10)]).unwrap();
        for run in ["a", "b"] {
            h.write(
                format!("sys/fs/cgroup/jobs/{run}/cpu.stat"),
                "usage_usec 0\n",
            )
            .unwrap();
            h.write(
                format!("sys/fs/cgroup/jobs/{run}/cgroup.events"),
                "populated 1\n",
            )
            .unwrap();
        }
        let mut tracker = RunTracker::new(TrackerConfig {
            patterns: vec!["none.slice/run-{run_id}.scope".into()],
            raise_nofile: false,
            ..TrackerConfig::new(HostRoot::new(dir.path()))
        })
        .unwrap();
        let sock = dir.path().join("control.sock");
        let mut cfg = ControlConfig::new(&sock);
        tune(&mut cfg);
        let (server, mut rx) = ControlServer::bind(cfg).unwrap();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let r = apply(&mut tracker, &req.event);
                req.respond(r);
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Harness {
            dir,
            sock,
            shutdown: Some(tx),
            server,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.server).await;
        assert!(!self.sock.exists(), "socket file left behind");
    }
}

struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Client {
    async fn connect(path: &Path) -> Client {
        let (rd, wr) = UnixStream::connect(path).await.unwrap().into_split();
        Client {
            rd: BufReader::new(rd),
            wr,
        }
    }

    /// The next reply, or `None` at end of stream.
    async fn reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut line))
            .await
            .expect("reply in time")
            .ok()?;
        (n > 0).then(|| serde_json::from_str(&line).unwrap())
    }

    async fn send(&mut self, msg: &str) -> Value {
        self.wr
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .unwrap();
        self.reply().await.expect("a reply")
    }
}

fn ok(v: &Value) -> bool {
    v["ok"] == Value::Bool(true)
}

fn err(v: &Value) -> String {
    assert_eq!(v["ok"], Value::Bool(false), "{v}");
    v["error"].as_str().unwrap().to_owned()
}

/// The descriptors the code under test holds: the server's listener and accepted connections
/// (Unix sockets bound to the harness's path) and the tracker's files in the harness's host
/// tree. Never the whole process's: other tests of this binary open descriptors concurrently.
fn server_fds(h: &Harness) -> Vec<String> {
    let mut v = wattd_testkit::fds::unix_socket_fds(&h.sock);
    v.extend(wattd_testkit::fds::fds_under(h.dir.path()));
    v
}

const START_A: &str =
    r#"{"type":"run_started","run_id":"ra","cgroup":"jobs/a","labels":{"team":"blue"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_finish_round_trip_idempotent_and_unknown_finish() {
    let _g = SERIAL.lock().await;
    let h = Harness::start(|_| {}).await;
    let mode = std::fs::metadata(&h.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    let mut c = Client::connect(&h.sock).await;
    assert!(ok(&c.send(START_A).await));
    assert!(ok(&c.send(START_A).await), "start is idempotent");
    let e = err(&c
        .send(r#"{"type":"run_started","run_id":"ra","cgroup":"jobs/b"}"#)
        .await);
    assert!(e.contains("already tracked"), "{e}");
    let e = err(&c
        .send(r#"{"type":"run_started","run_id":"rx","cgroup":"jobs/nope"}"#)
        .await);
    assert!(e.contains("not found"), "{e}");
    assert!(ok(&c
        .send(r#"{"type":"run_finished","run_id":"ra"}"#)
        .await));
    assert!(ok(&c
        .send(r#"{"type":"run_finished","run_id":"ra"}"#)
        .await));
    let e = err(&c.send(r#"{"type":"run_finished","run_id":"never"}"#).await);
    assert!(e.contains("not tracked"), "{e}");
    drop(c);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_error_replies_and_the_connection_goes_on() {
    let _g = SERIAL.lock().await;
    let h = Harness::start(|_| {}).await;
    let mut c = Client::connect(&h.sock).await;
    for bad in [
        "hello",
        "{",
        "[1,2]",
        r#"{"type":"run_started"}"#,
        r#"{"type":"reboot"}"#,
        r#"{"type":"run_finished","run_id":"../../etc"}"#,
        r#"{"type":"run_started","run_id":"r","cgroup":"jobs/../../x"}"#,
        r#"{"type":"run_started","run_id":"r","cgroup":"jobs/a","labels":{"k":"v\n"}}"#,
        "\u{0}\u{1}\u{2}",
    ] {
        let e = err(&c.send(bad).await);
        assert!(!e.is_empty(), "{bad}");
    }
    assert!(ok(&c.send(START_A).await));
    drop(c);
    h.stop().await;
}

/// A line of exactly the limit is read; a message cut short by the end of the stream (no newline)
/// is still answered, then the connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_at_the_limit_and_a_last_message_without_its_newline_are_answered() {
    let _g = SERIAL.lock().await;
    let h = Harness::start(|c| c.max_line_bytes = START_A.len()).await;
    let mut c = Client::connect(&h.sock).await;
    assert!(ok(&c.send(START_A).await));
    let mut padded = START_A.to_owned();
    padded.push(' ');
    assert!(err(&c.send(&padded).await).contains("longer than"));
    let mut c = Client::connect(&h.sock).await;
    let start_b = r#"{"type":"run_started","run_id":"rb","cgroup":"jobs/b"}"#;
    c.wr.write_all(start_b.as_bytes()).await.unwrap();
    c.wr.shutdown().await.unwrap();
    assert!(ok(&c
        .reply()
        .await
        .expect("a reply to the unterminated message")));
    assert!(c.reply().await.is_none(), "then the end");
    drop(c);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_line_is_refused_and_the_connection_closed() {
    let _g = SERIAL.lock().await;
    let h = Harness::start(|_| {}).await;
    let Client { rd, mut wr } = Client::connect(&h.sock).await;
    let writer = tokio::spawn(async move {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..10 {
            // The server closes mid-way: a broken pipe here is the expected end.
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.write_all(b"\n").await;
    });
    let mut rd = rd;
    let mut line = String::new();
    rd.read_line(&mut line).await.unwrap();
    let e = err(&serde_json::from_str(&line).unwrap());
    assert!(e.contains("longer than 65536"), "{e}");
    line.clear();
    assert_eq!(
        rd.read_line(&mut line).await.unwrap_or(0),
        0,
        "closed after it"
    );
    writer.await.unwrap();
    // Still serving others.
    let mut c2 = Client::connect(&h.sock).await;
    assert!(ok(&c2.send(START_A).await));
    drop((rd, c2));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_10000_messages_is_rate_limited_without_leaking() {
    let _g = SERIAL.lock().await;
    let h = Harness::start(|c| {
        c.messages_per_sec = 100;
        c.burst = 100;
        c.max_rate_violations = 50;
    })
    .await;
    // The run is tracked first: its kept cpu.stat descriptor is the tracker's, not a leak.
    let mut c0 = Client::connect(&h.sock).await;
    assert!(ok(&c0.send(START_A).await));
    drop(c0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = server_fds(&h);
    // The check can fail: the listener itself is seen.
    assert!(!wattd_testkit::fds::unix_socket_fds(&h.sock).is_empty());
    let Client { mut rd, mut wr } = Client::connect(&h.sock).await;
    let writer = tokio::spawn(async move {
        let one = format!("{START_A}\n");
        let all = one.repeat(10_000);
        let started = std::time::Instant::now();
        let _ = wr.write_all(all.as_bytes()).await;
        started.elapsed()
    });
    let (mut oks, mut limited, mut replies) = (0, 0, 0);
    loop {
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut line)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => panic!("server neither answered nor closed"),
        }
        replies += 1;
        let v: Value = serde_json::from_str(&line).unwrap();
        if ok(&v) {
            oks += 1;
        } else if err(&v).contains("rate limited") {
            limited += 1;
        }
    }
    let took = writer.await.unwrap();
    eprintln!("{replies} replies: {oks} ok, {limited} rate limited; writing took {took:?}");
    assert!((100..10_000).contains(&oks), "{oks}");
    assert!(limited > 50, "{limited}");
    assert!(replies < 10_000, "closed before answering everything");
    drop(rd);
    // The server is fine and serves the next peer.
    let mut c = Client::connect(&h.sock).await;
    assert!(ok(&c.send(START_A).await) || err(&c.send(START_A).await).contains("rate"));
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = server_fds(&h);
    assert!(
        after.len() <= before.len(),
        "descriptors leaked: {before:?} then {after:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused() {
    let _g = SERIAL.lock().await;
    let h = Harness::start(|c| c.max_connections = 2).await;
    let mut a = Client::connect(&h.sock).await;
    let mut b = Client::connect(&h.sock).await;
    assert!(ok(&a.send(START_A).await));
    assert!(ok(&b.send(START_A).await));
    let mut c = Client::connect(&h.sock).await;
    let e = err(&c.reply().await.unwrap());
    assert!(e.contains("too many connections"), "{e}");
    drop((a, b, c));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_path_is_never_taken_from_a_file_or_a_live_listener() {
    let _g = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, "keep me").unwrap();
    assert!(matches!(
        ControlServer::bind(ControlConfig::new(&file)),
        Err(ControlError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let live = dir.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    assert!(matches!(
        ControlServer::bind(ControlConfig::new(&live)),
        Err(ControlError::InUse { .. })
    ));
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (server, _rx) = ControlServer::bind(ControlConfig::new(&stale)).unwrap();
    assert_eq!(server.path(), stale);
}

/// Runs one request from a child process with uid and gid `id` (no supplementary groups) and
/// returns what it read back, or "CONNECT_FAILED".
fn request_as(id: u32, sock: &Path, msg: &str) -> String {
    // Everything the child touches is prepared before the fork: it then calls only
    // async-signal-safe functions.
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = sock.as_os_str().as_bytes();
    assert!(p.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    let msg = format!("{msg}\n").into_bytes();
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two descriptors for pipe to fill.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child calls only async-signal-safe functions on data prepared before the fork,
    // and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: plain syscalls on valid buffers, a valid sockaddr_un and our own descriptors.
        unsafe {
            let fail = |code| {
                libc::_exit(code);
            };
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(id) != 0
                || libc::setuid(id) != 0
            {
                fail(10);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(s, (&raw const addr).cast(), len) != 0 {
                let m = b"CONNECT_FAILED";
                libc::write(fds[1], m.as_ptr().cast(), m.len());
                libc::_exit(0);
            }
            libc::write(s, msg.as_ptr().cast(), msg.len());
            let mut buf = [0u8; 1024];
            let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                libc::write(fds[1], buf.as_ptr().cast(), n as usize);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: our own pipe's write end, closed once.
    unsafe { libc::close(fds[1]) };
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    let mut status = 0;
    // SAFETY: our own pipe's read end, and our own child's pid with a valid status pointer.
    unsafe {
        libc::close(fds[0]);
        libc::waitpid(pid, &mut status, 0);
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_not_in_the_allowed_list_is_refused() {
    let _g = SERIAL.lock().await;
    if !wattd_testkit::need::is_root() {
        wattd_testkit::skip(
            "peer_not_in_the_allowed_list_is_refused",
            "root to run a client as uid 65534",
        );
        return;
    }
    const NOBODY: u32 = 65534;
    let msg = r#"{"type":"run_finished","run_id":"nope"}"#;
    for allowed in [false, true] {
        let h = Harness::start(|c| {
            if allowed {
                c.allowed_uids = vec![NOBODY];
            }
        })
        .await;
        std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Mode 0660 root:root: the file system already keeps nobody out.
        let sock = h.sock.clone();
        let out = tokio::task::spawn_blocking(move || request_as(NOBODY, &sock, msg))
            .await
            .unwrap();
        assert_eq!(out, "CONNECT_FAILED");
        // Loosened by mistake: SO_PEERCRED still decides.
        std::fs::set_permissions(&h.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let sock = h.sock.clone();
        let out = tokio::task::spawn_blocking(move || request_as(NOBODY, &sock, msg))
            .await
            .unwrap();
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let e = err(&v);
        if allowed {
            assert!(e.contains("not tracked"), "{e}");
        } else {
            assert!(e.contains("uid 65534 gid 65534 is not allowed"), "{e}");
        }
        h.stop().await;
    }
}
