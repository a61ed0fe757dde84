//! The tracker's `.hrl` logs: an appender that makes every acknowledged write part of the log's
//! valid prefix without an fsync per write, and the naming and chaining of logs next to a disk.
//!
//! Why not `ferry_disk::hrl::HrlWriter`: its `commit` (the only way to write a metadata block,
//! which is what makes records count) always fsyncs. The tracker must have a write *in the log*
//! before it acknowledges it (a process crash must not lose it), but may defer durability to
//! FLUSH/FUA as any disk does, so it needs "write the block" and "sync" as separate steps. The
//! bytes are the same MS-HRL layout (FORMATS.md §3.6): header with EOL 0 while open, an empty
//! first block, then per batch the data and its metadata block; `ferry_disk::hrl::HrlLog`
//! reads what this writes (the tests check it).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_disk::hrl::{EntryMeta, HrlHeader, HrlLog};
use uuid::Uuid;

const HEADER_SIZE: u64 = 4096;
/// Hyper-V's default metadata block: 32-byte header and 127 entry slots.
pub(crate) const METADATA_SIZE: u32 = 4096;
const BLOCK_HEADER: usize = 32;
const ENTRY_SIZE: usize = 32;
const SLOTS: usize = (METADATA_SIZE as usize - BLOCK_HEADER) / ENTRY_SIZE;
const OP_WRITE: u8 = 1;
/// Writeback of the log starts every this many bytes, so a FLUSH finds little dirty log data
/// (the device is otherwise idle while writes are being copied in).
const WRITEBACK_EVERY: u64 = 8 << 20;
/// Seconds between 1970-01-01 and 2000-01-01 (HRL timestamps count from 2000).
const EPOCH_2000: u64 = 946_684_800;

fn now_2000() -> u32 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    unix.saturating_sub(EPOCH_2000).min(u32::MAX as u64) as u32
}

/// `!(sum of bytes)` skipping the 4-byte checksum field at `field` (MS-HRL 2.6).
fn checksum(b: &[u8], field: usize) -> u32 {
    let mut sum = 0u32;
    for (i, x) in b.iter().enumerate() {
        if i < field || i >= field + 4 {
            sum = sum.wrapping_add(*x as u32);
        }
    }
    !sum
}

fn data_checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |s, &x| s.wrapping_add(x as u32))
}

fn block_bytes(prev_distance: u64, entries: &[EntryMeta]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_SIZE as usize];
    b[0..8].copy_from_slice(&prev_distance.to_le_bytes());
    b[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    let c = checksum(&b[..BLOCK_HEADER], 12);
    b[12..16].copy_from_slice(&c.to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = BLOCK_HEADER + i * ENTRY_SIZE;
        e.write(&mut b[o..o + ENTRY_SIZE]);
    }
    b
}

/// What a sealed log holds; returned by a cut and by shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedLog {
    /// The tracked disk file.
    pub disk: PathBuf,
    /// The sealed `.hrl` file.
    pub log: PathBuf,
    pub seq: u64,
    pub unique_id: Uuid,
    pub previous_unique_id: Uuid,
    /// Size of the log file (EOLLocation).
    pub bytes: u64,
    /// Write records in the log.
    pub records: u64,
    /// Guest bytes the records carry.
    pub data_bytes: u64,
}

/// An open `.hrl` being appended to.
pub(crate) struct LogAppender {
    file: File,
    path: PathBuf,
    seq: u64,
    header: HrlHeader,
    last_block: u64,
    /// Where the next data byte goes; also the end of the valid prefix once `pending` is empty.
    pos: u64,
    pending: Vec<EntryMeta>,
    records: u64,
    data_bytes: u64,
    /// Log bytes whose writeback was started.
    written_back: u64,
}

