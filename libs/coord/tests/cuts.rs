//! Group cut rendezvous against a real redis-server.

use ferry_coord::{Coord, CutDecision, CutJoin, RedisServer};

async fn setup() -> (tempfile::TempDir, RedisServer, Coord) {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path())
        .expect("redis-server is required (deploy/test.sh installs it)");
    let coord = Coord::connect(&server.url()).await.unwrap();
    (dir, server, coord)
}

fn members(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn the_last_member_to_join_decides_go_and_nobody_joins_twice() {
    let (_d, _s, coord) = setup().await;
    coord.open_cut("g-1", &members(&["a", "b"])).await.unwrap();
    assert_eq!(
        coord.join_cut("g-1", "x").await.unwrap(),
        CutJoin::NotMember
    );
    assert_eq!(
        coord.join_cut("g-1", "a").await.unwrap(),
        CutJoin::Joined(None)
    );
    assert_eq!(coord.cut_decision("g-1").await.unwrap(), None);
    assert!(!coord.cut_went_ahead_with("g-1", "a").await.unwrap());
    assert_eq!(
        coord.join_cut("g-1", "b").await.unwrap(),
        CutJoin::Joined(Some(CutDecision::Go))
    );
    // A retried cycle of a is not part of the cut any more.
    assert_eq!(
        coord.join_cut("g-1", "a").await.unwrap(),
        CutJoin::AlreadyJoined
    );
    // Go is final: a late abort does not change it.
    assert_eq!(
        coord.decide_cut("g-1", CutDecision::Abort).await.unwrap(),
        CutDecision::Go
    );
    assert!(coord.cut_went_ahead_with("g-1", "a").await.unwrap());
    assert!(!coord.cut_went_ahead_with("g-1", "x").await.unwrap());
    assert_eq!(
        coord.join_cut("unknown", "a").await.unwrap(),
        CutJoin::NotMember
    );
}

#[tokio::test]
async fn an_abort_is_final_and_seen_by_a_late_member() {
    let (_d, _s, coord) = setup().await;
    coord.open_cut("g-2", &members(&["a", "b"])).await.unwrap();
    assert_eq!(
        coord.join_cut("g-2", "a").await.unwrap(),
        CutJoin::Joined(None)
    );
    assert_eq!(
        coord.decide_cut("g-2", CutDecision::Abort).await.unwrap(),
        CutDecision::Abort
    );
    assert_eq!(
        coord.join_cut("g-2", "b").await.unwrap(),
        CutJoin::Joined(Some(CutDecision::Abort))
    );
    assert!(!coord.cut_went_ahead_with("g-2", "a").await.unwrap());
    assert!(coord.open_cut("g{3}", &members(&["a"])).await.is_err());
    assert!(coord.open_cut("g-4", &[]).await.is_err());
}
