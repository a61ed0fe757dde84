//! Block maps stored as content-addressed index pages.
//!
//! A disk's block map (block index -> chunk id; absent = zero) is cut into pages of
//! [`PAGE_BLOCKS`] blocks. Each non-empty page is serialised, named by the BLAKE3 of its bytes
//! and written once with put-if-absent, so a small delta rewrites only the pages it touches and
//! identical pages (across points, disks or positions) are stored once. Empty pages are not
//! stored at all.
//!
//! Page bytes (little-endian): `"FIX1"`, version u8 (1), three zero bytes, entry count u32, then
//! per entry the block's offset within the page (u32, strictly ascending, < PAGE_BLOCKS) and
//! the 32-byte chunk id. The page number is deliberately not part of the content; it lives in
//! the [`PageRef`].

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::layout::{index_key, parse_index_key};
use crate::{ChunkId, Store, StoreError};

/// Blocks per index page.
pub const PAGE_BLOCKS: u64 = 4096;

const PAGE_MAGIC: &[u8; 4] = b"FIX1";
const PAGE_VERSION: u8 = 1;
const PAGE_HEADER: usize = 12;
const ENTRY_LEN: usize = 4 + 32;
const PARALLEL: usize = 8;

/// A disk's block map: block index -> chunk. Blocks not present are zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockMap {
    pub entries: BTreeMap<u64, ChunkId>,
}

/// One stored index page: which page of the map it is and the key of its content.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRef {
    pub page: u64,
    /// `index/<aa>/<64 hex>`, the BLAKE3 of the page bytes.
    pub key: String,
}

/// The key of a page's content: [`index_key`] of its BLAKE3.
fn page_key(bytes: &[u8]) -> String {
    index_key(blake3::hash(bytes).as_bytes())
}

