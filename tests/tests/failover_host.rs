//! Test failover on the VM's recovery host (issue #11 scopes 2 and 3), through the CLI as an
//! operator types it: the recovery host's agent fetches the point over QUIC, writes the disks
//! into its `[recovery]` folder, serves them through its tracker and starts the VM through
//! its command driver with the test network; cleanup stops it and deletes the folder.
use std::path::{Path, PathBuf};

use ferry_tests::*;

/// A command driver whose start and stop each append their environment to a file.
fn driver_section(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    for call in ["start", "stop"] {
        let script = dir.join(format!("{call}-vm.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n{{ echo \"call={call}\"; echo \"vm=$FERRY_VM\"; echo \"network=$FERRY_NETWORK\"; \
                 echo \"spec=$FERRY_VM_SPEC\"; echo \"disks=$FERRY_DISKS\"; }} >> calls.log\ncp \"$FERRY_VM_SPEC\" {call}-spec.json\n"
            ),
        )?;
    }
    Ok(
        "[driver]\nkind = \"command\"\nstart = \"sh ./start-vm.sh\"\nstop = \"sh ./stop-vm.sh\"\n"
            .into(),
    )
}

fn calls(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_failover_runs_on_the_recovery_host() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.vhdx");
    qemu_create(&web, "vhdx", "", "8M")?;
    qemu_io(
        &web,
        "vhdx",
        &["write -P 0x5a 0 1M", "write -P 0x17 3M 512k"],
    )?;
    // What the point holds (the tracker keeps the source open from now on).
    let original = disks.join("web01.orig.vhdx");
    std::fs::copy(&web, &original)?;
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()])],
            "[tracker]\n",
        )
        .await?;
    let dr_dir = t.path("hv-dr01");
    let dr = t.recovery_agent(&driver_section(&dr_dir)?).await?;
    t.wait_vm("web01").await?;

    // Without a recovery host a test failover needs a folder.
    let (ok, _, err) = t.cli(&["vm", "protect", "web01", "--frequency", "1h", "--wait"])?;
    assert!(ok, "protect: {err}");
    let (ok, _, err) = t.cli(&["failover", "test", "web01"])?;
    assert!(!ok && err.contains("no recovery host"), "{err}");
    let (ok, _, err) = t.cli(&[
        "vm",
        "set",
        "web01",
        "--recovery-host",
        "hv-dr01",
        "--test-network",
        "isolated",
    ])?;
    assert!(ok, "vm set: {err}");

    // A point that does not exist is named, and nothing starts.
    let (ok, _, err) = t.cli(&[
        "failover",
        "test",
        "web01",
        "--point",
        "00000000000000000099",
    ])?;
    assert!(
        !ok && err.contains("00000000000000000099") && err.contains("NotFound"),
        "{err}"
    );
    assert!(!dr_dir.join("recovered/web01").exists());

    let job = t.cli_json(&["failover", "test", "web01", "-o", "json"])?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let list = t.cli_json(&["failover", "list", "-o", "json"])?;
    let f = &list[0];
    assert_eq!(f["vm"], "web01", "{list}");
    assert_eq!(f["kind"], "test", "{list}");
    assert_eq!(f["state"], "active", "{list}");
    assert_eq!(f["host"], "hv-dr01", "{list}");
    let recovered = PathBuf::from(f["disks"][0]["path"].as_str().unwrap_or_default());
    let uri = f["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        recovered.starts_with(dr_dir.join("recovered").join("web01")),
        "{recovered:?}"
    );
    assert!(uri.starts_with("nbd+unix://"), "{list}");
    // The recovered disk is the point: the source as it was when protected.
    assert!(
        qemu_compare(&original, "vhdx", &recovered, "vhdx")?,
        "recovered disk differs"
    );
    let started = calls(&dr_dir);
    assert!(started.contains("call=start"), "{started}");
    assert!(started.contains("vm=web01"), "{started}");
    assert!(started.contains("network=test"), "{started}");
    assert!(
        started.contains(&uri),
        "the driver gets the disks' nbd uris: {started}"
    );
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dr_dir.join("start-spec.json"))?)?;
    assert_eq!(spec["nics"][0]["network"], "isolated", "{spec}");
    // The test VM runs on tracked disks: a write through the export lands.
    nbd_write(&uri, &["write -P 0x66 0 64k"])?;

    // One test failover at a time: the state machine says why.
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["failover_state"], "test", "{v}");
    let (ok, _, err) = t.cli(&["failover", "test", "web01"])?;
    assert!(!ok && err.contains("test-failover is not allowed"), "{err}");
    assert!(err.contains("FailedPrecondition"), "{err}");

    let job = t.cli_json(&["failover", "cleanup", "web01", "-o", "json"])?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(calls(&dr_dir).contains("call=stop"), "{}", calls(&dr_dir));
    assert!(
        !dr_dir.join("recovered/web01").exists(),
        "the folder is removed"
    );
    assert!(
        nbd_write(&uri, &["read 0 64k"]).is_err(),
        "the export is gone"
    );
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["failover_state"], "", "{v}");

    for a in [primary, dr] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}
