//! A verified write in progress: bytes go to a temp file and into a running hash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use sha2::{Digest as _, Sha256};

use super::StoreError;
use crate::names::Digest;

/// Owns a temp file under `tmp/`. Dropping it without [`super::Store::commit`] removes the
/// file, so an aborted fill (upstream error, client gone, panic) leaves nothing behind.
pub struct BlobWriter {
    file: Arc<File>,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
    /// Bytes whose writeback has been started (see [`BlobWriter::write`]).
    flushed: u64,
    done: bool,
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
            path,
            hasher: Sha256::new(),
            written: 0,
            flushed: 0,
            done: false,
        })
    }

    /// Appends bytes. They are in the OS page cache (readable through [`Self::reader`])
    /// when this returns; there is no user-space buffer to flush.
    ///
    /// Every [`FLUSH_EVERY`] bytes the kernel is asked to start writing them back
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait): the fsync at
    /// commit then finds little left to write, and a fill never leaves hundreds of MiB of
    /// dirty pages for the next one (or the next process) to wait behind.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        (&*self.file).write_all(bytes)?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        if self.written - self.flushed >= FLUSH_EVERY {
            self.start_writeback();
        }
        Ok(())
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let (from, len) = (self.flushed as i64, (self.written - self.flushed) as i64);
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
        self.flushed = self.written;
    }

    #[cfg(not(target_os = "linux"))]
    fn start_writeback(&mut self) {
        self.flushed = self.written;
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
