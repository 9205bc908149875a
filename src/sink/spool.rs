//! Spool files: where a batch's gzip file is built, on local disk, until it is sealed and uploaded.
//!
//! # Contract
//! - Memory per open batch is bounded whatever the batch size, and only a few batches at a time pay
//!   for a compressor (ARCHITECTURE.md, invariant 4):
//!   - a batch starts *raw*: its uncompressed CSV goes through a buffer of at most [`RAW_BUFFER`]
//!     (4 KiB, grown as needed) into an anonymous file of the spool directory, created at the first
//!     spill (a batch that never fills the buffer has no file). A raw batch costs that buffer.
//!   - once it holds [`PROMOTE_AT`] (256 KiB) of CSV, at a spill, and fewer than [`MAX_LIVE`] (16)
//!     batches of the same [`GzipSpools`] are *live*, it is promoted: what it has so far is compressed
//!     into its spool file and the rest is compressed as it arrives, through a 64 KiB buffer. A live
//!     batch costs the gzip state (~250 KiB at `Compression::fast()`) and that buffer. A raw batch that
//!     found no free slot tries again at each later spill; a slot is freed when its batch is finished
//!     or dropped.
//!   - a batch still raw when sealed is compressed by [`GzipSpool::finish`], which reads its file back
//!     (with a compressor of its own for that time only).
//!
//!   So N open batches cost at most N × 4 KiB + 16 × ~320 KiB (at most ~25 MiB for 5,000 tables),
//!   where a compressor per batch cost ~320 KiB each (`benches/many_tables.sh`: 1.6 GiB then, 25 MiB
//!   now, for the whole daemon with a one-row batch open in each of 5,000 tables).
//!   The price is on disk and at seal: a batch beyond the 16 live ones keeps its CSV uncompressed on
//!   disk (up to `batch.max_bytes`, ~5 times its gzip size), and its compression happens at its seal,
//!   in one go, on the stream thread.
//! - [`GzipSpool::finish`] returns the compressed size and SHA-256 computed while writing the gzip
//!   file, so that file is read once more only to upload it. The gzip file is one gzip member at the
//!   factory's level, the same whether the batch was promoted or compressed at the end.
//! - Spool files are temporary files in the daemon's own folder of the spool directory
//!   (`<spool_dir>/<source.name>-<digest of source URL and slot>/`, one per daemon, so daemons on
//!   one host never share one); they are deleted when dropped, and [`clean_spool_dir`] removes
//!   leftovers of a crashed process at start-up. The raw files are anonymous (like the hold files):
//!   they vanish with the process, however it ends.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

use crate::core::batch::SpoolFactory;
use crate::table::TableName;

/// The most a raw batch keeps in memory before it appends to its file.
pub const RAW_BUFFER: usize = 4 * 1024;
/// The uncompressed size at which a raw batch is promoted to a live gzip stream (when a slot is free).
pub const PROMOTE_AT: u64 = 256 * 1024;
/// How many batches of one [`GzipSpools`] may be live (compressing as rows arrive) at once.
pub const MAX_LIVE: usize = 16;
/// The buffer in front of a live batch's compressor.
const LIVE_BUFFER: usize = 64 * 1024;

/// File writer that hashes and counts what passes through it.
struct HashingFile {
    file: File,
    hash: Sha256,
    bytes: u64,
}

impl HashingFile {
    fn new(file: File) -> Self {
        HashingFile {
            file,
            hash: Sha256::new(),
            bytes: 0,
        }
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// What the spools of one factory share: where they go, and the live-batch budget.
struct Shared {
    dir: PathBuf,
    level: Compression,
    max_live: usize,
    promote_at: u64,
    live: AtomicUsize,
}

impl Shared {
    /// A live slot, if fewer than `max_live` are taken.
    fn try_live(self: &Arc<Self>) -> Option<LiveSlot> {
        self.live
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max_live).then_some(n + 1))
            .ok()
            .map(|_| LiveSlot(self.clone()))
    }

