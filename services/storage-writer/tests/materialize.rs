//! Materialising a point's disk into a file (raw, VHD, VHDX) checked with the real
//! `qemu-img`, and the failures and cancellations that must leave no file behind.
mod writer_env;

use std::path::{Path, PathBuf};

use ferry_mesh::{ErrorCode, ServiceError};
use ferry_proto::common::v1::Disk;
use ferry_proto::storage::v1::MaterializeDiskRequest;
use ferry_storage_writer::WriterError;
use ferry_store::{chunk_hex, chunk_key};
use tokio_util::sync::CancellationToken;
use writer_env::*;

/// Commits blocks 0, 3 and the partial last block 10 and returns the raw reference image.
async fn point_with_blocks(e: &Env, format: &str, subformat: &str) -> PathBuf {
    let token = e.lease("d1", "agent-a").await.token;
    let last_len = (VSIZE - 10 * u64::from(BS)) as usize;
    let blocks = [
        (0u64, block(1, BS as usize)),
        (3, block(2, BS as usize)),
        (10, block(3, last_len)),
    ];
    let mut entries = Vec::new();
    let mut reference = vec![0u8; VSIZE as usize];
    for (index, data) in &blocks {
        entries.push((*index, e.put(data).await));
        let off = (*index * u64::from(BS)) as usize;
        reference[off..off + data.len()].copy_from_slice(data);
    }
    e.writer
        .commit_point(commit(
            "web",
            disk("d1", format, subformat),
            &entries,
            &[],
            true,
            token,
        ))
        .await
        .unwrap();
    let path = e.path("reference.raw");
    std::fs::write(&path, &reference).unwrap();
    path
}

fn qemu_img() -> bool {
    std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `qemu-img compare` (content) and the virtual size qemu reports.
fn qemu_check(image: &Path, format: &str, reference: &Path) {
    if !qemu_img() {
        eprintln!("qemu-img not on PATH: checked with ferry-disk only");
        return;
    }
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", "raw"])
        .arg(image)
        .arg(reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format])
        .arg(image)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(VSIZE));
}

fn read_back(image: &Path) -> Vec<u8> {
    let dev = ferry_disk::open(image).unwrap();
    assert_eq!(dev.virtual_size(), VSIZE);
    let mut buf = vec![0u8; VSIZE as usize];
    dev.read_at(0, &mut buf).unwrap();
    buf
}

#[tokio::test]
async fn materialize_raw_and_vhdx() {
    let e = env().await;
    let reference = point_with_blocks(&e, "raw", "").await;
    let expected = std::fs::read(&reference).unwrap();
    let written = 2 * u64::from(BS) + (VSIZE - 10 * u64::from(BS));

    let raw = e.path("out.raw");
    let resp = e
        .writer
        .materialize_disk(materialize_req(&raw, ""), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((resp.bytes_written, resp.virtual_size), (written, VSIZE));
    assert_eq!(std::fs::read(&raw).unwrap(), expected);
    qemu_check(&raw, "raw", &reference);

    let vhdx = e.path("out.vhdx");
    e.writer
        .materialize_disk(materialize_req(&vhdx, "vhdx"), CancellationToken::new())
        .await
        .unwrap();
    assert!(read_back(&vhdx) == expected, "vhdx content differs");
    qemu_check(&vhdx, "vhdx", &reference);

    for subformat in ["fixed", "dynamic"] {
        let vhd = e.path(&format!("out-{subformat}.vhd"));
        let req = MaterializeDiskRequest {
            subformat: subformat.into(),
            ..materialize_req(&vhd, "vhd")
        };
        e.writer
            .materialize_disk(req, CancellationToken::new())
            .await
            .unwrap();
        assert!(
            read_back(&vhd) == expected,
            "vhd {subformat} content differs"
        );
        qemu_check(&vhd, "vpc", &reference);
    }

    // Never overwrites.
    let err = e
        .writer
        .materialize_disk(materialize_req(&raw, ""), CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::AlreadyExists, "{err}");
    assert_eq!(std::fs::read(&raw).unwrap(), expected);
}

#[tokio::test]
async fn materialize_defaults_to_the_source_format() {
    let e = env().await;
    let reference = point_with_blocks(&e, "vhdx", "dynamic").await;
    let out = e.path("disk.vhdx");
    e.writer
        .materialize_disk(materialize_req(&out, ""), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(ferry_disk::detect(&out).unwrap(), ferry_disk::Format::Vhdx);
    qemu_check(&out, "vhdx", &reference);
}

#[tokio::test]
async fn failed_or_cancelled_materialize_leaves_no_file() {
    let e = env().await;
    point_with_blocks(&e, "raw", "").await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let out = e.path("cancelled.raw");
    let err = e
        .writer
        .materialize_disk(materialize_req(&out, ""), cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, WriterError::Cancelled), "{err}");
    assert!(!out.exists());

    // A chunk lost from the store after the commit: an error naming it, no partial file.
    let map = map_of(&e.writer, "web", "latest", "d1").await;
    e.store.delete(&chunk_key(&map[1].1)).await.unwrap();
    let out = e.path("broken.raw");
    let err = e
        .writer
        .materialize_disk(materialize_req(&out, ""), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&chunk_hex(&map[1].1)), "{err}");
    assert!(!out.exists());

    let err = e
        .writer
        .materialize_disk(
            materialize_req(&e.path("no/such/dir/x.raw"), ""),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::FailedPrecondition, "{err}");
    let err = e
        .writer
        .materialize_disk(
            materialize_req(Path::new("relative.raw"), ""),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn dropped_materialize_removes_the_partial_file() {
    let e = env().await;
    let token = e.lease("big", "agent-a").await.token;
    let blocks = 160u64;
    let mut entries = Vec::new();
    for i in 0..blocks {
        entries.push((i, e.put(&block(i as u8, BS as usize)).await));
    }
    let big = Disk {
        virtual_size: blocks * u64::from(BS),
        ..disk("big", "raw", "")
    };
    e.writer
        .commit_point(commit("web", big, &entries, &[], true, token))
        .await
        .unwrap();
    let out = e.path("dropped.raw");
    let req = MaterializeDiskRequest {
        disk_id: "big".into(),
        ..materialize_req(&out, "")
    };
    let call = e.writer.materialize_disk(req, CancellationToken::new());
    let created = async {
        while !out.exists() {
            tokio::task::yield_now().await;
        }
    };
    // What a gRPC server does when the client goes away: the call's future is dropped.
    tokio::select! {
        biased;
        () = created => {}
        res = call => panic!("materialise finished before the file was seen: {res:?}"),
    }
    eventually("the partial file is removed", || !out.exists()).await;
}
