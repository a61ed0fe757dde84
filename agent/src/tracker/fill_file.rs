//! The two files next to a disk being filled (instant recovery, `fill.rs`):
//!
//! * `.<file>.fill-map`: written once, before the disk is first served: the point, the block
//!   size and virtual size, and every block of the point with its chunk id;
//! * `.<file>.fill`: which of those blocks are local, rewritten whole (temporary file, fsync,
//!   rename) after the image is flushed, so it never names a block the image may not hold.
//!
//! The `.fill` file existing is what makes the disk "still being filled": it goes first when
//! the copy is done, then the map. Both carry a magic and a BLAKE3 digest of their body, so a
//! damaged file is refused with its name rather than served as if whole.
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_store::ChunkId;

const MAP_MAGIC: &[u8; 8] = b"FRYFMAP1";
const STATE_MAGIC: &[u8; 8] = b"FRYFILL1";

/// What the disk is filled with: the blocks of one point of one VM's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillPlan {
    pub vm: String,
    pub point: String,
    pub block_size: u64,
    pub virtual_size: u64,
    /// Block index and chunk, ordered by block, no block twice.
    pub blocks: Vec<(u64, ChunkId)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct FillFileError {
    pub path: PathBuf,
    pub what: String,
}

fn err(path: &Path, what: impl Into<String>) -> FillFileError {
    FillFileError {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// `.<file>.fill-map` next to `disk`.
pub fn map_path(disk: &Path) -> PathBuf {
    hidden(disk, "fill-map")
}

/// `.<file>.fill` next to `disk`.
pub fn state_path(disk: &Path) -> PathBuf {
    hidden(disk, "fill")
}

fn hidden(disk: &Path, ext: &str) -> PathBuf {
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    disk.with_file_name(format!(".{name}.{ext}"))
}

/// Whether `disk` is still being filled.
pub fn pending(disk: &Path) -> bool {
    state_path(disk).exists()
}

/// Writes the map and an empty state (no block local yet) for `disk`.
pub fn create(disk: &Path, plan: &FillPlan) -> Result<(), FillFileError> {
    write_plan(&map_path(disk), plan)?;
    write_state(disk, &vec![0u64; plan.blocks.len().div_ceil(64)])
}

/// Writes `plan` to `path` whole (a standby copy's map has the layout of a fill map).
pub fn write_plan(path: &Path, plan: &FillPlan) -> Result<(), FillFileError> {
    let mut body = Vec::with_capacity(64 + plan.blocks.len() * 40);
    put_str(&mut body, &plan.vm);
    put_str(&mut body, &plan.point);
    body.extend_from_slice(&plan.block_size.to_le_bytes());
    body.extend_from_slice(&plan.virtual_size.to_le_bytes());
    body.extend_from_slice(&(plan.blocks.len() as u64).to_le_bytes());
    for (i, id) in &plan.blocks {
        body.extend_from_slice(&i.to_le_bytes());
        body.extend_from_slice(id);
    }
    write_atomic(path, MAP_MAGIC, &body)
}

/// Reads the map of `disk`.
pub fn read_map(disk: &Path) -> Result<FillPlan, FillFileError> {
    read_plan(&map_path(disk))
}

/// Reads a map written by [`write_plan`].
pub fn read_plan(path: &Path) -> Result<FillPlan, FillFileError> {
    let body = read_checked(path, MAP_MAGIC)?;
    let mut r = Reader { b: &body, path };
    let vm = r.string()?;
    let point = r.string()?;
    let block_size = r.u64()?;
    let virtual_size = r.u64()?;
    let n = r.u64()?;
    if block_size == 0 || n > virtual_size.div_ceil(block_size) {
        return Err(err(path, "its block size or block count does not fit"));
    }
    let mut blocks = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let i = r.u64()?;
        let id: ChunkId = r.take(32)?.try_into().map_err(|_| err(path, "short"))?;
        if blocks.last().is_some_and(|(p, _)| *p >= i) || i >= virtual_size.div_ceil(block_size) {
            return Err(err(
                path,
                format!("block {i} is out of order or beyond the disk"),
            ));
        }
        blocks.push((i, id));
    }
    Ok(FillPlan {
        vm,
        point,
        block_size,
        virtual_size,
        blocks,
    })
}

/// The bitset of local blocks (by position in the map) of `disk`.
pub fn read_state(disk: &Path, blocks: usize) -> Result<Vec<u64>, FillFileError> {
    let path = state_path(disk);
    let body = read_checked(&path, STATE_MAGIC)?;
    if body.len() != blocks.div_ceil(64) * 8 {
        return Err(err(
            &path,
            format!("it does not match the {blocks} blocks of its map"),
        ));
    }
    Ok(body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

pub fn write_state(disk: &Path, bits: &[u64]) -> Result<(), FillFileError> {
    let body: Vec<u8> = bits.iter().flat_map(|w| w.to_le_bytes()).collect();
    write_atomic(&state_path(disk), STATE_MAGIC, &body)
}

/// The copy is done: the state goes first (the disk is an ordinary file from then on), then
/// the map.
pub fn remove(disk: &Path) -> Result<(), FillFileError> {
    for p in [state_path(disk), map_path(disk)] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&p, format!("removing it: {e}"))),
        }
    }
    sync_dir(disk);
    Ok(())
}

