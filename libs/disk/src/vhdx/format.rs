//! VHDX on-disk structures (FORMATS.md §2): headers, region table, metadata table and items,
//! parent locator. Little-endian; GUIDs in Windows byte order; CRC-32C checksums.

use std::path::Path;

use uuid::Uuid;

use crate::DiskError;
use crate::io::{le_u16, le_u32, le_u64, put_le_u16, put_le_u32, put_le_u64};

pub const MIB: u64 = 1 << 20;
pub const KIB64: u64 = 64 << 10;
pub const HEADER1: u64 = 64 << 10;
pub const HEADER2: u64 = 128 << 10;
pub const REGION1: u64 = 192 << 10;
pub const REGION2: u64 = 256 << 10;
pub const HEADER_SIZE: usize = 4096;
pub const REGION_SIZE: usize = 64 << 10;
pub const MAX_SIZE: u64 = 64 << 40;
pub const SB_SECTORS: u64 = 1 << 23;

pub const BAT_GUID: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
pub const METADATA_GUID: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);
pub const FILE_PARAMS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub const VIRTUAL_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub const DISK_ID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub const LOGICAL_SECTOR: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub const PHYSICAL_SECTOR: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);
pub const VHDX_LOCATOR_TYPE: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

pub const ST_NOT_PRESENT: u64 = 0;
pub const ST_UNDEFINED: u64 = 1;
pub const ST_ZERO: u64 = 2;
pub const ST_UNMAPPED: u64 = 3;
pub const ST_UNMAPPED_V095: u64 = 5;
pub const ST_FULLY_PRESENT: u64 = 6;
pub const ST_PARTIALLY_PRESENT: u64 = 7;
pub const OFFSET_MASK: u64 = 0xFFFF_FFFF_FFF0_0000;

pub fn guid_at(b: &[u8], off: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    Uuid::from_bytes_le(a)
}

pub fn put_guid(b: &mut [u8], off: usize, g: &Uuid) {
    b[off..off + 16].copy_from_slice(&g.to_bytes_le());
}

/// CRC-32C of `buf` with the 4-byte checksum field at `field` counted as zero.
pub fn crc(buf: &[u8], field: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..field]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[field + 4..])
}

