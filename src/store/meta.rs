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
    fn repo_dir(&self, namespace: &str, repo: &str) -> PathBuf {
        self.root.join("repos").join(namespace).join(repo)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, p: PathBuf) -> Result<Option<T>, StoreError> {
        let Some(bytes) = not_found_is_none(fs::read(&p))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Meta(format!("{}: {e}", p.display())))
    }

    fn write_json<T: Serialize>(&self, p: PathBuf, v: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(v).map_err(|e| StoreError::Meta(e.to_string()))?;
        write_atomic(p, &bytes)
    }

    pub fn get_tag(
        &self,
        ns: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<TagRecord>, StoreError> {
        self.read_json(self.repo_dir(ns, repo).join("_tags").join(tag))
    }

    pub fn put_tag(
        &self,
        ns: &str,
        repo: &str,
        tag: &str,
        rec: &TagRecord,
    ) -> Result<(), StoreError> {
        self.write_json(self.repo_dir(ns, repo).join("_tags").join(tag), rec)
    }

    /// Tags cached for a repository, sorted.
    pub fn list_tags(&self, ns: &str, repo: &str) -> Result<Vec<String>, StoreError> {
        list_names(&self.repo_dir(ns, repo).join("_tags"))
    }

    pub fn get_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
    ) -> Result<Option<ManifestLink>, StoreError> {
        self.read_json(self.repo_dir(ns, repo).join("_manifests").join(d.hex()))
    }

    pub fn put_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
        link: &ManifestLink,
    ) -> Result<(), StoreError> {
        self.write_json(
            self.repo_dir(ns, repo).join("_manifests").join(d.hex()),
            link,
        )
    }

    /// Whether a repository is known to hold a blob (so it may be served from the shared
    /// store under that repository without asking upstream).
    pub fn blob_linked(&self, ns: &str, repo: &str, d: &Digest) -> Result<bool, StoreError> {
        let p = self.repo_dir(ns, repo).join("_blobs").join(d.hex());
        Ok(not_found_is_none(fs::metadata(p))?.is_some())
    }

    pub fn link_blob(&self, ns: &str, repo: &str, d: &Digest) -> Result<(), StoreError> {
        write_atomic(self.repo_dir(ns, repo).join("_blobs").join(d.hex()), b"")
    }
}

impl Store {
    pub fn delete_tag(&self, ns: &str, repo: &str, tag: &str) -> Result<bool, StoreError> {
        remove(self.repo_dir(ns, repo).join("_tags").join(tag))
    }

    pub fn delete_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
    ) -> Result<bool, StoreError> {
        remove(self.repo_dir(ns, repo).join("_manifests").join(d.hex()))
    }

    pub fn unlink_blob(&self, ns: &str, repo: &str, d: &Digest) -> Result<bool, StoreError> {
        remove(self.repo_dir(ns, repo).join("_blobs").join(d.hex()))
    }

    /// Records that manifest `desc` (a JSON descriptor) refers to `subject`.
    pub fn put_referrer(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
        desc: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let dir = self
            .repo_dir(ns, repo)
            .join("_referrers")
            .join(subject.hex());
        self.write_json(dir.join(referrer.hex()), desc)
    }

    pub fn delete_referrer(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<bool, StoreError> {
        remove(
            self.repo_dir(ns, repo)
                .join("_referrers")
                .join(subject.hex())
                .join(referrer.hex()),
        )
    }

    /// Descriptors of the manifests that refer to `subject`, in digest order.
    pub fn list_referrers(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let dir = self
            .repo_dir(ns, repo)
            .join("_referrers")
            .join(subject.hex());
        let mut out = Vec::new();
        for n in list_names(&dir)? {
            if let Some(v) = self.read_json(dir.join(n))? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// The cached referrers index of an upstream `subject` (what it pointed to, and when
    /// the upstream last said so), kept like a tag.
    pub fn get_referrers_index(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
    ) -> Result<Option<TagRecord>, StoreError> {
        self.read_json(self.referrers_index_path(ns, repo, subject))
    }

    pub fn put_referrers_index(
        &self,
        ns: &str,
        repo: &str,
        subject: &Digest,
        rec: &TagRecord,
    ) -> Result<(), StoreError> {
        self.write_json(self.referrers_index_path(ns, repo, subject), rec)
    }

    fn referrers_index_path(&self, ns: &str, repo: &str, subject: &Digest) -> PathBuf {
        self.repo_dir(ns, repo)
            .join("_referrers_index")
            .join(subject.hex())
    }

    /// Whether a repository's content came through someone's own upstream credentials
    /// (callers must then prove upstream access before it is served).
    pub fn is_private(&self, ns: &str, repo: &str) -> Result<bool, StoreError> {
        let p = self.repo_dir(ns, repo).join("_private");
        Ok(not_found_is_none(fs::metadata(p))?.is_some())
    }

    pub fn set_private(&self, ns: &str, repo: &str, private: bool) -> Result<(), StoreError> {
        let p = self.repo_dir(ns, repo).join("_private");
        if private {
            write_atomic(p, b"")
        } else {
            remove(p).map(|_| ())
        }
    }

    /// Manifests linked to a repository.
    pub fn list_manifest_links(
        &self,
        ns: &str,
        repo: &str,
    ) -> Result<Vec<(Digest, ManifestLink)>, StoreError> {
        let dir = self.repo_dir(ns, repo).join("_manifests");
        let mut out = Vec::new();
        for name in list_names(&dir)? {
            let Ok(d) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            if let Some(link) = self.read_json(dir.join(&name))? {
                out.push((d, link));
            }
        }
        Ok(out)
    }

    /// Blobs linked to a repository.
    pub fn list_blob_links(&self, ns: &str, repo: &str) -> Result<Vec<Digest>, StoreError> {
        let names = list_names(&self.repo_dir(ns, repo).join("_blobs"))?;
        Ok(names
            .iter()
            .filter_map(|n| format!("sha256:{n}").parse().ok())
            .collect())
    }

    /// Whether the store holds metadata for a repository (the same test [`Store::list_repos`]
    /// applies: a `_tags`/`_manifests`/`_blobs`/`_private` entry, not merely a parent folder
    /// of deeper repositories).
    pub fn repo_exists(&self, ns: &str, repo: &str) -> Result<bool, StoreError> {
        Ok(list_names(&self.repo_dir(ns, repo))?
            .iter()
            .any(|n| n.starts_with('_')))
    }

    /// Namespaces (upstream keys and the hosted prefix) that have repositories.
    pub fn list_namespaces(&self) -> Result<Vec<String>, StoreError> {
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
    pub fn list_repos(&self, ns: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        collect_repos(&self.root.join("repos").join(ns), "", &mut out)?;
        out.sort();
        Ok(out)
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
