//! The object layout: every key Ferry writes to object storage is built and parsed here, and
//! nowhere else.
//!
//! | key | builder | parser |
//! |---|---|---|
//! | `chunks/<aa>/<64 hex>` | [`chunk_key`] | [`parse_chunk_key`] |
//! | `index/<aa>/<64 hex>` | [`index_key`] | [`parse_index_key`] |
//! | `points/<vm>/<seq:020>.json` | [`point_key`], [`point_prefix`] | [`parse_point_key`], [`vm_of_point_key`] |
//! | `merged/<vm>/<seq:020>.json` | [`merged_key`], [`merged_prefix`] | [`parse_merged_key`] |
//! | `logs/<disk>/<unique id>.json` | [`log_key`] | [`parse_log_key`] |
//! | `readers/<vm>/<point>/<uuid>` | [`reader_key`], [`reader_prefix`] | [`parse_reader_key`] |
//! | `gc/condemned.json` | [`CONDEMNED_KEY`] | |
//! | `catalog/<ns>/<seq:020>.json` | [`catalog_key`], [`catalog_prefix`] | [`parse_catalog_key`] |
//! | `snapshots/<ns>/<seq:020>.json` | [`snapshot_key`], [`snapshot_prefix`] | [`parse_snapshot_key`] |
//! | `probe/<uuid>` | [`probe_key`] | |
//!
//! Builders only format: they never fail. VM names and catalog namespaces are checked with
//! `check_segment` by the store's point, merged-map and catalog operations, and every key,
//! whoever built it, is checked again by the store before any request (not empty, not
//! absolute, no empty, `.` or `..` segment). Parsers are strict: a key of any other shape is
//! `None`.

use crate::{ChunkId, StoreError};

/// Root of the sealed chunks (what collection lists).
pub const CHUNKS_PREFIX: &str = "chunks";
/// Root of chunks found corrupt (a drill's read-back): moved out of `chunks/`, so the next
/// upload of the block stores it again; kept for inspection.
pub const QUARANTINE_PREFIX: &str = "quarantine";
/// Root of the block-map index pages (what collection lists).
pub const INDEX_PREFIX: &str = "index";
/// Root of the shipped-log descriptors (what collection lists).
pub const LOGS_PREFIX: &str = "logs";
/// Root of the recovery point manifests: one directory per VM.
pub const POINTS_PREFIX: &str = "points";
/// Objects the last collection found unreferenced (deleted by the next one if still so).
pub const CONDEMNED_KEY: &str = "gc/condemned.json";

/// `probe/<uuid>`: written twice and deleted when a mesh starts, to learn whether the backend
/// honours put-if-absent (see `Store::prepare`).
pub fn probe_key(id: &uuid::Uuid) -> String {
    format!("probe/{id}")
}

/// `chunks/<aa>/<64 hex>`: where a sealed chunk lives.
pub fn chunk_key(id: &ChunkId) -> String {
    content_key(CHUNKS_PREFIX, id)
}

/// The chunk id of a `chunks/<aa>/<64 hex>` key (lowercase hex, `aa` its first two digits).
pub fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    parse_content_key(CHUNKS_PREFIX, key)
}

/// `quarantine/<aa>/<64 hex>`: a chunk found corrupt, as it was found.
pub fn quarantine_key(id: &ChunkId) -> String {
    content_key(QUARANTINE_PREFIX, id)
}

/// The chunk id of a `quarantine/<aa>/<64 hex>` key.
pub fn parse_quarantine_key(key: &str) -> Option<ChunkId> {
    parse_content_key(QUARANTINE_PREFIX, key)
}

/// `index/<aa>/<64 hex>`: where the index page whose bytes hash (BLAKE3) to `hash` lives.
pub fn index_key(hash: &[u8; 32]) -> String {
    content_key(INDEX_PREFIX, hash)
}

/// The hash of an `index/<aa>/<64 hex>` key (lowercase hex, `aa` its first two digits).
pub fn parse_index_key(key: &str) -> Option<[u8; 32]> {
    parse_content_key(INDEX_PREFIX, key)
}

/// `points/<vm>`: the directory of a VM's point manifests.
pub fn point_prefix(vm: &str) -> String {
    format!("{POINTS_PREFIX}/{vm}")
}

