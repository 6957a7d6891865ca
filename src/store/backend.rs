//! The one place the store's backend is chosen: the local filesystem under the root, or
//! the S3 bucket shared by replicas (the local disk then being its tier). [`Tier`] is that
//! choice, matched only here; metadata objects (tags, links, private markers, referrers)
//! go through it. Blob bytes and upload parts are still matched in `shared.rs` and
//! `sessions.rs`, to move behind it next.

use std::fs;
use std::path::{Path, PathBuf};

use super::shared::Shared;
use super::{not_found_is_none, Store, StoreError};

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
