//! Helpers of the failover and failback tests: a command driver that records its calls,
//! jobs that must have succeeded, points after a given one, the disk of a failover.
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::TestMesh;

/// A command driver in `dir` that records its calls.
pub fn command_driver(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("start.sh"),
        "#!/bin/sh\necho \"call=start vm=$FERRY_VM network=$FERRY_NETWORK disks=$FERRY_DISKS\" >> calls.log\n",
    )?;
    std::fs::write(
        dir.join("stop.sh"),
        "#!/bin/sh\necho \"call=stop vm=$FERRY_VM\" >> calls.log\n",
    )?;
    Ok("[driver]\nkind = \"command\"\nstart = \"sh ./start.sh\"\nstop = \"sh ./stop.sh\"\n".into())
}

/// A JSON string field's text ("" when absent or not a string).
pub fn text(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The step of a job's JSON named `name` (null when it has none).
pub fn step<'a>(job: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    job["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

pub fn ok_job(job: &serde_json::Value) -> anyhow::Result<()> {
    anyhow::ensure!(job["status"] == "succeeded", "{job:#}");
    Ok(())
}

impl TestMesh {
    /// `<test dir>/disks/web01.vhdx`: 16 MiB with data in 9 of its 16 (1 MiB) vault blocks.
    pub fn sample_vhdx(&self) -> anyhow::Result<PathBuf> {
        let disks = self.path("disks");
        std::fs::create_dir_all(&disks)?;
        let web = disks.join("web01.vhdx");
        crate::qemu_create(&web, "vhdx", "", "16M")?;
        crate::qemu_io(
            &web,
            "vhdx",
            &[
                "write -P 0x5a 0 4M",
                "write -P 0x17 6M 4M",
                "write -P 0x33 12M 512k",
            ],
        )?;
        Ok(web)
    }

    /// The id of `vm`'s newest point, if it has one (`ferry points list`).
    pub fn latest_point_id(&self, vm: &str) -> anyhow::Result<Option<String>> {
        let points = self.cli_json(&["points", "list", vm, "-o", "json"])?;
        Ok(points
            .as_array()
            .and_then(|a| a.last())
            .and_then(|p| p["id"].as_str())
            .map(str::to_owned))
    }

    /// Waits until `n` points newer than `after` exist (the next cycle after a write then holds it).
    pub async fn points_after(&self, vm: &str, after: &str, n: usize) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let points = self.cli_json(&["points", "list", vm, "-o", "json"])?;
            let ids: Vec<String> = points
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let newer = match ids.iter().position(|id| id == after) {
                Some(i) => ids.len() - i - 1,
                None => ids.len(),
            };
            if newer >= n {
                return Ok(ids.last().cloned().unwrap_or_default());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "vm {vm}: only {newer} points after {after}: {points}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub fn failover_disk(&self, kind: &str) -> anyhow::Result<(PathBuf, String)> {
        let list = self.cli_json(&["failover", "list", "-o", "json"])?;
        let f = list
            .as_array()
            .and_then(|a| {
                a.iter()
                    .rev()
                    .find(|f| f["kind"] == kind && f["state"] == "active")
            })
            .ok_or_else(|| anyhow::anyhow!("no active {kind} failover: {list}"))?;
        let d = &f["disks"][0];
        Ok((
            PathBuf::from(d["path"].as_str().unwrap_or_default()),
            d["nbd_uri"].as_str().unwrap_or_default().to_owned(),
        ))
    }
}
