//! MS-HRL structures (FORMATS.md §3): header, metadata block header and entries. Byte order is
//! not stated by the spec; little-endian, as everything else Hyper-V writes.

use uuid::Uuid;

use crate::io::{le_u16, le_u32, le_u64, put_le_u16, put_le_u32, put_le_u64};

pub const HEADER_SIZE: usize = 4096;
pub const COOKIE: &[u8; 7] = b"msctlog";
pub const VERSION_2: u32 = 0x0002_0000;
pub const VERSION_1: u32 = 0x0001_0000;
pub const DEFAULT_METADATA_SIZE: u32 = 4096;
pub const BLOCK_HEADER: usize = 32;
pub const ENTRY_SIZE: usize = 32;
pub const OP_WRITE: u8 = 1;

/// `!(sum of bytes)` skipping the 4-byte checksum field (spec 2.6).
pub fn checksum(b: &[u8], field: usize) -> u32 {
    let mut sum = 0u32;
    for (i, x) in b.iter().enumerate() {
        if i < field || i >= field + 4 {
            sum = sum.wrapping_add(*x as u32);
        }
    }
    !sum
}

/// Byte-sum checksum of record data.
pub fn data_checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |s, &x| s.wrapping_add(x as u32))
}

fn guid(b: &[u8], off: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    Uuid::from_bytes_le(a)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HrlHeader {
    pub version: u32,
    pub timestamp: u32,
    pub creator_app: String,
    pub creator_version: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub checksum: u32,
    pub eol: u64,
    pub error_code: i32,
    pub metadata_size: u32,
    pub unique_id: Uuid,
    pub previous_unique_id: Uuid,
    pub last_modified: u32,
    pub total_metadata_entries: u64,
    pub file_type: u32,
    pub flags: u16,
    pub vhd2_data_write_guid: Uuid,
}

impl HrlHeader {
    /// Parses without validating (the reader validates and names what is wrong).
    pub fn parse(b: &[u8]) -> HrlHeader {
        let app: String = b[16..20]
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as char)
            .collect();
        HrlHeader {
            version: le_u32(b, 8),
            timestamp: le_u32(b, 12),
            creator_app: app,
            creator_version: le_u32(b, 20),
            original_size: le_u64(b, 24),
            current_size: le_u64(b, 32),
            checksum: le_u32(b, 40),
            eol: le_u64(b, 44),
            error_code: le_u32(b, 52) as i32,
            metadata_size: le_u32(b, 56),
            unique_id: guid(b, 60),
            previous_unique_id: guid(b, 76),
            last_modified: le_u32(b, 92),
            total_metadata_entries: le_u64(b, 96),
            file_type: le_u32(b, 104),
            flags: le_u16(b, 108),
            vhd2_data_write_guid: guid(b, 110),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..7].copy_from_slice(COOKIE);
        put_le_u32(&mut b, 8, self.version);
        put_le_u32(&mut b, 12, self.timestamp);
        for (i, c) in self.creator_app.bytes().take(4).enumerate() {
            b[16 + i] = c;
        }
        put_le_u32(&mut b, 20, self.creator_version);
        put_le_u64(&mut b, 24, self.original_size);
        put_le_u64(&mut b, 32, self.current_size);
        put_le_u64(&mut b, 44, self.eol);
        put_le_u32(&mut b, 52, self.error_code as u32);
        put_le_u32(&mut b, 56, self.metadata_size);
        b[60..76].copy_from_slice(&self.unique_id.to_bytes_le());
        b[76..92].copy_from_slice(&self.previous_unique_id.to_bytes_le());
        put_le_u32(&mut b, 92, self.last_modified);
        put_le_u64(&mut b, 96, self.total_metadata_entries);
        put_le_u32(&mut b, 104, self.file_type);
        put_le_u16(&mut b, 108, self.flags);
        b[110..126].copy_from_slice(&self.vhd2_data_write_guid.to_bytes_le());
        let c = checksum(&b, 40);
        put_le_u32(&mut b, 40, c);
        b
    }
}

/// One metadata entry: a write of `length` bytes at virtual offset `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EntryMeta {
    pub offset: u64,
    pub length: u32,
    pub timestamp: u32,
    pub operation: u8,
    pub data_checksum: u32,
}

impl EntryMeta {
    pub fn parse(b: &[u8]) -> (EntryMeta, bool) {
        let e = EntryMeta {
            offset: le_u64(b, 0),
            length: le_u32(b, 12),
            timestamp: le_u32(b, 16),
            operation: b[20],
            data_checksum: le_u32(b, 21),
        };
        (e, checksum(&b[..ENTRY_SIZE], 8) == le_u32(b, 8))
    }

    pub fn write(&self, b: &mut [u8]) {
        put_le_u64(b, 0, self.offset);
        put_le_u32(b, 12, self.length);
        put_le_u32(b, 16, self.timestamp);
        b[20] = self.operation;
        put_le_u32(b, 21, self.data_checksum);
        let c = checksum(&b[..ENTRY_SIZE], 8);
        put_le_u32(b, 8, c);
    }
}

/// A metadata block: back distance to the previous block and its entries.
pub fn block_to_bytes(size: u32, prev_distance: u64, entries: &[EntryMeta]) -> Vec<u8> {
    let mut b = vec![0u8; size as usize];
    put_le_u64(&mut b, 0, prev_distance);
    put_le_u32(&mut b, 8, entries.len() as u32);
    let c = checksum(&b[..BLOCK_HEADER], 12);
    put_le_u32(&mut b, 12, c);
    for (i, e) in entries.iter().enumerate() {
        let o = BLOCK_HEADER + i * ENTRY_SIZE;
        e.write(&mut b[o..o + ENTRY_SIZE]);
    }
    b
}

pub fn slots(metadata_size: u32) -> usize {
    (metadata_size as usize).saturating_sub(BLOCK_HEADER) / ENTRY_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's section 3 example: metadata header (324096, 58) has checksum 4294966991.
    #[test]
    fn spec_example_block_checksum() {
        let mut b = vec![0u8; 32];
        put_le_u64(&mut b, 0, 324_096);
        put_le_u32(&mut b, 8, 58);
        assert_eq!(checksum(&b, 12), 4_294_966_991);
    }
}