    /// A new named gzip spool file: a compressor writing into it, and its path.
    fn gzip_file(&self, name: &str) -> io::Result<(GzEncoder<HashingFile>, tempfile::TempPath)> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .suffix(".csv.gz.spool")
            .tempfile_in(&self.dir)?;
        let (file, path) = tmp.into_parts();
        Ok((GzEncoder::new(HashingFile::new(file), self.level), path))
    }
}

/// One of the [`MAX_LIVE`] places of a factory's live batches, given back when dropped.
struct LiveSlot(Arc<Shared>);

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Relaxed);
    }
}

/// An uncompressed batch: `file` (if any) then `buf`.
struct Raw {
    buf: Vec<u8>,
    file: Option<File>,
    file_bytes: u64,
}

impl Raw {
    /// Appends `data` to the file (created now if needed), past the buffer: spill the buffer first.
    fn append(&mut self, dir: &Path, data: &[u8]) -> io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(tempfile::tempfile_in(dir)?),
        };
        file.write_all(data)?;
        self.file_bytes += data.len() as u64;
        Ok(())
    }

    /// Appends the buffer to the file and empties it (keeping its memory).
    fn spill(&mut self, dir: &Path) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let written = self.append(dir, &buf);
        self.buf = buf;
        self.buf.clear();
        written
    }

    /// Writes everything so far into `out`; the file's position is left at its end.
    fn copy_into(&mut self, out: &mut impl Write) -> io::Result<()> {
        if let Some(file) = &mut self.file {
            file.seek(SeekFrom::Start(0))?;
            let n = io::copy(file, out)?;
            if n != self.file_bytes {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "raw spool file has {n} bytes, {} were written",
                        self.file_bytes
                    ),
                ));
            }
        }
        out.write_all(&self.buf)
    }
}

struct Live {
    writer: BufWriter<GzEncoder<HashingFile>>,
    path: tempfile::TempPath,
    _slot: LiveSlot,
}

enum Stage {
    Raw(Raw),
    /// Boxed: a raw batch, the common case with many tables, does not pay for the compressor's size.
    Live(Box<Live>),
}

/// An open batch's spool: raw, then (maybe) live; see the module's contract.
pub struct GzipSpool {
    shared: Arc<Shared>,
    /// The file-name prefix of its gzip file (from the table name).
    name: Box<str>,
    stage: Stage,
}

/// A finished spool: a complete gzip file on disk, removed when this is dropped.
#[derive(Debug)]
pub struct SpooledFile {
    pub path: tempfile::TempPath,
    pub gz_bytes: u64,
    pub sha256: String,
}

impl Write for GzipSpool {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }
    #[inline]
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.stage {
            Stage::Live(live) => live.writer.write_all(data),
            Stage::Raw(raw) if raw.buf.len() + data.len() <= RAW_BUFFER => {
                let need = raw.buf.len() + data.len();
                if need > raw.buf.capacity() {
                    // Grown by doubling, but never past RAW_BUFFER.
                    let to = (2 * raw.buf.capacity()).clamp(need.max(256), RAW_BUFFER);
                    raw.buf.reserve_exact(to - raw.buf.len());
                }
                raw.buf.extend_from_slice(data);
                Ok(())
            }
            Stage::Raw(_) => self.spill_and_write(data),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stage {
            Stage::Live(live) => live.writer.flush(),
            Stage::Raw(raw) => raw.spill(&self.shared.dir),
        }
    }
}

impl GzipSpool {
    /// The raw buffer is full: spill it, take `data`, and promote the batch if it is due and a live
    /// slot is free.
    #[cold]
    fn spill_and_write(&mut self, data: &[u8]) -> io::Result<()> {
        let Stage::Raw(raw) = &mut self.stage else {
            unreachable!("only raw spools spill")
        };
        raw.spill(&self.shared.dir)?;
        if data.len() >= RAW_BUFFER {
            raw.append(&self.shared.dir, data)?;
        } else {
            raw.buf.reserve_exact(RAW_BUFFER);
            raw.buf.extend_from_slice(data);
        }
        if raw.file_bytes + raw.buf.len() as u64 >= self.shared.promote_at {
            if let Some(slot) = self.shared.try_live() {
                let (enc, path) = self.shared.gzip_file(&self.name)?;
                let mut writer = BufWriter::with_capacity(LIVE_BUFFER, enc);
                raw.copy_into(&mut writer)?;
                self.stage = Stage::Live(Box::new(Live {
                    writer,
                    path,
                    _slot: slot,
                }));
            }
        }
        Ok(())
    }

