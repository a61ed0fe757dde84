//! `PointChunks`: every chunk id a point's disks reference, for the gateway's FETCH, and who
//! may ask for whom (the VM's host and its recovery host; the caller is the gateway). Also
//! the recovery host's reads of points and block hashes. A real object store (local
//! filesystem) and `redis-server`, as in `writer.rs`.
mod common;
mod writer_env;

use std::collections::BTreeSet;

use ferry_mesh::scope::VmHosts;
use ferry_mesh::{Caller, ErrorCode, Role, ServiceError, VmOwners};
use ferry_proto::storage::v1::storage_writer_server::StorageWriter as _;
use ferry_proto::storage::v1::{
    BlockHashesRequest, CommitDisk, GetPointRequest, ListPointsRequest, PointChunksRequest,
};
use ferry_storage_writer::StorageWriterService;
use ferry_store::ChunkId;
use tokio_util::sync::CancellationToken;
use writer_env::*;

/// "web" belongs to h1 and fails over to hr; "db" belongs to h1 with no recovery host.
fn owners() -> VmOwners {
    VmOwners::from_fn_hosts(|vm| {
        Box::pin(async move {
            let hosts = |recovery_host: &str| VmHosts {
                host: "h1".into(),
                recovery_host: recovery_host.into(),
                ..VmHosts::default()
            };
            Ok(match vm.as_str() {
                "web" => Some(hosts("hr")),
                "db" => Some(hosts("")),
                _ => None,
            })
        })
    })
}

fn as_caller<T>(msg: T, caller: Option<Caller>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(c) = caller {
        req.extensions_mut().insert(c);
    }
    req
}

fn service() -> Option<Caller> {
    Some(Caller::Service("ferry".into()))
}

fn chunks_req(vm: &str, point: &str, host: &str) -> PointChunksRequest {
    PointChunksRequest {
        vm: vm.into(),
        point: point.into(),
        host_name: host.into(),
    }
}

/// Every id the service streams for `req`, in order, checking each is 32 bytes.
async fn streamed(
    svc: &StorageWriterService,
    req: PointChunksRequest,
) -> Result<Vec<ChunkId>, tonic::Status> {
    let mut pages = svc
        .point_chunks(as_caller(req, service()))
        .await?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(page) = tokio_stream::StreamExt::next(&mut pages).await {
        for id in page?.chunk_ids {
            ids.push(ChunkId::try_from(id.as_slice()).expect("a 32-byte chunk id"));
        }
    }
    Ok(ids)
}

/// A point of "web" with two disks: d1 references a, b and a again; d2 references c and b.
/// Returns its id, its chunks (ascending) and d1's fencing token.
async fn two_disk_point(e: &Env) -> (String, Vec<ChunkId>, u64) {
    let (t1, t2) = (
        e.lease("d1", "agent").await.token,
        e.lease("d2", "agent").await.token,
    );
    let (a, b, c) = (
        e.put(&block(1, BS as usize)).await,
        e.put(&block(2, BS as usize)).await,
        e.put(&block(3, BS as usize)).await,
    );
    let mut req = commit(
        "web",
        disk("d1", "raw", ""),
        &[(0, a), (1, b), (4, a)],
        &[],
        true,
        t1,
    );
    let d2 = commit(
        "web",
        disk("d2", "raw", ""),
        &[(2, c), (3, b)],
        &[],
        true,
        t2,
    );
    let d2_disk: CommitDisk = d2.disks[0].clone();
    req.disks.push(d2_disk);
    req.fencing_tokens.insert("d2".into(), t2);
    let p = e.writer.commit_point(req).await.unwrap();
    assert_eq!(p.disks.len(), 2);
    let mut want: Vec<ChunkId> = vec![a, b, c];
    want.sort();
    (p.id, want, t1)
}

