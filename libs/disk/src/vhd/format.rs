//! VHD on-disk structures (FORMATS.md §1): footer, dynamic header, parent locators, CHS.
//! All integers are big-endian.

use std::path::Path;

use crate::DiskError;
use crate::io::{be_u32, be_u64, put_be_u32, put_be_u64};

pub const FOOTER_SIZE: usize = 512;
pub const HEADER_SIZE: usize = 1024;
pub const SECTOR: u64 = 512;
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Largest VHD the format allows: 0xFF000000 sectors (2040 GiB).
pub const MAX_SIZE: u64 = 0xFF00_0000 * SECTOR;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

pub const TYPE_FIXED: u32 = 2;
pub const TYPE_DYNAMIC: u32 = 3;
pub const TYPE_DIFFERENCING: u32 = 4;

/// `!(wrapping sum of bytes)` with the checksum field counted as zero (§1.3).
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let mut sum = 0u32;
    for (i, b) in buf.iter().enumerate() {
        if i < field || i >= field + 4 {
            sum = sum.wrapping_add(*b as u32);
        }
    }
    !sum
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub disk_type: u32,
    pub checksum: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

impl Footer {
    /// Parses a footer; `Ok(None)` when the cookie is absent. A bad checksum is returned in the
    /// second field so the caller can warn (reads) instead of refusing.
    pub fn parse(b: &[u8; FOOTER_SIZE]) -> Option<(Footer, bool)> {
        if &b[0..8] != b"conectix" {
            return None;
        }
        let mut app = [0u8; 4];
        app.copy_from_slice(&b[28..32]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[68..84]);
        let geo = be_u32(b, 56);
        let f = Footer {
            features: be_u32(b, 8),
            version: be_u32(b, 12),
            data_offset: be_u64(b, 16),
            timestamp: be_u32(b, 24),
            creator_app: app,
            creator_version: be_u32(b, 32),
            creator_os: be_u32(b, 36),
            original_size: be_u64(b, 40),
            current_size: be_u64(b, 48),
            cylinders: (geo >> 16) as u16,
            heads: (geo >> 8) as u8,
            sectors: geo as u8,
            disk_type: be_u32(b, 60),
            checksum: be_u32(b, 64),
            unique_id: id,
            saved_state: b[84],
        };
        let ok = checksum(b, 64) == f.checksum;
        Some((f, ok))
    }

    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(b"conectix");
        put_be_u32(&mut b, 8, self.features);
        put_be_u32(&mut b, 12, self.version);
        put_be_u64(&mut b, 16, self.data_offset);
        put_be_u32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put_be_u32(&mut b, 32, self.creator_version);
        put_be_u32(&mut b, 36, self.creator_os);
        put_be_u64(&mut b, 40, self.original_size);
        put_be_u64(&mut b, 48, self.current_size);
        let geo =
            ((self.cylinders as u32) << 16) | ((self.heads as u32) << 8) | self.sectors as u32;
        put_be_u32(&mut b, 56, geo);
        put_be_u32(&mut b, 60, self.disk_type);
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let sum = checksum(&b, 64);
        put_be_u32(&mut b, 64, sum);
        b
    }

    /// A new footer for a disk of `size` bytes. CreatorApp `qem2` is the marker qemu reads as
    /// "CurrentSize is the size" (force_size); Windows always uses CurrentSize, so both agree.
    pub fn new(size: u64, disk_type: u32, data_offset: u64) -> Footer {
        let (c, h, s) = chs(size / SECTOR);
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset,
            timestamp: now_vhd(),
            creator_app: *b"qem2",
            creator_version: 0x0005_0003,
            creator_os: 0x5769_326B,
            original_size: size,
            current_size: size,
            cylinders: c,
            heads: h,
            sectors: s,
            disk_type,
            checksum: 0,
            unique_id: *uuid::Uuid::new_v4().as_bytes(),
            saved_state: 0,
        }
    }
}

pub fn now_vhd() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(VHD_EPOCH) as u32)
        .unwrap_or(0)
}

