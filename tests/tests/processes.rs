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

    probes_answer_for_one_component(&t)?;

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

/// `ferry status --component NAME --endpoint ADDR`, what the Kubernetes probes run: exit 0
/// for a serving component at that address, 1 naming it for a dead address, and a refusal
/// naming what was wrong for an unknown component or an address Redis cannot take.
fn probes_answer_for_one_component(t: &TestMesh) -> anyhow::Result<()> {
    let probe = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(bin("ferry")?)
            .arg("--config")
            .arg(&t.mesh.config_path)
            .arg("status")
            .args(args)
            .output()?)
    };
    let cfg = &t.mesh.cfg;
    let mut targets: Vec<(String, String)> = ferry::up::GRPC_COMPONENTS
        .iter()
        .map(|c| (c.to_string(), cfg.endpoint(*c)))
        .collect();
    targets.push(("gateway".into(), cfg.gateway.listen.to_string()));
    for (name, endpoint) in &targets {
        let out = probe(&["--component", name, "--endpoint", endpoint, "-o", "json"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} at {endpoint}: {text}");
        assert!(text.contains("\"serving\""), "{name}: {text}");
    }
    // Nothing listens on a port just released.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let out = probe(&[
        "--component",
        "registry",
        "--endpoint",
        &format!("https://{dead}"),
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("unreachable") && text.contains(&dead.to_string()),
        "{text}"
    );
    for (args, says) in [
        (vec!["--component", "registrar"], "registrar"),
        (
            vec!["--component", "redis", "--endpoint", "127.0.0.1:1"],
            "redis",
        ),
        (vec!["--endpoint", "https://127.0.0.1:1"], "--component"),
    ] {
        let out = probe(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }
    Ok(())
}
