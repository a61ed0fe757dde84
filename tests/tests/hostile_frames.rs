//! The frame campaign (issue #16): a registered host's certificate opens thousands of QUIC
//! streams to the real gateway carrying hostile frames — random bytes, valid frames with a
//! flipped byte, truncated frames, bounds pushed to their maximum and resealed, well-formed
//! offers into cycles that are not the host's, fetches of chunks it may not read, streams
//! reset half-sent — while a VM replicates through the same gateway. Each stream must end
//! with an ERROR frame or a reset, never hang and never be accepted; afterwards the gateway
//! still answers and the VM still gets points. `FERRY_HOSTILE_STREAMS=100000 cargo test -p ferry-tests --test
//! hostile_frames` runs a longer campaign by hand (CI: 10,000).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_gateway::client::Uploader;
use ferry_gateway::fetch::{MAGIC_FETCH, encode_fetch};
use ferry_gateway::frame::{MAGIC_ERROR, MAGIC_NEED, MAGIC_OFFER, MAGIC_PING, Offer, encode_offer};
use ferry_proto::common::v1::StepStatus;
use ferry_tests::*;
use futures::StreamExt;

const DEFAULT_STREAMS: usize = 10_000;
/// Streams in flight at once (the gateway allows 256 a connection).
const CONCURRENT: usize = 32;
/// Longer than any of the gateway's own timeouts: a stream unanswered by then hangs.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Names for cycles and points that exist nowhere.
fn name(rng: &mut Rng) -> String {
    format!("{:016x}", rng.next_u64())
}

fn offers(rng: &mut Rng, n: usize) -> Vec<Offer> {
    (0..n)
        .map(|_| Offer {
            id: rng.bytes(32).try_into().expect("32 bytes"),
            plain_len: 1 + rng.below(1 << 20) as u32,
        })
        .collect()
}

/// Replaces the trailing BLAKE3 so a pushed bound reaches its check, not the checksum's.
fn reseal(buf: &mut [u8]) {
    let n = buf.len() - 32;
    let sum = blake3::hash(&buf[..n]);
    buf[n..].copy_from_slice(sum.as_bytes());
}

/// One hostile stream's bytes, and the kind it is counted under.
fn hostile(rng: &mut Rng, real_point: &str) -> (&'static str, Vec<u8>) {
    let n = 1 + rng.below(40);
    let offer = encode_offer(&name(rng), &offers(rng, n)).expect("a valid offer");
    let ids: Vec<[u8; 32]> = (0..1 + rng.below(63))
        .map(|_| rng.bytes(32).try_into().expect("32 bytes"))
        .collect();
    let fetch = encode_fetch("web01", &name(rng), &ids).expect("a valid fetch");
    match rng.below(100) {
        0..=14 => {
            let n = rng.below(2048);
            ("random", rng.bytes(n))
        }
        15..=29 => {
            let magic = [MAGIC_OFFER, MAGIC_FETCH, MAGIC_PING][rng.below(3)];
            let n = rng.below(2048);
            ("magic+random", [magic.to_vec(), rng.bytes(n)].concat())
        }
        30..=49 => {
            let mut buf = if rng.below(2) == 0 { offer } else { fetch };
            let at = rng.below(buf.len());
            buf[at] ^= 1 << rng.below(8);
            ("bit-flip", buf)
        }
        50..=69 => {
            let mut buf = if rng.below(2) == 0 { offer } else { fetch };
            buf.truncate(rng.below(buf.len()));
            ("truncated", buf)
        }
        70..=89 => {
            // OFFER: version, flags, id length; then the count after the id; each resealed.
            let mut buf = offer;
            let id_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
            let (at, width) = [
                (4, 2),
                (6, 2),
                (8, 2),
                (10 + id_len, 4),
                (10 + id_len + 36, 4),
            ][rng.below(5)];
            let huge = [0xffu8; 4];
            buf[at..at + width].copy_from_slice(&huge[..width]);
            reseal(&mut buf);
            ("bounds", buf)
        }
        90..=92 => ("offer-not-its-cycle", offer),
        93..=94 => {
            // Sent in part, then the stream is reset: the gateway must let go of it.
            let mut buf = offer;
            buf.truncate(1 + rng.below(buf.len() - 1));
            ("early-close", buf)
        }
        _ => {
            let fetch = encode_fetch("web01", real_point, &ids).expect("a valid fetch");
            ("fetch-not-entitled", fetch)
        }
    }
}

