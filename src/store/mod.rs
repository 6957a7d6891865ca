//! The store: the only code that touches files or the bucket.
//!
//! Content lives once per digest under `blobs/sha256/<2>/<hex>`, whatever upstream or
//! repository it came from. Writes go to `tmp/` and are renamed into place only after the
//! bytes were hashed and matched the expected digest and were fsynced, so a crash can leave
//! at most a temp file (removed at the next start), never a wrong or partial blob.
//!
//! Per-repository metadata (`repos/<upstream>/<repo>/...`) is small JSON: which tags point
//! where, which manifests and blobs a repository is known to hold. Repository components
//! always start with `[a-z0-9]`, so the `_tags`/`_manifests`/`_blobs` folders cannot
//! collide with a repository name.
//!
//! The interface is narrow on purpose (stat, read at offset, begin/commit/abort a verified
//! write, delete, list, and metadata get/put), and which backend runs (files, or an S3
//! bucket with this disk as its local tier) is chosen and matched in one place,
//! `backend.rs`: nothing outside `store/` knows.

mod backend;
mod bucket;
mod direct;
mod hot;
pub mod layout;
mod meta;
mod owner;
mod sessions;
mod shared;
mod writer;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use bucket::{Bucket, Upload};
pub use hot::{HotStats, Served, Stamp};
pub use meta::{now_secs, ManifestLink, TagRecord};
pub use owner::Owner;
pub use sessions::{SessionInfo, SessionWriter};
pub use writer::BlobWriter;

use crate::names::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// (Not a `#[source]`: the message already holds the I/O error, and `{:#}` chains
    /// would print it twice.)
    #[error("store I/O: {0}")]
    Io(io::Error),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    /// Boxed: a digest is 64 bytes inline, and every store result carries this error.
    DigestMismatch {
        expected: Box<Digest>,
        actual: Box<Digest>,
    },
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("corrupt metadata {0}")]
    Meta(String),
    #[error("{0}")]
    Bucket(String),
    #[error("server.storage {path}: already served by another entrepot ({holder}); stop it, or give this server its own server.storage (replicas share a bucket, each with its own directory)", path = path.display())]
    Owned { path: PathBuf, holder: String },
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::Io(e)
    }
}

