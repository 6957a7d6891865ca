//! The one place the store's backend is chosen: the local filesystem under the root, or
//! the S3 bucket shared by replicas (the local disk then being its tier). [`Tier`] is that
//! choice, matched only here; metadata objects (tags, links, private markers, referrers)
//! and upload sessions (see `sessions.rs` for their layout) go through it. Blob bytes are
//! still matched in `shared.rs`, to move behind it next.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;

use super::sessions::{SessionInfo, SessionWriter, Sink};
use super::shared::Shared;
use super::{not_found_is_none, Store, StoreError};
use crate::names::Digest;

/// Where metadata lives.
pub(super) enum Tier<'a> {
    /// Files under the store's root.
    Files(&'a Path),
    /// Objects in the bucket, with the recent "exists" answers this replica keeps.
    Bucket(&'a Shared),
}

impl Store {
    pub(super) fn tier(&self) -> Tier<'_> {
        match &self.shared {
            Some(sh) => Tier::Bucket(sh),
            None => Tier::Files(&self.root),
        }
    }
}

impl Tier<'_> {
    /// A metadata object.
    pub(super) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Tier::Bucket(sh) => Ok(sh.bucket.get(key).await?.map(|b| b.to_vec())),
            Tier::Files(root) => not_found_is_none(fs::read(root.join(key))),
        }
    }

    pub(super) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Tier::Bucket(sh) => {
                sh.bucket.put(key, bytes.into()).await?;
                sh.remember(key, true);
                Ok(())
            }
            Tier::Files(root) => write_atomic(root.join(key), &bytes),
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
            Tier::Files(root) => Ok(not_found_is_none(fs::metadata(root.join(key)))?.is_some()),
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
            Tier::Files(root) => Ok(not_found_is_none(fs::remove_file(root.join(key)))?.is_some()),
        }
    }

    /// Names directly under a metadata "directory", sorted.
    pub(super) async fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Tier::Bucket(sh) => sh.bucket.list_dir(&format!("{dir}/")).await,
            Tier::Files(root) => list_names(&root.join(dir)),
        }
    }

    /// Namespaces (upstream keys and the hosted prefix) that have repositories.
    pub(super) async fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        let root = match self {
            Tier::Bucket(sh) => return sh.bucket.list_dir("repos/").await,
            Tier::Files(root) => root,
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
            Tier::Files(root) => root,
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
            Tier::Files(_) => {
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
            Tier::Files(_) => {
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
            Tier::Files(_) => match not_found_is_none(fs::metadata(self.session_file(id)))? {
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
            Tier::Files(_) => {
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
            Tier::Files(_) => self.session_commit_local(id, expected).await,
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
                expected: expected.clone(),
                actual,
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
                expected: expected.clone(),
                actual: w.digest(),
            });
        }
        if let Some(u) = upload {
            u.complete().await?;
        }
        let expected = expected.clone();
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
            Tier::Files(_) => {
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
            Tier::Files(_) => {
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
