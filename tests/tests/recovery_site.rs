//! The recovery side of a VM's policy (issue #11 scope 1) and `ferry vm set` (scope 8): a
//! recovery host is a registered host of another site with a `[recovery]` section; anything
//! else is refused with a clear reason, through the CLI as an operator types it. A policy
//! change of a protected VM lands in the registry; one the VM's state does not allow is
//! FAILED_PRECONDITION naming the state; a host certificate may not change a policy.
use std::path::Path;
use std::time::Duration;

use ferry_mesh::Component;
use ferry_proto::common::v1::ReplicationPolicy;
use ferry_proto::registry::v1 as reg;
use ferry_tests::*;
use tonic::Code;

/// `ferry ARGS` must fail, saying all of `words`.
fn refused(t: &TestMesh, args: &[&str], words: &[&str]) -> anyhow::Result<()> {
    let (ok, out, err) = t.cli(args)?;
    assert!(!ok, "ferry {args:?} must fail: {out}");
    for w in words {
        assert!(err.contains(w), "ferry {args:?}: {w:?} not in {err:?}");
    }
    Ok(())
}

fn vm_json(t: &TestMesh, vm: &str) -> anyhow::Result<serde_json::Value> {
    t.cli_json(&["vm", "show", vm, "-o", "json"])
}

/// Waits until the registry lists `host` connected, with the recovery flag it should have.
async fn wait_host(t: &TestMesh, host: &str, recovery: bool) -> anyhow::Result<()> {
    let connected = |h: &reg::Host| h.status == "connected" && h.recovery == recovery;
    t.wait_host(host, connected, Duration::from_secs(60))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_host_is_checked_and_the_policy_can_change() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.raw");
    let db = disks.join("db01.raw");
    qemu_create(&web, "raw", "", "4M")?;
    qemu_create(&db, "raw", "", "4M")?;
    qemu_io(&web, "raw", &["write -P 0x3c 0 1M"])?;
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()]), ("db01", vec![db.clone()])],
            "[tracker]\n",
        )
        .await?;
    let dr = t
        .site_agent(
            "hv-dr01",
            "site-b",
            &[],
            "[recovery]\ndir = \"recovered\"\n",
        )
        .await?;
    let plain = t.site_agent("hv-plain", "site-b", &[], "").await?;
    t.wait_vm("web01").await?;
    wait_host(&t, "hv-dr01", true).await?;
    wait_host(&t, "hv-plain", false).await?;
    assert!(
        t.path("hv-dr01/recovered").is_dir(),
        "the agent makes its recovery folder"
    );

    refused_recovery_hosts(&t).await?;
    let (ok, out, err) = t.cli(&[
        "vm",
        "protect",
        "web01",
        "--frequency",
        "2s",
        "--recovery-host",
        "hv-dr01",
        "--wait",
    ])?;
    assert!(ok, "protect: {out} {err}");
    let v = vm_json(&t, "web01")?;
    assert_eq!(v["recovery_host"], "hv-dr01", "{v}");
    assert_eq!(v["active_host"], "hv01", "{v}");
    assert_eq!(v["policy"]["recovery_host"], "hv-dr01", "{v}");

    policy_changes(&t).await?;
    host_certificate_may_not_change_a_policy(&t, &t.path("hv01")).await?;

    for a in [primary, dr, plain] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}

async fn refused_recovery_hosts(t: &TestMesh) -> anyhow::Result<()> {
    let protect = |host: &'static str| ["vm", "protect", "web01", "--recovery-host", host];
    refused(t, &protect("nope"), &["nope", "not registered"])?;
    refused(t, &protect("hv01"), &["web01", "another host"])?;
    refused(t, &protect("hv-plain"), &["hv-plain", "[recovery]"])?;
    // Nothing started: the VM is still unprotected and allows enabling protection.
    let v = vm_json(t, "web01")?;
    assert_eq!(v["state"], "unprotected", "{v}");
    Ok(())
}

async fn policy_changes(t: &TestMesh) -> anyhow::Result<()> {
    let (ok, out, err) = t.cli(&["vm", "set", "web01", "--frequency", "3s", "-o", "json"])?;
    assert!(ok, "vm set: {out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["policy"]["frequency_seconds"], 3, "{v}");
    assert_eq!(v["policy"]["recovery_host"], "hv-dr01", "kept: {v}");

    // Refused, and nothing changes.
    refused(
        t,
        &["vm", "set", "web01", "--recovery-host", "hv01"],
        &["another host"],
    )?;
    refused(
        t,
        &["vm", "set", "web01", "--recovery-host", "hv-plain"],
        &["[recovery]"],
    )?;
    refused(
        t,
        &["vm", "set", "web01", "--frequency", "0s"],
        &["--frequency", "1s to 24h"],
    )?;
    refused(t, &["vm", "set", "nope", "--frequency", "3s"], &["nope"])?;
    refused(
        t,
        &["vm", "set", "db01", "--frequency", "3s"],
        &["db01", "unprotected"],
    )?;
    let v = vm_json(t, "web01")?;
    assert_eq!(v["policy"]["frequency_seconds"], 3, "{v}");
    assert_eq!(v["recovery_host"], "hv-dr01", "{v}");

    // The registry's own answer for a VM whose state allows no policy change.
    let err = t
        .ctl
        .registry()
        .await?
        .update_policy(reg::UpdatePolicyRequest {
            name: "db01".into(),
            policy: Some(ReplicationPolicy {
                frequency_seconds: 3,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("db01") && err.message().contains("unprotected"),
        "{err:?}"
    );
    Ok(())
}

async fn host_certificate_may_not_change_a_policy(t: &TestMesh, dir: &Path) -> anyhow::Result<()> {
    let tls = host_tls(dir)?;
    let ch = ferry_mesh::connect(&t.ctl.cfg.endpoint(Component::Registry), &tls).await?;
    let err = reg::registry_client::RegistryClient::new(ch)
        .update_policy(reg::UpdatePolicyRequest {
            name: "web01".into(),
            policy: Some(ReplicationPolicy {
                frequency_seconds: 1,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    Ok(())
}
