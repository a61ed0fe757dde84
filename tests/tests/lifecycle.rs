//! The protection state machine at the edges: `ferry vm show -o json` lists the operations
//! the VM's state allows, and an operation it does not allow (a test failover of a VM that is
//! not protected yet) is refused with FAILED_PRECONDITION naming the state and what it allows.
use std::time::Duration;

use ferry_proto::common::v1::StepStatus;
use ferry_proto::failover::v1::TestFailoverRequest;
use ferry_tests::*;

fn vm_show(t: &TestMesh, vm: &str) -> anyhow::Result<serde_json::Value> {
    let out = t.ferry_cli(&["vm", "show", vm, "-o", "json"])?;
    anyhow::ensure!(out.status.success(), "ferry vm show: {out:?}");
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn allowed(v: &serde_json::Value) -> Vec<String> {
    v["allowed_operations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_follow_the_state_machine() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disk = t.path("host/web01.vhdx");
    std::fs::create_dir_all(disk.parent().unwrap())?;
    qemu_create(&disk, "vhdx", "subformat=dynamic", "8M")?;
    qemu_io(&disk, "vhdx", &["write -P 0x5a 0 1M"])?;
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[("web01", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("web01").await?;

    let v = vm_show(&t, "web01")?;
    assert_eq!(v["state"], "unprotected", "{v}");
    assert_eq!(allowed(&v), ["enable-protection"], "{v}");

    // Not protected yet: a test failover is refused, naming the state and what it allows.
    let err = t
        .ctl
        .failover()
        .await?
        .test_failover(TestFailoverRequest {
            vm: "web01".into(),
            point: "latest".into(),
            target_dir: t.path("tf").display().to_string(),
            instant: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let msg = err.message();
    assert!(
        msg.contains("web01") && msg.contains("unprotected") && msg.contains("enable-protection"),
        "{msg}"
    );
    assert!(
        !t.path("tf").exists(),
        "nothing was written for a refused test failover"
    );
    let target = t.path("tf").display().to_string();
    let cli = t.ferry_cli(&["failover", "test", "web01", "--target", &target])?;
    assert!(!cli.status.success());
    assert!(String::from_utf8_lossy(&cli.stderr).contains("allowed: enable-protection"));

    // Protected: the test failover is allowed and runs; its copy makes cleanup the next step.
    let job = t.protect_every("web01", 5).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let v = vm_show(&t, "web01")?;
    assert_eq!(v["state"], "protected", "{v}");
    let ops = allowed(&v);
    for op in [
        "test-failover",
        "unplanned-failover",
        "planned-failover",
        "resync",
    ] {
        assert!(ops.iter().any(|o| o == op), "{op} in {ops:?}");
    }
    assert!(!ops.iter().any(|o| o == "enable-protection"), "{ops:?}");
    let job = t.test_failover("web01", "latest", &t.path("tf")).await?;
    assert_eq!(job.status, StepStatus::Succeeded as i32, "{job:?}");
    let ops = allowed(&vm_show(&t, "web01")?);
    assert!(
        ops.iter().any(|o| o == "cleanup-test-failover")
            && !ops.iter().any(|o| o == "test-failover"),
        "{ops:?}"
    );

    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}
