//! Throwaway PostgreSQL clusters made by a test itself, for what a shared test server cannot show:
//! TLS on the server, a synchronous standby made with `pg_basebackup -R`, the primary lost with
//! SIGKILL, the standby promoted. Debian's server binaries (`/usr/lib/postgresql/*/bin`), run as
//! the `postgres` user (initdb refuses root), listening on 127.0.0.1 only. Dropping a cluster
//! stops it (immediate mode) and deletes its directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::tls::CertFiles;

/// The server binaries, or why they cannot be used here.
#[derive(Clone, Debug)]
pub struct PgBin {
    dir: PathBuf,
}

impl PgBin {
    /// The newest installed server binaries; `Err` says what is missing (not root, no server,
    /// no `postgres` user, no runuser).
    pub fn find() -> Result<PgBin, String> {
        if !wattd_testkit::is_root() {
            return Err("root (to run PostgreSQL as the postgres user)".into());
        }
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("PostgreSQL server binaries (/usr/lib/postgresql: {e})"))?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("initdb").exists() && d.join("pg_basebackup").exists())
            .collect();
        dirs.sort_by_key(|d| {
            d.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        let dir = dirs
            .pop()
            .ok_or("PostgreSQL server binaries (Debian package postgresql)")?;
        let pg = Command::new("id").args(["-u", "postgres"]).output();
        if !pg.is_ok_and(|o| o.status.success()) {
            return Err("the postgres user (Debian package postgresql)".into());
        }
        if wattd_testkit::need::which("runuser").is_none() {
            return Err("runuser (Debian package util-linux)".into());
        }
        Ok(PgBin { dir })
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `name args...` as the postgres user; panics with its output if it fails.
    fn run(&self, name: &str, args: &[&str]) -> Output {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.tool(name))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {name}: {e}"));
        assert!(
            out.status.success(),
            "{name} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// A directory the postgres user owns, removed on drop.
fn owned_dir(path: &Path) {
    std::fs::create_dir_all(path).expect("creating a cluster directory");
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(st.success(), "chown postgres {}", path.display());
}

/// One cluster: its data directory, port and binaries.
#[derive(Debug)]
pub struct Cluster {
    pub port: u16,
    pub data: PathBuf,
    root: PathBuf,
    bin: PgBin,
    running: bool,
}

impl Cluster {
    /// A new primary in `root` (created, owned by postgres) on `port`: TLS with `server` (its
    /// certificate must name 127.0.0.1), `hba` as its pg_hba.conf, and these `settings`
    /// appended to postgresql.conf. Not started.
    pub fn init(
        bin: &PgBin,
        root: &Path,
        port: u16,
        server: &CertFiles,
        hba: &str,
        settings: &str,
    ) -> Cluster {
        owned_dir(root);
        let data = root.join("data");
        bin.run(
            "initdb",
            &[
                "-D",
                data.to_str().expect("a UTF-8 path"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        );
        for (from, to) in [(&server.cert, "server.crt"), (&server.key, "server.key")] {
            std::fs::copy(from, data.join(to)).expect("copying the server's TLS files");
        }
        std::fs::write(data.join("pg_hba.conf"), hba).expect("writing pg_hba.conf");
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             ssl_min_protocol_version = 'TLSv1.2'\nmax_connections = 50\nwal_level = replica\n\
             max_wal_senders = 4\nfsync = on\n{settings}\n",
            root.display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).expect("writing postgresql.conf");
        owned_dir(root);
        chmod_key(&data);
        Cluster {
            port,
            data,
            root: root.to_path_buf(),
            bin: bin.clone(),
            running: false,
        }
    }

    /// A standby of `primary` in `root` on `port`, from `pg_basebackup -R` (its
    /// `primary_conninfo` names it `application_name`, for `synchronous_standby_names`). Not
    /// started.
    pub fn standby_of(
        primary: &Cluster,
        root: &Path,
        port: u16,
        application_name: &str,
    ) -> Cluster {
        owned_dir(root);
        let data = root.join("data");
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres application_name={application_name} sslmode=require",
            primary.port
        );
        primary.bin.run(
            "pg_basebackup",
            &[
                "-D",
                data.to_str().expect("a UTF-8 path"),
                "-d",
                &conninfo,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        text.push_str(&format!(
            "\nport = {port}\nunix_socket_directories = '{}'\n",
            root.display()
        ));
        std::fs::write(data.join("postgresql.conf"), text).expect("writing postgresql.conf");
        owned_dir(root);
        chmod_key(&data);
        Cluster {
            port,
            data,
            root: root.to_path_buf(),
            bin: primary.bin.clone(),
            running: false,
        }
    }

    pub fn start(&mut self) {
        let log = self.root.join("server.log");
        self.bin.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("a UTF-8 path"),
                "-l",
                log.to_str().expect("a UTF-8 path"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        self.running = true;
    }

    /// `sql` through psql as postgres (over the Unix socket); the output's text.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.bin.run(
            "psql",
            &[
                "-h",
                self.root.to_str().expect("a UTF-8 path"),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-Atq",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until `sql` prints `want` (60 s at most).
    pub fn wait_for(&self, sql: &str, want: &str) {
        let t = Instant::now();
        loop {
            let got = self.psql(sql);
            if got == want {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{sql}: {got:?}, never {want:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where the server logs.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The postmaster's pid and its children's.
    fn pids(&self) -> (i32, Vec<i32>) {
        let pid_text = std::fs::read_to_string(self.data.join("postmaster.pid")).expect("pid");
        let pid: i32 = pid_text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("postmaster pid");
        let children: Vec<i32> = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| {
                        // The fields after the command name (which may hold spaces).
                        let rest = s.rsplit_once(')')?.1.to_owned();
                        rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                    })
                    == Some(pid)
            })
            .collect();
        (pid, children)
    }

    /// Sends `signal` (a `kill` name: STOP, CONT, KILL) to the postmaster and every process it
    /// started.
    pub fn signal_all(&self, signal: &str) {
        let (pid, children) = self.pids();
        for p in std::iter::once(pid).chain(children) {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &p.to_string()])
                .status();
        }
    }

    /// Loses the server as a host loses it: SIGKILL to the postmaster and every process it
    /// started, nothing flushed, nobody told.
    pub fn kill9(&mut self) {
        let (pid, _) = self.pids();
        self.signal_all("KILL");
        // Until the postmaster is gone (the pid file stays: nobody removed it).
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.running = false;
    }

    /// Promotes a standby and waits until it accepts writes.
    pub fn promote(&self) {
        self.bin.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().expect("a UTF-8 path"),
                "-w",
                "-t",
                "60",
                "promote",
            ],
        );
        self.wait_for("SELECT pg_is_in_recovery()", "f");
    }
}

fn chmod_key(data: &Path) {
    let key = data.join("server.key");
    if key.exists() {
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod 600 server.key");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.tool("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
