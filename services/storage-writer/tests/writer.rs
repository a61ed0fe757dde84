//! Storage-writer handlers against a real object store (local filesystem in a tempdir) and a
//! real `redis-server` for fencing: commits, fencing, missing chunks, and who may call what.
//! Materialising points is in `materialize.rs`.
mod writer_env;

use ferry_mesh::{Caller, ErrorCode, Role, ServiceError};
use ferry_proto::storage::v1::storage_writer_server::StorageWriter as _;
use ferry_proto::storage::v1::{BlockHashesRequest, MaterializeDiskRequest};
use ferry_storage_writer::{StorageWriterService, WriterError};
use ferry_store::{chunk_hex, chunk_id};
use tokio_util::sync::CancellationToken;
use writer_env::*;

#[tokio::test]
async fn commit_full_then_patch() {
    let e = env().await;
    let token = e.lease("d1", "agent-a").await.token;
    let (a, b, c, d) = (
        e.put(&block(1, BS as usize)).await,
        e.put(&block(2, BS as usize)).await,
        e.put(&block(3, BS as usize)).await,
        e.put(&block(4, BS as usize)).await,
    );
    let disk1 = disk("d1", "raw", "");
    let p1 = e
        .writer
        .commit_point(commit(
            "web",
            disk1.clone(),
            &[(0, a), (1, b), (2, c)],
            &[],
            true,
            token,
        ))
        .await
        .unwrap();
    assert_eq!(
        (p1.seq, p1.vm.as_str(), p1.kind()),
        (1, "web", ferry_proto::common::v1::CycleKind::Initial)
    );
    assert_eq!(p1.disks[0].stored_blocks, 3);
    assert_eq!(p1.disks[0].block_size, BS);

    // Patch: block 5 new, block 1 zeroed, block 2 re-sent unchanged.
    let p2 = e
        .writer
        .commit_point(commit(
            "web",
            disk1.clone(),
            &[(5, d), (2, c)],
            &[1],
            false,
            token,
        ))
        .await
        .unwrap();
    assert_eq!(p2.seq, 2);
    assert_eq!(p2.disks[0].stored_blocks, 3);
    // A retried commit (same cycle, its first attempt landed) returns the same point.
    let mut retry = commit("web", disk1.clone(), &[(5, d), (2, c)], &[1], false, token);
    retry.cycle_id = "retried-cycle".into();
    let first = e.writer.commit_point(retry.clone()).await.unwrap();
    let again = e.writer.commit_point(retry).await.unwrap();
    assert_eq!(
        (first.seq, again.seq, again.id.as_str()),
        (3, 3, first.id.as_str())
    );
    assert_eq!(
        map_of(&e.writer, "web", "latest", "d1").await,
        [(0, a), (2, c), (5, d)]
    );
    assert_eq!(
        map_of(&e.writer, "web", &p1.id, "d1").await,
        [(0, a), (1, b), (2, c)]
    );

    // A full map replaces everything.
    let p3 = e
        .writer
        .commit_point(commit("web", disk1, &[(7, b)], &[], true, token))
        .await
        .unwrap();
    assert_eq!(map_of(&e.writer, "web", &p3.id, "d1").await, [(7, b)]);

    let listed: Vec<u64> = e
        .writer
        .list_points("web")
        .await
        .unwrap()
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(listed, [1, 2, 3, 4]);
    assert_eq!(e.writer.get_point("web", "latest").await.unwrap().id, p3.id);
    assert_eq!(e.writer.get_point("web", &p1.id).await.unwrap().seq, 1);
    let missing = e
        .writer
        .get_point("web", "no-such-point")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), ErrorCode::NotFound);
    assert!(e.writer.list_points("other").await.unwrap().is_empty());
}