/// The store: a directory on local disk and, when configured, an S3 bucket shared by
/// replicas. Without a bucket the directory holds everything (blobs and metadata). With
/// one, the bucket is the source of truth for blobs and all metadata, and the directory
/// is this replica's hot tier of blobs (LRU-capped), so warm reads stay local file reads.
pub struct Store {
    root: PathBuf,
    /// Bytes of committed content, kept current on commit/delete for the size metric
    /// (wrapping arithmetic: a delete before [`Store::measure`] is made up by it).
    size: AtomicU64,
    /// Whether [`Store::measure`] ran (until then the size is unknown: 0).
    measured: std::sync::atomic::AtomicBool,
    shared: Option<shared::Shared>,
    /// Hot manifests and metadata in memory (off until [`Store::keep_in_memory`]).
    hot: hot::Hot,
    /// Test seam: bytes a fill may write before the disk reports full (see
    /// [`Store::limit_room`]).
    #[cfg(test)]
    room: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the store at `root`. The stored bytes are measured by
    /// [`Store::measure`], which `serve` runs after it listens: on a store of 250k blobs
    /// the walk took 0.9 s warm and 5 s with a cold page cache, time a restarted mirror
    /// used to spend not serving. Temp files are left alone here: a CLI command may open
    /// the store of a running server; `serve` calls [`Store::clean_tmp`] at start.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for dir in [
            "blobs/sha256",
            "sizes",
            "quarantine",
            "tmp",
            "uploads",
            "repos",
        ] {
            fs::create_dir_all(root.join(dir))?;
        }
        let root = fs::canonicalize(root)?;
        Ok(Store {
            root,
            size: AtomicU64::new(0),
            measured: Default::default(),
            shared: None,
            hot: hot::Hot::new(0),
            #[cfg(test)]
            room: AtomicU64::new(u64::MAX),
        })
    }

    /// Walks the local blobs and adds their bytes to [`Store::size`] (which counted only
    /// what was committed and deleted since the store was opened). Blocking.
    pub fn measure(&self) -> Result<u64, StoreError> {
        let walked = dir_size(&self.root.join("blobs"))?;
        self.size.fetch_add(walked, Ordering::Relaxed);
        self.measured.store(true, Ordering::Release);
        Ok(walked)
    }

    /// Opens the store at `root` as the local tier of `bucket` (checked reachable first),
    /// capped at `local_cap` bytes.
    pub async fn open_shared(
        root: &Path,
        bucket: Bucket,
        local_cap: u64,
    ) -> Result<Store, StoreError> {
        bucket.check().await?;
        let mut store = Store::open(root)?;
        store.shared = Some(shared::Shared::new(bucket, local_cap));
        Ok(store)
    }

    /// Keeps up to `bytes` of hot manifests and metadata in memory (`server.memory_cache`).
    pub fn keep_in_memory(mut self, bytes: u64) -> Store {
        self.hot = hot::Hot::new(bytes);
        self
    }

    /// The memory's size and use, for the metrics.
    pub fn memory_stats(&self) -> HotStats {
        self.hot.stats()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Total bytes of committed content (0 until [`Store::measure`] ran).
    pub fn size(&self) -> u64 {
        if self.measured.load(Ordering::Acquire) {
            self.size.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    /// Where the length of a committed blob is recorded (written before the blob becomes
    /// visible): a file cut short later (a disk cleanup, an operator, a bad restore) is
    /// caught when it is opened, without re-hashing.
    fn size_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("sizes").join(&hex[..2]).join(hex)
    }

    fn recorded_size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        let Some(text) = not_found_is_none(fs::read_to_string(self.size_path(d)))? else {
            return Ok(None);
        };
        Ok(text.trim().parse().ok())
    }

    /// Whether a blob file of `len` bytes is whole; if not it is moved to `quarantine/`
    /// (kept for inspection, no longer served) and the blob counts as not stored.
    fn check_len(&self, d: &Digest, len: u64) -> Result<bool, StoreError> {
        match self.recorded_size(d)? {
            Some(want) if want != len => {
                let dest = self.root.join("quarantine").join(format!(
                    "{}.{}",
                    d.hex(),
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |t| t.as_nanos())
                ));
                tracing::error!(digest = %d, recorded = want, found = len, quarantine = %dest.display(), "stored blob has the wrong length: quarantined, it will be fetched again");
                self.hot.forget(&size_key(d));
                if not_found_is_none(fs::rename(self.blob_path(d), &dest))?.is_some() {
                    self.size.fetch_sub(len, Ordering::Relaxed);
                }
                not_found_is_none(fs::remove_file(self.size_path(d)))?;
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    /// `len` bytes of the local copy of `d` from `start` (none when it is not local).
    pub fn read_range(
        &self,
        d: &Digest,
        start: u64,
        len: u64,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        let Some(f) = not_found_is_none(File::open(self.blob_path(d)))? else {
            return Ok(None);
        };
        Ok(Some(read_chunk(&f, start, len as usize)?))
    }

    /// Size of a blob in the local tier, or `None` if it is not there (or not whole).
    pub fn local_size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        // The size of a whole local blob, remembered a second (see `hot`): a blob HEAD
        // otherwise cost a stat and a read of the size record (6 system calls).
        let key = size_key(d);
        if let hot::Lookup::Present(Some(b)) = self.hot.lookup(&key, true) {
            if let Some(len) = std::str::from_utf8(&b).ok().and_then(|t| t.parse().ok()) {
                return Ok(Some(len));
            }
        }
        let Some(len) = not_found_is_none(fs::metadata(self.blob_path(d)))?.map(|m| m.len()) else {
            return Ok(None);
        };
        let whole = self.check_len(d, len)?;
        if whole {
            self.hot.remember(&key, Some(len.to_string().as_bytes()));
        }
        Ok(whole.then_some(len))
    }

    /// Opens a committed blob for positional reads (`FileExt::read_at`); `None` if it is
    /// not stored or not whole.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<File>, StoreError> {
        let Some(f) = not_found_is_none(File::open(self.blob_path(d)))? else {
            return Ok(None);
        };
        let len = f.metadata()?.len();
        Ok(self.check_len(d, len)?.then_some(f))
    }

    /// Reads a whole small blob (a manifest) into memory; `None` if not stored or whole.
    pub fn read_small_local(&self, d: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(bytes) = not_found_is_none(fs::read(self.blob_path(d)))? else {
            return Ok(None);
        };
        Ok(self.check_len(d, bytes.len() as u64)?.then_some(bytes))
    }

    /// Records the length of a blob about to be committed (temp file + rename).
    fn record_size(&self, d: &Digest, len: u64) -> Result<(), StoreError> {
        let path = self.size_path(d);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, len.to_string())?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Starts a write; nothing is visible until [`Store::commit`], and dropping the
    /// writer aborts it.
    pub fn begin(&self) -> Result<BlobWriter, StoreError> {
        let w = BlobWriter::create(&self.root.join("tmp"))?;
        #[cfg(test)]
        let w = w.with_room(self.room.load(Ordering::Relaxed));
        Ok(w)
    }

    /// Test seam: every writer begun from now on reports the disk full
    /// (`ErrorKind::StorageFull`) once it would hold more than `bytes`, as a full
    /// filesystem does, so the fill's disk-full path runs without filling a disk.
    #[cfg(test)]
    pub fn limit_room(&self, bytes: u64) {
        self.room.store(bytes, Ordering::Relaxed);
    }

    /// Verifies the written bytes against the expected digest (and size, when known),
    /// syncs them to disk and moves them into place. On mismatch the temp file is removed.
    pub fn commit(
        &self,
        w: BlobWriter,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> Result<u64, StoreError> {
        let (tmp, actual, written) = w.finish()?;
        let verdict = if actual != *expected {
            Err(StoreError::DigestMismatch {
                expected: Box::new(*expected),
                actual: Box::new(actual),
            })
        } else if expected_size.is_some_and(|s| s != written) {
            Err(StoreError::SizeMismatch {
                expected: expected_size.unwrap_or_default(),
                actual: written,
            })
        } else {
            Ok(())
        };
        if let Err(e) = verdict {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.adopt(&tmp, expected, written)?;
        Ok(written)
    }

    /// Moves a verified, synced file into place as blob `d` (or drops it when the same
    /// content is stored already: another upstream, or a racing fill).
    fn adopt(&self, tmp: &Path, d: &Digest, len: u64) -> Result<(), StoreError> {
        if self.local_size(d)?.is_some() {
            let _ = fs::remove_file(tmp);
            return Ok(());
        }
        let dest = self.blob_path(d);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        self.record_size(d, len)?;
        fs::rename(tmp, &dest)?;
        self.size.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a small, already-verified object (a manifest) to the local tier.
    fn put_small_local(&self, d: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut w = self.begin()?;
        w.write(bytes)?;
        self.commit(w, d, Some(bytes.len() as u64)).map(|_| ())
    }

    /// Removes a blob from the local tier; returns whether it existed.
    fn delete_local(&self, d: &Digest) -> Result<bool, StoreError> {
        let path = self.blob_path(d);
        let Some(len) = not_found_is_none(fs::metadata(&path))?.map(|m| m.len()) else {
            return Ok(false);
        };
        fs::remove_file(&path)?;
        self.hot.forget(&size_key(d));
        not_found_is_none(fs::remove_file(self.size_path(d)))?;
        self.size.fetch_sub(len, Ordering::Relaxed);
        Ok(true)
    }

    /// Every committed object with its size and last use (for gc and verify).
    fn list_local(&self) -> Result<Vec<BlobInfo>, StoreError> {
        let mut out = Vec::new();
        for shard in fs::read_dir(self.root.join("blobs/sha256"))? {
            for entry in fs::read_dir(shard?.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Ok(digest) = format!("sha256:{}", name.to_string_lossy()).parse() else {
                    continue;
                };
                let Some(meta) = not_found_is_none(entry.metadata())? else {
                    continue;
                };
                out.push(BlobInfo {
                    digest,
                    size: meta.len(),
                    last_used: meta.modified()?,
                });
            }
        }
        Ok(out)
    }

    /// Records a use of `d` (its mtime is the "last pulled" time eviction goes by).
    /// Skipped when the last record is recent, to keep hot blobs from costing a
    /// syscall per request.
    fn touch_local(&self, d: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(d);
        let Some(file) = not_found_is_none(File::options().append(true).open(&path))? else {
            return Ok(());
        };
        let now = SystemTime::now();
        let fresh = file
            .metadata()?
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age < TOUCH_EVERY);
        if !fresh {
            file.set_modified(now)?;
        }
        Ok(())
    }

    /// Re-hashes a stored object; `Some(actual)` when it does not match its name.
    fn verify_local(&self, d: &Digest) -> Result<Option<Digest>, StoreError> {
        use sha2::Digest as _;
        // The file as it is (no length check: verify reports, it does not quarantine).
        let Some(mut f) = not_found_is_none(File::open(self.blob_path(d)))? else {
            return Ok(None);
        };
        let mut h = sha2::Sha256::new();
        io::copy(&mut f, &mut h)?;
        let actual = Digest::from_hasher(h);
        Ok((actual != *d).then_some(actual))
    }

    /// Temp files of fills (`uploads == false`) or of upload sessions, with their age
    /// (since last written).
    pub fn temp_files(&self, uploads: bool) -> Result<Vec<(PathBuf, Duration)>, StoreError> {
        let dir = if uploads { "uploads" } else { "tmp" };
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join(dir))? {
            let e = e?;
            let Some(meta) = not_found_is_none(e.metadata())? else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .unwrap_or_default();
            out.push((e.path(), age));
        }
        Ok(out)
    }

    /// Removes a temp file listed by [`Store::temp_files`].
    pub fn remove_temp(&self, p: &Path) -> Result<(), StoreError> {
        let parent = p.parent();
        if parent != Some(self.root.join("tmp").as_path())
            && parent != Some(self.root.join("uploads").as_path())
        {
            return Err(StoreError::Meta(format!(
                "{} is not a temp file",
                p.display()
            )));
        }
        not_found_is_none(fs::remove_file(p))?;
        Ok(())
    }

    /// Takes the link lock shared: linking content into a hosted repository (and the
    /// write it links) happens under it, so an eviction pass, which decides and deletes
    /// under the same lock held exclusively ([`Store::lock_evicting`]), can never delete
    /// what a hosted repository has just linked. A file lock (`flock`), so a `gc` run from
    /// the command line beside a live server is held back too. Taken on a blocking thread.
    pub async fn lock_linking(&self) -> Result<LinkLock, StoreError> {
        self.lock(false).await
    }

    /// Takes the link lock exclusively (eviction; see [`Store::lock_linking`]).
    pub async fn lock_evicting(&self) -> Result<LinkLock, StoreError> {
        self.lock(true).await
    }

    async fn lock(&self, exclusive: bool) -> Result<LinkLock, StoreError> {
        let path = self.root.join("links.lock");
        let file = tokio::task::spawn_blocking(move || -> io::Result<File> {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            if exclusive {
                f.lock()?;
            } else {
                f.lock_shared()?;
            }
            Ok(f)
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        Ok(LinkLock { _file: file })
    }

    /// Removes every temp file: only at server start, when no write can be in progress.
    pub fn clean_tmp(&self) -> Result<usize, StoreError> {
        Ok(clean_dir(&self.root.join("tmp"))? + clean_dir(&self.root.join("uploads"))?)
    }
}

/// The link lock, held until dropped (closing the file releases the `flock`).
pub struct LinkLock {
    _file: File,
}

/// Use records are refreshed at most this often per object.
const TOUCH_EVERY: Duration = Duration::from_secs(10);

/// A committed object as listed by [`Store::list`].
#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    pub last_used: SystemTime,
}

/// Removes every file in `dir`; returns how many.
fn clean_dir(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        fs::remove_file(entry?.path())?;
        n += 1;
    }
    Ok(n)
}

fn dir_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            total += dir_size(&entry.path())?;
        } else if ty.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

