//! Reading MS-HRL logs: validation of every checksum, the two-pass walk of a closed log
//! (FORMATS §3.5), forward recovery of a log that was not closed, and chain ordering.

use std::path::Path;

use uuid::Uuid;

use super::format::*;
use crate::io::{DiskFile, le_u32, le_u64};
use crate::{DiskError, DiskWriter};

/// Bytes read at a time when scanning or checksumming data.
const WINDOW: usize = 1 << 20;

/// One write record: `length` bytes at virtual `offset`, stored at file offset `data_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HrlRecord {
    pub offset: u64,
    pub length: u32,
    pub timestamp: u32,
    pub data_at: u64,
    pub data_checksum: u32,
}

/// A validated log: header, records in write order, and whether it was closed cleanly.
pub struct HrlLog {
    f: DiskFile,
    pub header: HrlHeader,
    pub records: Vec<HrlRecord>,
    /// False when EOLLocation was 0 or past the end: only the valid prefix was recovered.
    pub clean: bool,
    /// File offset up to which the log is valid (EOLLocation for a clean log).
    pub valid_end: u64,
    pub metadata_blocks: u64,
}

impl std::fmt::Debug for HrlLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HrlLog")
            .field("path", &self.f.path)
            .field("records", &self.records.len())
            .field("clean", &self.clean)
            .finish()
    }
}

struct Block {
    at: u64,
    prev: u64,
    entries: Vec<EntryMeta>,
}

