//! The VHDX metadata log (FORMATS §2.6): parsing entries, finding the active sequence,
//! turning it into an overlay of file writes, and building new entries.

use std::path::Path;

use uuid::Uuid;

use super::format::{crc, guid_at, put_guid, seal};
use crate::DiskError;
use crate::io::{le_u32, le_u64, put_le_u32, put_le_u64};

pub const SECTOR: usize = 4096;

/// One replayable write: a 4 KiB sector or a run of zeros at a file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    Data { offset: u64, sector: Box<[u8]> },
    Zero { offset: u64, len: u64 },
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub at: u64,
    pub len: u64,
    pub tail: u64,
    pub seq: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub ops: Vec<LogOp>,
}

/// The replay the log demands: writes in order, and the size the file must reach.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    pub ops: Vec<LogOp>,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub head_seq: u64,
}

/// Reads `n` bytes at log offset `at`, wrapping modulo the log length.
fn wrapped(log: &[u8], at: u64, n: usize) -> Vec<u8> {
    let l = log.len() as u64;
    let mut out = Vec::with_capacity(n);
    let mut pos = at % l;
    while out.len() < n {
        let take = ((l - pos) as usize).min(n - out.len());
        out.extend_from_slice(&log[pos as usize..pos as usize + take]);
        pos = (pos + take as u64) % l;
    }
    out
}

/// Parses and validates the entry at log offset `at`; `None` if anything is wrong.
pub fn parse_entry(log: &[u8], at: u64, guid: &Uuid) -> Option<Entry> {
    let l = log.len() as u64;
    let first = wrapped(log, at, SECTOR);
    if &first[0..4] != b"loge" {
        return None;
    }
    let len = le_u32(&first, 8) as u64;
    let tail = le_u32(&first, 12) as u64;
    let seq = le_u64(&first, 16);
    let count = le_u32(&first, 24) as u64;
    if len == 0
        || !len.is_multiple_of(SECTOR as u64)
        || len > l
        || !tail.is_multiple_of(SECTOR as u64)
        || tail >= l
    {
        return None;
    }
    if seq == 0 || guid_at(&first, 32) != *guid {
        return None;
    }
    let desc_sectors = (count + 2).div_ceil(128).max(1);
    if desc_sectors * SECTOR as u64 > len {
        return None;
    }
    let entry = wrapped(log, at, len as usize);
    if crc(&entry, 4) != le_u32(&entry, 4) {
        return None;
    }
    let mut ops = Vec::with_capacity(count as usize);
    let mut data_idx = desc_sectors;
    for i in 0..count {
        let o = (64 + i * 32) as usize;
        let d = &entry[o..o + 32];
        if le_u64(d, 24) != seq {
            return None;
        }
        let file_offset = le_u64(d, 16);
        if !file_offset.is_multiple_of(SECTOR as u64) {
            return None;
        }
        match &d[0..4] {
            b"zero" => {
                let zlen = le_u64(d, 8);
                if !zlen.is_multiple_of(SECTOR as u64) {
                    return None;
                }
                ops.push(LogOp::Zero {
                    offset: file_offset,
                    len: zlen,
                });
            }
            b"desc" => {
                let so = (data_idx * SECTOR as u64) as usize;
                let s = entry.get(so..so + SECTOR)?;
                let hi = le_u32(s, 4) as u64;
                let lo = le_u32(s, 4092) as u64;
                if &s[0..4] != b"data" || (hi << 32 | lo) != seq {
                    return None;
                }
                let mut sector = vec![0u8; SECTOR].into_boxed_slice();
                sector[0..8].copy_from_slice(&d[8..16]);
                sector[8..4092].copy_from_slice(&s[8..4092]);
                sector[4092..4096].copy_from_slice(&d[4..8]);
                ops.push(LogOp::Data {
                    offset: file_offset,
                    sector,
                });
                data_idx += 1;
            }
            _ => return None,
        }
    }
    if data_idx * SECTOR as u64 != len {
        return None;
    }
    Some(Entry {
        at,
        len,
        tail,
        seq,
        flushed_file_offset: le_u64(&first, 48),
        last_file_offset: le_u64(&first, 56),
        ops,
    })
}