fn not_found_is_none<T>(r: io::Result<T>) -> Result<Option<T>, StoreError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads `[pos, pos+len)` of a blob file; callers run it on a blocking thread (a page-cache miss never
/// stalls an async worker). Positional reads, not a memory map: a file cut short under a
/// reader (a disk cleanup, an operator) then gives a short read, which aborts this one
/// response, where a mapping would kill the whole process with SIGBUS.
pub fn read_chunk(file: &File, pos: u64, len: usize) -> std::io::Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = bytes::BytesMut::zeroed(len);
    file.read_exact_at(&mut buf, pos).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            std::io::Error::other(format!(
                "blob file ends before byte {} (cut short while being read)",
                pos + len as u64
            ))
        } else {
            e
        }
    })?;
    Ok(buf.freeze())
}

/// The key under which the memory of hot objects keeps a local blob's size.
fn size_key(d: &Digest) -> String {
    format!("sizes/{}", d.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(store: &Store, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        let mut w = store.begin().expect("begin");
        w.write(bytes).expect("write");
        store
            .commit(w, &d, Some(bytes.len() as u64))
            .expect("commit");
        d
    }

    /// The remembered size never outlives the blob this process removes, and a second
    /// ask after a removal by someone else is answered from the disk once it is stale.
    #[tokio::test]
    async fn remembered_blob_sizes_follow_removals() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let store = Store::open(dir.path())
            .expect("store")
            .keep_in_memory(1 << 20);
        let d = stored(&store, b"a blob of some bytes");
        assert_eq!(store.local_size(&d).expect("size"), Some(20));
        let misses = store.memory_stats().misses;
        assert_eq!(store.local_size(&d).expect("size"), Some(20));
        assert_eq!(
            store.memory_stats().misses,
            misses,
            "second ask from memory"
        );
        assert!(store.delete(&d).await.expect("delete"));
        assert_eq!(store.local_size(&d).expect("size"), None);

        // Removed behind the store's back (as `entrepot gc` in another process does).
        let e = stored(&store, b"another blob");
        assert_eq!(store.local_size(&e).expect("size"), Some(12));
        std::fs::remove_file(store.blob_path(&e)).expect("rm");
        std::thread::sleep(hot::FRESH);
        assert_eq!(store.local_size(&e).expect("size"), None);
    }
}
