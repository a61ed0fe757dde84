//! Object layout: chunks, index pages, manifests, catalog log, encryption.
//!
//! Everything durable in Ferry lives in object storage and is written so that a crash at any
//! instant leaves either the old or the new state: objects are immutable, content-addressed
//! where possible, and anything that changes is a new sequence-numbered key written with
//! put-if-absent (`PutMode::Create`). `PutMode::Update` is never used because the local
//! filesystem backend does not support it.
//!
//! Every object key is built and parsed by [`layout`] (the table of keys is there), and by no
//! other crate.

mod audit;
pub mod backend;
mod blockmap;
mod catalog;
mod chunk;
mod error;
mod faults;
pub mod layout;
mod merged;
mod points;
mod prepare;
mod quarantine;
mod scrub;
mod snapshot;
mod store;
mod unreliable;

pub use audit::{AUDIT_NAMESPACE, AuditLog, AuditVerification, AuditWriter};
pub use blockmap::{BlockMap, PAGE_BLOCKS, PageRef};
pub use catalog::Catalog;
pub use chunk::{
    CHUNK_HEADER_LEN, ChunkId, MAX_CHUNK_LEN, VaultKey, WRAPPED_KEY_LEN, chunk_hex, chunk_id,
    is_zero, open_chunk, parse_chunk_hex, seal_chunk, sealed_key_id,
};
pub use error::StoreError;
pub use faults::{FaultPlan, injected_faults};
pub use layout::{chunk_key, merged_key};
pub use merged::{MergedDisk, MergedManifest};
pub use points::{DiskManifest, PointManifest};
pub use scrub::ScrubReport;
pub use store::Store;
pub use unreliable::UnreliableStore;

/// Re-exported so callers can build stores for [`Store::from_object_store`] without naming
/// the exact `object_store` version themselves.
pub use object_store;
