//! The one place the store's backend is chosen: the local filesystem under the root, or
//! the S3 bucket shared by replicas (the local disk then being its tier). [`Tier`] is that
//! choice, matched only here. Metadata objects (tags, links, private markers, referrers),
//! upload sessions (see `sessions.rs` for their layout) and blob bytes across the two
//! tiers all go through it; `shared.rs` keeps the bucket side's own state, and nothing
//! outside `store/` knows which backend runs.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};

use super::bucket::Upload;
use super::hot::{Hot, Lookup};
use super::sessions::{SessionInfo, SessionWriter, Sink};
use super::shared::{blob_key, secs, Shared};
use super::{not_found_is_none, BlobInfo, Store, StoreError};
use crate::names::Digest;

/// Whether the metadata file `key` exists, through the memory of hot objects: presence
/// is remembered, absence only with `absence` (a marker only `serve` writes; another
/// process may add any other object).
fn file_exists(root: &Path, hot: &Hot, key: &str, absence: bool) -> Result<bool, StoreError> {
    match hot.lookup(key, false) {
        Lookup::Absent => Ok(false),
        Lookup::Present(_) => Ok(true),
        Lookup::Unknown => {
            let exists = not_found_is_none(fs::metadata(root.join(key)))?.is_some();
            if exists {
                hot.remember_exists(key);
            } else if absence {
                hot.remember(key, None);
            }
            Ok(exists)
        }
    }
}

/// Where metadata lives.
pub(super) enum Tier<'a> {
    /// Files under the store's root, with the memory of hot ones.
    Files(&'a Path, &'a Hot),
    /// Objects in the bucket, with the recent "exists" answers this replica keeps.
    Bucket(&'a Shared),
}

impl Store {
    pub(super) fn tier(&self) -> Tier<'_> {
        match &self.shared {
            Some(sh) => Tier::Bucket(sh),
            None => Tier::Files(&self.root, &self.hot),
        }
    }
}

