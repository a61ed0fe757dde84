//! Kept leases and slot pushes (what scheduler and orchestrator replicas build on), against a
//! real redis-server started per test.

use std::time::Duration;

use ferry_coord::{Coord, CoordError, RedisServer, SlotPush, redis_server_available};

async fn setup() -> Option<(tempfile::TempDir, RedisServer, Coord)> {
    if !redis_server_available() {
        panic!("redis-server is required (deploy/test.sh installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path()).unwrap();
    let coord = Coord::connect(&server.url()).await.unwrap();
    Some((dir, server, coord))
}

const SHORT: Duration = Duration::from_millis(300);

async fn flushall(coord_url: &str) {
    let client = redis::Client::open(coord_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
}

#[tokio::test]
async fn kept_lease_outlives_its_ttl_and_release_frees_it() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    let kept = coord.acquire_kept("leader", "a", SHORT).await.unwrap();
    tokio::time::sleep(SHORT * 4).await;
    assert!(!kept.lost().is_cancelled());
    coord.check_fence("leader", kept.token()).await.unwrap();
    assert!(matches!(
        coord.acquire_lease("leader", "b", SHORT).await,
        Err(CoordError::LeaseHeld { .. })
    ));
    let lost = kept.lost();
    kept.release().await.unwrap();
    assert!(!lost.is_cancelled(), "a release is not a loss");
    coord.acquire_lease("leader", "b", SHORT).await.unwrap();
}

#[tokio::test]
async fn dropped_kept_lease_expires() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    let kept = coord.acquire_kept("leader", "a", SHORT).await.unwrap();
    drop(kept);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match coord.acquire_lease("leader", "b", SHORT).await {
            Ok(_) => break,
            Err(CoordError::LeaseHeld { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the dropped lease never expired: {e}"),
        }
    }
}

#[tokio::test]
async fn kept_lease_is_lost_when_redis_forgets_it_and_tokens_still_grow() {
    let Some((_d, server, coord)) = setup().await else {
        return;
    };
    let kept = coord.acquire_kept("leader", "a", SHORT).await.unwrap();
    let old = kept.token();
    flushall(&server.url()).await;
    tokio::time::timeout(Duration::from_secs(5), kept.lost().cancelled())
        .await
        .expect("loss noticed");
    let again = coord.acquire_kept("leader", "b", SHORT).await.unwrap();
    assert!(again.token() > old, "{} > {old}", again.token());
}

#[tokio::test]
async fn kept_lease_is_given_up_when_redis_is_unreachable() {
    let Some((_d, mut server, coord)) = setup().await else {
        return;
    };
    let kept = coord.acquire_kept("leader", "a", SHORT).await.unwrap();
    server.kill();
    tokio::time::timeout(Duration::from_secs(10), kept.lost().cancelled())
        .await
        .expect("given up");
}

#[tokio::test]
async fn each_slot_is_queued_once_and_only_by_the_lease_holder() {
    let Some((_d, _s, coord)) = setup().await else {
        return;
    };
    let a = coord
        .acquire_lease("scheduler-leader", "a", SHORT)
        .await
        .unwrap();
    let push = |lease: ferry_coord::Lease, slot: u64| {
        let coord = coord.clone();
        async move {
            coord
                .push_slot(&lease, "h1", "vm1", slot, "delta-vm1", "p")
                .await
        }
    };
    assert_eq!(push(a.clone(), 10).await.unwrap(), SlotPush::Queued);
    // Still queued: the next slot waits.
    assert_eq!(push(a.clone(), 11).await.unwrap(), SlotPush::Busy);
    let (id, payload) = coord
        .next_work("h1", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((id.as_str(), payload.as_str()), ("delta-vm1", "p"));
    assert_eq!(push(a.clone(), 11).await.unwrap(), SlotPush::Busy);
    coord.ack_work("h1", "delta-vm1").await.unwrap();
    // Done: the same slot or an older one is never queued again.
    assert_eq!(
        push(a.clone(), 10).await.unwrap(),
        SlotPush::AlreadyQueued { last: 10 }
    );
    assert_eq!(
        push(a.clone(), 9).await.unwrap(),
        SlotPush::AlreadyQueued { last: 10 }
    );
    assert!(
        coord
            .next_work("h1", Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );

    // A new leader after a expired: a is refused, b goes on from the recorded slot.
    tokio::time::sleep(SHORT * 2).await;
    let b = coord
        .acquire_lease("scheduler-leader", "b", SHORT)
        .await
        .unwrap();
    assert!(matches!(
        push(a.clone(), 11).await,
        Err(CoordError::Fenced { .. })
    ));
    assert_eq!(
        push(b.clone(), 10).await.unwrap(),
        SlotPush::AlreadyQueued { last: 10 }
    );
    assert_eq!(push(b.clone(), 11).await.unwrap(), SlotPush::Queued);
    // Series are independent.
    assert_eq!(
        coord
            .push_slot(&b, "h1", "vm2", 11, "delta-vm2", "q")
            .await
            .unwrap(),
        SlotPush::Queued
    );
    assert!(
        coord
            .push_slot(&b, "h1", "~fence", 12, "x", "q")
            .await
            .is_err()
    );
}