/// How the gateway ended one stream (an `early-close` one is reset by this side instead).
async fn one_stream(conn: &quinn::Connection, kind: &str, bytes: Vec<u8>) -> &'static str {
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return "connection-lost";
    };
    let _ = send.write_all(&bytes).await;
    if kind == "early-close" {
        let _ = send.reset(0u32.into());
        let _ = recv.stop(0u32.into());
        return "closed-early";
    }
    let _ = send.finish();
    match tokio::time::timeout(ANSWER_WITHIN, recv.read_to_end(1 << 20)).await {
        Err(_) => "hung",
        Ok(Ok(buf)) if buf.starts_with(&MAGIC_ERROR) => "error-frame",
        Ok(Ok(buf)) if buf.starts_with(&MAGIC_NEED) => "accepted",
        Ok(Ok(buf)) if buf.starts_with(&MAGIC_PING) && buf.len() == 12 => "pong",
        Ok(Ok(_)) => "other-answer",
        Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)))) => "reset",
        Ok(Err(_)) => "connection-lost",
    }
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_hostile_streams_leave_the_gateway_serving() -> anyhow::Result<()> {
    let total: usize = std::env::var("FERRY_HOSTILE_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_STREAMS);
    let t = TestMesh::start().await?;
    let disk = t.path("hv/web01.raw");
    std::fs::create_dir_all(disk.parent().expect("a parent"))?;
    qemu_create(&disk, "raw", "", "8M")?;
    let cfg = t
        .agent_config_tracked(&t.path("hv"), "hv1", &[("web01", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("web01").await?;
    let job = t.protect_every("web01", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let point = t.points("web01").await?.pop().expect("a point").id;

    let (ca, cert, key) = host_identity(&t.path("hv"))?;
    let quic = || ferry_mesh::quic_client_config(&ca, &cert, &key);
    let gateway = t.ctl.cfg.gateway.listen;
    let mut up = Uploader::connect(gateway, quic()?).await?;
    let rss_before = rss_kib("VmRSS:");
    let started = Instant::now();
    let mut rng = Rng::new(0x5eed_f4a3_0000_0016);
    let mut outcomes: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut reconnects = 0;
    let mut done = 0;
    while done < total {
        let batch: Vec<_> = (0..(total - done).min(1000))
            .map(|_| hostile(&mut rng, &point))
            .collect();
        done += batch.len();
        let conn = up.connection().clone();
        let ended: Vec<(&str, &str)> = futures::stream::iter(batch)
            .map(|(kind, bytes)| {
                let conn = conn.clone();
                async move { (kind, one_stream(&conn, kind, bytes).await) }
            })
            .buffer_unordered(CONCURRENT)
            .collect()
            .await;
        let lost = ended.iter().any(|(_, o)| *o == "connection-lost");
        for e in ended {
            *outcomes.entry(e).or_default() += 1;
        }
        if lost || conn.close_reason().is_some() {
            up = Uploader::connect(gateway, quic()?).await?;
            reconnects += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let grown_mib = rss_kib("VmRSS:").saturating_sub(rss_before) / 1024;
    let peak_mib = rss_kib("VmHWM:") / 1024;
    let mut by_outcome: BTreeMap<&str, usize> = BTreeMap::new();
    for ((_, o), n) in &outcomes {
        *by_outcome.entry(o).or_default() += n;
    }
    println!(
        "hostile_streams={total} secs={secs:.1} reconnects={reconnects} rss_growth_mib={grown_mib} peak_rss_mib={peak_mib} outcomes={by_outcome:?}"
    );
    println!("by kind: {outcomes:?}");
    for bad in ["hung", "accepted", "other-answer"] {
        let hit: Vec<_> = outcomes.iter().filter(|((_, o), _)| *o == bad).collect();
        assert!(hit.is_empty(), "{bad}: {hit:?}");
    }
    // The gateway bounds what it holds (256 MiB of payload across all streams); the whole
    // test process (mesh, agent, gateway) must not have grown past that.
    assert!(grown_mib < 256, "rss grew {grown_mib} MiB");

    // Still serving: a fresh connection is answered, and replication carries on.
    let fresh = Uploader::connect(gateway, quic()?).await?;
    fresh.ping().await?;
    let n = t.points("web01").await?.len();
    t.wait_points("web01", n + 2, Duration::from_secs(60))
        .await?;
    let verify = t.ferry_cli(&["points", "verify", "web01", "-o", "json"])?;
    assert!(verify.status.success(), "{verify:?}");
    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}