impl Tier<'_> {
    /// A metadata object.
    pub(super) async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self {
            Tier::Bucket(sh) => Ok(sh.bucket.get(key).await?),
            Tier::Files(root, hot) => match hot.lookup(key, true) {
                Lookup::Absent => Ok(None),
                Lookup::Present(b) => Ok(b),
                Lookup::Unknown => {
                    let read = not_found_is_none(fs::read(root.join(key)))?;
                    // Only what exists is remembered: `entrepot import` beside `serve`
                    // writes tags and links that must be served at once.
                    if let Some(b) = &read {
                        hot.remember(key, Some(b));
                    }
                    Ok(read.map(Bytes::from))
                }
            },
        }
    }

    pub(super) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Tier::Bucket(sh) => {
                sh.bucket.put(key, bytes.into()).await?;
                sh.remember(key, true);
                Ok(())
            }
            Tier::Files(root, hot) => {
                hot.forget(key);
                write_atomic(root.join(key), &bytes)?;
                hot.remember(key, Some(&bytes));
                Ok(())
            }
        }
    }

    /// Whether a marker exists that only `serve` writes (the private marker): its absence
    /// is remembered too, unlike other objects' (see [`Tier::get`]).
    pub(super) async fn marker(&self, key: &str) -> Result<bool, StoreError> {
        match self {
            Tier::Files(root, hot) => file_exists(root, hot, key, true),
            Tier::Bucket(_) => self.exists(key).await,
        }
    }

    pub(super) async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self {
            Tier::Bucket(sh) => {
                if let Some(exists) = sh.seen(key) {
                    return Ok(exists);
                }
                let exists = sh.bucket.head(key).await?.is_some();
                sh.remember(key, exists);
                Ok(exists)
            }
            Tier::Files(root, hot) => file_exists(root, hot, key, false),
        }
    }

    /// Removes a metadata object; whether it existed.
    pub(super) async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        match self {
            Tier::Bucket(sh) => {
                let existed = sh.bucket.head(key).await?.is_some();
                sh.bucket.delete(key).await?;
                sh.remember(key, false);
                Ok(existed)
            }
            Tier::Files(root, hot) => {
                hot.forget(key);
                Ok(not_found_is_none(fs::remove_file(root.join(key)))?.is_some())
            }
        }
    }

    /// Names directly under a metadata "directory", sorted.
    pub(super) async fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Tier::Bucket(sh) => sh.bucket.list_dir(&format!("{dir}/")).await,
            Tier::Files(root, _) => list_names(&root.join(dir)),
        }
    }

    /// Namespaces (upstream keys and the hosted prefix) that have repositories.
    pub(super) async fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        let root = match self {
            Tier::Bucket(sh) => return sh.bucket.list_dir("repos/").await,
            Tier::Files(root, _) => root,
        };
        let mut out = Vec::new();
        for e in fs::read_dir(root.join("repos"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_dir() && !name.starts_with('.') {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Repositories under a namespace (those with any metadata), sorted.
    pub(super) async fn repos(&self, ns: &str) -> Result<Vec<String>, StoreError> {
        let root = match self {
            Tier::Bucket(sh) => return bucket_repos(sh, ns).await,
            Tier::Files(root, _) => root,
        };
        let mut out = Vec::new();
        collect_repos(&root.join("repos").join(ns), "", &mut out)?;
        out.sort();
        Ok(out)
    }
}

impl Store {
    fn session_file(&self, id: &str) -> std::path::PathBuf {
        self.root.join("uploads").join(id)
    }

    /// Opens a session (`id` is a fresh UUID).
    pub async fn session_create(&self, id: &str, info: &SessionInfo) -> Result<(), StoreError> {
        let json = serde_json::to_vec(info).map_err(|e| StoreError::Meta(e.to_string()))?;
        match self.tier() {
            Tier::Bucket(sh) => {
                sh.bucket
                    .put(&format!("uploads/{id}/info"), json.into())
                    .await
            }
            Tier::Files(..) => {
                File::create(self.session_file(id))?;
                fs::write(self.session_file(&format!("{id}.json")), json)?;
                Ok(())
            }
        }
    }

    /// A session and the bytes it holds; `None` if unknown (never opened, finished,
    /// cancelled or expired).
    pub async fn session_info(&self, id: &str) -> Result<Option<(SessionInfo, u64)>, StoreError> {
        let bytes = match self.tier() {
            Tier::Bucket(sh) => sh
                .bucket
                .get(&format!("uploads/{id}/info"))
                .await?
                .map(|b| b.to_vec()),
            Tier::Files(..) => {
                not_found_is_none(fs::read(self.session_file(&format!("{id}.json"))))?
            }
        };
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let info: SessionInfo = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Meta(format!("upload session {id}: {e}")))?;
        let offset = match self.tier() {
            Tier::Bucket(_) => self.session_chunks(id).await?.values().sum(),
            Tier::Files(..) => match not_found_is_none(fs::metadata(self.session_file(id)))? {
                Some(m) => m.len(),
                None => return Ok(None),
            },
        };
        Ok(Some((info, offset)))
    }

    /// The chunks of a bucket session: offset -> size, checked to follow each other.
    async fn session_chunks(&self, id: &str) -> Result<BTreeMap<u64, u64>, StoreError> {
        let Tier::Bucket(sh) = self.tier() else {
            return Ok(BTreeMap::new());
        };
        let mut chunks = BTreeMap::new();
        for o in sh.bucket.list_all(&format!("uploads/{id}/")).await? {
            let name = o.key.rsplit('/').next().unwrap_or_default();
            if let Some(off) = name.strip_prefix('p').and_then(|n| n.parse::<u64>().ok()) {
                chunks.insert(off, o.size);
            }
        }
        let mut expect = 0;
        for (off, size) in &chunks {
            if *off != expect {
                return Err(StoreError::Meta(format!(
                    "upload session {id}: chunk at {off}, expected {expect}"
                )));
            }
            expect += size;
        }
        Ok(chunks)
    }

    /// Starts appending a body at `offset` (the session's current size).
    pub async fn session_writer(&self, id: &str, offset: u64) -> Result<SessionWriter, StoreError> {
        let sink = match self.tier() {
            Tier::Bucket(sh) => Sink::Bucket(Some(
                sh.bucket
                    .upload(&format!("uploads/{id}/p{offset:020}"))
                    .await?,
            )),
            Tier::Files(..) => {
                let f = File::options().append(true).open(self.session_file(id))?;
                if f.metadata()?.len() != offset {
                    return Err(StoreError::Meta(format!(
                        "upload session {id} changed under this request"
                    )));
                }
                Sink::File(f)
            }
        };
        Ok(SessionWriter {
            sink,
            start: offset,
            offset,
        })
    }

    /// Verifies the session's bytes against `expected` and stores them as that blob;
    /// returns its size. The session is gone afterwards either way.
    pub async fn session_commit(&self, id: &str, expected: &Digest) -> Result<u64, StoreError> {
        let r = match self.tier() {
            Tier::Bucket(_) => self.session_commit_shared(id, expected).await,
            Tier::Files(..) => self.session_commit_local(id, expected).await,
        };
        self.session_delete(id).await?;
        r
    }

    async fn session_commit_local(&self, id: &str, expected: &Digest) -> Result<u64, StoreError> {
        let path = self.session_file(id);
        let hashed = path.clone();
        let (actual, len) = tokio::task::spawn_blocking(move || -> io::Result<(Digest, u64)> {
            use sha2::Digest as _;
            let mut f = File::open(&hashed)?;
            let mut h = sha2::Sha256::new();
            let len = io::copy(&mut f, &mut h)?;
            f.sync_all()?;
            Ok((Digest::from_hasher(h), len))
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        if actual != *expected {
            return Err(StoreError::DigestMismatch {
                expected: Box::new(*expected),
                actual: Box::new(actual),
            });
        }
        self.adopt(&path, expected, len)?;
        Ok(len)
    }

    async fn session_commit_shared(&self, id: &str, expected: &Digest) -> Result<u64, StoreError> {
        let chunks = self.session_chunks(id).await?;
        let mut upload = self.upload_shared(expected).await?;
        let mut w = self.begin()?;
        for off in chunks.keys() {
            let key = format!("uploads/{id}/p{off:020}");
            let Tier::Bucket(sh) = self.tier() else { break };
            let Some((_, mut body)) = sh.bucket.read(&key, 0).await? else {
                return Err(StoreError::Meta(format!(
                    "upload session {id}: chunk {off} is gone"
                )));
            };
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                w.write(&chunk)?;
                if let Some(u) = &mut upload {
                    u.push(chunk).await?;
                }
            }
        }
        if w.digest() != *expected {
            if let Some(u) = upload {
                u.abort().await;
            }
            return Err(StoreError::DigestMismatch {
                expected: Box::new(*expected),
                actual: Box::new(w.digest()),
            });
        }
        if let Some(u) = upload {
            u.complete().await?;
        }
        let expected = *expected;
        self.commit(w, &expected, None)
    }

    /// Removes a session and its bytes (finished, cancelled or expired).
    pub async fn session_delete(&self, id: &str) -> Result<(), StoreError> {
        match self.tier() {
            Tier::Bucket(sh) => {
                for o in sh.bucket.list_all(&format!("uploads/{id}/")).await? {
                    sh.bucket.delete(&o.key).await?;
                }
            }
            Tier::Files(..) => {
                not_found_is_none(fs::remove_file(self.session_file(id)))?;
                not_found_is_none(fs::remove_file(self.session_file(&format!("{id}.json"))))?;
            }
        }
        Ok(())
    }

    /// Every session with the time since it was last written to.
    pub async fn sessions(&self) -> Result<Vec<(String, Duration)>, StoreError> {
        let now = SystemTime::now();
        let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
        let mut latest: BTreeMap<String, SystemTime> = BTreeMap::new();
        match self.tier() {
            Tier::Bucket(sh) => {
                for o in sh.bucket.list_all("uploads/").await? {
                    if let Some(id) = o
                        .key
                        .strip_prefix("uploads/")
                        .and_then(|k| k.split('/').next())
                    {
                        let e = latest.entry(id.to_string()).or_insert(o.modified);
                        *e = (*e).max(o.modified);
                    }
                }
            }
            Tier::Files(..) => {
                for (path, a) in self.temp_files(true)? {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    let Some(name) = name else { continue };
                    let id = name.trim_end_matches(".json").to_string();
                    let t = now - a;
                    let e = latest.entry(id).or_insert(t);
                    *e = (*e).max(t);
                }
            }
        }
        Ok(latest.into_iter().map(|(id, t)| (id, age(t))).collect())
    }
}

impl Store {
    /// Size of a blob held locally or in the bucket; `None` if neither has it. An object
    /// missing from the bucket is a miss, whatever was known before (another replica's
    /// eviction may have removed it).
    pub async fn stat(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        if let Lookup::Present(Some(b)) = self.hot.lookup(d.hex(), true) {
            return Ok(Some(b.len() as u64));
        }
        if let Some(size) = self.local_size(d)? {
            return Ok(Some(size));
        }
        match self.tier() {
            Tier::Bucket(sh) => Ok(sh.bucket.head(&blob_key(d)).await?.map(|o| o.size)),
            Tier::Files(..) => Ok(None),
        }
    }

    /// The bytes of a blob from the bucket (for filling the local tier), from `from` on.
    pub async fn read_shared(
        &self,
        d: &Digest,
        from: u64,
    ) -> Result<Option<(u64, BoxStream<'static, Result<Bytes, StoreError>>)>, StoreError> {
        match self.tier() {
            Tier::Bucket(sh) => sh.bucket.read(&blob_key(d), from).await,
            Tier::Files(..) => Ok(None),
        }
    }

    /// Like [`Store::read_shared`], read on the calling worker with `http`, for filling
    /// the local tier while clients stream (see [`super::bucket::Bucket::read_here`]).
    pub async fn read_shared_here(
        &self,
        http: &awc::Client,
        d: &Digest,
    ) -> Result<Option<(u64, super::bucket::LocalBody)>, StoreError> {
        match self.tier() {
            Tier::Bucket(sh) => sh.bucket.read_here(http, &blob_key(d)).await,
            Tier::Files(..) => Ok(None),
        }
    }

    /// Deletes a bucket object whose bytes did not match its digest, so the next request
    /// fetches the blob again.
    pub async fn reject_shared(&self, d: &Digest) -> Result<(), StoreError> {
        if let Tier::Bucket(sh) = self.tier() {
            tracing::error!(digest = %d, bucket = %sh.bucket.name, "bucket object does not match its digest: deleted, it will be fetched again");
            sh.bucket.delete(&blob_key(d)).await?;
        }
        Ok(())
    }

    /// Copies `size` bytes of a committed local blob `d` into the bucket, part by part;
    /// nothing without a bucket.
    pub async fn copy_to_shared(
        &self,
        d: &Digest,
        file: Arc<std::fs::File>,
        size: u64,
    ) -> Result<(), StoreError> {
        let Some(mut upload) = self.upload_shared(d).await? else {
            return Ok(());
        };
        let part = super::bucket::PART as u64;
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(part) as usize;
            let (f, at) = (file.clone(), pos);
            let bytes = tokio::task::spawn_blocking(move || super::read_chunk(&f, at, n))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))??;
            upload.push(bytes).await?;
            pos += n as u64;
        }
        upload.complete().await
    }

    /// A multipart upload of `d` into the bucket, to be fed while the blob is written
    /// locally and completed only once its digest checked out; `None` without a bucket.
    pub async fn upload_shared(&self, d: &Digest) -> Result<Option<Upload>, StoreError> {
        match self.tier() {
            Tier::Bucket(sh) => Ok(Some(sh.bucket.upload(&blob_key(d)).await?)),
            Tier::Files(..) => Ok(None),
        }
    }

    /// A whole small blob (a manifest), from the local tier or else the bucket (verified,
    /// then kept locally); `None` if not stored.
    pub async fn read_small(&self, d: &Digest) -> Result<Option<Bytes>, StoreError> {
        if let Lookup::Present(Some(b)) = self.hot.lookup(d.hex(), true) {
            return Ok(Some(b));
        }
        if let Some(bytes) = self.read_small_local(d)? {
            // Read from disk at most once a second while hot: the time to record a use.
            self.touch_local(d)?;
            self.hot.remember(d.hex(), Some(&bytes));
            return Ok(Some(bytes.into()));
        }
        let Tier::Bucket(sh) = self.tier() else {
            return Ok(None);
        };
        let Some(bytes) = sh.bucket.get(&blob_key(d)).await? else {
            return Ok(None);
        };
        if Digest::of(&bytes) != *d {
            self.reject_shared(d).await?;
            return Ok(None);
        }
        self.put_small_local(d, &bytes)?;
        self.hot.remember(d.hex(), Some(&bytes));
        Ok(Some(bytes))
    }

    /// Writes a small, already-verified object (a manifest) to both tiers.
    pub async fn put_small(&self, d: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if let Tier::Bucket(sh) = self.tier() {
            sh.bucket
                .put(&blob_key(d), Bytes::copy_from_slice(bytes))
                .await?;
        }
        self.put_small_local(d, bytes)
    }

    /// Removes a blob from both tiers; whether it existed.
    pub async fn delete(&self, d: &Digest) -> Result<bool, StoreError> {
        self.hot.forget(d.hex());
        let local = self.delete_local(d)?;
        match self.tier() {
            Tier::Bucket(sh) => {
                let there = sh.bucket.head(&blob_key(d)).await?.is_some();
                sh.bucket.delete(&blob_key(d)).await?;
                Ok(local || there)
            }
            Tier::Files(..) => Ok(local),
        }
    }

    /// Every committed object with its size and last use (for gc and verify): the
    /// bucket's objects when there is one, with the uses replicas recorded.
    pub async fn list(&self) -> Result<Vec<BlobInfo>, StoreError> {
        let Tier::Bucket(sh) = self.tier() else {
            return self.list_local();
        };
        let uses = self.read_uses().await?;
        let mut out = Vec::new();
        for o in sh.bucket.list_all("blobs/sha256/").await? {
            let Some(hex) = o.key.rsplit('/').next() else {
                continue;
            };
            let Ok(digest) = format!("sha256:{hex}").parse() else {
                continue;
            };
            let used = uses.get(hex).copied().unwrap_or(0).max(secs(o.modified));
            out.push(BlobInfo {
                digest,
                size: o.size,
                last_used: UNIX_EPOCH + Duration::from_secs(used),
            });
        }
        Ok(out)
    }

    /// Records a use of `d`: the local file's mtime (the local tier's LRU order) and,
    /// with a bucket, a use written in the next batch.
    pub fn touch(&self, d: &Digest) -> Result<(), StoreError> {
        if let Tier::Bucket(sh) = self.tier() {
            if let Ok(mut u) = sh.uses.lock() {
                u.insert(d.hex().to_string(), super::now_secs());
            }
        }
        if let Lookup::Present(_) = self.hot.lookup(d.hex(), false) {
            // Touched when it was read into memory, under a second ago.
            return Ok(());
        }
        // A blob pulled again within a second was recorded then: without this memory
        // each request opened the file to look at its mtime (3 system calls).
        let touched = format!("touched/{}", d.hex());
        if let Lookup::Present(_) = self.hot.lookup(&touched, false) {
            return Ok(());
        }
        self.touch_local(d)?;
        self.hot.remember_exists(&touched);
        Ok(())
    }

    /// Drops the uses recorded since the last call (no eviction is configured: nobody
    /// reads them, and `uses/` objects would pile up in the bucket).
    pub fn forget_uses(&self) {
        if let Tier::Bucket(sh) = self.tier() {
            if let Ok(mut u) = sh.uses.lock() {
                u.clear();
            }
        }
    }

    /// Writes the uses recorded since the last call as one object `uses/<random>`.
    pub async fn flush_uses(&self) -> Result<usize, StoreError> {
        let Tier::Bucket(sh) = self.tier() else {
            return Ok(0);
        };
        let batch = match sh.uses.lock() {
            Ok(mut u) => std::mem::take(&mut *u),
            Err(_) => return Ok(0),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let bytes = serde_json::to_vec(&batch).map_err(|e| StoreError::Meta(e.to_string()))?;
        let key = format!("uses/{}", uuid::Uuid::new_v4());
        sh.bucket.put(&key, bytes.into()).await?;
        Ok(batch.len())
    }

    /// Every recorded use, merged (latest per digest).
    async fn read_uses(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut all = HashMap::new();
        let Tier::Bucket(sh) = self.tier() else {
            return Ok(all);
        };
        for o in sh.bucket.list_all("uses/").await? {
            let Some(bytes) = sh.bucket.get(&o.key).await? else {
                continue;
            };
            let batch: HashMap<String, u64> = serde_json::from_slice(&bytes).unwrap_or_default();
            for (k, v) in batch {
                let e = all.entry(k).or_insert(0);
                *e = (*e).max(v);
            }
        }
        Ok(all)
    }

    /// Folds every use batch into one object (gc does this, so batches do not pile up).
    pub async fn compact_uses(&self) -> Result<(), StoreError> {
        let Tier::Bucket(sh) = self.tier() else {
            return Ok(());
        };
        let before = sh.bucket.list_all("uses/").await?;
        if before.len() < 2 {
            return Ok(());
        }
        let merged = self.read_uses().await?;
        let bytes = serde_json::to_vec(&merged).map_err(|e| StoreError::Meta(e.to_string()))?;
        let key = format!("uses/{}", uuid::Uuid::new_v4());
        sh.bucket.put(&key, bytes.into()).await?;
        for o in before {
            sh.bucket.delete(&o.key).await?;
        }
        Ok(())
    }

    /// Re-hashes a stored object (the bucket's copy when there is one); `Some(actual)`
    /// when it does not match its name.
    pub async fn verify(&self, d: &Digest) -> Result<Option<Digest>, StoreError> {
        use sha2::Digest as _;
        let Tier::Bucket(_) = self.tier() else {
            return self.verify_local(d);
        };
        let Some((_, mut body)) = self.read_shared(d, 0).await? else {
            return Ok(None);
        };
        let mut h = sha2::Sha256::new();
        while let Some(chunk) = body.next().await {
            h.update(chunk?);
        }
        let actual = Digest::from_hasher(h);
        Ok((actual != *d).then_some(actual))
    }

    /// Keeps the local tier under its cap: least recently used local copies go first
    /// (only copies the bucket holds; readers keep their open file). Without a bucket the
    /// local directory is the store and eviction is the gc's business.
    pub async fn trim_local(&self) -> Result<(u64, usize), StoreError> {
        let Tier::Bucket(sh) = self.tier() else {
            return Ok((0, 0));
        };
        if self.size() <= sh.local_cap || sh.trimming.swap(true, Ordering::AcqRel) {
            return Ok((0, 0));
        }
        let r = self.trim_local_to(sh).await;
        sh.trimming.store(false, Ordering::Release);
        r
    }

    /// Whether the local tier is over its cap (a trim is due).
    pub fn local_over_cap(&self) -> bool {
        match self.tier() {
            Tier::Bucket(sh) => self.size() > sh.local_cap,
            Tier::Files(..) => false,
        }
    }

    async fn trim_local_to(&self, sh: &Shared) -> Result<(u64, usize), StoreError> {
        let mut local = self.list_local()?;
        local.sort_by_key(|b| b.last_used);
        let (mut freed, mut n) = (0, 0);
        for b in local {
            if self.size() <= sh.local_cap {
                break;
            }
            if sh.bucket.head(&blob_key(&b.digest)).await?.is_none() {
                continue;
            }
            if self.delete_local(&b.digest)? {
                freed += b.size;
                n += 1;
            }
        }
        Ok((freed, n))
    }
}

