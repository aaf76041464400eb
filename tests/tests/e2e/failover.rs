//! Issue 17's failover proof: the ledger's PostgreSQL is a primary with a synchronous standby,
//! both made here (`initdb`, `pg_basebackup -R`, loopback ports, TLS on, password logins over
//! TLS only). The real agent streams to the real `wattd-ledger serve`, whose store URL names
//! both servers (`target_session_attrs=read-write`, `sslmode=verify-full`, `passfile=`). The
//! database password is rotated, then the primary is SIGKILLed mid-stream and the standby
//! promoted. The ledger reconnects through the URL with the new password; afterwards it holds
//! every batch the agent sealed, once, its totals equal the agent's to the microjoule, and
//! `wattd-ledger audit` is clean. The agent keeps no acknowledged batch (`retain_acked_s = 0`),
//! so a batch acknowledged and then lost in the failover could not be sent again: it would show
//! as a hole, and as a rewind in the agent's log.

use std::process::Command;
use std::time::{Duration, Instant};

use wattd_tests::cgroups::require_cgroups;
use wattd_tests::pgcluster::{Cluster, PgBin};
use wattd_tests::tls::TestCa;

use crate::harness::{burn_bin, free_port, Agent};
use crate::ledger::{ledger_bin, stop_agent_cleanly, World};

