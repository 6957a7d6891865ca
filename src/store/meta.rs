//! Per-repository metadata: tags, manifest links and blob links, as small JSON files.
//!
//! Metadata is written with write-to-temp + rename, so a reader sees the old or the new
//! record, never half of one.

use std::fs;

use std::path::{Path, PathBuf};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{not_found_is_none, Store, StoreError};
use crate::names::Digest;

/// What a tag pointed to when it was last fetched or revalidated upstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Seconds since the epoch of the last upstream confirmation.
    pub checked_at: u64,
}

impl TagRecord {
    pub fn digest(&self) -> Result<Digest, StoreError> {
        self.digest
            .parse()
            .map_err(|_| StoreError::Meta(format!("tag digest {:?}", self.digest)))
    }

    /// Time since the upstream last confirmed this tag.
    pub fn age(&self) -> Duration {
        let checked = UNIX_EPOCH + Duration::from_secs(self.checked_at);
        SystemTime::now()
            .duration_since(checked)
            .unwrap_or_default()
    }
}

/// The media type a repository's manifest was served with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestLink {
    pub media_type: String,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Store {
    /// `repos/<namespace>/<repo>`; `namespace` and `repo` are validated names.
    fn repo_key(ns: &str, repo: &str) -> String {
        format!("repos/{ns}/{repo}")
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: String,
    ) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.kv_get(&key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Meta(format!("{key}: {e}")))
    }

    async fn write_json<T: Serialize>(&self, key: String, v: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(v).map_err(|e| StoreError::Meta(e.to_string()))?;
        self.kv_put(&key, bytes).await
    }

    pub async fn get_tag(
        &self,
        ns: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<TagRecord>, StoreError> {
        self.read_json(format!("{}/_tags/{tag}", Self::repo_key(ns, repo)))
            .await
    }

    pub async fn put_tag(
        &self,
        ns: &str,
        repo: &str,
        tag: &str,
        rec: &TagRecord,
    ) -> Result<(), StoreError> {
        self.write_json(format!("{}/_tags/{tag}", Self::repo_key(ns, repo)), rec)
            .await
    }

    /// Tags cached for a repository, sorted.
    pub async fn list_tags(&self, ns: &str, repo: &str) -> Result<Vec<String>, StoreError> {
        self.kv_list(&format!("{}/_tags", Self::repo_key(ns, repo)))
            .await
    }

    pub async fn get_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
    ) -> Result<Option<ManifestLink>, StoreError> {
        let key = format!("{}/_manifests/{}", Self::repo_key(ns, repo), d.hex());
        self.read_json(key).await
    }

    pub async fn put_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
        link: &ManifestLink,
    ) -> Result<(), StoreError> {
        let key = format!("{}/_manifests/{}", Self::repo_key(ns, repo), d.hex());
        self.write_json(key, link).await
    }

    /// Whether a repository is known to hold a blob (so it may be served from the shared
    /// store under that repository without asking upstream).
    pub async fn blob_linked(&self, ns: &str, repo: &str, d: &Digest) -> Result<bool, StoreError> {
        let key = format!("{}/_blobs/{}", Self::repo_key(ns, repo), d.hex());
        self.kv_exists(&key).await
    }

    pub async fn link_blob(&self, ns: &str, repo: &str, d: &Digest) -> Result<(), StoreError> {
        let key = format!("{}/_blobs/{}", Self::repo_key(ns, repo), d.hex());
        self.kv_put(&key, Vec::new()).await
    }

    pub async fn delete_tag(&self, ns: &str, repo: &str, tag: &str) -> Result<bool, StoreError> {
        self.kv_delete(&format!("{}/_tags/{tag}", Self::repo_key(ns, repo)))
            .await
    }

    pub async fn delete_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
    ) -> Result<bool, StoreError> {
        let key = format!("{}/_manifests/{}", Self::repo_key(ns, repo), d.hex());
        self.kv_delete(&key).await
    }

    pub async fn unlink_blob(&self, ns: &str, repo: &str, d: &Digest) -> Result<bool, StoreError> {
        let key = format!("{}/_blobs/{}", Self::repo_key(ns, repo), d.hex());
        self.kv_delete(&key).await
    }

    fn referrers_key(ns: &str, repo: &str, subject: &Digest) -> String {
        format!("{}/_referrers/{}", Self::repo_key(ns, repo), subject.hex())
    }

    /// Records that manifest `desc` (a JSON descriptor) refers to `subject`.
    pub async fn put_referrer(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
        desc: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let key = format!(
            "{}/{}",
            Self::referrers_key(ns, repo, subject),
            referrer.hex()
        );
        self.write_json(key, desc).await
    }

    pub async fn delete_referrer(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<bool, StoreError> {
        let key = format!(
            "{}/{}",
            Self::referrers_key(ns, repo, subject),
            referrer.hex()
        );
        self.kv_delete(&key).await
    }

    /// Descriptors of the manifests that refer to `subject`, in digest order.
    pub async fn list_referrers(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let dir = Self::referrers_key(ns, repo, subject);
        let mut out = Vec::new();
        for n in self.kv_list(&dir).await? {
            if let Some(v) = self.read_json(format!("{dir}/{n}")).await? {
                out.push(v);
            }
        }
        Ok(out)
    }

    fn referrers_index_key(ns: &str, repo: &str, subject: &Digest) -> String {
        format!(
            "{}/_referrers_index/{}",
            Self::repo_key(ns, repo),
            subject.hex()
        )
    }

    /// The cached referrers index of an upstream `subject` (what it pointed to, and when
    /// the upstream last said so), kept like a tag.
    pub async fn get_referrers_index(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
    ) -> Result<Option<TagRecord>, StoreError> {
        self.read_json(Self::referrers_index_key(ns, repo, subject))
            .await
    }

    pub async fn put_referrers_index(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
        rec: &TagRecord,
    ) -> Result<(), StoreError> {
        self.write_json(Self::referrers_index_key(ns, repo, subject), rec)
            .await
    }

    /// Whether a repository's content came through someone's own upstream credentials
    /// (callers must then prove upstream access before it is served).
    pub async fn is_private(&self, ns: &str, repo: &str) -> Result<bool, StoreError> {
        self.kv_exists(&format!("{}/_private", Self::repo_key(ns, repo)))
            .await
    }

    pub async fn set_private(&self, ns: &str, repo: &str, private: bool) -> Result<(), StoreError> {
        let key = format!("{}/_private", Self::repo_key(ns, repo));
        if private {
            self.kv_put(&key, Vec::new()).await
        } else {
            self.kv_delete(&key).await.map(|_| ())
        }
    }

    /// Manifests linked to a repository.
    pub async fn list_manifest_links(
        &self,
        ns: &str,
        repo: &str,
    ) -> Result<Vec<(Digest, ManifestLink)>, StoreError> {
        let dir = format!("{}/_manifests", Self::repo_key(ns, repo));
        let mut out = Vec::new();
        for name in self.kv_list(&dir).await? {
            let Ok(d) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            if let Some(link) = self.read_json(format!("{dir}/{name}")).await? {
                out.push((d, link));
            }
        }
        Ok(out)
    }

    /// Blobs linked to a repository.
    pub async fn list_blob_links(&self, ns: &str, repo: &str) -> Result<Vec<Digest>, StoreError> {
        let names = self
            .kv_list(&format!("{}/_blobs", Self::repo_key(ns, repo)))
            .await?;
        Ok(names
            .iter()
            .filter_map(|n| format!("sha256:{n}").parse().ok())
            .collect())
    }

    /// Whether the store holds metadata for a repository (the same test [`Store::list_repos`]
    /// applies: a `_tags`/`_manifests`/`_blobs`/`_private` entry, not merely a parent folder
    /// of deeper repositories).
    pub async fn repo_exists(&self, ns: &str, repo: &str) -> Result<bool, StoreError> {
        Ok(self
            .kv_list(&Self::repo_key(ns, repo))
            .await?
            .iter()
            .any(|n| n.starts_with('_')))
    }

    /// Namespaces (upstream keys and the hosted prefix) that have repositories.
    pub async fn list_namespaces(&self) -> Result<Vec<String>, StoreError> {
        if let Some(sh) = &self.shared {
            return sh.bucket.list_dir("repos/").await;
        }
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("repos"))? {
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
    pub async fn list_repos(&self, ns: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        if let Some(sh) = &self.shared {
            // One recursive listing: a repository is the path before its first `_` entry.
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
            return Ok(set.into_iter().collect());
        }
        collect_repos(&self.root.join("repos").join(ns), "", &mut out)?;
        out.sort();
        Ok(out)
    }

    /// A metadata object, from the bucket when there is one, else under the root.
    async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.shared {
            Some(sh) => Ok(sh.bucket.get(key).await?.map(|b| b.to_vec())),
            None => not_found_is_none(fs::read(self.root.join(key))),
        }
    }

    async fn kv_put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match &self.shared {
            Some(sh) => {
                sh.bucket.put(key, bytes.into()).await?;
                sh.remember(key, true);
                Ok(())
            }
            None => write_atomic(self.root.join(key), &bytes),
        }
    }

    async fn kv_exists(&self, key: &str) -> Result<bool, StoreError> {
        match &self.shared {
            Some(sh) => {
                if let Some(exists) = sh.seen(key) {
                    return Ok(exists);
                }
                let exists = sh.bucket.head(key).await?.is_some();
                sh.remember(key, exists);
                Ok(exists)
            }
            None => Ok(not_found_is_none(fs::metadata(self.root.join(key)))?.is_some()),
        }
    }

    /// Removes a metadata object; whether it existed.
    async fn kv_delete(&self, key: &str) -> Result<bool, StoreError> {
        match &self.shared {
            Some(sh) => {
                let existed = sh.bucket.head(key).await?.is_some();
                sh.bucket.delete(key).await?;
                sh.remember(key, false);
                Ok(existed)
            }
            None => remove(self.root.join(key)),
        }
    }

    /// Names directly under a metadata "directory", sorted.
    async fn kv_list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        match &self.shared {
            Some(sh) => sh.bucket.list_dir(&format!("{dir}/")).await,
            None => list_names(&self.root.join(dir)),
        }
    }
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

/// Removes a file; whether it existed.
fn remove(p: PathBuf) -> Result<bool, StoreError> {
    Ok(not_found_is_none(fs::remove_file(p))?.is_some())
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
