//! Object layout: chunks, index pages, manifests, catalog log, encryption.
//!
//! Everything durable in Ferry lives in object storage and is written so that a crash at any
//! instant leaves either the old or the new state: objects are immutable, content-addressed
//! where possible, and anything that changes is a new sequence-numbered key written with
//! put-if-absent (`PutMode::Create`). `PutMode::Update` is never used because the local
//! filesystem backend does not support it.
//!
//! | key | what |
//! |---|---|
//! | `chunks/<aa>/<64 hex>` | sealed block ([`seal_chunk`]) |
//! | `index/<aa>/<64 hex>` | block-map index page ([`Store::write_block_map`]) |
//! | `points/<vm>/<seq:020>.json` | recovery point manifest ([`Store::commit_point`]) |
//! | `merged/<vm>/<seq:020>.json` | a point's block maps with its logs applied ([`Store::put_merged`]) |
//! | `catalog/<ns>/<seq:020>.json` | transaction log entry ([`Catalog::append`]) |

mod blockmap;
mod catalog;
mod chunk;
mod error;
mod merged;
mod points;
mod store;
mod unreliable;

pub use blockmap::{BlockMap, PAGE_BLOCKS, PageRef};
pub use catalog::Catalog;
pub use chunk::{
    CHUNK_HEADER_LEN, ChunkId, MAX_CHUNK_LEN, VaultKey, chunk_hex, chunk_id, is_zero, open_chunk,
    parse_chunk_hex, seal_chunk,
};
pub use error::StoreError;
pub use merged::{MergedDisk, MergedManifest, merged_key};
pub use points::{DiskManifest, PointManifest};
pub use store::{Store, chunk_key};
pub use unreliable::UnreliableStore;

/// Re-exported so callers can build stores for [`Store::from_object_store`] without naming
/// the exact `object_store` version themselves.
pub use object_store;