    /// Whether rows are compressed as they arrive (the batch was promoted).
    pub fn is_live(&self) -> bool {
        matches!(self.stage, Stage::Live(_))
    }

    /// Completes the gzip file (compressing a raw batch now) and gives back its live slot, if any.
    pub fn finish(self) -> io::Result<SpooledFile> {
        // No fsync: a spool is scratch. After a crash its changes are read again from the slot; what
        // is durable is the uploaded object and its registry row.
        let (hf, path) = match self.stage {
            Stage::Live(live) => {
                let Live { writer, path, .. } = *live;
                let enc = writer.into_inner().map_err(|e| e.into_error())?;
                (enc.finish()?, path)
            }
            Stage::Raw(mut raw) => {
                let (mut enc, path) = self.shared.gzip_file(&self.name)?;
                raw.copy_into(&mut enc)?;
                (enc.finish()?, path)
            }
        };
        Ok(SpooledFile {
            path,
            gz_bytes: hf.bytes,
            sha256: hex::encode(hf.hash.finalize()),
        })
    }
}

/// Creates spool files in one directory with a fixed compression level, and keeps the count of its
/// live spools (at most [`MAX_LIVE`]).
pub struct GzipSpools {
    shared: Arc<Shared>,
}

impl GzipSpools {
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        Self::with_limits(dir, MAX_LIVE, PROMOTE_AT)
    }

    /// Like [`GzipSpools::new`] with another live budget and promotion size (for tests).
    pub fn with_limits(dir: PathBuf, max_live: usize, promote_at: u64) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(GzipSpools {
            shared: Arc::new(Shared {
                dir,
                level: Compression::fast(),
                max_live,
                promote_at,
                live: AtomicUsize::new(0),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// How many of its spools are live now.
    pub fn live(&self) -> usize {
        self.shared.live.load(Relaxed)
    }
}

impl SpoolFactory for GzipSpools {
    type Spool = GzipSpool;
    type Hold = File;

    /// An anonymous file in the spool directory: it vanishes with the process, however it ends.
    fn hold_file(&mut self) -> io::Result<File> {
        tempfile::tempfile_in(&self.shared.dir)
    }

    /// A raw spool: no file and no memory until it is written to.
    fn create(&mut self, table: &TableName) -> io::Result<GzipSpool> {
        let name: String = table
            .dotted()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        Ok(GzipSpool {
            shared: self.shared.clone(),
            name: name.into_boxed_str(),
            stage: Stage::Raw(Raw {
                buf: Vec::new(),
                file: None,
                file_bytes: 0,
            }),
        })
    }
}

/// Removes spool files left by a process that did not exit cleanly. Only files with our suffix are
/// touched (raw files are anonymous and leave nothing behind).
pub fn clean_spool_dir(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(".csv.gz.spool")
        {
            std::fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Read;

    /// `n` bytes that differ from any shifted copy of themselves (a misplaced chunk shows).
    fn data(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"0123456789,\"abcdefghij\n"[(x % 23) as usize]
            })
            .collect()
    }

    /// Named spool files in the directory.
    fn named(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".csv.gz.spool")
            })
            .count()
    }

    /// The file is one gzip member that decompresses to `want`, and its size and hash are those on
    /// disk.
    fn check(done: &SpooledFile, want: &[u8]) {
        let on_disk = std::fs::read(&done.path).unwrap();
        assert_eq!(on_disk.len() as u64, done.gz_bytes);
        assert_eq!(hex::encode(Sha256::digest(&on_disk)), done.sha256);
        let mut dec = flate2::read::GzDecoder::new(&on_disk[..]);
        let mut text = Vec::new();
        dec.read_to_end(&mut text).unwrap();
        assert_eq!(text.len(), want.len());
        assert!(text == want, "decompressed bytes differ");
        // A single member: nothing after it.
        let mut rest = Vec::new();
        dec.into_inner().read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "{} bytes after the gzip member",
            rest.len()
        );
    }

    fn write_in(spool: &mut GzipSpool, bytes: &[u8], sizes: &[usize]) {
        let mut at = 0;
        for &n in sizes.iter().cycle() {
            if at == bytes.len() {
                break;
            }
            let end = (at + n.max(1)).min(bytes.len());
            spool.write_all(&bytes[at..end]).unwrap();
            at = end;
        }
    }

    #[test]
    fn spool_round_trips_and_hashes_what_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = GzipSpools::new(dir.path().join("slot")).unwrap();
        let mut s = spools.create(&TableName::new("public", "t/x")).unwrap();
        let mut want = Vec::new();
        for i in 0..30_000 {
            writeln!(s, "\"{i}\",\"row\"").unwrap();
            writeln!(want, "\"{i}\",\"row\"").unwrap();
        }
        assert!(s.is_live());
        let done = s.finish().unwrap();
        check(&done, &want);
        assert!(done
            .path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("public.t_x-"));
        assert_eq!(spools.live(), 0);
    }

    #[test]
    fn raw_batches_have_no_named_file_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = GzipSpools::new(dir.path().to_path_buf()).unwrap();
        // An empty batch, one under the buffer, one just at it, one spilled to its anonymous file.
        for n in [0, 100, RAW_BUFFER, RAW_BUFFER + 1, 100_000] {
            let bytes = data(n as u64, n);
            let mut s = spools.create(&TableName::new("public", "t")).unwrap();
            write_in(&mut s, &bytes, &[130]);
            assert!(!s.is_live());
            if let Stage::Raw(raw) = &s.stage {
                assert!(raw.buf.capacity() <= RAW_BUFFER);
                assert_eq!(raw.file.is_some(), n > RAW_BUFFER);
            }
            assert_eq!(named(dir.path()), 0);
            let done = s.finish().unwrap();
            assert_eq!(named(dir.path()), 1);
            check(&done, &bytes);
            drop(done);
            assert_eq!(named(dir.path()), 0);
        }
        assert_eq!(spools.live(), 0);
    }

    #[test]
    fn promoted_batches_compress_what_came_before_and_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = GzipSpools::new(dir.path().to_path_buf()).unwrap();
        let bytes = data(7, 3 * PROMOTE_AT as usize + 12_345);
        let mut s = spools.create(&TableName::new("public", "t")).unwrap();
        write_in(&mut s, &bytes[..PROMOTE_AT as usize - 1], &[97, 5, 1000]);
        assert!(!s.is_live(), "not due yet");
        write_in(&mut s, &bytes[PROMOTE_AT as usize - 1..], &[97, 5, 1000]);
        assert!(s.is_live());
        assert_eq!(spools.live(), 1);
        assert_eq!(named(dir.path()), 1);
        check(&s.finish().unwrap(), &bytes);
        assert_eq!(spools.live(), 0);
    }

    #[test]
    fn one_write_may_cross_the_buffer_and_the_promotion_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = GzipSpools::new(dir.path().to_path_buf()).unwrap();
        for (seed, sizes) in [
            (1u64, vec![10, PROMOTE_AT as usize + 5]),
            (2, vec![RAW_BUFFER - 1, 2, PROMOTE_AT as usize]),
            (3, vec![PROMOTE_AT as usize, 1]),
            (4, vec![3 * RAW_BUFFER]),
        ] {
            let total: usize = sizes.iter().sum();
            let bytes = data(seed, total + 777);
            let mut s = spools.create(&TableName::new("public", "t")).unwrap();
            let mut at = 0;
            for n in &sizes {
                s.write_all(&bytes[at..at + n]).unwrap();
                at += n;
            }
            assert_eq!(s.is_live(), total as u64 >= PROMOTE_AT, "{sizes:?}");
            s.write_all(&bytes[at..]).unwrap();
            check(&s.finish().unwrap(), &bytes);
        }
    }

    #[test]
    fn past_the_live_budget_big_batches_stay_raw_and_finish_all_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = GzipSpools::with_limits(dir.path().to_path_buf(), 2, 16 * 1024).unwrap();
        let inputs: Vec<Vec<u8>> = (0..4).map(|i| data(i, 200_000)).collect();
        let mut open: Vec<GzipSpool> = (0..4)
            .map(|_| spools.create(&TableName::new("s", "t")).unwrap())
            .collect();
        for (s, bytes) in open.iter_mut().zip(&inputs) {
            write_in(s, &bytes[..100_000], &[150]);
        }
        let live: Vec<bool> = open.iter().map(GzipSpool::is_live).collect();
        assert_eq!(live, [true, true, false, false]);
        assert_eq!(spools.live(), 2);
        // A live one finishes: the next raw one is promoted at its next spill, the last stays raw.
        let first = open.remove(0);
        let mut done = vec![first.finish().unwrap()];
        assert_eq!(spools.live(), 1);
        for (s, bytes) in open.iter_mut().zip(&inputs[1..]) {
            write_in(s, &bytes[100_000..], &[150]);
        }
        let live: Vec<bool> = open.iter().map(GzipSpool::is_live).collect();
        assert_eq!(live, [true, true, false]);
        // A dropped live spool gives its slot back too.
        drop(open.remove(0));
        assert_eq!(spools.live(), 1);
        for s in open {
            done.push(s.finish().unwrap());
        }
        assert_eq!(spools.live(), 0);
        check(&done[0], &inputs[0][..100_000]);
        check(&done[1], &inputs[2]);
        check(&done[2], &inputs[3]);
    }

    #[test]
    fn cleanup_removes_what_a_crash_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = GzipSpools::new(dir.path().join("slot")).unwrap();
        let bytes = data(9, PROMOTE_AT as usize + 1);
        // A live spool and a spilled raw one are forgotten, as in a crash: only the live one has a
        // name, and the raw one's anonymous file is gone with its descriptor.
        let mut live = spools.create(&TableName::new("public", "a")).unwrap();
        live.write_all(&bytes).unwrap();
        assert!(live.is_live());
        let mut raw = spools.create(&TableName::new("public", "b")).unwrap();
        raw.write_all(&bytes[..2 * RAW_BUFFER]).unwrap();
        assert!(!raw.is_live());
        let finished = spools.create(&TableName::new("public", "c")).unwrap();
        let finished = finished.finish().unwrap();
        std::mem::forget(live);
        drop(raw);
        let left: Vec<_> = std::fs::read_dir(spools.dir()).unwrap().collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(clean_spool_dir(spools.dir()).unwrap(), 2);
        assert_eq!(std::fs::read_dir(spools.dir()).unwrap().count(), 0);
        drop(finished);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any interleaving of writes into three spools sharing one live slot: every file decompresses
        /// to what was written into it, and the budget is never exceeded and is all given back.
        #[test]
        fn any_write_sizes_round_trip(
            writes in proptest::collection::vec((0usize..3, 0usize..20_000), 0..60),
            promote_at in prop_oneof![Just(0u64), Just(1u64), 1u64..40_000, Just(u64::MAX)],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut spools = GzipSpools::with_limits(dir.path().to_path_buf(), 1, promote_at).unwrap();
            let mut spools_open: Vec<GzipSpool> =
                (0..3).map(|_| spools.create(&TableName::new("p", "t")).unwrap()).collect();
            let mut want = vec![Vec::new(); 3];
            for (i, (which, n)) in writes.iter().enumerate() {
                let bytes = data(i as u64, *n);
                spools_open[*which].write_all(&bytes).unwrap();
                want[*which].extend_from_slice(&bytes);
                prop_assert!(spools.live() <= 1);
                let live = spools_open.iter().filter(|s| s.is_live()).count();
                prop_assert_eq!(live, spools.live());
            }
            for (s, want) in spools_open.into_iter().zip(&want) {
                check(&s.finish().unwrap(), want);
            }
            prop_assert_eq!(spools.live(), 0);
            prop_assert_eq!(named(dir.path()), 0);
        }
    }
}