#[tokio::test]
async fn delta_without_base_and_bad_input_are_refused() {
    let e = env().await;
    let token = e.lease("d1", "agent-a").await.token;
    let a = e.put(&block(1, BS as usize)).await;
    let err = e
        .writer
        .commit_point(commit(
            "web",
            disk("d1", "raw", ""),
            &[(0, a)],
            &[],
            false,
            token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::FailedPrecondition, "{err}");

    let beyond = commit("web", disk("d1", "raw", ""), &[(11, a)], &[], true, token);
    let err = e.writer.commit_point(beyond).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");

    let mut short_id = commit("web", disk("d1", "raw", ""), &[(0, a)], &[], true, token);
    short_id.disks[0].blocks[0].chunk.truncate(31);
    let err = e.writer.commit_point(short_id).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");

    let mut no_token = commit("web", disk("d1", "raw", ""), &[(0, a)], &[], true, token);
    no_token.fencing_tokens.clear();
    let err = e.writer.commit_point(no_token).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(e.writer.list_points("web").await.unwrap().is_empty());
}

#[tokio::test]
async fn fenced_commit_is_rejected() {
    let e = env().await;
    let first = e.lease("d1", "agent-a").await;
    e.coord.release_lease(&first).await.unwrap();
    let stale = first.token;
    let current = e.lease("d1", "agent-b").await.token;
    assert!(current > stale);
    let a = e.put(&block(1, BS as usize)).await;
    let err = e
        .writer
        .commit_point(commit(
            "web",
            disk("d1", "raw", ""),
            &[(0, a)],
            &[],
            true,
            stale,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WriterError::Fenced { ref disk, token, .. } if disk == "d1" && token == stale),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::FailedPrecondition);
    assert!(e.writer.list_points("web").await.unwrap().is_empty());
    let p = e
        .writer
        .commit_point(commit(
            "web",
            disk("d1", "raw", ""),
            &[(0, a)],
            &[],
            true,
            current,
        ))
        .await
        .unwrap();
    assert_eq!(p.seq, 1);
}

#[tokio::test]
async fn missing_chunk_is_rejected() {
    let e = env().await;
    let token = e.lease("d1", "agent-a").await.token;
    let a = e.put(&block(1, BS as usize)).await;
    let ghost = chunk_id(&e.key, &block(9, BS as usize));
    let err = e
        .writer
        .commit_point(commit(
            "web",
            disk("d1", "raw", ""),
            &[(0, a), (4, ghost)],
            &[],
            true,
            token,
        ))
        .await
        .unwrap_err();
    match &err {
        WriterError::MissingChunk { disk, index, chunk } => {
            assert_eq!((disk.as_str(), *index), ("d1", 4));
            assert_eq!(chunk, &chunk_hex(&ghost));
        }
        other => panic!("expected a missing chunk, got {other}"),
    }
    assert_eq!(err.code(), ErrorCode::FailedPrecondition);
    assert!(e.writer.list_points("web").await.unwrap().is_empty());

    // On top of an existing point too: the latest point stays as it was.
    e.writer
        .commit_point(commit(
            "web",
            disk("d1", "raw", ""),
            &[(0, a)],
            &[],
            true,
            token,
        ))
        .await
        .unwrap();
    let err = e
        .writer
        .commit_point(commit(
            "web",
            disk("d1", "raw", ""),
            &[(3, ghost)],
            &[],
            false,
            token,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WriterError::MissingChunk { index: 3, .. }),
        "{err}"
    );
    assert_eq!(e.writer.get_point("web", "latest").await.unwrap().seq, 1);

    let present = e
        .writer
        .has_chunks(&[a.to_vec(), ghost.to_vec()])
        .await
        .unwrap();
    assert_eq!(present, [true, false]);
    let err = e.writer.has_chunks(&[vec![1, 2, 3]]).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
}

fn as_caller<T>(msg: T, caller: Option<Caller>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(c) = caller {
        req.extensions_mut().insert(c);
    }
    req
}

#[tokio::test]
async fn every_call_is_authorized() {
    let e = env().await;
    // "web" belongs to host h1; h2 is another host of the vault.
    let owners = ferry_mesh::VmOwners::from_fn(|vm| {
        Box::pin(async move { Ok((vm == "web").then(|| "h1".to_string())) })
    });
    let svc = StorageWriterService::new(e.writer.clone(), owners, CancellationToken::new());
    let reader = Some(Caller::operator(Role::Reader, "test"));
    let commit_req = || commit("web", disk("d1", "raw", ""), &[], &[], true, 1);
    // Only services commit; operators of any role and hosts may not.
    let err = svc
        .commit_point(as_caller(
            commit_req(),
            Some(Caller::operator(Role::Admin, "test")),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = svc
        .commit_point(as_caller(commit_req(), Some(Caller::Host("h1".into()))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = svc
        .commit_point(as_caller(commit_req(), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // Readers read but do not act.
    let list = ferry_proto::storage::v1::ListPointsRequest { vm: "web".into() };
    assert!(
        svc.list_points(as_caller(list.clone(), reader.clone()))
            .await
            .is_ok()
    );
    let out = e.path("x.raw");
    let err = svc
        .materialize_disk(as_caller(materialize_req(&out, ""), reader.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Hosts may make exactly the three reads a checksum resync needs — list the points, get
    // one, stream a disk's block hashes — and nothing else; without credentials, not even
    // those. A point exists so the reads answer with data, not NotFound.
    let token = e.lease("d1", "agent-a").await.token;
    let chunk = e.put(&block(7, BS as usize)).await;
    let committed = e
        .writer
        .commit_point(commit(
            "web",
            disk("d1", "raw", ""),
            &[(3, chunk)],
            &[],
            true,
            token,
        ))
        .await
        .unwrap();
    let host = || Some(Caller::Host("h1".into()));
    let points = svc
        .list_points(as_caller(list.clone(), host()))
        .await
        .expect("a host lists points")
        .into_inner()
        .points;
    assert_eq!(
        points.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        vec![committed.id.clone()]
    );
    let get = ferry_proto::storage::v1::GetPointRequest {
        vm: "web".into(),
        point: "latest".into(),
    };
    let got = svc
        .get_point(as_caller(get.clone(), host()))
        .await
        .expect("a host gets a point")
        .into_inner();
    assert_eq!(got.id, committed.id);
    let hashes = BlockHashesRequest {
        vm: "web".into(),
        point: committed.id.clone(),
        disk_id: "d1".into(),
        omit_lost: false,
    };
    let mut stream = svc
        .block_hashes(as_caller(hashes.clone(), host()))
        .await
        .expect("a host reads block hashes")
        .into_inner();
    let mut entries = Vec::new();
    while let Some(page) = tokio_stream::StreamExt::next(&mut stream).await {
        entries.extend(page.unwrap().blocks.into_iter().map(|b| (b.index, b.chunk)));
    }
    assert_eq!(entries, vec![(3, chunk.to_vec())]);
    for code in [
        svc.list_points(as_caller(list.clone(), None))
            .await
            .unwrap_err()
            .code(),
        svc.get_point(as_caller(get, None))
            .await
            .unwrap_err()
            .code(),
        svc.block_hashes(as_caller(hashes, None))
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
    ] {
        assert_eq!(code, tonic::Code::Unauthenticated);
    }
    // Another host of the vault reads none of it, and is told whose VM it is.
    let other = || Some(Caller::Host("h2".into()));
    let get = ferry_proto::storage::v1::GetPointRequest {
        vm: "web".into(),
        point: "latest".into(),
    };
    let hashes = BlockHashesRequest {
        vm: "web".into(),
        point: committed.id.clone(),
        disk_id: "d1".into(),
        omit_lost: false,
    };
    for status in [
        svc.list_points(as_caller(list.clone(), other()))
            .await
            .unwrap_err(),
        svc.get_point(as_caller(get, other())).await.unwrap_err(),
        svc.block_hashes(as_caller(hashes, other()))
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("h2") && status.message().contains("web"),
            "{}",
            status.message()
        );
    }
    // Everything else stays refused to a host (committing is checked above).
    let has = ferry_proto::storage::v1::HasChunksRequest {
        chunks: vec![chunk.to_vec()],
    };
    let err = svc.has_chunks(as_caller(has, host())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = svc
        .materialize_disk(as_caller(materialize_req(&out, ""), host()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(!out.exists(), "a refused materialise writes nothing");
    let err = svc
        .run_retention(as_caller(
            ferry_proto::storage::v1::RunRetentionRequest {
                vm: "web".into(),
                retention_seconds: 1,
                gc_grace_seconds: 1,
                ..Default::default()
            },
            host(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        e.writer.list_points("web").await.unwrap().len(),
        1,
        "a refused retention run prunes nothing"
    );
    // Errors come back as statuses with their codes.
    let missing = MaterializeDiskRequest {
        vm: "nope".into(),
        ..materialize_req(&out, "")
    };
    let err = svc
        .materialize_disk(as_caller(
            missing,
            Some(Caller::operator(Role::Operator, "test")),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let retention = ferry_proto::storage::v1::RunRetentionRequest {
        vm: "web".into(),
        ..Default::default()
    };
    // A retention run deletes points: the contributor role, not the operator's.
    let err = svc
        .run_retention(as_caller(
            retention.clone(),
            Some(Caller::operator(Role::Operator, "test")),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = svc
        .run_retention(as_caller(
            retention,
            Some(Caller::operator(Role::Contributor, "test")),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("retention"));
}