impl LogAppender {
    /// Creates `path` (must not exist) with an empty first block, synced.
    pub(crate) fn create(
        path: &Path,
        seq: u64,
        previous: Uuid,
        vhd2_data_write_guid: Uuid,
    ) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let t = now_2000();
        let header = HrlHeader {
            version: 0x0002_0000,
            timestamp: t,
            creator_app: "fery".into(),
            creator_version: 0x0001_0000,
            original_size: 0,
            current_size: 0,
            checksum: 0,
            eol: 0,
            error_code: 0,
            metadata_size: METADATA_SIZE,
            unique_id: Uuid::new_v4(),
            previous_unique_id: previous,
            last_modified: t,
            total_metadata_entries: 0,
            file_type: 0,
            flags: 0,
            vhd2_data_write_guid,
        };
        file.write_all_at(&header.to_bytes(), 0)?;
        file.write_all_at(&block_bytes(0, &[]), HEADER_SIZE)?;
        file.sync_all()?;
        // The new name must survive a crash too, or the chain has a hole.
        sync_dir(path)?;
        Ok(LogAppender {
            file,
            path: path.to_path_buf(),
            seq,
            header,
            last_block: HEADER_SIZE,
            pos: HEADER_SIZE + METADATA_SIZE as u64,
            pending: Vec::new(),
            records: 0,
            data_bytes: 0,
            written_back: 0,
        })
    }

    pub(crate) fn unique_id(&self) -> Uuid {
        self.header.unique_id
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the log file holds (including data whose block is not written yet).
    pub(crate) fn bytes(&self) -> u64 {
        self.pos
    }

    /// Appends the data of one write. It counts once [`commit`](Self::commit) wrote its block.
    pub(crate) fn append(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.pending.len() == SLOTS {
            self.commit()?;
        }
        let len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record over 4 GiB"))?;
        self.file.write_all_at(data, self.pos)?;
        self.pos += data.len() as u64;
        self.pending.push(EntryMeta {
            offset,
            length: len,
            timestamp: now_2000(),
            operation: OP_WRITE,
            data_checksum: data_checksum(data),
        });
        Ok(())
    }

    /// Writes the metadata block of the pending records (no fsync): from now on they are part
    /// of the log's valid prefix, also for a reader that recovers an unclosed log.
    pub(crate) fn commit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let at = self.pos;
        self.file
            .write_all_at(&block_bytes(at - self.last_block, &self.pending), at)?;
        self.records += self.pending.len() as u64;
        self.data_bytes += self.pending.iter().map(|e| e.length as u64).sum::<u64>();
        self.header.total_metadata_entries += self.pending.len() as u64;
        self.pending.clear();
        self.last_block = at;
        self.pos = at + METADATA_SIZE as u64;
        if self.pos - self.written_back >= WRITEBACK_EVERY {
            self.start_writeback();
        }
        Ok(())
    }

    /// Asks the kernel to start writing the log out (no wait, no durability promise).
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let (from, len) = (self.written_back, self.pos - self.written_back);
        // SAFETY: plain syscall on an fd this struct owns; no memory is passed.
        let r = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                from as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            tracing::debug!(log = %self.path.display(), error = %io::Error::last_os_error(), "log writeback hint failed");
        }
        self.written_back = self.pos;
    }

    /// Forgets records whose block was not written (after a failed append or commit): the next
    /// append overwrites their data, so the valid prefix stays exactly what was acknowledged.
    pub(crate) fn rollback(&mut self) {
        self.pending.clear();
        self.pos = self.last_block + METADATA_SIZE as u64;
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Commits, sets EOLLocation, sizes and times in the header, and syncs.
    pub(crate) fn close(mut self, disk: &Path) -> io::Result<SealedLog> {
        self.commit()?;
        self.header.eol = self.pos;
        self.header.current_size = self.pos;
        self.header.last_modified = now_2000();
        self.file.write_all_at(&self.header.to_bytes(), 0)?;
        self.file.sync_all()?;
        Ok(SealedLog {
            disk: disk.to_path_buf(),
            log: self.path.clone(),
            seq: self.seq,
            unique_id: self.header.unique_id,
            previous_unique_id: self.header.previous_unique_id,
            bytes: self.pos,
            records: self.records,
            data_bytes: self.data_bytes,
        })
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// `<disk file>.<seq:08>.hrl` next to the disk.
pub fn log_path(disk: &Path, seq: u64) -> PathBuf {
    let mut name = disk.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{seq:08}.hrl"));
    disk.with_file_name(name)
}

/// The `.hrl` logs of `disk` present in its folder, by sequence number (oldest first).
pub fn list_logs(disk: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = match disk.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(base) = disk.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{base}.");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(mid) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".hrl"))
        else {
            continue;
        };
        if mid.len() == 8
            && mid.bytes().all(|c| c.is_ascii_digit())
            && let Ok(seq) = mid.parse::<u64>()
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Where the next log of `disk` starts: its sequence number and the UniqueId it chains to
/// (nil when there is no earlier log, or the last one cannot be read).
pub(crate) fn next_in_chain(disk: &Path) -> io::Result<(u64, Uuid)> {
    let logs = list_logs(disk)?;
    let Some((seq, last)) = logs.last() else {
        return Ok((1, Uuid::nil()));
    };
    match HrlLog::open(last) {
        Ok(log) => {
            if !log.clean {
                tracing::warn!(log = %last.display(), records = log.records.len(), "last log of the disk was not closed cleanly; chaining to its valid prefix");
            }
            Ok((seq + 1, log.header.unique_id))
        }
        Err(e) => {
            tracing::warn!(log = %last.display(), error = %e, "last log of the disk is unreadable; the new log starts a new chain");
            Ok((seq + 1, Uuid::nil()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_records_read_back_without_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("d.raw");
        let p = log_path(&disk, 3);
        assert!(p.ends_with("d.raw.00000003.hrl"));
        let mut a = LogAppender::create(&p, 3, Uuid::nil(), Uuid::nil()).expect("create");
        a.append(4096, &[7u8; 512]).expect("append");
        a.append(0, &[9u8; 1000]).expect("append");
        a.commit().expect("commit");
        // Data without a block is not part of the log.
        a.append(8192, &[1u8; 100]).expect("append");
        let open = HrlLog::open(&p).expect("open unclosed");
        assert!(!open.clean);
        assert_eq!(open.records.len(), 2);
        a.rollback();
        for i in 0..300u64 {
            a.append(i * 512, &[i as u8; 512]).expect("append");
        }
        let sealed = a.close(&disk).expect("close");
        assert_eq!(sealed.records, 302);
        let log = HrlLog::open(&p).expect("open closed");
        assert!(log.clean);
        assert_eq!(log.records.len(), 302);
        assert_eq!(log.records[1].offset, 0);
        assert_eq!(log.records[301].offset, 299 * 512);
        assert_eq!(list_logs(&disk).expect("list"), vec![(3, p.clone())]);
        let (seq, prev) = next_in_chain(&disk).expect("next");
        assert_eq!((seq, prev), (4, sealed.unique_id));
    }
}