/// One recursive listing: a repository is the path before its first `_` entry.
async fn bucket_repos(sh: &Shared, ns: &str) -> Result<Vec<String>, StoreError> {
    let dir = format!("repos/{ns}/");
    let mut set = std::collections::BTreeSet::new();
    for o in sh.bucket.list_all(&dir).await? {
        let rest = o.key.strip_prefix(&dir).unwrap_or_default();
        let parts: Vec<&str> = rest.split('/').collect();
        if let Some(i) = parts.iter().position(|p| p.starts_with('_')) {
            if i > 0 {
                set.insert(parts[..i].join("/"));
            }
        }
    }
    Ok(set.into_iter().collect())
}

fn collect_repos(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), StoreError> {
    let Some(entries) = not_found_is_none(fs::read_dir(dir))? else {
        return Ok(());
    };
    let mut is_repo = false;
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('_') {
            is_repo = true;
        } else if e.file_type()?.is_dir() && !name.starts_with('.') {
            let child = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            collect_repos(&e.path(), &child, out)?;
        }
    }
    if is_repo && !prefix.is_empty() {
        out.push(prefix.to_string());
    }
    Ok(())
}

/// File names in `dir` (none if it does not exist), without in-progress dot files.
fn list_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let Some(entries) = not_found_is_none(fs::read_dir(dir))? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `bytes` to a dot-prefixed sibling, then renames it over `p`.
fn write_atomic(p: PathBuf, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = p
        .parent()
        .ok_or_else(|| StoreError::Meta(format!("{} has no parent", p.display())))?;
    fs::create_dir_all(dir)?;
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:08x}", rand::random::<u32>()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, &p).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    Ok(())
}