/// `points/<vm>/<seq:020>.json`: the manifest of point `seq` of `vm`.
pub fn point_key(vm: &str, seq: u64) -> String {
    format!("{}/{seq:020}.json", point_prefix(vm))
}

/// The VM and seq of a `points/<vm>/<seq:020>.json` key.
pub fn parse_point_key(key: &str) -> Option<(&str, u64)> {
    parse_seq_key("points", key)
}

/// The VM directory a key listed under [`POINTS_PREFIX`] belongs to (`points/<vm>/...`),
/// whatever the rest of the key: how the VMs with points are found.
pub fn vm_of_point_key(key: &str) -> Option<&str> {
    key.strip_prefix("points/")?.split('/').next()
}

/// `merged/<vm>`: the directory of a VM's merged maps.
pub fn merged_prefix(vm: &str) -> String {
    format!("merged/{vm}")
}

/// `merged/<vm>/<seq:020>.json`: where the merged map of point `seq` lives.
pub fn merged_key(vm: &str, seq: u64) -> String {
    format!("{}/{seq:020}.json", merged_prefix(vm))
}

/// The VM and seq of a `merged/<vm>/<seq:020>.json` key.
pub fn parse_merged_key(key: &str) -> Option<(&str, u64)> {
    parse_seq_key("merged", key)
}

/// `logs/<disk>/<unique id>.json`: the descriptor of a shipped log (`unique_id` in hex).
pub fn log_key(disk_id: &str, unique_id: &str) -> String {
    format!("{LOGS_PREFIX}/{disk_id}/{unique_id}.json")
}

/// The disk and unique id of a `logs/<disk>/<unique id>.json` key.
pub fn parse_log_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("logs/")?;
    let (disk, name) = rest.split_once('/')?;
    let unique = name.strip_suffix(".json")?;
    (!disk.is_empty() && !unique.is_empty() && !unique.contains('/')).then_some((disk, unique))
}

/// `readers/<vm>`: the markers of everyone reading a point of `vm`.
pub fn reader_prefix(vm: &str) -> String {
    format!("readers/{vm}")
}

/// `readers/<vm>/<point>/<reader>`: the marker of one reader of point `point` (its id) of `vm`.
pub fn reader_key(vm: &str, point: &str, reader: &str) -> String {
    format!("{}/{point}/{reader}", reader_prefix(vm))
}

/// The VM and point id of a reader marker `readers/<vm>/<point>/...` (the reader's own id, and
/// anything after it, is not needed to know which point is held).
pub fn parse_reader_key(key: &str) -> Option<(&str, &str)> {
    let mut parts = key.strip_prefix("readers/")?.split('/');
    Some((parts.next()?, parts.next()?))
}

/// `catalog/<ns>`: the directory of a catalog namespace's log.
pub fn catalog_prefix(namespace: &str) -> String {
    format!("catalog/{namespace}")
}

/// `catalog/<ns>/<seq:020>.json`: entry `seq` of a namespace's log.
pub fn catalog_key(namespace: &str, seq: u64) -> String {
    format!("{}/{seq:020}.json", catalog_prefix(namespace))
}

/// The namespace and seq of a `catalog/<ns>/<seq:020>.json` key.
pub fn parse_catalog_key(key: &str) -> Option<(&str, u64)> {
    parse_seq_key("catalog", key)
}

/// `snapshots/<ns>`: the directory of a catalog namespace's snapshots.
pub fn snapshot_prefix(namespace: &str) -> String {
    format!("snapshots/{namespace}")
}

/// `snapshots/<ns>/<seq:020>.json`: a namespace's state as of entry `seq`.
pub fn snapshot_key(namespace: &str, seq: u64) -> String {
    format!("{}/{seq:020}.json", snapshot_prefix(namespace))
}

/// The namespace and seq of a `snapshots/<ns>/<seq:020>.json` key.
pub fn parse_snapshot_key(key: &str) -> Option<(&str, u64)> {
    parse_seq_key("snapshots", key)
}

/// Checks a name used as one path segment (VM name, catalog namespace): 1-200 of
/// `A-Z a-z 0-9 - _ . : @`, and neither `.` nor `..`.
pub(crate) fn check_segment(what: &str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            what,
            format!("{name:?} (use 1-200 of A-Z a-z 0-9 - _ . : @)"),
        ))
    }
}

