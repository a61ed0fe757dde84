//! Planned failover (issue #11 scope 4), through the CLI: a guest writes through the
//! primary's NBD export until the primary's driver stops it; the final point holds every
//! acknowledged write, so the disk the recovery host starts the VM on equals the primary's
//! disk after the shutdown; the primary's export refuses writes afterwards.
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_tests::*;

/// A command driver in `dir`: each call is appended to calls.log; the stop command also
/// asks the test's writer to end and waits until it has.
fn driver(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("start.sh"),
        "#!/bin/sh\necho \"call=start vm=$FERRY_VM network=$FERRY_NETWORK disks=$FERRY_DISKS\" >> calls.log\ncp \"$FERRY_VM_SPEC\" spec.json\n",
    )?;
    std::fs::write(
        dir.join("stop.sh"),
        "#!/bin/sh\ntouch stop-writer\nwhile [ -e writer.running ] && [ ! -e writer.done ]; do sleep 0.05; done\necho \"call=stop vm=$FERRY_VM\" >> calls.log\n",
    )?;
    Ok("[driver]\nkind = \"command\"\nstart = \"sh ./start.sh\"\nstop = \"sh ./stop.sh\"\n".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_failover_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.raw");
    qemu_create(&web, "raw", "", "8M")?;
    qemu_io(&web, "raw", &["write -P 0x5a 0 1M"])?;
    let hv01 = t.path("hv01");
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()])],
            &format!(
                "cpus = 2\nnetworks = [\"prod\"]\n[tracker]\n{}",
                driver(&hv01)?
            ),
        )
        .await?;
    let dr_dir = t.path("hv-dr01");
    let dr = t.recovery_agent(&driver(&dr_dir)?).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "1h")?;
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    // The recovery side: its network and the address the VM gets there.
    let bad = t.ferry_cli(&["vm", "set", "web01", "--ip", "nic0=banana"])?;
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && said.contains("--ip"), "{said}");
    let v = t.cli_json(&[
        "vm",
        "set",
        "web01",
        "--network-map",
        "prod=dr-prod",
        "--ip",
        "nic0=10.2.0.7/24",
        "-o",
        "json",
    ])?;
    assert_eq!(v["policy"]["network_map"]["prod"], "dr-prod", "{v}");

    // The guest: writes through the export until the primary's stop command says to end.
    std::fs::write(hv01.join("writer.running"), "")?;
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (dir, uri, writes) = (hv01.clone(), uri.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !dir.join("stop-writer").exists() {
                let cmd = format!(
                    "write -P {} {} 64k",
                    i % 200 + 1,
                    (i % 64) * 65536 + (1 << 20)
                );
                if nbd_write(&uri, &[&cmd]).is_ok() {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            let _ = std::fs::write(dir.join("writer.done"), "");
        })
    };
    while writes.load(Ordering::Relaxed) < 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let job = t.cli_json(&["failover", "planned", "web01", "--wait", "-o", "json"])?;
    anyhow::ensure!(job["status"] == "succeeded", "{job}");
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let list = t.cli_json(&["failover", "list", "-o", "json"])?;
    let f = &list[0];
    assert_eq!(f["kind"], "planned", "{list}");
    assert_eq!(f["state"], "active", "{list}");
    let recovered = std::path::PathBuf::from(f["disks"][0]["path"].as_str().unwrap_or_default());
    let recovered_uri = f["disks"][0]["nbd_uri"].as_str().unwrap_or_default();
    assert!(
        qemu_compare(&web, "raw", &recovered, "raw")?,
        "the recovered disk lost writes ({} acknowledged)",
        writes.load(Ordering::Relaxed)
    );
    let stops = std::fs::read_to_string(hv01.join("calls.log"))?;
    assert!(stops.contains("call=stop vm=web01"), "{stops}");
    let starts = std::fs::read_to_string(dr_dir.join("calls.log"))?;
    assert!(
        starts.contains("call=start vm=web01 network=production"),
        "{starts}"
    );
    assert!(starts.contains(recovered_uri), "{starts}");
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dr_dir.join("spec.json"))?)?;
    assert_eq!(spec["cpus"], 2, "{spec}");
    assert_eq!(spec["nics"][0]["network"], "dr-prod", "{spec}");
    assert_eq!(spec["nics"][0]["ip"], "10.2.0.7/24", "{spec}");
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["state"], "failed-over", "{v}");
    assert_eq!(v["active_host"], "hv-dr01", "{v}");
    // The source is fenced: its export refuses writes.
    let err = nbd_write(&uri, &["write -P 0x99 0 64k"]);
    assert!(err.is_err(), "the primary took a write after the failover");

    for a in [primary, dr] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_planned_failover_starts_the_source_again() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.raw");
    qemu_create(&web, "raw", "", "4M")?;
    qemu_io(&web, "raw", &["write -P 0x5a 0 1M"])?;
    let hv01 = t.path("hv01");
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()])],
            &format!("[tracker]\n{}", driver(&hv01)?),
        )
        .await?;
    let dr_dir = t.path("hv-dr01");
    let dr = t.recovery_agent(&driver(&dr_dir)?).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "1h")?;
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    // The recovery host cannot take the vm: its folder holds something that is not ferry's.
    let taken = dr_dir.join("recovered/web01");
    std::fs::create_dir_all(&taken)?;
    std::fs::write(taken.join("notes.txt"), "an operator's files")?;

    let (ok, out, _) = t.cli(&["failover", "planned", "web01", "-o", "json"])?;
    assert!(!ok, "{out}");
    let job: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a folder of ferry's")),
        "{job}"
    );
    let stop_step = &job["steps"][1];
    assert_eq!(stop_step["status"], "succeeded", "{job}");
    assert!(
        stop_step["message"]
            .as_str()
            .is_some_and(|m| m.contains("vm started again on hv01")),
        "{job}"
    );
    // The source was stopped, then started again, and takes writes again.
    let calls = std::fs::read_to_string(hv01.join("calls.log"))?;
    let (stop, start) = (calls.find("call=stop"), calls.rfind("call=start"));
    assert!(stop.is_some() && start.is_some() && start > stop, "{calls}");
    nbd_write(&uri, &["write -P 0x33 0 64k"])?;
    assert!(
        taken.join("notes.txt").exists(),
        "the operator's files stay"
    );
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["state"], "protected", "{v}");
    assert_eq!(v["active_host"], "hv01", "{v}");

    for a in [primary, dr] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}