fn write_passfile(path: &std::path::Path, password: &str) {
    std::fs::write(path, format!("127.0.0.1:*:wattd:wattd:{password}\n")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// `wattd-ledger WHAT --store URL`: the output, whatever the exit status.
fn ledger_cmd(what: &str, store: &str) -> std::process::Output {
    Command::new(ledger_bin())
        .args([what, "--store", store, "--format", "json"])
        .output()
        .unwrap()
}

#[test]
fn a_synchronous_standby_takes_over_and_no_acknowledged_batch_is_lost() {
    let test = "a_synchronous_standby_takes_over_and_no_acknowledged_batch_is_lost";
    let Some(mount) = require_cgroups(test) else {
        return;
    };
    let bin = match PgBin::find() {
        Ok(b) => b,
        Err(what) => {
            wattd_testkit::skip(test, what);
            return;
        }
    };
    let pg_dir = tempfile::tempdir().unwrap();
    // The postgres user walks through it to its clusters.
    std::fs::set_permissions(
        pg_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let pki = pg_dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    let ca = TestCa::new(&pki, "postgres");
    let server = ca.server("pg-server");
    // Password logins only over TLS; replication and the superuser on loopback for the test.
    let hba = "local all postgres trust\n\
               hostssl replication postgres 127.0.0.1/32 trust\n\
               hostssl all postgres 127.0.0.1/32 trust\n\
               hostssl wattd wattd 127.0.0.1/32 scram-sha-256\n";
    let (p1, p2) = (free_port(), free_port());
    let mut primary = Cluster::init(
        &bin,
        &pg_dir.path().join("primary"),
        p1,
        &server,
        hba,
        "synchronous_commit = on\n",
    );
    primary.start();
    primary.psql("CREATE ROLE wattd LOGIN PASSWORD 'first-password'");
    primary.psql("CREATE DATABASE wattd OWNER wattd");
    let mut standby = Cluster::standby_of(&primary, &pg_dir.path().join("standby"), p2, "standby1");
    standby.start();
    // Every commit waits for the standby's flush: what makes a failover lose nothing. (Set once
    // the standby exists: before, every commit would wait for it.)
    primary.psql("ALTER SYSTEM SET synchronous_standby_names = 'standby1'");
    primary.psql("SELECT pg_reload_conf()");
    primary.wait_for(
        "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'",
        "sync",
    );

    let passfile = pg_dir.path().join("pgpass");
    write_passfile(&passfile, "first-password");
    let url = format!(
        "postgres://wattd@127.0.0.1:{p1},127.0.0.1:{p2}/wattd?target_session_attrs=read-write\
         &sslmode=verify-full&sslrootcert={}&passfile={}",
        ca.ca_pem.display(),
        passfile.display()
    );
    // Plain TCP is refused by the server (hostssl only): the ledger's connections are TLS.
    let plain = ledger_cmd(
        "nodes",
        &format!(
            "postgres://wattd@127.0.0.1:{p1}/wattd?passfile={}",
            passfile.display()
        ),
    );
    assert!(!plain.status.success(), "a plain connection was accepted");
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("no encryption"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );

    // A server whose certificate does not chain to sslrootcert is refused (verify-full).
    let other_ca = TestCa::new(&pki, "other");
    let wrong = ledger_cmd(
        "nodes",
        &format!(
            "postgres://wattd@127.0.0.1:{p1}/wattd?sslmode=verify-full&sslrootcert={}&passfile={}",
            other_ca.ca_pem.display(),
            passfile.display()
        ),
    );
    assert!(
        !wrong.status.success(),
        "a server of another CA was trusted"
    );
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    let mut w = World::with_store_url(mount, "failover", url.clone());
    let ledger = w.ledger("127.0.0.1:0");
    let config = w.agent_config_with(ledger.listen, 200, 200, "retain_acked_s = 0\n");
    let mut agent = Agent::start(&config, &w.agent_log());
    w.cg.spawn_in(
        "run-across.scope",
        Command::new(burn_bin()).args(["0.5", "14"]),
    )
    .unwrap();
    let pg_logs = [primary.log_path(), standby.log_path()];
    let wait_acked = |w: &World, above: u64, what: &str| {
        let t = Instant::now();
        while w.agent_acked() < above {
            let [p, s] = pg_logs
                .clone()
                .map(|p| std::fs::read_to_string(p).unwrap_or_default());
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "{what}: acknowledged {} of {above}\n{}\n--- primary ---\n{p}\n--- standby ---\n{s}",
                w.agent_acked(),
                w.logs(),
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_acked(&w, 10, "before the failover");

    // The standby is synchronous: frozen, it holds every commit, so no batch is acknowledged
    // (an asynchronous one would let them through). Thawed, they go on.
    standby.signal_all("STOP");
    std::thread::sleep(Duration::from_millis(1000));
    let frozen_at = w.agent_acked();
    std::thread::sleep(Duration::from_secs(2));
    let frozen_after = w.agent_acked();
    standby.signal_all("CONT");
    assert_eq!(
        frozen_after,
        frozen_at,
        "batches were acknowledged while the synchronous standby could not confirm them\n{}",
        w.logs()
    );
    wait_acked(&w, frozen_after + 5, "after the standby thawed");

    // The credentials rotate (as a daily rotation would): the server and the file change; the
    // ledger's open connections keep working, new ones must read the file again.
    primary.psql("ALTER ROLE wattd PASSWORD 'second-password'");
    write_passfile(&passfile, "second-password");
    wait_acked(&w, w.agent_acked() + 5, "after the rotation");

    // The primary is lost mid-stream; the standby is promoted.
    let acked_at_loss = w.agent_acked();
    primary.kill9();
    standby.promote();
    wait_acked(&w, acked_at_loss + 15, "after the failover");
    w.cg.spawn_in(
        "run-after.scope",
        Command::new(burn_bin()).args(["0.8", "2"]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    w.cg.wait_all();
    stop_agent_cleanly(&w, &mut agent);

    // Every sealed batch once, the totals the agent's, nothing rewound, the audit clean.
    w.check();
    let agent_log = std::fs::read_to_string(w.agent_log()).unwrap_or_default();
    assert!(
        !agent_log.contains("holds less than it acknowledged")
            && !agent_log.contains("cannot be sent again"),
        "the ledger lost acknowledged batches in the failover\n{}",
        w.logs()
    );
    let audit = ledger_cmd("audit", &url);
    assert!(
        audit.status.success(),
        "wattd-ledger audit: {}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    // The failover was seen: the ledger's connections to the primary broke mid-stream.
    let ledger_log = std::fs::read_to_string(w.work.path().join("ledger.log")).unwrap_or_default();
    assert!(
        ledger_log.contains("postgres connection closed"),
        "the ledger never noticed the failover\n{ledger_log}"
    );
    drop(ledger);
    drop(standby);
    drop(primary);
}
