//! A verified write in progress: bytes go to a temp file and into a running hash.
//!
//! Where the filesystem allows it, whole blocks are written with direct I/O (see
//! [`super::direct`]) and only the last partial block through the page cache.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use sha2::{Digest as _, Sha256};

use super::direct::Direct;
use super::StoreError;
use crate::names::Digest;

/// Owns a temp file under `tmp/`. Dropping it without [`super::Store::commit`] removes the
/// file, so an aborted fill (upstream error, client gone, panic) leaves nothing behind.
pub struct BlobWriter {
    /// Buffered descriptor: readers of a fill in progress, and the last partial block.
    file: Arc<File>,
    /// Direct-I/O descriptor and its block buffer, when the filesystem supports it.
    direct: Option<Direct>,
    path: PathBuf,
    hasher: Sha256,
    /// Bytes taken (hashed, and in the file or the block buffer).
    written: u64,
    /// Bytes in the file (readable through [`Self::reader`]).
    in_file: u64,
    /// Bytes whose writeback has been started (see [`BlobWriter::write`]).
    flushed: u64,
    done: bool,
    /// Test seam: bytes this writer may take before it reports the disk full.
    #[cfg(test)]
    room: u64,
}

/// Writeback of a blob being written is started every this many bytes.
const FLUSH_EVERY: u64 = 8 * 1024 * 1024;

impl BlobWriter {
    pub(super) fn create(tmp_dir: &Path) -> Result<BlobWriter, StoreError> {
        let name = format!("{:032x}.part", rand::thread_rng().gen::<u128>());
        let path = tmp_dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(BlobWriter {
            file: Arc::new(file),
            direct: Direct::open(&path),
            path,
            hasher: Sha256::new(),
            written: 0,
            in_file: 0,
            flushed: 0,
            done: false,
            #[cfg(test)]
            room: u64::MAX,
        })
    }

    /// Appends bytes. Up to [`Self::in_file`] they are readable through
    /// [`Self::reader`]; the last partial direct-I/O block is written at commit.
    ///
    /// On the buffered path, every [`FLUSH_EVERY`] bytes the kernel is asked to start
    /// writing them back (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait):
    /// the fsync at commit then finds little left to write, and a fill never leaves
    /// hundreds of MiB of dirty pages for the next one (or the next process) to wait behind.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.write_unhashed(bytes)
    }

    /// Appends bytes that the caller hashes itself (see [`Self::take_hasher`]).
    pub fn write_unhashed(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if self.written + bytes.len() as u64 > self.room {
            return Err(io::ErrorKind::StorageFull.into());
        }
        self.written += bytes.len() as u64;
        while let Some(direct) = self.direct.as_mut() {
            let took = direct.fill(bytes);
            bytes = &bytes[took..];
            if !direct.full() {
                return Ok(());
            }
            match direct.write_block() {
                Ok(()) => self.in_file += super::direct::BLOCK as u64,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Opened with O_DIRECT but the writes are refused: buffered from here.
                    let block = direct.pending();
                    self.direct = None;
                    self.append(&block)?;
                }
                Err(e) => return Err(e),
            }
        }
        self.append(bytes)
    }

    /// Writes through the page cache at the end of the file.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(bytes, self.in_file)?;
        self.in_file += bytes.len() as u64;
        if self.in_file - self.flushed >= FLUSH_EVERY {
            self.start_writeback();
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn with_room(mut self, room: u64) -> BlobWriter {
        self.room = room;
        self
    }

    /// Bytes in the file: a reader of a fill in progress may read this far.
    pub fn in_file(&self) -> u64 {
        self.in_file
    }

    /// Takes the running hash of the bytes written so far, so a caller can hash the next
    /// ones on another thread while this one writes them (the two cost about the same).
    /// It must be handed back with [`Self::put_hasher`] before the commit; a writer
    /// committed without it hashes to the empty digest and is refused.
    pub fn take_hasher(&mut self) -> Sha256 {
        std::mem::take(&mut self.hasher)
    }

    pub fn put_hasher(&mut self, hasher: Sha256) {
        self.hasher = hasher;
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let (from, len) = (self.flushed as i64, (self.in_file - self.flushed) as i64);
        // SAFETY: a plain syscall on a descriptor this writer owns; a failure only means
        // the fsync at commit does all the writing, as without this call.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                from,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.flushed = self.in_file;
    }

    #[cfg(not(target_os = "linux"))]
    fn start_writeback(&mut self) {
        self.flushed = self.in_file;
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// The digest of the bytes written so far (the writer goes on).
    pub fn digest(&self) -> Digest {
        Digest::from_hasher(self.hasher.clone())
    }

    /// A handle for positional reads of the bytes written so far, shared with the
    /// requests that stream a fill while it is still in progress.
    pub fn reader(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Syncs the file and hands back (temp path, digest of the bytes, bytes written).
    pub(super) fn finish(mut self) -> io::Result<(PathBuf, Digest, u64)> {
        if let Some(direct) = self.direct.take().filter(|d| d.pending_len() > 0) {
            self.append(&direct.pending())?;
        }
        self.done = true;
        self.file.sync_all()?;
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        Ok((self.path.clone(), actual, self.written))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::direct::BLOCK;

    /// Bytes cross direct-I/O blocks in odd-sized chunks: what is readable grows by whole
    /// blocks (or at once, buffered), and the committed file holds exactly the bytes.
    #[test]
    fn writes_every_byte_whatever_the_chunking() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let data: Vec<u8> = (0..2 * BLOCK + 1234)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut w = BlobWriter::create(dir.path()).expect("create");
        let direct = w.direct.is_some();
        for chunk in data.chunks(23 * 1024 + 7) {
            w.write(chunk).expect("write");
            assert!(w.in_file() <= w.written());
            if !direct {
                assert_eq!(w.in_file(), w.written());
            }
        }
        assert_eq!(w.written(), data.len() as u64);
        assert!(
            w.in_file()
                >= if direct {
                    2 * BLOCK as u64
                } else {
                    data.len() as u64
                }
        );
        let expected = Digest::from_hasher(Sha256::new_with_prefix(&data));
        let (path, digest, len) = w.finish().expect("finish");
        assert_eq!((digest, len), (expected, data.len() as u64));
        assert_eq!(fs::read(&path).expect("read"), data);
    }
}