pub fn seal(buf: &mut [u8], field: usize) {
    let c = crc(buf, field);
    put_le_u32(buf, field, c);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// `None` unless signature, checksum and version are right (what qemu checks).
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || &b[0..4] != b"head" || crc(&b[..HEADER_SIZE], 4) != le_u32(b, 4)
        {
            return None;
        }
        let h = Header {
            seq: le_u64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le_u16(b, 64),
            version: le_u16(b, 66),
            log_length: le_u32(b, 68),
            log_offset: le_u64(b, 72),
        };
        (h.version == 1).then_some(h)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head");
        put_le_u64(&mut b, 8, self.seq);
        put_guid(&mut b, 16, &self.file_write_guid);
        put_guid(&mut b, 32, &self.data_write_guid);
        put_guid(&mut b, 48, &self.log_guid);
        put_le_u16(&mut b, 64, self.log_version);
        put_le_u16(&mut b, 66, self.version);
        put_le_u32(&mut b, 68, self.log_length);
        put_le_u64(&mut b, 72, self.log_offset);
        seal(&mut b, 4);
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub guid: Uuid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

pub fn parse_regions(b: &[u8], path: &Path, at: u64) -> Result<Vec<Region>, DiskError> {
    if &b[0..4] != b"regi" {
        return Err(DiskError::corrupt(
            path,
            "vhdx region table",
            at,
            "missing regi signature",
        ));
    }
    let stored = le_u32(b, 4);
    let computed = crc(&b[..REGION_SIZE], 4);
    if stored != computed {
        return Err(DiskError::Checksum {
            path: path.to_path_buf(),
            structure: "vhdx region table",
            offset: at,
            stored,
            computed,
        });
    }
    let count = le_u32(b, 8);
    if count > 2047 {
        return Err(DiskError::corrupt(
            path,
            "vhdx region table entry count",
            at + 8,
            format!("{count} entries (at most 2047)"),
        ));
    }
    Ok((0..count as usize)
        .map(|i| {
            let o = 16 + i * 32;
            Region {
                guid: guid_at(b, o),
                offset: le_u64(b, o + 16),
                length: le_u32(b, o + 24),
                required: le_u32(b, o + 28) & 1 != 0,
            }
        })
        .collect())
}

pub fn regions_to_bytes(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_SIZE];
    b[0..4].copy_from_slice(b"regi");
    put_le_u32(&mut b, 8, regions.len() as u32);
    for (i, r) in regions.iter().enumerate() {
        let o = 16 + i * 32;
        put_guid(&mut b, o, &r.guid);
        put_le_u64(&mut b, o + 16, r.offset);
        put_le_u32(&mut b, o + 24, r.length);
        put_le_u32(&mut b, o + 28, r.required as u32);
    }
    seal(&mut b, 4);
    b
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaEntry {
    pub id: Uuid,
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub is_virtual_disk: bool,
    pub is_required: bool,
}

pub fn parse_meta_table(b: &[u8], path: &Path, at: u64) -> Result<Vec<MetaEntry>, DiskError> {
    if &b[0..8] != b"metadata" {
        return Err(DiskError::corrupt(
            path,
            "vhdx metadata table",
            at,
            "missing metadata signature",
        ));
    }
    let count = le_u16(b, 10);
    if count > 2047 {
        return Err(DiskError::corrupt(
            path,
            "vhdx metadata table entry count",
            at + 10,
            format!("{count} entries (at most 2047)"),
        ));
    }
    Ok((0..count as usize)
        .map(|i| {
            let o = 32 + i * 32;
            let flags = le_u32(b, o + 24);
            MetaEntry {
                id: guid_at(b, o),
                offset: le_u32(b, o + 16),
                length: le_u32(b, o + 20),
                is_user: flags & 1 != 0,
                is_virtual_disk: flags & 2 != 0,
                is_required: flags & 4 != 0,
            }
        })
        .collect())
}

pub fn meta_table_to_bytes(entries: &[MetaEntry]) -> Vec<u8> {
    let mut b = vec![0u8; KIB64 as usize];
    b[0..8].copy_from_slice(b"metadata");
    put_le_u16(&mut b, 10, entries.len() as u16);
    for (i, e) in entries.iter().enumerate() {
        let o = 32 + i * 32;
        put_guid(&mut b, o, &e.id);
        put_le_u32(&mut b, o + 16, e.offset);
        put_le_u32(&mut b, o + 20, e.length);
        let flags =
            e.is_user as u32 | (e.is_virtual_disk as u32) << 1 | (e.is_required as u32) << 2;
        put_le_u32(&mut b, o + 24, flags);
    }
    b
}

fn utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// Parent locator key/value pairs (FORMATS §2.4).
pub fn parse_parent_locator(
    b: &[u8],
    path: &Path,
    at: u64,
) -> Result<Vec<(String, String)>, DiskError> {
    let bad = |reason: String| DiskError::corrupt(path, "vhdx parent locator", at, reason);
    if b.len() < 20 {
        return Err(bad(format!("{} bytes is too short", b.len())));
    }
    if guid_at(b, 0) != VHDX_LOCATOR_TYPE {
        return Err(DiskError::unsupported(
            path,
            "vhdx parent locator type",
            at,
            guid_at(b, 0).to_string(),
        ));
    }
    let count = le_u16(b, 18) as usize;
    if 20 + count * 12 > b.len() {
        return Err(bad(format!(
            "{count} entries do not fit in {} bytes",
            b.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let o = 20 + i * 12;
        let (ko, vo) = (le_u32(b, o) as usize, le_u32(b, o + 4) as usize);
        let (kl, vl) = (le_u16(b, o + 8) as usize, le_u16(b, o + 10) as usize);
        let key = b
            .get(ko..ko + kl)
            .ok_or_else(|| bad(format!("entry {i} key outside the item")))?;
        let val = b
            .get(vo..vo + vl)
            .ok_or_else(|| bad(format!("entry {i} value outside the item")))?;
        out.push((utf16le(key), utf16le(val)));
    }
    Ok(out)
}

pub fn parent_locator_to_bytes(pairs: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + pairs.len() * 12];
    put_guid(&mut b, 0, &VHDX_LOCATOR_TYPE);
    put_le_u16(&mut b, 18, pairs.len() as u16);
    for (i, (k, v)) in pairs.iter().enumerate() {
        let kb: Vec<u8> = k.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
        let vb: Vec<u8> = v.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
        let ko = b.len();
        b.extend_from_slice(&kb);
        let vo = b.len();
        b.extend_from_slice(&vb);
        let o = 20 + i * 12;
        put_le_u32(&mut b, o, ko as u32);
        put_le_u32(&mut b, o + 4, vo as u32);
        put_le_u16(&mut b, o + 8, kb.len() as u16);
        put_le_u16(&mut b, o + 10, vb.len() as u16);
    }
    b
}

/// Payload blocks per sector-bitmap block (FORMATS §2.5).
pub fn chunk_ratio(logical_sector: u32, block_size: u32) -> u64 {
    (SB_SECTORS * logical_sector as u64) / block_size as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn guid_layout() {
        let mut b = [0u8; 16];
        put_guid(&mut b, 0, &BAT_GUID);
        assert_eq!(
            b,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            seq: 7,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b), Some(h));
        let mut bad = b.clone();
        bad[200] = 1;
        assert_eq!(Header::parse(&bad), None);
    }
}
