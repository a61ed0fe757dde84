//! Vault key rotation (issue #16, scope 5): protect, rotate, more cycles. Chunks stored before
//! the rotation keep key id 0 and are not rewritten; chunks stored after it carry key id 1;
//! points from before and after both fail over identical to the disk they were taken of.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::common::v1::StepStatus;
use ferry_tests::*;

/// Every sealed chunk file under `dir`, with its bytes' hash and its key id.
fn chunks(dir: &Path) -> anyhow::Result<BTreeMap<PathBuf, (blake3::Hash, u16)>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            let bytes = std::fs::read(&p)?;
            if bytes.starts_with(b"FCK1")
                && let Some(id) = ferry_store::sealed_key_id(&bytes)
            {
                out.insert(p, (blake3::hash(&bytes), id));
            }
        }
    }
    Ok(out)
}

fn latest_point(t: &TestMesh, vm: &str) -> anyhow::Result<String> {
    t.latest_point_id(vm)?
        .ok_or_else(|| anyhow::anyhow!("no point of {vm}"))
}

/// A test failover of `vm` to `point` into a folder equals `want`; then cleaned up.
async fn fails_over_identical(
    t: &TestMesh,
    vm: &str,
    point: &str,
    want: &Path,
) -> anyhow::Result<()> {
    let out = t.path(&format!("exports/{point}"));
    let job = t.test_failover(vm, point, &out).await?;
    assert_eq!(job.status, StepStatus::Succeeded as i32, "{job:?}");
    let got = out.join(format!("{vm}.raw"));
    assert!(
        qemu_compare(&got, "raw", want, "raw")?,
        "point {point} differs from {}",
        want.display()
    );
    ok_job(&t.cli_json(&["failover", "cleanup", vm, "-o", "json"])?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_seals_new_chunks_with_the_new_key_and_old_points_stay_readable()
-> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disk = t.path("hv01/rot01.raw");
    std::fs::create_dir_all(disk.parent().expect("a parent"))?;
    qemu_create(&disk, "raw", "", "8M")?;
    fill_random(&disk, 0, 8 << 20, 31)?;
    let before = t.path("rot01-before.raw");
    std::fs::copy(&disk, &before)?;
    t.agent_config_tracked(&t.path("hv01"), "hv01", &[("rot01", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&t.path("hv01/agent.toml"))?;
    let vm = t.wait_vm("rot01").await?;
    let job = t.protect_every("rot01", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let p0 = latest_point(&t, "rot01")?;
    let store = t.path("mesh/store");
    let old = chunks(&store)?;
    assert!(
        !old.is_empty() && old.values().all(|(_, id)| *id == 0),
        "{old:?}"
    );

    let keys = t.cli_json(&["vault", "keys", "-o", "json"])?;
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "{keys}");
    let rotated = t.cli_json(&["vault", "rotate-key", "-o", "json"])?;
    assert_eq!(rotated["key_id"], 1, "{rotated}");
    assert_eq!(rotated["current"], true, "{rotated}");
    let keys = t.cli_json(&["vault", "keys", "-o", "json"])?;
    assert_eq!(keys[1]["key_id"], 1, "{keys}");
    assert_eq!(
        (keys[0]["current"].clone(), keys[1]["current"].clone()),
        (false.into(), true.into()),
        "{keys}"
    );
    // A reader may list the key ids, not rotate.
    let reader = t.cli_json(&[
        "token", "create", "--name", "r", "--role", "reader", "-o", "json",
    ])?;
    let token = reader["token"].as_str().unwrap_or_default().to_owned();
    let (ok, _, err) = t.cli_as(&token, &["vault", "rotate-key"])?;
    assert!(!ok && err.contains("admin"), "{err}");
    assert!(t.cli_as(&token, &["vault", "keys"])?.0);

    // More cycles: fresh data until a chunk sealed with key 1 is stored (the host learns the
    // key with its next heartbeat), then one point more.
    let uri = &vm.disks[0].nbd_uri;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut round = 0u64;
    loop {
        let at = (round % 8) << 20;
        nbd_write(uri, &[&format!("write -P {} {at} 64k", 0x40 + round % 64)])?;
        round += 1;
        let last = latest_point(&t, "rot01")?;
        t.points_after("rot01", &last, 1).await?;
        if chunks(&store)?.values().any(|(_, id)| *id == 1) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no chunk sealed with key 1"
        );
    }
    nbd_write(uri, &["write -P 0x99 3M 1M"])?;
    let last = latest_point(&t, "rot01")?;
    let p1 = t.points_after("rot01", &last, 1).await?;
    agent.shutdown().await?;

    let now = chunks(&store)?;
    for (path, (hash, id)) in &old {
        // Merges and retention may drop a chunk no point holds; none is ever resealed.
        if let Some((h, i)) = now.get(path) {
            assert_eq!((h, i), (hash, id), "{} was rewritten", path.display());
        }
    }
    let new: Vec<_> = now.iter().filter(|(p, _)| !old.contains_key(*p)).collect();
    assert!(!new.is_empty());
    // Chunks sealed before the host learned key 1 carry 0; from the first key-1 chunk on, 1.
    let ones = new.iter().filter(|(_, (_, id))| *id == 1).count();
    println!(
        "key_rotation chunks_before={} new={} new_with_key_1={ones}",
        old.len(),
        new.len()
    );
    assert!(new.iter().all(|(_, (_, id))| *id <= 1));

    fails_over_identical(&t, "rot01", &p0, &before).await?;
    fails_over_identical(&t, "rot01", &p1, &disk).await?;
    t.stop().await;
    Ok(())
}