/// Finds the active sequence (MS-VHDX 2.3.3) and returns its replay, or an error when the log
/// holds no complete sequence.
pub fn active_sequence(
    log: &[u8],
    guid: &Uuid,
    path: &Path,
    log_offset: u64,
) -> Result<Replay, DiskError> {
    let l = log.len() as u64;
    if l == 0 || !l.is_multiple_of(SECTOR as u64) {
        return Err(DiskError::corrupt(
            path,
            "vhdx log",
            log_offset,
            format!("log length {l} is not a positive multiple of 4096"),
        ));
    }
    let mut best: Option<Vec<Entry>> = None;
    let mut tail = 0u64;
    let mut old = 0u64;
    loop {
        let mut chain: Vec<Entry> = Vec::new();
        let mut pos = tail;
        let mut span = 0u64;
        while let Some(e) = parse_entry(log, pos, guid) {
            if chain.last().is_some_and(|p| e.seq != p.seq + 1) || span + e.len > l {
                break;
            }
            span += e.len;
            pos = (pos + e.len) % l;
            chain.push(e);
        }
        let complete = chain
            .last()
            .is_some_and(|last| chain.iter().any(|e| e.at == last.tail));
        if complete {
            let better = match (&best, chain.last()) {
                (Some(b), Some(c)) => b.last().is_none_or(|bl| c.seq > bl.seq),
                _ => true,
            };
            if better {
                best = Some(chain);
            }
        }
        let next = if complete {
            pos
        } else {
            (tail + SECTOR as u64) % l
        };
        // Positions only grow until the scan wraps; then every position has been tried.
        if next <= old {
            break;
        }
        old = next;
        tail = next;
    }
    let chain = best.ok_or_else(|| {
        DiskError::corrupt(
            path,
            "vhdx log",
            log_offset,
            "log guid is set but the log holds no complete entry sequence",
        )
    })?;
    let head = chain
        .last()
        .cloned()
        .ok_or_else(|| DiskError::corrupt(path, "vhdx log", log_offset, "empty sequence"))?;
    let start = chain.iter().position(|e| e.at == head.tail).unwrap_or(0);
    let mut replay = Replay {
        flushed_file_offset: head.flushed_file_offset,
        last_file_offset: head.last_file_offset,
        head_seq: head.seq,
        ops: Vec::new(),
    };
    for e in chain.into_iter().skip(start) {
        replay.ops.extend(e.ops);
    }
    Ok(replay)
}

/// Applies the replay to a byte range read from the file at `offset` (later writes win).
pub fn overlay(ops: &[LogOp], offset: u64, buf: &mut [u8]) {
    let end = offset + buf.len() as u64;
    for op in ops {
        let (o, n, src) = match op {
            LogOp::Data { offset, sector } => (*offset, sector.len() as u64, Some(sector)),
            LogOp::Zero { offset, len } => (*offset, *len, None),
        };
        let (s, e) = (o.max(offset), (o + n).min(end));
        if s >= e {
            continue;
        }
        let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
        match src {
            Some(sec) => dst.copy_from_slice(&sec[(s - o) as usize..(e - o) as usize]),
            None => dst.fill(0),
        }
    }
}

/// Builds one log entry holding 4 KiB sector writes.
pub fn build_entry(
    seq: u64,
    tail: u32,
    guid: &Uuid,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: &[(u64, &[u8])],
) -> Vec<u8> {
    let count = writes.len() as u64;
    let desc_sectors = (count + 2).div_ceil(128).max(1);
    let len = (desc_sectors + count) as usize * SECTOR;
    let mut b = vec![0u8; len];
    b[0..4].copy_from_slice(b"loge");
    put_le_u32(&mut b, 8, len as u32);
    put_le_u32(&mut b, 12, tail);
    put_le_u64(&mut b, 16, seq);
    put_le_u32(&mut b, 24, count as u32);
    put_guid(&mut b, 32, guid);
    put_le_u64(&mut b, 48, flushed_file_offset);
    put_le_u64(&mut b, 56, last_file_offset);
    for (i, (off, data)) in writes.iter().enumerate() {
        let d = 64 + i * 32;
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[0..8]);
        put_le_u64(&mut b, d + 16, *off);
        put_le_u64(&mut b, d + 24, seq);
        let s = (desc_sectors as usize + i) * SECTOR;
        b[s..s + 4].copy_from_slice(b"data");
        put_le_u32(&mut b, s + 4, (seq >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put_le_u32(&mut b, s + 4092, seq as u32);
    }
    seal(&mut b, 4);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip_and_sequence() {
        let g = Uuid::new_v4();
        let mut log = vec![0u8; 64 * 1024];
        let s1 = vec![1u8; 4096];
        let s2 = vec![2u8; 4096];
        let e1 = build_entry(5, 0, &g, 1 << 20, 2 << 20, &[(3 << 20, &s1)]);
        let e2 = build_entry(
            6,
            8192,
            &g,
            1 << 20,
            3 << 20,
            &[(3 << 20, &s2), (4 << 20, &s1)],
        );
        log[..e1.len()].copy_from_slice(&e1);
        log[8192..8192 + e2.len()].copy_from_slice(&e2);
        let r = active_sequence(&log, &g, Path::new("t"), 0).expect("sequence");
        assert_eq!(r.head_seq, 6);
        assert_eq!(r.last_file_offset, 3 << 20);
        // Tail of the head points at itself: only its ops replay.
        assert_eq!(r.ops.len(), 2);
        let mut buf = vec![0u8; 4096];
        overlay(&r.ops, 3 << 20, &mut buf);
        assert_eq!(buf, s2);
        // A wrong guid finds nothing.
        assert!(active_sequence(&log, &Uuid::new_v4(), Path::new("t"), 0).is_err());
        // A flipped byte invalidates the head; the older entry wins.
        log[8192 + 4096 + 100] ^= 1;
        let r = active_sequence(&log, &g, Path::new("t"), 0).expect("sequence");
        assert_eq!(r.head_seq, 5);
    }
}
