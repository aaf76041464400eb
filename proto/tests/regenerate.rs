//! Regenerates the checked-in Rust from the .proto files with `tonic-build` (prost messages and
//! the gRPC stubs) (needs `protoc` on
//! PATH or in $PROTOC) and fails on any difference, so the generated code can never drift from
//! its source. `WATTD_PROTO_UPDATE=1 cargo test -p wattd-proto --test regenerate` rewrites it.

use std::path::Path;

#[test]
fn generated_code_matches_proto_sources() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = std::env::var_os("PROTOC")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("protoc"))
                    .find(|c| c.is_file())
            })
        });
    if protoc.is_none() {
        // The checked-in code builds without protoc; only this check needs it. CI installs it
        // (Debian's protobuf-compiler) and sets the strict switch, which makes this a failure.
        wattd_testkit::skip(
            "generated_code_matches_proto_sources",
            "protoc (apt-get install protobuf-compiler)",
        );
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let checked_in = root.join("src/gen");
    let out = tempfile::tempdir()?;
    let protos: Vec<_> = wattd_proto::PROTO_FILES
        .iter()
        .map(|p| root.join(p))
        .collect();
    // The messages and the `Ledger` client and server stubs, without tonic's transport: the
    // shipper and the reference ledger set up TLS themselves.
    tonic_build::configure()
        .build_transport(false)
        .out_dir(out.path())
        .compile_protos_with_config(
            prost_build::Config::new(),
            &protos,
            // This checkout's own root, not the library's compiled-in one: a build directory
            // shared between two clones can hold the library built from the other.
            &[root],
        )?;

    let update = std::env::var_os("WATTD_PROTO_UPDATE").is_some();
    let mut generated: Vec<_> = std::fs::read_dir(out.path())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    generated.sort();
    assert!(!generated.is_empty(), "prost-build wrote nothing");
    let mut stale = Vec::new();
    for name in &generated {
        let fresh = std::fs::read_to_string(out.path().join(name))?;
        let path = checked_in.join(name);
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if fresh != old {
            if update {
                std::fs::write(&path, &fresh)?;
            } else {
                stale.push(path.display().to_string());
            }
        }
    }
    // A checked-in file that prost no longer generates is stale too.
    for entry in std::fs::read_dir(&checked_in)? {
        let name = entry?.file_name();
        if !generated.contains(&name) {
            stale.push(format!(
                "{} (no longer generated)",
                checked_in.join(&name).display()
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "generated code is out of date: {stale:?}; rerun with WATTD_PROTO_UPDATE=1 and commit"
    );
    Ok(())
}
