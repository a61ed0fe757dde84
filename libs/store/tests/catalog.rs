//! The catalog transaction log.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferry_store::object_store::memory::InMemory;
use ferry_store::{Catalog, Store, StoreError, UnreliableStore};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Entry {
    writer: u32,
    n: u32,
}

fn fs_store(dir: &tempfile::TempDir) -> Store {
    Store::from_url(&format!("file://{}/s", dir.path().display())).unwrap()
}

#[tokio::test]
async fn append_and_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::new(fs_store(&dir), "jobs");
    assert!(cat.read_from::<Entry>(0).await.unwrap().is_empty());
    for n in 0..12 {
        assert_eq!(
            cat.append(&Entry { writer: 0, n }).await.unwrap(),
            u64::from(n) + 1
        );
    }
    let all = cat.read_from::<Entry>(0).await.unwrap();
    assert_eq!(all.len(), 12);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, (s, e))| *s == i as u64 + 1 && e.n == i as u32)
    );
    let tail = cat.read_from::<Entry>(10).await.unwrap();
    assert_eq!(
        tail.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![11, 12]
    );
    assert!(cat.read_from::<Entry>(12).await.unwrap().is_empty());
    // Namespaces are independent; a fresh handle finds the tail.
    let other = Catalog::new(fs_store(&dir), "registry");
    assert_eq!(other.append(&"hello").await.unwrap(), 1);
    let again = Catalog::new(fs_store(&dir), "jobs");
    assert_eq!(again.append(&Entry { writer: 1, n: 0 }).await.unwrap(), 13);
    // Wrong type: a clear corruption error, no panic.
    assert!(matches!(
        other.read_from::<Entry>(0).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        Catalog::new(fs_store(&dir), "../up").append(&1).await,
        Err(StoreError::Invalid { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_yield_gapless_log_without_losses() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    const WRITERS: u32 = 2;
    const EACH: u32 = 40;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        // Separate handles: separate tail caches, as two processes would have.
        let cat = Catalog::new(store.clone(), "registry");
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..EACH {
                seqs.push(cat.append(&Entry { writer: w, n }).await.unwrap());
            }
            seqs
        }));
    }
    let mut all_seqs = BTreeSet::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a writer's own appends are ordered"
        );
        all_seqs.extend(seqs);
    }
    let total = u64::from(WRITERS * EACH);
    assert_eq!(all_seqs, (1..=total).collect::<BTreeSet<_>>());
    let entries = Catalog::new(store, "registry")
        .read_from::<Entry>(0)
        .await
        .unwrap();
    assert_eq!(entries.len() as u64, total);
    assert!(
        entries
            .iter()
            .enumerate()
            .all(|(i, (s, _))| *s == i as u64 + 1)
    );
    for w in 0..WRITERS {
        let mine: Vec<u32> = entries
            .iter()
            .filter(|(_, e)| e.writer == w)
            .map(|(_, e)| e.n)
            .collect();
        assert_eq!(
            mine,
            (0..EACH).collect::<Vec<_>>(),
            "writer {w} lost or reordered entries"
        );
    }
}

#[tokio::test]
async fn ambiguous_put_failure_does_not_duplicate_an_entry() {
    let flaky = Arc::new(UnreliableStore::new(Arc::new(InMemory::new())));
    let store = Store::from_object_store(flaky.clone(), "memory+unreliable://");
    let cat = Catalog::new(store.clone(), "jobs");
    assert_eq!(cat.append(&Entry { writer: 0, n: 0 }).await.unwrap(), 1);
    // The put lands but reports failure; append retries and recognises its own entry.
    flaky.fail_nth_put_after_write(1);
    assert_eq!(cat.append(&Entry { writer: 0, n: 1 }).await.unwrap(), 2);
    // A plain transient failure is retried too.
    flaky.fail_nth_put(1);
    assert_eq!(cat.append(&Entry { writer: 0, n: 2 }).await.unwrap(), 3);
    let entries = cat.read_from::<Entry>(0).await.unwrap();
    assert_eq!(
        entries.iter().map(|(_, e)| e.n).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_on_a_shared_handle_and_separate_handles() {
    let store = Store::from_url("memory://").unwrap();
    let shared = Catalog::new(store.clone(), "jobs");
    let mut tasks = Vec::new();
    for w in 0..6u32 {
        // Half share one handle (one tail cache), half have their own.
        let cat = if w % 2 == 0 {
            shared.clone()
        } else {
            Catalog::new(store.clone(), "jobs")
        };
        tasks.push(tokio::spawn(async move {
            for n in 0..30 {
                cat.append(&Entry { writer: w, n }).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let entries = shared.read_from::<Entry>(0).await.unwrap();
    assert_eq!(entries.len(), 180);
    assert!(
        entries
            .iter()
            .enumerate()
            .all(|(i, (s, _))| *s == i as u64 + 1)
    );
    for w in 0..6u32 {
        let mine: Vec<u32> = entries
            .iter()
            .filter(|(_, e)| e.writer == w)
            .map(|(_, e)| e.n)
            .collect();
        assert_eq!(mine, (0..30).collect::<Vec<_>>());
    }
    // Reading incrementally from any point gives the rest, in order.
    let rest = shared.read_from::<Entry>(100).await.unwrap();
    assert_eq!(rest.first().map(|(s, _)| *s), Some(101));
    assert_eq!(rest.len(), 80);
}
