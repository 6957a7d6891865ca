//! Per-repository metadata: tags, manifest links and blob links, as small JSON files.
//!
//! Metadata is written with write-to-temp + rename, so a reader sees the old or the new
//! record, never half of one.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::hot::{Served, Stamp};

use serde::{Deserialize, Serialize};

use super::backend::Tier;
use super::{Store, StoreError};
use crate::names::{Digest, Reference};

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

    /// `repos/<ns>/<repo>/<parts...>` in one allocation: these keys are built several
    /// times for every manifest request.
    fn meta_key(ns: &str, repo: &str, parts: &[&str]) -> String {
        let len = 8 + ns.len() + repo.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut k = String::with_capacity(len);
        for p in ["repos/", ns, "/", repo, "/"].iter().chain(parts) {
            k.push_str(p);
        }
        k
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: String,
    ) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.tier().get(&key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Meta(format!("{key}: {e}")))
    }

    async fn write_json<T: Serialize>(&self, key: String, v: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(v).map_err(|e| StoreError::Meta(e.to_string()))?;
        self.tier().put(&key, bytes).await
    }

    pub async fn get_tag(
        &self,
        ns: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<TagRecord>, StoreError> {
        self.read_json(Self::meta_key(ns, repo, &["_tags/", tag]))
            .await
    }

    pub async fn put_tag(
        &self,
        ns: &str,
        repo: &str,
        tag: &str,
        rec: &TagRecord,
    ) -> Result<(), StoreError> {
        self.write_json(Self::meta_key(ns, repo, &["_tags/", tag]), rec)
            .await
    }

    /// Tags cached for a repository, sorted.
    pub async fn list_tags(&self, ns: &str, repo: &str) -> Result<Vec<String>, StoreError> {
        self.tier()
            .list(&format!("{}/_tags", Self::repo_key(ns, repo)))
            .await
    }

    pub async fn get_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
    ) -> Result<Option<ManifestLink>, StoreError> {
        let key = Self::meta_key(ns, repo, &["_manifests/", d.hex()]);
        self.read_json(key).await
    }

    /// Where the memory of hot objects stands (see `Hot::generation`); `None` with a
    /// bucket, whose metadata other replicas write (nothing is remembered as served).
    pub fn served_generation(&self) -> Option<u64> {
        match self.tier() {
            Tier::Files(..) => Some(self.hot.generation()),
            Tier::Bucket(_) => None,
        }
    }

    /// A manifest of a repository served a moment ago by `reference` (a digest or a tag)
    /// and unchanged since (see `Hot::served`).
    pub fn served_manifest(
        &self,
        ns: &str,
        repo: &str,
        reference: &Reference,
    ) -> Option<(Arc<Served>, Stamp)> {
        self.served_generation()?;
        self.hot.served(&Self::served_key(ns, repo, reference))
    }

    /// Whether a manifest served with this stamp would still be served (see `Stamp`).
    pub fn still_served(&self, stamp: &Stamp) -> bool {
        self.hot.still(stamp)
    }

    /// The size of a blob of a repository served a moment ago and unchanged since (see
    /// `Hot::served_size`); its use was recorded when it was remembered.
    pub fn served_blob(&self, ns: &str, repo: &str, d: &Digest) -> Option<(u64, Stamp)> {
        self.served_generation()?;
        self.hot.served_size(&Self::served_blob_key(ns, repo, d))
    }

    /// Remembers a blob served whole from a repository, read at `generation`.
    pub fn remember_served_blob(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
        size: u64,
        generation: u64,
    ) {
        let key = Self::served_blob_key(ns, repo, d);
        self.hot.remember_served_size(&key, size, generation);
    }

    /// `_served/blob@<hex>` (no tag or digest reference starts with `blob@`).
    fn served_blob_key(ns: &str, repo: &str, d: &Digest) -> String {
        Self::meta_key(ns, repo, &["_served/blob@", d.hex()])
    }

    /// `_served/<tag>` or `_served/@<hex>` (a tag may be 64 hex digits; never an `@`).
    fn served_key(ns: &str, repo: &str, reference: &Reference) -> String {
        match reference {
            Reference::Tag(t) => Self::meta_key(ns, repo, &["_served/", t]),
            Reference::Digest(d) => Self::meta_key(ns, repo, &["_served/@", d.hex()]),
        }
    }

    /// Remembers a manifest served from a repository by `reference`, read at `generation`.
    pub fn remember_served(
        &self,
        ns: &str,
        repo: &str,
        reference: &Reference,
        served: Served,
        generation: u64,
    ) {
        let key = Self::served_key(ns, repo, reference);
        self.hot.remember_served(&key, served, generation);
    }

    pub async fn put_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
        link: &ManifestLink,
    ) -> Result<(), StoreError> {
        let key = Self::meta_key(ns, repo, &["_manifests/", d.hex()]);
        self.write_json(key, link).await
    }

    /// Whether a repository is known to hold a blob (so it may be served from the shared
    /// store under that repository without asking upstream).
    pub async fn blob_linked(&self, ns: &str, repo: &str, d: &Digest) -> Result<bool, StoreError> {
        let key = Self::meta_key(ns, repo, &["_blobs/", d.hex()]);
        self.tier().exists(&key).await
    }

    pub async fn link_blob(&self, ns: &str, repo: &str, d: &Digest) -> Result<(), StoreError> {
        let key = Self::meta_key(ns, repo, &["_blobs/", d.hex()]);
        self.tier().put(&key, Vec::new()).await
    }

    pub async fn delete_tag(&self, ns: &str, repo: &str, tag: &str) -> Result<bool, StoreError> {
        self.tier()
            .delete(&Self::meta_key(ns, repo, &["_tags/", tag]))
            .await
    }

    pub async fn delete_manifest_link(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
    ) -> Result<bool, StoreError> {
        let key = Self::meta_key(ns, repo, &["_manifests/", d.hex()]);
        self.tier().delete(&key).await
    }

    pub async fn unlink_blob(&self, ns: &str, repo: &str, d: &Digest) -> Result<bool, StoreError> {
        let key = Self::meta_key(ns, repo, &["_blobs/", d.hex()]);
        self.tier().delete(&key).await
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
        self.tier().delete(&key).await
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
        for n in self.tier().list(&dir).await? {
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
        self.tier()
            .marker(&Self::meta_key(ns, repo, &["_private"]))
            .await
    }

    pub async fn set_private(&self, ns: &str, repo: &str, private: bool) -> Result<(), StoreError> {
        let key = Self::meta_key(ns, repo, &["_private"]);
        if private {
            self.tier().put(&key, Vec::new()).await
        } else {
            self.tier().delete(&key).await.map(|_| ())
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
        for name in self.tier().list(&dir).await? {
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
            .tier()
            .list(&format!("{}/_blobs", Self::repo_key(ns, repo)))
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
            .tier()
            .list(&Self::repo_key(ns, repo))
            .await?
            .iter()
            .any(|n| n.starts_with('_')))
    }

    /// Namespaces (upstream keys and the hosted prefix) that have repositories.
    pub async fn list_namespaces(&self) -> Result<Vec<String>, StoreError> {
        self.tier().namespaces().await
    }

    /// Repositories under a namespace (those with any metadata), sorted.
    pub async fn list_repos(&self, ns: &str) -> Result<Vec<String>, StoreError> {
        self.tier().repos(ns).await
    }
}
