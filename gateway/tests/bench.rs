//! Upload throughput through a real gateway on loopback (client and gateway share the
//! machine's cores, as DESIGN §6 measured quinn). Prints MB/s; asserts only correctness.
//! Run: `cargo test -p ferry-gateway --test bench -- --ignored --nocapture`.

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::*;
use ferry_gateway::client::Offer;

const BLOCK_1M: u32 = 1 << 20;
const CHUNKS: usize = 256;
const BATCH: usize = 16;
const CONCURRENT: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn upload_throughput() {
    let h = Harness::start_opts(true, BLOCK_1M).await;
    h.ingest.open_cycle("bench", "host-a");
    let up = h.uploader("host-a").await;
    let blocks: Vec<(Offer, Bytes)> = (0..CHUNKS)
        .map(|i| {
            let data = xof(&(i as u64).to_le_bytes(), BLOCK_1M as usize);
            let id = *blake3::hash(&data).as_bytes();
            (
                Offer {
                    id,
                    plain_len: BLOCK_1M,
                },
                Bytes::from(data),
            )
        })
        .collect();
    let batches: Vec<Vec<(Offer, Bytes)>> = blocks.chunks(BATCH).map(<[_]>::to_vec).collect();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(batches));

    let (start, cpu0) = (Instant::now(), cpu_seconds());
    let mut workers = Vec::new();
    for _ in 0..CONCURRENT {
        let (up, queue) = (up.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            loop {
                let Some(batch) = queue.lock().unwrap().pop() else {
                    return bytes;
                };
                let offers: Vec<Offer> = batch.iter().map(|(o, _)| *o).collect();
                let pending = up.offer("bench", &offers).await.unwrap();
                let sealed: Vec<Bytes> = batch.into_iter().map(|(_, b)| b).collect();
                bytes += pending.send(sealed).await.unwrap().bytes_written;
            }
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    assert_eq!(total, CHUNKS as u64 * u64::from(BLOCK_1M));
    // CPU time is the steadier figure on a shared machine: client and gateway together.
    println!(
        "gateway upload: {} MiB in {secs:.2} s = {:.0} MB/s, {cpu:.2} cpu-s = {:.0} MB per cpu-second \
         ({CONCURRENT} concurrent batches of {BATCH} x 1 MiB)",
        total >> 20,
        total as f64 / secs / 1e6,
        total as f64 / cpu / 1e6
    );
    // the dedup path: everything is present now, so a re-offer costs HEADs only
    let start = Instant::now();
    for batch in blocks.chunks(BATCH) {
        let offers: Vec<Offer> = batch.iter().map(|(o, _)| *o).collect();
        let pending = up.offer("bench", &offers).await.unwrap();
        assert_eq!(pending.needed_count(), 0);
        pending.send(vec![]).await.unwrap();
    }
    println!(
        "re-offer of {CHUNKS} present chunks: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    h.stop().await;
}

/// User + system CPU time of this process (client and gateway), from /proc (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the parenthesised command name; utime and stime are the 12th and 13th
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 13 {
        return 0.0;
    }
    (f[11] + f[12]) / 100.0
}
