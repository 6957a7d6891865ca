//! Blob operations that span both tiers: the local directory and, when configured, the
//! shared bucket. Without a bucket each of them is the plain local operation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};

use super::bucket::{Bucket, Upload};
use super::{BlobInfo, Store, StoreError};
use crate::names::Digest;

/// The bucket side of a store.
pub(super) struct Shared {
    pub(super) bucket: Arc<Bucket>,
    /// Cap on the local tier.
    local_cap: u64,
    /// Uses not yet written to the bucket (digest hex -> seconds since the epoch):
    /// eviction on the bucket goes by the last use on any replica, recorded in batches.
    uses: Mutex<HashMap<String, u64>>,
    /// Recent "this marker exists" answers (blob links, private markers), so a warm
    /// request does not wait for the bucket each time. Bounded in time, never "forever":
    /// another replica's change is seen within [`SEEN_FOR`]. Absence is never remembered:
    /// a repository another replica just marked private must be private here at once.
    seen: dashmap::DashMap<String, std::time::Instant>,
    /// One trim of the local tier at a time.
    trimming: AtomicBool,
}

/// How long an answer in `Shared::seen` is trusted.
const SEEN_FOR: Duration = Duration::from_secs(10);

impl Shared {
    /// A remembered existence answer for `key`, if recent: only ever "exists". An absent
    /// marker must be looked up each time: another replica may have just made it (a link),
    /// and a "not private" answer kept here would serve content that another replica has
    /// just marked private, before this one saw the marker.
    pub(super) fn seen(&self, key: &str) -> Option<bool> {
        let e = self.seen.get(key)?;
        (e.elapsed() < SEEN_FOR).then_some(true)
    }

    pub(super) fn remember(&self, key: &str, exists: bool) {
        if !exists {
            self.seen.remove(key);
            return;
        }
        if key.contains("/_blobs/") || key.ends_with("/_private") {
            if self.seen.len() > 100_000 {
                self.seen.retain(|_, at| at.elapsed() < SEEN_FOR);
            }
            self.seen.insert(key.to_string(), std::time::Instant::now());
        }
    }
}

impl Shared {
    pub(super) fn new(bucket: Bucket, local_cap: u64) -> Shared {
        Shared {
            bucket: Arc::new(bucket),
            local_cap,
            uses: Mutex::new(HashMap::new()),
            seen: dashmap::DashMap::new(),
            trimming: AtomicBool::new(false),
        }
    }
}

/// The key of a blob in the bucket.
pub(super) fn blob_key(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Store {
    /// Size of a blob held locally or in the bucket; `None` if neither has it. An object
    /// missing from the bucket is a miss, whatever was known before (another replica's
    /// eviction may have removed it).
    pub async fn stat(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        if let Some(size) = self.local_size(d)? {
            return Ok(Some(size));
        }
        match &self.shared {
            Some(sh) => Ok(sh.bucket.head(&blob_key(d)).await?.map(|o| o.size)),
            None => Ok(None),
        }
    }

    /// The bytes of a blob from the bucket (for filling the local tier), from `from` on.
    pub async fn read_shared(
        &self,
        d: &Digest,
        from: u64,
    ) -> Result<Option<(u64, BoxStream<'static, Result<Bytes, StoreError>>)>, StoreError> {
        match &self.shared {
            Some(sh) => sh.bucket.read(&blob_key(d), from).await,
            None => Ok(None),
        }
    }

    /// Like [`Store::read_shared`], read on the calling worker with `http`, for filling
    /// the local tier while clients stream (see [`super::bucket::Bucket::read_here`]).
    pub async fn read_shared_here(
        &self,
        http: &awc::Client,
        d: &Digest,
    ) -> Result<Option<(u64, super::bucket::LocalBody)>, StoreError> {
        match &self.shared {
            Some(sh) => sh.bucket.read_here(http, &blob_key(d)).await,
            None => Ok(None),
        }
    }

    /// Deletes a bucket object whose bytes did not match its digest, so the next request
    /// fetches the blob again.
    pub async fn reject_shared(&self, d: &Digest) -> Result<(), StoreError> {
        if let Some(sh) = &self.shared {
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
        match &self.shared {
            Some(sh) => Ok(Some(sh.bucket.upload(&blob_key(d)).await?)),
            None => Ok(None),
        }
    }

    /// A whole small blob (a manifest), from the local tier or else the bucket (verified,
    /// then kept locally); `None` if not stored.
    pub async fn read_small(&self, d: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(bytes) = self.read_small_local(d)? {
            return Ok(Some(bytes));
        }
        let Some(sh) = &self.shared else {
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
        Ok(Some(bytes.to_vec()))
    }

    /// Writes a small, already-verified object (a manifest) to both tiers.
    pub async fn put_small(&self, d: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if let Some(sh) = &self.shared {
            sh.bucket
                .put(&blob_key(d), Bytes::copy_from_slice(bytes))
                .await?;
        }
        self.put_small_local(d, bytes)
    }

    /// Removes a blob from both tiers; whether it existed.
    pub async fn delete(&self, d: &Digest) -> Result<bool, StoreError> {
        let local = self.delete_local(d)?;
        match &self.shared {
            Some(sh) => {
                let there = sh.bucket.head(&blob_key(d)).await?.is_some();
                sh.bucket.delete(&blob_key(d)).await?;
                Ok(local || there)
            }
            None => Ok(local),
        }
    }

    /// Every committed object with its size and last use (for gc and verify): the
    /// bucket's objects when there is one, with the uses replicas recorded.
    pub async fn list(&self) -> Result<Vec<BlobInfo>, StoreError> {
        let Some(sh) = &self.shared else {
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
        if let Some(sh) = &self.shared {
            if let Ok(mut u) = sh.uses.lock() {
                u.insert(d.hex().to_string(), super::now_secs());
            }
        }
        self.touch_local(d)
    }

    /// Drops the uses recorded since the last call (no eviction is configured: nobody
    /// reads them, and `uses/` objects would pile up in the bucket).
    pub fn forget_uses(&self) {
        if let Some(sh) = &self.shared {
            if let Ok(mut u) = sh.uses.lock() {
                u.clear();
            }
        }
    }

    /// Writes the uses recorded since the last call as one object `uses/<random>`.
    pub async fn flush_uses(&self) -> Result<usize, StoreError> {
        let Some(sh) = &self.shared else {
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
        let Some(sh) = &self.shared else {
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
        let Some(sh) = &self.shared else {
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
        let Some(_) = &self.shared else {
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
        let Some(sh) = &self.shared else {
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
        self.shared
            .as_ref()
            .is_some_and(|sh| self.size() > sh.local_cap)
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
