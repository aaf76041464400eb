//! The CLI against a real spool: `identity`, `export`, `verify` (spool and export file),
//! `runs`, and `verify` failing with the file and offset of a flipped bit.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use wattd::sealer::{SealPolicy, Sealer};

use crate::records::common::{config, fill, TestResult};

fn wattd(args: &[&str], dir: &Path) -> Result<Output, Box<dyn std::error::Error>> {
    Ok(Command::new(env!("CARGO_BIN_EXE_wattd"))
        .args(args)
        .current_dir(dir)
        .output()?)
}

/// `wattd identity` makes the key for the node id `wattd run` will use: the configuration's
/// `[node] id`, in the configuration's `spool_dir` (a key made under another id, as the command
/// once did from /etc/machine-id alone, would be refused by the daemon).
#[test]
fn identity_follows_the_configuration_the_daemon_reads() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let spool = tmp.path().join("spool");
    let cfg = tmp.path().join("wattd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = \"node-from-config\"\n[spool]\ndir = {:?}\n",
            spool.to_str().ok_or("path")?
        ),
    )?;
    let out = wattd(
        &["identity", "--config", cfg.to_str().ok_or("path")?],
        tmp.path(),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ident = String::from_utf8(out.stdout)?;
    assert!(ident.contains("node_id = \"node-from-config\""), "{ident}");
    assert!(spool.join(wattd::identity::KEY_FILE).is_file(), "{stderr}");
    // The key exists: the same configuration prints it; one naming another node is refused
    // (the daemon would refuse the key), and so is a --node-id that contradicts [node] id.
    let again = wattd(
        &["identity", "--config", cfg.to_str().ok_or("path")?],
        tmp.path(),
    )?;
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout)?, ident);
    let other = tmp.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "[node]\nid = \"another-node\"\n[spool]\ndir = {:?}\n",
            spool.to_str().ok_or("path")?
        ),
    )?;
    let refused = wattd(
        &["identity", "--config", other.to_str().ok_or("path")?],
        tmp.path(),
    )?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("key belongs to node \"node-from-config\", not \"another-node\""),
        "{stderr}"
    );
    let contradicts = wattd(
        &[
            "identity",
            "--config",
            cfg.to_str().ok_or("path")?,
            "--node-id",
            "x",
        ],
        tmp.path(),
    )?;
    let stderr = String::from_utf8_lossy(&contradicts.stderr);
    assert!(!contradicts.status.success());
    assert!(
        stderr.contains("--node-id \"x\" differs from \"node-from-config\""),
        "{stderr}"
    );
    // A bad configuration is refused, naming the file, the line and the key.
    std::fs::write(&cfg, "[node]\nid = 7\n")?;
    let out = wattd(
        &["identity", "--config", cfg.to_str().ok_or("path")?],
        tmp.path(),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("wattd.toml:2") && stderr.contains("node.id"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn identity_export_verify_runs() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let policy = SealPolicy::new(4, Duration::from_secs(5))?;
    let (mut s, _) = Sealer::open(config(&data, 1 << 20), policy)?;
    let mut index = 0;
    fill(&mut s, &mut index, 3, 2, 2)?;
    drop(s);
    let d = data.to_str().ok_or("path")?;

    let out = wattd(&["identity", "--data-dir", d], tmp.path())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ident = String::from_utf8(out.stdout)?;
    assert!(
        ident.contains("node_id = \"node-a\"") && ident.contains("public_key = "),
        "{ident}"
    );
    std::fs::write(tmp.path().join("node.toml"), &ident)?;

    let out = wattd(&["export", "--data-dir", d], tmp.path())?;
    assert!(out.status.success());
    std::fs::write(tmp.path().join("export.bin"), &out.stdout)?;

    let out = wattd(&["verify", "export.bin", "--key", "node.toml"], tmp.path())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8(out.stdout)?
        .contains("3 batches (seq 1..=3), 3 valid, 6 intervals, 0 breaks"));
    let out = wattd(&["verify", "--data-dir", d], tmp.path())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = wattd(&["runs", "--data-dir", d, "--format", "json"], tmp.path())?;
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // 6 intervals, run-0 gets 1000 + 10 uJ per interval.
    assert_eq!(json["runs"][0]["run_id"], "run-0");
    assert_eq!(json["runs"][0]["energy_uj"], 6 * 1010);
    assert_eq!(json["runs"][0]["domains"][0]["domain"], "package:0");
    let out = wattd(&["runs", "--data-dir", d], tmp.path())?;
    assert!(String::from_utf8(out.stdout)?.contains("0.0000016833"));

    // Flip a bit in the middle of the segment: verify fails naming file and offset.
    let (_, seg) = wattd::spool::list_segments(&data)?
        .pop()
        .ok_or("no segment")?;
    let mut bytes = std::fs::read(&seg)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&seg, &bytes)?;
    let out = wattd(&["verify", "--data-dir", d], tmp.path())?;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("BREAK")
            && text.contains(&seg.display().to_string())
            && text.contains("offset"),
        "{text}"
    );
    Ok(())
}
