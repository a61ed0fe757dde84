//! Against a real redis-server started per test.

use std::time::Duration;

use ferry_coord::{Coord, CoordError, RedisServer, redis_server_available};

async fn setup() -> Option<(tempfile::TempDir, RedisServer, Coord)> {
    if !redis_server_available() {
        panic!("redis-server is required (deploy/test.sh installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path()).unwrap();
    let coord = Coord::connect(&server.url()).await.unwrap();
    Some((dir, server, coord))
}

const TTL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn server_answers_and_reports_itself() {
    let Some((_d, server, coord)) = setup().await else {
        return;
    };
    coord.ping().await.unwrap();
    assert_ne!(server.port(), 6379);
    assert!(server.pid() > 0);
    assert!(server.url().starts_with("redis://:"));
    assert!(server.address_url().starts_with("redis://127.0.0.1:"));
}

#[tokio::test]
async fn server_refuses_clients_without_its_password() {
    let Some((d, server, _coord)) = setup().await else {
        return;
    };
    let anonymous = match Coord::connect(&server.address_url()).await {
        Ok(c) => c.ping().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let e = anonymous.expect_err("a client without the password is refused");
    assert!(e.contains("NOAUTH") || e.contains("uthentication"), "{e}");
    let mut wrong = ferry_coord::RedisTarget::new(server.address_url());
    wrong.password = Some("not-the-password".into());
    let e = match Coord::open(&wrong).await {
        Ok(c) => c
            .ping()
            .await
            .expect_err("a wrong password is refused")
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains("not-the-password"), "{e}");
    let mut right = ferry_coord::RedisTarget::new(server.address_url());
    right.password = Some(server.password().to_string());
    Coord::open(&right).await.unwrap().ping().await.unwrap();
    let conf = std::fs::metadata(d.path().join("redis.conf")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(conf.permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn lease_conflict_between_holders() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    let a = coord.acquire_lease("disk-1", "agent-a", TTL).await.unwrap();
    match coord.acquire_lease("disk-1", "agent-b", TTL).await {
        Err(CoordError::LeaseHeld { resource, holder }) => {
            assert_eq!(resource, "disk-1");
            assert_eq!(holder, "agent-a");
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    assert!(
        coord
            .acquire_lease("disk-1", "agent-b", TTL)
            .await
            .unwrap_err()
            .is_transient()
    );
    assert_eq!(
        coord.lease_holder("disk-1").await.unwrap(),
        Some(("agent-a".to_string(), a.token))
    );
    coord.check_fence("disk-1", a.token).await.unwrap();
    // Another resource is independent.
    coord.acquire_lease("disk-2", "agent-b", TTL).await.unwrap();
    // After release the other holder gets it, with a higher token.
    coord.release_lease(&a).await.unwrap();
    let b = coord.acquire_lease("disk-1", "agent-b", TTL).await.unwrap();
    assert!(b.token > a.token);
    // Releasing a lease we no longer hold leaves the new holder alone.
    coord.release_lease(&a).await.unwrap();
    coord.check_fence("disk-1", b.token).await.unwrap();
    match coord.renew_lease(&a, TTL).await {
        Err(CoordError::LeaseLost { resource }) => assert_eq!(resource, "disk-1"),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

#[tokio::test]
async fn reacquire_by_same_holder_fences_old_token() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    let old = coord
        .acquire_lease("disk-x", "ingest-1", TTL)
        .await
        .unwrap();
    let new = coord
        .acquire_lease("disk-x", "ingest-1", TTL)
        .await
        .unwrap();
    assert!(new.token > old.token);
    match coord.check_fence("disk-x", old.token).await {
        Err(CoordError::Fenced {
            resource,
            presented,
            current,
        }) => {
            assert_eq!(resource, "disk-x");
            assert_eq!(presented, old.token);
            assert_eq!(current, new.token);
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(matches!(
        coord.renew_lease(&old, TTL).await,
        Err(CoordError::LeaseLost { .. })
    ));
    coord.renew_lease(&new, TTL).await.unwrap();
    coord.check_fence("disk-x", new.token).await.unwrap();
    assert!(
        !coord
            .check_fence("disk-x", old.token)
            .await
            .unwrap_err()
            .is_transient()
    );
}

#[tokio::test]
async fn lease_expires_after_ttl_and_renew_extends() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    // Margins are generous: the test machine may be busy (only the lower bounds matter).
    let short = Duration::from_millis(900);
    let a = coord.acquire_lease("disk-e", "a", short).await.unwrap();
    let kept = coord.acquire_lease("disk-k", "a", short).await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        coord.renew_lease(&kept, short).await.unwrap();
    }
    // disk-e was not renewed for at least 1250 ms > ttl.
    assert_eq!(coord.lease_holder("disk-e").await.unwrap(), None);
    assert!(matches!(
        coord.check_fence("disk-e", a.token).await,
        Err(CoordError::LeaseLost { .. })
    ));
    assert!(matches!(
        coord.renew_lease(&a, short).await,
        Err(CoordError::LeaseLost { .. })
    ));
    let b = coord.acquire_lease("disk-e", "b", TTL).await.unwrap();
    assert!(b.token > a.token);
    coord.check_fence("disk-k", kept.token).await.unwrap();
}

#[tokio::test]
async fn fencing_tokens_keep_growing_after_redis_loses_its_data() {
    let Some((_d, mut server, coord)) = setup().await else {
        return;
    };
    let before = coord.acquire_lease("disk-r", "a", TTL).await.unwrap();
    server.restart().unwrap();
    // The connection manager reconnects by itself; the first call may see the broken socket.
    let mut after = None;
    for _ in 0..50 {
        match coord.acquire_lease("disk-r", "a", TTL).await {
            Ok(l) => {
                after = Some(l);
                break;
            }
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let after = after.expect("reconnected");
    assert!(
        after.token > before.token,
        "{} <= {}",
        after.token,
        before.token
    );
    // Tokens are exact integers, not rounded floats.
    let next = coord.acquire_lease("disk-r", "a", TTL).await.unwrap();
    assert_eq!(next.token, after.token + 1);
}

#[tokio::test]
async fn bad_names_are_rejected() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    for bad in ["", "a{b", "a}b", "a\nb"] {
        assert!(matches!(
            coord.acquire_lease(bad, "h", TTL).await,
            Err(CoordError::Invalid { .. })
        ));
        assert!(coord.push_work(bad, "id", "{}").await.is_err());
    }
    assert!(coord.acquire_lease("r", "a\nb", TTL).await.is_err());
    assert!(coord.acquire_lease("r", "a", Duration::ZERO).await.is_err());
    assert!(coord.set_ex("k", "v", Duration::ZERO).await.is_err());
    // Absurd durations are refused or capped, never a panic.
    assert!(coord.acquire_lease("r", "a", Duration::MAX).await.is_err());
    assert!(coord.set_ex("k", "v", Duration::MAX).await.is_err());
    coord.push_work("hm", "w", "{}").await.unwrap();
    let got = coord.next_work("hm", Duration::MAX).await.unwrap();
    assert_eq!(got.map(|(id, _)| id).as_deref(), Some("w"));
}

#[tokio::test]
async fn work_queue_push_next_ack_requeue() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    let none = Duration::ZERO;
    coord.push_work("h1", "w1", r#"{"id":"w1"}"#).await.unwrap();
    coord.push_work("h1", "w2", r#"{"id":"w2"}"#).await.unwrap();
    // Idempotent per id.
    coord
        .push_work("h1", "w1", r#"{"id":"w1","dup":true}"#)
        .await
        .unwrap();
    coord.push_work("h2", "w9", r#"{"id":"w9"}"#).await.unwrap();
    let listed = coord.list_work("h1").await.unwrap();
    assert_eq!(
        listed,
        vec![
            ("w1".into(), "queued".into(), r#"{"id":"w1"}"#.into()),
            ("w2".into(), "queued".into(), r#"{"id":"w2"}"#.into()),
        ]
    );

    let (id, payload) = coord.next_work("h1", none).await.unwrap().unwrap();
    assert_eq!((id.as_str(), payload.as_str()), ("w1", r#"{"id":"w1"}"#));
    // In flight: pushing it again does not duplicate it.
    coord.push_work("h1", "w1", r#"{"id":"w1"}"#).await.unwrap();
    let (id2, _) = coord
        .next_work("h1", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id2, "w2");
    assert_eq!(coord.next_work("h1", none).await.unwrap(), None);
    assert_eq!(
        coord
            .next_work("h1", Duration::from_millis(100))
            .await
            .unwrap(),
        None
    );

    let states: Vec<_> = coord
        .list_work("h1")
        .await
        .unwrap()
        .into_iter()
        .map(|(i, s, _)| (i, s))
        .collect();
    assert_eq!(
        states,
        vec![
            ("w1".into(), "in-flight".into()),
            ("w2".into(), "in-flight".into())
        ]
    );

    coord.ack_work("h1", "w1").await.unwrap();
    coord.ack_work("h1", "w1").await.unwrap();
    coord.push_work("h1", "w3", r#"{"id":"w3"}"#).await.unwrap();
    // A reconnecting worker gets w2 back before newer work.
    assert_eq!(coord.requeue_inflight("h1").await.unwrap(), 1);
    assert_eq!(coord.requeue_inflight("h1").await.unwrap(), 0);
    let order: Vec<_> = coord
        .list_work("h1")
        .await
        .unwrap()
        .into_iter()
        .map(|(i, s, _)| (i, s))
        .collect();
    assert_eq!(
        order,
        vec![
            ("w2".into(), "queued".into()),
            ("w3".into(), "queued".into())
        ]
    );
    assert_eq!(coord.next_work("h1", none).await.unwrap().unwrap().0, "w2");
    // Acking a queued item removes it from the queue as well.
    coord.ack_work("h1", "w3").await.unwrap();
    assert_eq!(coord.next_work("h1", none).await.unwrap(), None);
    // Once acked, the same id can be queued again.
    coord.ack_work("h1", "w1").await.unwrap();
    coord
        .push_work("h1", "w1", r#"{"id":"w1","again":true}"#)
        .await
        .unwrap();
    assert_eq!(
        coord.next_work("h1", none).await.unwrap().unwrap().1,
        r#"{"id":"w1","again":true}"#
    );
    assert_eq!(coord.list_work("h2").await.unwrap().len(), 1);
}

#[tokio::test]
async fn blocking_next_work_does_not_stall_the_shared_connection() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    let waiter = {
        let c = coord.clone();
        tokio::spawn(async move { c.next_work("hb", Duration::from_secs(20)).await })
    };
    // Give the waiter time to block in BLMOVE.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // If the waiter's BLMOVE were on the shared connection, this push would queue behind it
    // and the waiter would time out empty-handed after 20 s.
    coord.ping().await.unwrap();
    coord
        .push_work("hb", "w1", "{\"id\":\"w1\"}")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("waiter woke up")
        .unwrap()
        .unwrap();
    assert_eq!(got.map(|(id, _)| id).as_deref(), Some("w1"));
    // Several concurrent waiters each get their own item.
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let c = coord.clone();
        waiters.push(tokio::spawn(async move {
            c.next_work("hc", Duration::from_secs(20)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        coord.push_work("hc", &format!("i{i}"), "{}").await.unwrap();
    }
    let mut ids = Vec::new();
    for w in waiters {
        ids.push(w.await.unwrap().unwrap().unwrap().0);
    }
    ids.sort();
    assert_eq!(ids, vec!["i0", "i1", "i2"]);
}

#[tokio::test]
async fn retry_queue_returns_due_items_in_due_order() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    coord.schedule_retry("c", 3_000, "pc").await.unwrap();
    coord.schedule_retry("a", 1_000, "pa").await.unwrap();
    coord.schedule_retry("b", 2_000, "pb").await.unwrap();
    coord.schedule_retry("later", 9_000, "pl").await.unwrap();
    assert_eq!(coord.take_due(500, 10).await.unwrap(), vec![]);
    assert_eq!(
        coord.take_due(3_000, 2).await.unwrap(),
        vec![("a".into(), "pa".into()), ("b".into(), "pb".into())]
    );
    // Rescheduling replaces the due time and payload.
    coord.schedule_retry("c", 10_000, "pc2").await.unwrap();
    assert_eq!(
        coord.take_due(9_500, 10).await.unwrap(),
        vec![("later".into(), "pl".into())]
    );
    assert_eq!(coord.take_due(9_500, 0).await.unwrap(), vec![]);
    assert_eq!(
        coord.take_due(i64::MAX, 10).await.unwrap(),
        vec![("c".into(), "pc2".into())]
    );
    assert_eq!(coord.take_due(i64::MAX, 10).await.unwrap(), vec![]);
}

#[tokio::test]
async fn a_dropped_retry_is_never_due() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    coord.schedule_retry("gone", 1_000, "pg").await.unwrap();
    coord.schedule_retry("kept", 2_000, "pk").await.unwrap();
    assert!(coord.drop_retry("gone").await.unwrap());
    assert!(!coord.drop_retry("gone").await.unwrap());
    assert!(!coord.drop_retry("never-scheduled").await.unwrap());
    assert_eq!(coord.pending_retry("gone").await.unwrap(), None);
    assert_eq!(
        coord.take_due(i64::MAX, 10).await.unwrap(),
        vec![("kept".into(), "pk".into())]
    );
}

#[tokio::test]
async fn pending_retries_list_what_waits_earliest_first() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    assert!(coord.pending_retries(10).await.unwrap().is_empty());
    coord.schedule_retry("b", 2_000, "pb").await.unwrap();
    coord.schedule_retry("a", 1_000, "pa").await.unwrap();
    coord.schedule_retry("c", 3_000, "pc").await.unwrap();
    assert_eq!(
        coord.pending_retries(2).await.unwrap(),
        vec![
            ("a".into(), 1_000, "pa".into()),
            ("b".into(), 2_000, "pb".into())
        ]
    );
    assert!(coord.pending_retries(0).await.unwrap().is_empty());
    // Listing takes nothing; taking removes from the list.
    coord.take_due(1_500, 10).await.unwrap();
    assert_eq!(
        coord.pending_retries(10).await.unwrap(),
        vec![
            ("b".into(), 2_000, "pb".into()),
            ("c".into(), 3_000, "pc".into())
        ]
    );
}

#[tokio::test]
async fn kv_cache_expires() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    coord
        .set_ex("heartbeat:h1", "alive", Duration::from_millis(800))
        .await
        .unwrap();
    coord.set_ex("progress:j1", "42", TTL).await.unwrap();
    assert_eq!(
        coord.get("heartbeat:h1").await.unwrap().as_deref(),
        Some("alive")
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(coord.get("heartbeat:h1").await.unwrap(), None);
    assert_eq!(
        coord.get("progress:j1").await.unwrap().as_deref(),
        Some("42")
    );
    coord.del("progress:j1").await.unwrap();
    assert_eq!(coord.get("progress:j1").await.unwrap(), None);
}

#[tokio::test]
async fn errors_after_server_dies_are_transient() {
    let Some((_d, mut server, coord)) = setup().await else {
        return;
    };
    coord.ping().await.unwrap();
    server.kill();
    let err = coord.ping().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn blocking_pool_survives_a_redis_restart() {
    let Some((_d, mut server, coord)) = setup().await else {
        return;
    };
    // Leave an idle connection in the blocking pool.
    assert_eq!(
        coord
            .next_work("hr", Duration::from_millis(50))
            .await
            .unwrap(),
        None
    );
    server.restart().unwrap();
    // Shared connection: reconnects on its own after the first failure.
    let mut pushed = false;
    for _ in 0..50 {
        match coord.push_work("hr", "w1", "{}").await {
            Ok(()) => {
                pushed = true;
                break;
            }
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(pushed);
    // The stale pooled connection is replaced without surfacing an error.
    let got = coord.next_work("hr", Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.map(|(id, _)| id).as_deref(), Some("w1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquirers_have_exactly_one_winner() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = coord.clone();
        tasks.push(tokio::spawn(async move {
            c.acquire_lease("disk-c", &format!("holder-{i}"), TTL).await
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(l) => winners.push(l),
            Err(CoordError::LeaseHeld { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let w = &winners[0];
    assert_eq!(
        coord.lease_holder("disk-c").await.unwrap(),
        Some((w.holder.clone(), w.token))
    );
}

#[test]
fn dropping_the_server_kills_the_child() {
    assert!(
        redis_server_available(),
        "redis-server is required (deploy/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path()).unwrap();
    let pid = server.pid();
    let port = server.port();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(server);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn failed_work_moves_to_the_retry_set_in_one_step() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    coord.push_work("hr", "delta-x", "p1").await.unwrap();
    let none = Duration::from_millis(0);
    let (id, _) = coord.next_work("hr", none).await.unwrap().unwrap();
    assert_eq!(id, "delta-x");
    coord
        .ack_and_retry("hr", "delta-x", 5_000, "p2")
        .await
        .unwrap();
    assert!(coord.list_work("hr").await.unwrap().is_empty());
    assert_eq!(
        coord.pending_retry("delta-x").await.unwrap(),
        Some((5_000, "p2".into()))
    );
    // The id is free again in the queue: the retry loop can queue it when due.
    coord.push_work("hr", "delta-x", "p2").await.unwrap();
    assert_eq!(coord.list_work("hr").await.unwrap().len(), 1);
    assert!(coord.ack_and_retry("h{r}", "x", 1, "p").await.is_err());
}
