//! `ferry up --without gateway,scheduler` plus those components as their own processes
//! (`ferry-gateway --config D/ferry.toml`, `ferry-scheduler --config ...`) form one mesh.
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry::ctl::Ctl;
use ferry::up::{Mesh, UpOptions};
use ferry_mesh::Component;
use ferry_proto::common::v1::StepStatus;
use ferry_tests::*;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_as_separate_processes_join_one_mesh() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mesh = Mesh::start(UpOptions {
        data_dir: dir.path().join("mesh"),
        export_roots: Some(vec![dir.path().to_path_buf()]),
        without: vec![Component::Gateway, Component::Scheduler],
        ..Default::default()
    })
    .await?;
    let mut procs = Vec::new();
    for b in ["ferry-gateway", "ferry-scheduler"] {
        procs.push(Kill(
            Command::new(bin(b)?)
                .arg("--config")
                .arg(&mesh.config_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ));
    }
    let ctl = Ctl::load(&mesh.config_path)?;
    let t = TestMesh { mesh, dir, ctl };
    t.wait_serving().await?;
    // The CLI binary sees the same mesh.
    let out = run(Command::new(bin("ferry")?)
        .arg("--config")
        .arg(&t.mesh.config_path)
        .args(["status", "-o", "json"]))?;
    let st: serde_json::Value = serde_json::from_str(&out)?;
    let names: Vec<&str> = st
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["component"].as_str())
        .collect();
    for want in [
        "registry",
        "scheduler",
        "ingest",
        "storage-writer",
        "failover",
        "gateway",
        "redis",
        "store",
    ] {
        assert!(names.contains(&want), "status lists {want}: {out}");
    }
    assert!(
        st.as_array()
            .into_iter()
            .flatten()
            .all(|c| c["status"] == "serving"),
        "{out}"
    );

    let disk = t.path("small.vhdx");
    qemu_create(&disk, "vhdx", "subformat=dynamic", "24M")?;
    qemu_io(
        &disk,
        "vhdx",
        &["write -P 0x33 1M 5M", "write -P 0x44 20M 1M"],
    )?;
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[("small01", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("small01").await?;
    let job = t.protect("small01").await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let out = t.path("out");
    let fo = t.test_failover("small01", "latest", &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(qemu_compare(
        &disk,
        "vhdx",
        &out.join("small.vhdx"),
        "vhdx"
    )?);
    agent.shutdown().await?;
    drop(procs);
    t.stop().await;
    Ok(())
}