#[tokio::test]
async fn point_chunks_are_every_disk_s_chunks_once() {
    let e = env().await;
    let (id, want, token) = two_disk_point(&e).await;
    assert_eq!(e.writer.point_chunks("web", &id).await.unwrap(), want);
    assert_eq!(e.writer.point_chunks("web", "latest").await.unwrap(), want);
    assert_eq!(e.writer.point_chunks("web", "").await.unwrap(), want);

    // a newer point of d1 alone: its own map, d2 as the previous point left it
    let d = e.put(&block(4, BS as usize)).await;
    let p2 = e
        .writer
        .commit_point(commit(
            "web",
            disk("d1", "raw", ""),
            &[(0, d)],
            &[],
            true,
            token,
        ))
        .await
        .unwrap();
    let latest: BTreeSet<ChunkId> = e
        .writer
        .point_chunks("web", "latest")
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut maps = BTreeSet::new();
    for disk in &p2.disks {
        maps.extend(
            map_of(&e.writer, "web", &p2.id, &disk.disk_id)
                .await
                .into_iter()
                .map(|(_, c)| c),
        );
    }
    assert_eq!(latest, maps);
    assert!(latest.contains(&d));
    // the first point still names its own chunks
    assert_eq!(e.writer.point_chunks("web", &id).await.unwrap(), want);

    for (vm, point) in [("web", "no-such-point"), ("other", "latest")] {
        let err = e.writer.point_chunks(vm, point).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotFound, "{err}");
        assert!(
            err.to_string().contains(point) && err.to_string().contains(vm),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_disk_with_logs_contributes_its_merged_map_not_the_log_chunks() {
    let mut e = common::env_with(VSIZE, common::local_store).await;
    let base = e.put(&block(1, BS as usize)).await;
    e.disk[..BS as usize].copy_from_slice(&block(1, BS as usize));
    let initial = commit(
        "web",
        disk("d1", "raw", ""),
        &[(0, base)],
        &[],
        true,
        e.token,
    );
    e.writer.commit_point(initial).await.unwrap();
    // a log rewrites the start of block 0 and writes into block 2
    let log = e
        .log(&[(0, vec![0x77; 4096]), (2 * u64::from(BS), vec![0x55; 512])])
        .await;
    let mut delta = commit("web", disk("d1", "raw", ""), &[], &[], false, e.token);
    delta.disks[0].shipped_logs = vec![log.clone()];
    let p = e.writer.commit_point(delta).await.unwrap();
    assert_eq!(p.disks[0].pending_logs, 1);

    // merged on demand: the blocks as of the point, the same BlockHashes serves
    let ids = e.writer.point_chunks("web", "latest").await.unwrap();
    let map = map_of(&e.writer, "web", &p.id, "d1").await;
    let mut from_map: Vec<ChunkId> = map.iter().map(|(_, c)| *c).collect();
    from_map.sort();
    from_map.dedup();
    assert_eq!(ids, from_map);
    assert_eq!(map.len(), 2, "{map:?}");
    assert!(!ids.contains(&base), "block 0 was rewritten by the log");
    for c in &log.chunks {
        let c = ChunkId::try_from(c.as_slice()).unwrap();
        assert!(!ids.contains(&c), "a log chunk is not a block of the point");
    }
}

#[tokio::test]
async fn the_gateway_asks_for_the_vm_s_host_and_its_recovery_host_only() {
    let e = env().await;
    let (id, want, _) = two_disk_point(&e).await;
    let svc = StorageWriterService::new(e.writer.clone(), owners(), CancellationToken::new());

    // the owner and the recovery host, by id and as latest
    assert_eq!(
        streamed(&svc, chunks_req("web", &id, "h1")).await.unwrap(),
        want
    );
    assert_eq!(
        streamed(&svc, chunks_req("web", "latest", "hr"))
            .await
            .unwrap(),
        want
    );

    // another host of the vault is told who may read
    let err = streamed(&svc, chunks_req("web", &id, "h2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    for name in ["h2", "web", "h1", "hr"] {
        assert!(
            err.message().contains(name),
            "{name} not in {}",
            err.message()
        );
    }
    // a VM without a recovery host: only its host
    let err = streamed(&svc, chunks_req("db", "latest", "hr"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("recovery host is none"),
        "{}",
        err.message()
    );
    // a VM the registry does not know is refused, not looked up
    let err = streamed(&svc, chunks_req("ghost", "latest", "h1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // unknown point: NOT_FOUND naming it; db has no points at all
    let err = streamed(&svc, chunks_req("web", "no-such-point", "hr"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("no-such-point"), "{}", err.message());
    let err = streamed(&svc, chunks_req("db", "latest", "h1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("vm db"), "{}", err.message());

    // bad requests
    for req in [chunks_req("web", &id, ""), chunks_req("", &id, "h1")] {
        let err = streamed(&svc, req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }

    // only the gateway (the service certificate) asks: not hosts, operators or nobody
    for (caller, code) in [
        (
            Some(Caller::Host("h1".into())),
            tonic::Code::PermissionDenied,
        ),
        (
            Some(Caller::operator(Role::Admin, "test")),
            tonic::Code::PermissionDenied,
        ),
        (None, tonic::Code::Unauthenticated),
    ] {
        let err = svc
            .point_chunks(as_caller(chunks_req("web", &id, "h1"), caller))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.code(), code);
    }
}

#[tokio::test]
async fn the_recovery_host_reads_points_and_block_hashes_but_does_not_write() {
    let e = env().await;
    let (id, _, token) = two_disk_point(&e).await;
    let svc = StorageWriterService::new(e.writer.clone(), owners(), CancellationToken::new());
    let recovery = || Some(Caller::Host("hr".into()));
    let list = ListPointsRequest { vm: "web".into() };
    let points = svc
        .list_points(as_caller(list.clone(), recovery()))
        .await
        .expect("the recovery host lists points")
        .into_inner()
        .points;
    assert_eq!(points.len(), 1);
    let get = GetPointRequest {
        vm: "web".into(),
        point: "latest".into(),
    };
    let got = svc
        .get_point(as_caller(get, recovery()))
        .await
        .expect("the recovery host gets a point");
    assert_eq!(got.into_inner().id, id);
    let hashes = BlockHashesRequest {
        vm: "web".into(),
        point: id.clone(),
        disk_id: "d2".into(),
        omit_lost: false,
    };
    svc.block_hashes(as_caller(hashes, recovery()))
        .await
        .expect("the recovery host reads block hashes");
    // it is not the owner: committing and acting stay refused
    let req = commit("web", disk("d1", "raw", ""), &[], &[], true, token);
    let err = svc
        .commit_point(as_caller(req, recovery()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // of a VM it is not the recovery host of, it reads nothing
    let err = svc
        .list_points(as_caller(ListPointsRequest { vm: "db".into() }, recovery()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}
