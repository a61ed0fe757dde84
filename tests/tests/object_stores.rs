//! Real object stores (issue #15, scope 1): the same whole-mesh run — protect, delta writes
//! through the tracker, a test failover of the latest point — against the local filesystem,
//! Azurite (Azure Blob) and moto's S3 server. Every backend's copy equals its disk, and the
//! three copies are the same bytes. The container and bucket do not exist beforehand:
//! `ferry up` creates them. A backend that cannot do put-if-absent is refused at start, and
//! S3 behind a proxy that throttles, fails and resets connections still keeps every write.
use std::time::Duration;

use ferry::up::Mesh;
use ferry::up::UpOptions;
use ferry_proto::common::v1::StepStatus;
use ferry_store::{Store, StoreError, VaultKey, chunk_id, open_chunk, seal_chunk};
use ferry_tests::*;

/// Credentials of the test's moto server (it accepts any); never real ones.
const S3_KEY_ID: &str = "ferry-test-key-id";
const S3_SECRET: &str = "ferry-test-secret-not-real";

/// One backend's run: the failed-over disk's hash, and how many chunks the store holds.
async fn protect_delta_failover(url: &str, seed: u64) -> anyhow::Result<(blake3::Hash, usize)> {
    let t = TestMesh::start_with(|o| o.store = Some(url.to_string())).await?;
    let disk = t.path("hv01/obj01.raw");
    std::fs::create_dir_all(disk.parent().expect("a parent"))?;
    qemu_create(&disk, "raw", "", "8M")?;
    fill_random(&disk, 0, 8 << 20, seed)?;
    t.agent_config_tracked(&t.path("hv01"), "hv01", &[("obj01", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&t.path("hv01/agent.toml"))?;
    let vm = t.wait_vm("obj01").await?;
    let job = t.protect_every("obj01", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{url}: {j:?}");

    // Deltas: writes through the tracker's export, then a point taken after them.
    let uri = &vm.disks[0].nbd_uri;
    nbd_write(uri, &["write -P 0x5a 1M 256k", "write -P 0x3c 6M 64k"])?;
    let last = t.latest_point_id("obj01")?.unwrap_or_default();
    t.points_after("obj01", &last, 1).await?;
    agent.shutdown().await?;

    let out = t.path("exports/obj01");
    let job = t.test_failover("obj01", "latest", &out).await?;
    assert_eq!(job.status, StepStatus::Succeeded as i32, "{url}: {job:?}");
    let copy = out.join("obj01.raw");
    assert!(
        qemu_compare(&copy, "raw", &disk, "raw")?,
        "{url}: the test failover differs from the disk"
    );
    let hash = blake3::hash(&std::fs::read(&copy)?);
    ok_job(&t.cli_json(&["failover", "cleanup", "obj01", "-o", "json"])?)?;

    // The data is in the named store, not in a local folder beside the mesh.
    let store = ferry_store::Store::from_url(url)?;
    let chunks = store.list(ferry_store::layout::CHUNKS_PREFIX).await?.len();
    assert!(chunks > 0, "{url}: no chunk in the store");
    if !url.starts_with("file://") {
        assert!(
            !t.path("mesh/store").exists(),
            "{url}: a local store folder was made"
        );
    }
    t.stop().await;
    Ok((hash, chunks))
}

/// Calls `op` again while it fails transiently (at most 5 times); counts those failures.
async fn transient_retry<T, F: std::future::Future<Output = Result<T, StoreError>>>(
    surfaced: &mut u32,
    mut op: impl FnMut() -> F,
) -> anyhow::Result<T> {
    loop {
        match op().await {
            Err(e) if e.is_transient() && *surfaced < 100 => {
                *surfaced += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return Ok(r?),
        }
    }
}

/// Through a proxy that answers one connection in three with 503, 429 or 500, or resets
/// it, the S3 backend creates its bucket and every chunk written reads back whole. Most
/// faults are absorbed by `object_store`'s own retries; what it gives up on is transient
/// for Ferry's.
async fn s3_through_throttling(moto: &ObjectServer) -> anyhow::Result<()> {
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], moto.port));
    let proxy = ThrottlingProxy::start(upstream, 3).await?;
    let url = format!(
        "s3://ferry-throttled/site-b?endpoint={}&allow_http=true",
        proxy.endpoint()
    );
    let store = Store::from_url(&url)?;
    store.prepare().await?;
    let key = VaultKey::generate();
    let mut surfaced = 0;
    let mut ids = Vec::new();
    for i in 0..40u8 {
        let data = vec![i; 4096 + usize::from(i)];
        let id = chunk_id(&key, &data);
        let sealed = bytes::Bytes::from(seal_chunk(&key, &id, &data));
        transient_retry(&mut surfaced, || store.put_chunk(&id, sealed.clone())).await?;
        ids.push((id, data));
    }
    for (id, data) in &ids {
        let sealed = transient_retry(&mut surfaced, || store.get_chunk(id)).await?;
        assert_eq!(&open_chunk(&key, id, &sealed)?, data);
    }
    println!(
        "object_stores throttled injected={} surfaced_to_ferry={surfaced}",
        proxy.injected()
    );
    assert!(proxy.injected() >= 10, "only {} faults", proxy.injected());
    Ok(())
}

/// A mesh on an S3 store told not to use conditional puts refuses to start, saying why.
async fn refuses_a_store_without_put_if_absent(s3: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("{s3}&conditional_put=disabled");
    let opts = UpOptions {
        data_dir: dir.path().join("mesh"),
        store: Some(url.clone()),
        ..Default::default()
    };
    let err = match Mesh::start(opts).await {
        Ok(m) => {
            m.stop().await;
            anyhow::bail!("a mesh started on {url}");
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("conditional puts"), "{err}");
    assert!(!err.contains(S3_SECRET), "{err}");
    Ok(())
}

#[test]
fn the_same_run_on_local_azurite_and_s3_gives_the_same_copy() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let azurite = ObjectServer::azurite(&dir.path().join("azurite"))?;
    let moto = ObjectServer::moto(&dir.path().join("moto"))?;
    // The backends read their credentials from the environment, as in production. Set
    // before the runtime and its threads exist, and this file holds this one test.
    unsafe {
        std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
        std::env::set_var("AZURITE_BLOB_STORAGE_URL", azurite.endpoint());
        std::env::set_var("AWS_ACCESS_KEY_ID", S3_KEY_ID);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET);
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let local = format!("file://{}", dir.path().join("local-store").display());
    let az = "az://ferry-vault/site-a".to_string();
    let s3 = format!(
        "s3://ferry-vault/site-a?endpoint={}&allow_http=true",
        moto.endpoint()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut results = Vec::new();
        for url in [&local, &az, &s3] {
            let r = protect_delta_failover(url, 51).await;
            let r = r.map_err(|e| {
                anyhow::anyhow!(
                    "{url}: {e:#}\nazurite: {}\nmoto: {}",
                    azurite.log_text(),
                    moto.log_text()
                )
            })?;
            println!("object_stores store={url} chunks={} copy={}", r.1, r.0);
            results.push(r);
        }
        assert!(
            results.windows(2).all(|w| w[0].0 == w[1].0),
            "the backends' copies differ: {results:?}"
        );
        s3_through_throttling(&moto).await?;
        refuses_a_store_without_put_if_absent(&s3).await
    })
}