impl HrlLog {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let f = DiskFile::open(path, false)?;
        let mut hb = vec![0u8; HEADER_SIZE];
        f.read_exact_at(0, &mut hb, "hrl header")?;
        if &hb[0..7] != COOKIE {
            return Err(DiskError::corrupt(
                path,
                "hrl header cookie",
                0,
                "missing msctlog cookie",
            ));
        }
        let header = HrlHeader::parse(&hb);
        if header.version != VERSION_2 && header.version != VERSION_1 {
            return Err(DiskError::unsupported(
                path,
                "hrl header version",
                8,
                format!("version {:#x}", header.version),
            ));
        }
        let computed = checksum(&hb, 40);
        if computed != header.checksum {
            return Err(DiskError::Checksum {
                path: path.to_path_buf(),
                structure: "hrl header",
                offset: 0,
                stored: header.checksum,
                computed,
            });
        }
        let ms = header.metadata_size;
        if ms == 0 || !ms.is_multiple_of(512) || slots(ms) == 0 || ms > 1 << 20 {
            return Err(DiskError::corrupt(
                path,
                "hrl header metadata size",
                56,
                format!("{ms} is not a multiple of 512 up to 1 MiB"),
            ));
        }
        let mut log = HrlLog {
            f,
            header,
            records: Vec::new(),
            clean: true,
            valid_end: 0,
            metadata_blocks: 0,
        };
        let eol = log.header.eol;
        if eol == 0 || eol > log.f.len {
            tracing::warn!(path = %path.display(), eol, file_len = log.f.len, "hrl log was not closed cleanly, recovering its valid prefix");
            log.clean = false;
            log.recover()?;
        } else {
            log.walk_closed()?;
        }
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.f.path
    }

    fn ms(&self) -> u64 {
        self.header.metadata_size as u64
    }

    /// Reads and checks the block at `at`: header checksum, entry count, entry checksums.
    fn read_block(&self, at: u64) -> Result<Block, DiskError> {
        let mut b = vec![0u8; self.ms() as usize];
        self.f.read_exact_at(at, &mut b, "hrl metadata block")?;
        let stored = le_u32(&b, 12);
        let computed = checksum(&b[..BLOCK_HEADER], 12);
        if stored != computed {
            return Err(DiskError::Checksum {
                path: self.f.path.clone(),
                structure: "hrl metadata block",
                offset: at,
                stored,
                computed,
            });
        }
        let count = le_u32(&b, 8) as usize;
        if count > slots(self.header.metadata_size) {
            return Err(DiskError::corrupt(
                &self.f.path,
                "hrl metadata block entry count",
                at + 8,
                format!("{count} entries do not fit in {} bytes", self.ms()),
            ));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let o = BLOCK_HEADER + i * ENTRY_SIZE;
            let (e, ok) = EntryMeta::parse(&b[o..o + ENTRY_SIZE]);
            let eat = at + o as u64;
            if !ok {
                return Err(DiskError::Checksum {
                    path: self.f.path.clone(),
                    structure: "hrl metadata entry",
                    offset: eat,
                    stored: le_u32(&b, o + 8),
                    computed: checksum(&b[o..o + ENTRY_SIZE], 8),
                });
            }
            if e.operation != OP_WRITE {
                return Err(DiskError::unsupported(
                    &self.f.path,
                    "hrl metadata entry operation",
                    eat + 20,
                    format!("operation {}", e.operation),
                ));
            }
            entries.push(e);
        }
        Ok(Block {
            at,
            prev: le_u64(&b, 0),
            entries,
        })
    }

    /// Adds a block's records; its data must fill exactly `cursor..block`.
    fn take_block(&mut self, cursor: u64, b: &Block) -> Result<(), DiskError> {
        let total: u64 = b.entries.iter().map(|e| e.length as u64).sum();
        if cursor + total != b.at {
            return Err(DiskError::corrupt(
                &self.f.path,
                "hrl metadata block",
                b.at,
                format!(
                    "entries describe {total} bytes but the data before it spans {cursor:#x}..{:#x}",
                    b.at
                ),
            ));
        }
        let mut pos = cursor;
        for e in &b.entries {
            let r = HrlRecord {
                offset: e.offset,
                length: e.length,
                timestamp: e.timestamp,
                data_at: pos,
                data_checksum: e.data_checksum,
            };
            self.verify_data(&r)?;
            self.records.push(r);
            pos += e.length as u64;
        }
        self.metadata_blocks += 1;
        Ok(())
    }

    fn verify_data(&self, r: &HrlRecord) -> Result<(), DiskError> {
        // Hyper-V's own example leaves DataChecksum 0: only non-zero sums are checked.
        if r.data_checksum == 0 {
            return Ok(());
        }
        let mut sum = 0u32;
        let mut buf = vec![0u8; (r.length as usize).min(WINDOW)];
        let mut done = 0u64;
        while done < r.length as u64 {
            let n = ((r.length as u64 - done) as usize).min(WINDOW);
            self.f
                .read_exact_at(r.data_at + done, &mut buf[..n], "hrl record data")?;
            sum = buf[..n].iter().fold(sum, |s, &x| s.wrapping_add(x as u32));
            done += n as u64;
        }
        if !sum != r.data_checksum {
            return Err(DiskError::Checksum {
                path: self.f.path.clone(),
                structure: "hrl record data",
                offset: r.data_at,
                stored: r.data_checksum,
                computed: !sum,
            });
        }
        Ok(())
    }

    /// Pass 1 walks back from EOLLocation, pass 2 replays oldest first (FORMATS §3.5).
    fn walk_closed(&mut self) -> Result<(), DiskError> {
        let ms = self.ms();
        let eol = self.header.eol;
        let first = HEADER_SIZE as u64;
        if eol < first + ms {
            return Err(DiskError::corrupt(
                &self.f.path,
                "hrl header eol location",
                44,
                format!("{eol:#x} leaves no room for a metadata block"),
            ));
        }
        let mut stack = Vec::new();
        let mut m = eol - ms;
        loop {
            let b = self.read_block(m)?;
            let prev = b.prev;
            stack.push(b);
            if prev == 0 {
                break;
            }
            if prev < ms || m.checked_sub(prev).is_none_or(|p| p < first) {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "hrl metadata block previous location",
                    m,
                    format!("back distance {prev:#x} points outside the log"),
                ));
            }
            m -= prev;
        }
        let mut cursor = first;
        while let Some(b) = stack.pop() {
            self.take_block(cursor, &b)?;
            cursor = b.at + ms;
        }
        self.valid_end = cursor;
        Ok(())
    }

    /// Forward recovery: from the header on, the next block is the first position whose
    /// back distance, checksums and entry lengths all fit. Stops at the first gap.
    fn recover(&mut self) -> Result<(), DiskError> {
        let ms = self.ms();
        let mut cursor = HEADER_SIZE as u64;
        let mut prev: Option<u64> = None;
        let mut win = vec![0u8; WINDOW + BLOCK_HEADER];
        'outer: loop {
            let mut p = cursor;
            while p + ms <= self.f.len {
                let n = ((self.f.len - p) as usize).min(win.len());
                self.f.read_exact_at(p, &mut win[..n], "hrl data")?;
                let usable = n.saturating_sub(BLOCK_HEADER - 1).min(WINDOW);
                for i in 0..usable {
                    let at = p + i as u64;
                    if at + ms > self.f.len {
                        break;
                    }
                    let want = prev.map_or(0, |m| at - m);
                    if le_u64(&win, i) != want
                        || checksum(&win[i..i + BLOCK_HEADER], 12) != le_u32(&win, i + 12)
                    {
                        continue;
                    }
                    let Ok(b) = self.read_block(at) else { continue };
                    let before = self.records.len();
                    if self.take_block(cursor, &b).is_err() {
                        self.records.truncate(before);
                        continue;
                    }
                    prev = Some(at);
                    cursor = at + ms;
                    continue 'outer;
                }
                p += usable.max(1) as u64;
            }
            break;
        }
        self.valid_end = cursor;
        tracing::info!(path = %self.f.path.display(), records = self.records.len(), valid_end = cursor, "hrl valid prefix recovered");
        Ok(())
    }

    /// Reads one record's data (`buf` must be `record.length` long).
    pub fn read_record(&self, r: &HrlRecord, buf: &mut [u8]) -> Result<(), DiskError> {
        self.f.read_exact_at(r.data_at, buf, "hrl record data")
    }

    /// Applies every record in order (later records win); memory is one window.
    pub fn replay_onto(&self, dst: &mut dyn DiskWriter) -> Result<u64, DiskError> {
        let mut buf = vec![0u8; WINDOW];
        let mut total = 0u64;
        for r in &self.records {
            let mut done = 0u64;
            while done < r.length as u64 {
                let n = ((r.length as u64 - done) as usize).min(WINDOW);
                self.f
                    .read_exact_at(r.data_at + done, &mut buf[..n], "hrl record data")?;
                dst.write_at(r.offset + done, &buf[..n])?;
                done += n as u64;
            }
            total += r.length as u64;
        }
        Ok(total)
    }
}

