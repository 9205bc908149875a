//! Spool files: where a batch's gzip stream is built, on local disk, until it is sealed and uploaded.
//!
//! # Contract
//! - Rows are compressed as they arrive; memory per open batch is the gzip state plus a 64 KiB buffer,
//!   whatever the batch size (ARCHITECTURE.md, invariant 4).
//! - [`GzipSpool::finish`] returns the compressed size and SHA-256 computed while writing, so the file
//!   is read once more only to upload it.
//! - Spool files are temporary files in the daemon's own folder of the spool directory
//!   (`<spool_dir>/<source.name>-<digest of source URL and slot>/`, one per daemon, so daemons on
//!   one host never share one); they are deleted when dropped, and [`clean_spool_dir`] removes
//!   leftovers of a crashed process at start-up.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

use crate::core::batch::SpoolFactory;
use crate::table::TableName;

/// File writer that hashes and counts what passes through it.
struct HashingFile {
    file: File,
    hash: Sha256,
    bytes: u64,
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

pub struct GzipSpool {
    writer: BufWriter<GzEncoder<HashingFile>>,
    path: tempfile::TempPath,
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
        self.writer.write(buf)
    }
    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.writer.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl GzipSpool {
    pub fn finish(self) -> io::Result<SpooledFile> {
        let enc = self.writer.into_inner().map_err(|e| e.into_error())?;
        // No fsync: a spool is scratch. After a crash its changes are read again from the slot; what
        // is durable is the uploaded object and its registry row.
        let hf = enc.finish()?;
        Ok(SpooledFile {
            path: self.path,
            gz_bytes: hf.bytes,
            sha256: hex::encode(hf.hash.finalize()),
        })
    }
}

/// Creates spool files in one directory with a fixed compression level.
pub struct GzipSpools {
    dir: PathBuf,
    level: Compression,
}

impl GzipSpools {
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(GzipSpools {
            dir,
            level: Compression::fast(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl SpoolFactory for GzipSpools {
    type Spool = GzipSpool;
    type Hold = File;

    /// An anonymous file in the spool directory: it vanishes with the process, however it ends.
    fn hold_file(&mut self) -> io::Result<File> {
        tempfile::tempfile_in(&self.dir)
    }

    fn create(&mut self, table: &TableName) -> io::Result<GzipSpool> {
        let safe: String = table
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
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{safe}-"))
            .suffix(".csv.gz.spool")
            .tempfile_in(&self.dir)?;
        let (file, path) = tmp.into_parts();
        let hf = HashingFile {
            file,
            hash: Sha256::new(),
            bytes: 0,
        };
        Ok(GzipSpool {
            writer: BufWriter::with_capacity(64 * 1024, GzEncoder::new(hf, self.level)),
            path,
        })
    }
}

/// Removes spool files left by a process that did not exit cleanly. Only files with our suffix are
/// touched.
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
    use std::io::Read;

    #[test]
    fn spool_round_trips_and_hashes_what_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut spools = GzipSpools::new(dir.path().join("slot")).unwrap();
        let mut s = spools.create(&TableName::new("public", "t/x")).unwrap();
        for i in 0..10_000 {
            writeln!(s, "\"{i}\",\"row\"").unwrap();
        }
        let done = s.finish().unwrap();
        let on_disk = std::fs::read(&done.path).unwrap();
        assert_eq!(on_disk.len() as u64, done.gz_bytes);
        assert_eq!(hex::encode(Sha256::digest(&on_disk)), done.sha256);
        let mut text = String::new();
        flate2::read::GzDecoder::new(&on_disk[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.lines().count(), 10_000);
        // A leftover from a crash is cleaned; the finished one is removed on drop.
        let leftover = spools.create(&TableName::new("public", "t")).unwrap();
        std::mem::forget(leftover);
        assert_eq!(clean_spool_dir(spools.dir()).unwrap(), 2);
        drop(done);
    }
}