/// CHS geometry for a sector count (spec appendix; qemu `calculate_geometry`).
pub fn chs(total_sectors: u64) -> (u16, u8, u8) {
    let t = total_sectors.min(65535 * 16 * 255);
    let (spt, heads, ch);
    if t >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        ch = t / spt;
    } else {
        let mut s = 17u64;
        let mut c = t / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = t / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = t / s;
        }
        spt = s;
        heads = h;
        ch = c;
    }
    ((ch / heads) as u16, heads as u8, spt as u8)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locator {
    pub code: u32,
    pub data_space: u32,
    pub data_len: u32,
    pub data_offset: u64,
}

pub const LOC_W2RU: u32 = 0x5732_7275;
pub const LOC_W2KU: u32 = 0x5732_6B75;
pub const LOC_MACX: u32 = 0x4D61_6358;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub checksum: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    pub parent_name: String,
    pub locators: [Locator; 8],
}

impl DynHeader {
    pub fn parse(
        b: &[u8; HEADER_SIZE],
        path: &Path,
        at: u64,
    ) -> Result<(DynHeader, bool), DiskError> {
        if &b[0..8] != b"cxsparse" {
            return Err(DiskError::corrupt(
                path,
                "vhd dynamic header",
                at,
                "missing cxsparse cookie",
            ));
        }
        let mut pid = [0u8; 16];
        pid.copy_from_slice(&b[40..56]);
        let name_units: Vec<u16> = b[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let mut locators: [Locator; 8] = Default::default();
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + i * 24;
            *l = Locator {
                code: be_u32(b, o),
                data_space: be_u32(b, o + 4),
                data_len: be_u32(b, o + 8),
                data_offset: be_u64(b, o + 16),
            };
        }
        let h = DynHeader {
            table_offset: be_u64(b, 16),
            max_table_entries: be_u32(b, 28),
            block_size: be_u32(b, 32),
            checksum: be_u32(b, 36),
            parent_unique_id: pid,
            parent_timestamp: be_u32(b, 56),
            parent_name: String::from_utf16_lossy(&name_units),
            locators,
        };
        let ok = checksum(b, 36) == h.checksum;
        Ok((h, ok))
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(b"cxsparse");
        put_be_u64(&mut b, 8, u64::MAX);
        put_be_u64(&mut b, 16, self.table_offset);
        put_be_u32(&mut b, 24, 0x0001_0000);
        put_be_u32(&mut b, 28, self.max_table_entries);
        put_be_u32(&mut b, 32, self.block_size);
        b[40..56].copy_from_slice(&self.parent_unique_id);
        put_be_u32(&mut b, 56, self.parent_timestamp);
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + i * 2..66 + i * 2].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + i * 24;
            put_be_u32(&mut b, o, l.code);
            put_be_u32(&mut b, o + 4, l.data_space);
            put_be_u32(&mut b, o + 8, l.data_len);
            put_be_u64(&mut b, o + 16, l.data_offset);
        }
        let sum = checksum(&b, 36);
        put_be_u32(&mut b, 36, sum);
        b
    }
}

/// Bytes of the per-block sector bitmap, padded to a sector (§1.5).
pub fn bitmap_size(block_size: u32) -> u64 {
    (block_size as u64 / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_qemu_rounding() {
        // qemu-img create -f vpc 1G gives 1073995776 bytes: 2080 x 16 x 63.
        let (c, h, s) = chs(1 << 21);
        assert_eq!((c, h, s), (2080, 16, 63));
        // CHS rounds down; qemu then grows the size by one cylinder to cover 1 GiB.
        assert_eq!((c as u64 + 1) * h as u64 * s as u64 * 512, 1_073_995_776);
    }

    #[test]
    fn checksum_skips_field() {
        let f = Footer::new(1 << 20, TYPE_FIXED, u64::MAX);
        let b = f.to_bytes();
        let (g, ok) = Footer::parse(&b).expect("cookie");
        assert!(ok);
        assert_eq!(g.current_size, 1 << 20);
        let mut bad = b;
        bad[100] ^= 1;
        assert!(!Footer::parse(&bad).expect("cookie").1);
    }
}