fn encode_page(page: u64, entries: &[(u64, ChunkId)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGE_HEADER + entries.len() * ENTRY_LEN);
    out.extend_from_slice(PAGE_MAGIC);
    out.extend_from_slice(&[PAGE_VERSION, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (block, id) in entries {
        // block / PAGE_BLOCKS == page, so the offset fits in u32.
        out.extend_from_slice(&((block - page * PAGE_BLOCKS) as u32).to_le_bytes());
        out.extend_from_slice(id);
    }
    out
}

fn decode_page(r: &PageRef, bytes: &[u8]) -> Result<Vec<(u64, ChunkId)>, StoreError> {
    let what = || format!("index page {} (page {})", r.key, r.page);
    if page_key(bytes) != r.key {
        return Err(StoreError::corrupt(
            what(),
            "content does not hash to its key",
        ));
    }
    if bytes.len() < PAGE_HEADER || &bytes[..4] != PAGE_MAGIC {
        return Err(StoreError::corrupt(what(), "bad magic or truncated header"));
    }
    if bytes[4] != PAGE_VERSION || bytes[5..8] != [0, 0, 0] {
        return Err(StoreError::corrupt(
            what(),
            format!("unsupported page version {}", bytes[4]),
        ));
    }
    let count = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let body = &bytes[PAGE_HEADER..];
    if count == 0 || count as u64 > PAGE_BLOCKS || body.len() != count * ENTRY_LEN {
        return Err(StoreError::corrupt(
            what(),
            format!("{count} entries in {} body bytes", body.len()),
        ));
    }
    let base = r.page * PAGE_BLOCKS;
    let mut out = Vec::with_capacity(count);
    let mut last: Option<u32> = None;
    for e in body.chunks_exact(ENTRY_LEN) {
        let off = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        if u64::from(off) >= PAGE_BLOCKS || last.is_some_and(|l| off <= l) {
            return Err(StoreError::corrupt(
                what(),
                format!("entry offset {off} out of range or out of order"),
            ));
        }
        last = Some(off);
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[4..]);
        out.push((base + u64::from(off), id));
    }
    Ok(out)
}

fn check_page_key(key: &str) -> bool {
    parse_index_key(key).is_some()
}

impl Store {
    /// Writes the map's index pages and returns their references (ascending by page). Pages
    /// whose content equals the `previous` page at the same position are reused without any
    /// request; others are written with put-if-absent, so a page that exists anywhere is shared.
    pub async fn write_block_map(
        &self,
        map: &BlockMap,
        previous: &[PageRef],
    ) -> Result<Vec<PageRef>, StoreError> {
        if map
            .entries
            .keys()
            .next_back()
            .is_some_and(|&b| b > u64::MAX - PAGE_BLOCKS)
        {
            return Err(StoreError::invalid("block map", "block index out of range"));
        }
        let prev: BTreeMap<u64, &str> = previous.iter().map(|p| (p.page, p.key.as_str())).collect();
        let mut refs: Vec<PageRef> = Vec::new();
        let mut writes: Vec<(String, Vec<u8>)> = Vec::new();
        let mut flush = |page: u64, entries: &mut Vec<(u64, ChunkId)>| {
            let bytes = encode_page(page, entries);
            entries.clear();
            let key = page_key(&bytes);
            if prev.get(&page) != Some(&key.as_str()) {
                writes.push((key.clone(), bytes));
            }
            refs.push(PageRef { page, key });
        };
        let mut current: Vec<(u64, ChunkId)> = Vec::new();
        let mut current_page = None;
        for (&block, id) in &map.entries {
            let page = block / PAGE_BLOCKS;
            if let Some(p) = current_page
                && p != page
            {
                flush(p, &mut current);
            }
            current_page = Some(page);
            current.push((block, *id));
        }
        if let Some(p) = current_page {
            flush(p, &mut current);
        }
        let changed = writes.len();
        let written =
            futures::stream::iter(writes.into_iter().map(|(key, bytes)| async move {
                self.put_if_absent(&key, Bytes::from(bytes)).await
            }))
            .buffer_unordered(PARALLEL)
            .try_fold(0usize, |n, new| async move { Ok(n + usize::from(new)) })
            .await?;
        debug!(
            pages = refs.len(),
            changed,
            written,
            entries = map.entries.len(),
            "block map written"
        );
        Ok(refs)
    }

    /// Reads and validates index pages (hash, format, page order) into a block map.
    pub async fn read_block_map(&self, pages: &[PageRef]) -> Result<BlockMap, StoreError> {
        for (i, r) in pages.iter().enumerate() {
            if !check_page_key(&r.key) {
                return Err(StoreError::invalid("page key", format!("{:?}", r.key)));
            }
            if r.page > u64::MAX / PAGE_BLOCKS - 1 {
                return Err(StoreError::invalid("page number", r.page.to_string()));
            }
            if i > 0 && pages[i - 1].page >= r.page {
                return Err(StoreError::invalid(
                    "page list",
                    format!("page {} follows page {}", r.page, pages[i - 1].page),
                ));
            }
        }
        let decoded: Vec<Vec<(u64, ChunkId)>> =
            futures::stream::iter(pages.iter().map(|r| async move {
                let bytes = self
                    .get(&r.key)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        what: format!("index page {} (page {})", r.key, r.page),
                    })?;
                decode_page(r, &bytes)
            }))
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        let mut map = BlockMap::default();
        for entries in decoded {
            map.entries.extend(entries);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_round_trip_and_validation() {
        let entries = vec![(4096 * 3 + 1, [1u8; 32]), (4096 * 3 + 4095, [2u8; 32])];
        let bytes = encode_page(3, &entries);
        let r = PageRef {
            page: 3,
            key: page_key(&bytes),
        };
        assert!(check_page_key(&r.key));
        assert_eq!(decode_page(&r, &bytes).unwrap(), entries);
        let mut bad = bytes.clone();
        bad[PAGE_HEADER] ^= 1;
        assert!(decode_page(&r, &bad).is_err());
        assert!(decode_page(&r, &bytes[..5]).is_err());
        assert!(!check_page_key("index/ab/../x"));
        assert!(!check_page_key(&format!("index/00/{}", "a".repeat(64))));
    }

    #[test]
    fn garbage_pages_never_panic() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = encode_page(0, &[(1, [3u8; 32]), (2, [4u8; 32])]);
        for round in 0..2000 {
            let mut bytes = if round % 2 == 0 {
                valid.clone()
            } else {
                (0..(next() % 200) as usize).map(|_| next() as u8).collect()
            };
            if !bytes.is_empty() {
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
            }
            let r = PageRef {
                page: next() % 1000,
                key: page_key(&bytes),
            };
            let _ = decode_page(&r, &bytes);
        }
    }
}
