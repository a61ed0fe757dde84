//! Writing an MS-HRL log: header (EOL 0 while open), an empty first metadata block, then per
//! batch the data followed by its metadata block; closing sets EOLLocation (FORMATS §3.6).

use std::path::Path;

use uuid::Uuid;

use super::format::*;
use crate::DiskError;
use crate::io::DiskFile;

/// Largest single record; longer writes are split (DataLength is a u32).
const MAX_RECORD: usize = 1 << 30;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HrlOptions {
    /// UniqueId of the previous log in the chain (nil for the first).
    pub previous_unique_id: Uuid,
    /// DataWriteGuid of the tracked VHDX (bytes 32..48 of its current header), if any.
    pub vhd2_data_write_guid: Uuid,
    /// Metadata block size; 0 means the default 4096. Must be a multiple of 512.
    pub metadata_size: u32,
}

/// Appends write records to a new `.hrl` file.
pub struct HrlWriter {
    f: DiskFile,
    header: HrlHeader,
    /// Offset of the last metadata block written.
    last_block: u64,
    /// Where the next data byte goes.
    pos: u64,
    pending: Vec<EntryMeta>,
}

fn now() -> u32 {
    crate::vhd::now_vhd()
}

impl HrlWriter {
    pub fn create(path: &Path, opts: &HrlOptions) -> Result<Self, DiskError> {
        let ms = if opts.metadata_size == 0 {
            DEFAULT_METADATA_SIZE
        } else {
            opts.metadata_size
        };
        if !ms.is_multiple_of(512) || slots(ms) == 0 || ms > 1 << 20 {
            return Err(DiskError::InvalidArgument(format!(
                "hrl metadata size {ms} must be a multiple of 512 between 512 and 1 MiB"
            )));
        }
        let mut f = DiskFile::create_new(path)?;
        let t = now();
        let header = HrlHeader {
            version: VERSION_2,
            timestamp: t,
            creator_app: "fery".into(),
            creator_version: 0x0001_0000,
            original_size: 0,
            current_size: 0,
            checksum: 0,
            eol: 0,
            error_code: 0,
            metadata_size: ms,
            unique_id: Uuid::new_v4(),
            previous_unique_id: opts.previous_unique_id,
            last_modified: t,
            total_metadata_entries: 0,
            file_type: 0,
            flags: 0,
            vhd2_data_write_guid: opts.vhd2_data_write_guid,
        };
        f.write_all_at(0, &header.to_bytes(), "hrl header")?;
        // An empty first block, as in the spec's example, anchors the chain of blocks.
        let first = HEADER_SIZE as u64;
        f.write_all_at(first, &block_to_bytes(ms, 0, &[]), "hrl metadata block")?;
        f.sync()?;
        Ok(HrlWriter {
            f,
            header,
            last_block: first,
            pos: first + ms as u64,
            pending: Vec::new(),
        })
    }

    pub fn unique_id(&self) -> Uuid {
        self.header.unique_id
    }

    /// Appends a write of `data` at virtual offset `offset`. It becomes durable with the
    /// metadata block that `commit` (or a full block) writes after it.
    pub fn record(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        for (i, chunk) in data.chunks(MAX_RECORD).enumerate() {
            let off = offset + (i * MAX_RECORD) as u64;
            self.f.write_all_at(self.pos, chunk, "hrl record data")?;
            self.pos += chunk.len() as u64;
            self.pending.push(EntryMeta {
                offset: off,
                length: chunk.len() as u32,
                timestamp: now(),
                operation: OP_WRITE,
                data_checksum: data_checksum(chunk),
            });
            if self.pending.len() == slots(self.header.metadata_size) {
                self.commit()?;
            }
        }
        Ok(())
    }

    /// Writes the metadata block for the pending records and flushes; returns the file offset
    /// up to which the log is now valid.
    pub fn commit(&mut self) -> Result<u64, DiskError> {
        if self.pending.is_empty() {
            return Ok(self.pos);
        }
        let at = self.pos;
        let block = block_to_bytes(
            self.header.metadata_size,
            at - self.last_block,
            &self.pending,
        );
        self.f.write_all_at(at, &block, "hrl metadata block")?;
        self.f.sync()?;
        self.header.total_metadata_entries += self.pending.len() as u64;
        self.pending.clear();
        self.last_block = at;
        self.pos = at + self.header.metadata_size as u64;
        Ok(self.pos)
    }

    /// Commits pending records, sets EOLLocation and the sizes, and flushes.
    pub fn close(mut self) -> Result<HrlHeader, DiskError> {
        self.commit()?;
        let t = now();
        self.header.eol = self.pos;
        self.header.current_size = self.pos;
        self.header.last_modified = t;
        let bytes = self.header.to_bytes();
        self.f.write_all_at(0, &bytes, "hrl header")?;
        self.f.sync()?;
        self.header.checksum = checksum(&bytes, 40);
        Ok(self.header)
    }
}