/// A map left behind by a removal cut short (its state is gone: the copy was done).
pub fn remove_stale_map(disk: &Path) {
    if !pending(disk) {
        let _ = std::fs::remove_file(map_path(disk));
    }
}

fn put_str(body: &mut Vec<u8>, s: &str) {
    body.extend_from_slice(&(s.len() as u32).to_le_bytes());
    body.extend_from_slice(s.as_bytes());
}

fn write_atomic(path: &Path, magic: &[u8; 8], body: &[u8]) -> Result<(), FillFileError> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(magic)?;
        f.write_all(blake3::hash(body).as_bytes())?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(path, format!("writing it: {e}"))
    })?;
    sync_dir(path);
    Ok(())
}

/// Makes a rename or removal in the folder durable (best effort: some filesystems refuse).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

fn read_checked(path: &Path, magic: &[u8; 8]) -> Result<Vec<u8>, FillFileError> {
    let raw = std::fs::read(path).map_err(|e| err(path, format!("reading it: {e}")))?;
    if raw.len() < 40 || &raw[..8] != magic {
        return Err(err(path, "it is not a fill file of ferry's"));
    }
    let body = &raw[40..];
    if blake3::hash(body).as_bytes() != &raw[8..40] {
        return Err(err(path, "its digest does not match: the file is damaged"));
    }
    Ok(body.to_vec())
}

struct Reader<'a> {
    b: &'a [u8],
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FillFileError> {
        if self.b.len() < n {
            return Err(err(self.path, "it ends early"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, FillFileError> {
        Ok(u64::from_le_bytes(
            self.take(8)?
                .try_into()
                .map_err(|_| err(self.path, "short"))?,
        ))
    }

    fn string(&mut self) -> Result<String, FillFileError> {
        let n = u32::from_le_bytes(
            self.take(4)?
                .try_into()
                .map_err(|_| err(self.path, "short"))?,
        );
        if n > 4096 {
            return Err(err(self.path, "a name in it is too long"));
        }
        String::from_utf8(self.take(n as usize)?.to_vec())
            .map_err(|_| err(self.path, "a name in it is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> FillPlan {
        FillPlan {
            vm: "web".into(),
            point: "p1".into(),
            block_size: 1 << 20,
            virtual_size: 10 << 20,
            blocks: vec![(0, [1; 32]), (3, [2; 32]), (9, [3; 32])],
        }
    }

    #[test]
    fn map_and_state_round_trip_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("web.vhdx");
        create(&disk, &plan()).unwrap();
        assert!(pending(&disk));
        assert_eq!(read_map(&disk).unwrap(), plan());
        assert_eq!(read_state(&disk, 3).unwrap(), vec![0]);
        write_state(&disk, &[0b101]).unwrap();
        assert_eq!(read_state(&disk, 3).unwrap(), vec![0b101]);
        remove(&disk).unwrap();
        assert!(!pending(&disk) && !map_path(&disk).exists());
    }

    #[test]
    fn damaged_files_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("web.raw");
        create(&disk, &plan()).unwrap();
        let mut raw = std::fs::read(map_path(&disk)).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(map_path(&disk), &raw).unwrap();
        let e = read_map(&disk).unwrap_err().to_string();
        assert!(
            e.contains(".web.raw.fill-map") && e.contains("damaged"),
            "{e}"
        );
        std::fs::write(state_path(&disk), b"short").unwrap();
        let e = read_state(&disk, 3).unwrap_err().to_string();
        assert!(e.contains("not a fill file"), "{e}");
        assert!(read_state(&disk, 200).is_err());
    }
}