/// `<root>/<aa>/<64 hex>`.
fn content_key(root: &str, id: &[u8; 32]) -> String {
    let hex = hex::encode(id);
    format!("{root}/{}/{hex}", &hex[..2])
}

fn parse_content_key(root: &str, key: &str) -> Option<[u8; 32]> {
    let rest = key.strip_prefix(root)?.strip_prefix('/')?;
    let (aa, hex) = rest.split_once('/')?;
    let ok = aa.len() == 2
        && hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && hex.starts_with(aa);
    if !ok {
        return None;
    }
    let mut id = [0u8; 32];
    hex::decode_to_slice(hex, &mut id).ok()?;
    Some(id)
}

/// `<root>/<name>/<seq:020>.json`: exactly 20 digits, no more segments.
fn parse_seq_key<'a>(root: &str, key: &'a str) -> Option<(&'a str, u64)> {
    let rest = key.strip_prefix(root)?.strip_prefix('/')?;
    let (name, file) = rest.split_once('/')?;
    let digits = file.strip_suffix(".json")?;
    if name.is_empty() || digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, digits.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::path;

    #[test]
    fn exact_key_strings() {
        let id: ChunkId = std::array::from_fn(|i| i as u8 + 0xa0);
        let hex = hex::encode(id);
        assert_eq!(chunk_key(&id), format!("chunks/a0/{hex}"));
        assert_eq!(index_key(&id), format!("index/a0/{hex}"));
        assert_eq!(point_prefix("web"), "points/web");
        assert_eq!(point_key("web", 42), "points/web/00000000000000000042.json");
        assert_eq!(merged_prefix("web"), "merged/web");
        assert_eq!(merged_key("web", 7), "merged/web/00000000000000000007.json");
        assert_eq!(log_key("d1", "00ff"), "logs/d1/00ff.json");
        assert_eq!(reader_prefix("web"), "readers/web");
        assert_eq!(reader_key("web", "p1", "u"), "readers/web/p1/u");
        assert_eq!(catalog_prefix("jobs"), "catalog/jobs");
        assert_eq!(
            catalog_key("jobs", u64::MAX),
            "catalog/jobs/18446744073709551615.json"
        );
        assert_eq!(CONDEMNED_KEY, "gc/condemned.json");
        let blake = blake3::hash(b"page");
        assert_eq!(
            index_key(blake.as_bytes()),
            format!("index/{}/{}", &blake.to_hex()[..2], blake.to_hex())
        );
    }

    #[test]
    fn round_trips() {
        for id in [[0u8; 32], [0xff; 32], std::array::from_fn(|i| i as u8 * 7)] {
            assert_eq!(parse_chunk_key(&chunk_key(&id)), Some(id));
            assert_eq!(parse_index_key(&index_key(&id)), Some(id));
            // One kind of key is not the other.
            assert_eq!(parse_chunk_key(&index_key(&id)), None);
            assert_eq!(parse_index_key(&chunk_key(&id)), None);
        }
        for (vm, seq) in [("web", 1), ("db-01.prod@x:y", u64::MAX), ("a", 0)] {
            assert_eq!(parse_point_key(&point_key(vm, seq)), Some((vm, seq)));
            assert_eq!(vm_of_point_key(&point_key(vm, seq)), Some(vm));
            assert_eq!(parse_merged_key(&merged_key(vm, seq)), Some((vm, seq)));
            assert_eq!(parse_catalog_key(&catalog_key(vm, seq)), Some((vm, seq)));
            assert_eq!(parse_snapshot_key(&snapshot_key(vm, seq)), Some((vm, seq)));
            assert_eq!(parse_snapshot_key(&catalog_key(vm, seq)), None);
            assert_eq!(parse_point_key(&merged_key(vm, seq)), None);
            assert_eq!(parse_merged_key(&catalog_key(vm, seq)), None);
        }
        assert_eq!(
            parse_log_key(&log_key("d1", "0011223344556677")),
            Some(("d1", "0011223344556677"))
        );
        assert_eq!(
            parse_reader_key(&reader_key("web", "00000000000000000003", "u-1")),
            Some(("web", "00000000000000000003"))
        );
    }

    #[test]
    fn parsers_refuse_other_shapes() {
        assert_eq!(
            parse_point_key("points/vm/00000000000000000042.json"),
            Some(("vm", 42))
        );
        for bad in [
            "points/vm/42.json",
            "points/vm/0000000000000000004x.json",
            "points/vm/99999999999999999999.json",
            "points/vm/00000000000000000042.jsonx",
            "points/vm/sub/00000000000000000042.json",
            "points//00000000000000000042.json",
            "points/00000000000000000042.json",
            "xpoints/vm/00000000000000000042.json",
            "merged/vm/00000000000000000042.json",
            "",
        ] {
            assert_eq!(parse_point_key(bad), None, "{bad}");
        }
        assert_eq!(parse_merged_key("merged/vm/42.json"), None);
        assert_eq!(parse_catalog_key("catalog/jobs/1.json"), None);
        let hex = "ab".repeat(32);
        assert!(parse_index_key(&format!("index/ab/{hex}")).is_some());
        for bad in [
            "index/ab/../x".to_string(),
            format!("index/00/{}", "a".repeat(64)),
            format!("index/AB/{}", hex.to_uppercase()),
            format!("index/ab/{hex}0"),
            format!("index/ab/{}", &hex[..62]),
            format!("index/ab/{hex}/x"),
            format!("index/a/{hex}"),
            format!("chunks/ab/{hex}"),
            "chunks/00/xx".to_string(),
        ] {
            assert_eq!(parse_index_key(&bad), None, "{bad}");
        }
        assert_eq!(parse_log_key("logs/d1/.json"), None);
        assert_eq!(parse_log_key("logs/d1/x"), None);
        assert_eq!(parse_log_key("logs/x.json"), None);
        assert_eq!(parse_reader_key("readers/web"), None);
        assert_eq!(parse_reader_key("points/web/p/u"), None);
        assert_eq!(vm_of_point_key("merged/web/x"), None);
        // Any key under a VM's directory names the VM (as collection has always found them).
        assert_eq!(vm_of_point_key("points/web/junk"), Some("web"));
    }

    #[test]
    fn hostile_names() {
        for vm in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "a b",
            "é",
            &"a".repeat(201),
        ] {
            assert!(check_segment("vm name", vm).is_err(), "{vm:?}");
        }
        for vm in ["web", "db-01.prod", "x:y@z", "_", "...", &"a".repeat(200)] {
            assert!(check_segment("vm name", vm).is_ok(), "{vm:?}");
        }
        // A `..` that slips into any key is refused by the store before any request...
        for key in [
            point_key("..", 1),
            merged_key("../x", 1),
            log_key("..", "00"),
            log_key("d/../..", "00"),
            reader_key("..", "p", "u"),
            reader_key("web", "..", "u"),
            catalog_key("..", 1),
        ] {
            assert!(path(&key).is_err(), "{key}");
        }
        assert!(path(&log_key("", "00")).is_err());
        assert!(path("/points/web/00000000000000000001.json").is_err());
        // ...and a VM name with a `/` never parses back as itself.
        assert_eq!(parse_point_key(&point_key("a/b", 1)), None);
        assert_eq!(parse_merged_key(&merged_key("a/b", 1)), None);
        assert_ne!(vm_of_point_key(&point_key("a/b", 1)), Some("a/b"));
    }

    /// Where a hostile VM name is refused today: by every point and merged-map operation,
    /// before any request.
    #[tokio::test]
    async fn store_refuses_hostile_vm_names() {
        let store = crate::Store::from_url("memory://").unwrap();
        for vm in ["a/b", "..", "../x", ""] {
            let invalid = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Invalid { .. }));
            assert!(invalid(store.list_points(vm).await.map(drop)), "{vm:?}");
            assert!(invalid(store.latest_point(vm).await.map(drop)), "{vm:?}");
            assert!(invalid(store.get_point(vm, "1").await.map(drop)), "{vm:?}");
            assert!(invalid(store.merged_seqs(vm).await.map(drop)), "{vm:?}");
            assert!(invalid(store.get_merged(vm, 1).await.map(drop)), "{vm:?}");
            assert!(invalid(store.delete_merged(vm, 1).await), "{vm:?}");
        }
        assert!(
            store.list("").await.unwrap().is_empty(),
            "nothing was written"
        );
    }
}