/// Orders logs oldest first by PreviousUniqueId -> UniqueId; refuses gaps, forks and loops.
pub fn order_chain(logs: Vec<HrlLog>) -> Result<Vec<HrlLog>, DiskError> {
    let chain_err = |path: &Path, reason: String| {
        DiskError::corrupt(path, "hrl header previous unique id", 76, reason)
    };
    let ids: Vec<Uuid> = logs.iter().map(|l| l.header.unique_id).collect();
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            return Err(chain_err(
                logs[i].path(),
                format!("unique id {id} appears twice"),
            ));
        }
    }
    let heads: Vec<usize> = (0..logs.len())
        .filter(|&i| !ids.contains(&logs[i].header.previous_unique_id))
        .collect();
    let [head] = heads[..] else {
        let p = logs.first().map_or(Path::new(""), |l| l.path());
        return Err(chain_err(
            p,
            format!("{} logs start a chain (expected one)", heads.len()),
        ));
    };
    let mut rest: Vec<Option<HrlLog>> = logs.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(rest.len());
    let mut cur = rest[head].take();
    while let Some(l) = cur {
        let id = l.header.unique_id;
        let next: Vec<usize> = (0..rest.len())
            .filter(|&i| {
                rest[i]
                    .as_ref()
                    .is_some_and(|n| n.header.previous_unique_id == id)
            })
            .collect();
        if next.len() > 1 {
            return Err(chain_err(
                l.path(),
                format!("{} logs follow {id}", next.len()),
            ));
        }
        out.push(l);
        cur = next.first().and_then(|&i| rest[i].take());
    }
    if let Some(l) = rest.into_iter().flatten().next() {
        return Err(chain_err(
            l.path(),
            "log is not connected to the chain".into(),
        ));
    }
    Ok(out)
}
