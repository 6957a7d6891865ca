//! Eviction: keeps upstream-cached content under `max_cache_size`, least recently pulled
//! first, and drops what was not pulled for `max_age`.
//!
//! Hosted content is never evicted and never counted. Objects being streamed right now
//! are skipped. A manifest that references an evicted object is dropped with it (and
//! indexes that list a dropped manifest, and tags that point to any of them), so the
//! cache never offers an image it can only half serve; anything dropped is fetched again
//! on demand. Runs on a blocking thread (a walk of the store): serving goes on meanwhile.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use super::manifest_refs::parse_manifest;
use super::{Mirror, ServiceError};
use crate::names::Digest;
use crate::store::{BlobInfo, Store, StoreError};

/// What to evict.
#[derive(Debug, Clone, Default)]
pub struct GcPolicy {
    pub max_cache_size: Option<u64>,
    pub max_age: Option<Duration>,
    /// Report what would go, delete nothing.
    pub dry_run: bool,
    /// Never evict what was used this recently (with a shared bucket: uses reach it in
    /// batches, so a blob one replica is serving may look idle to the one running gc).
    pub keep_recent: Duration,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub cached_bytes_before: u64,
    pub cached_bytes_after: u64,
    pub evicted: Vec<(Digest, u64)>,
    pub manifests_dropped: usize,
    pub tags_dropped: usize,
    /// The images that lost content, as people name them: `docker.io/library/app:1`
    /// for a tag, `<ns>/<repo>@<digest>` for a manifest no tag pointed to.
    pub images_lost: Vec<String>,
}

impl GcReport {
    pub fn evicted_bytes(&self) -> u64 {
        self.evicted.iter().map(|(_, s)| s).sum()
    }
}

impl Mirror {
    /// Runs one eviction pass (blocking), under the store's link lock: what a hosted
    /// repository links meanwhile waits, and what it linked before is seen as pinned.
    pub async fn gc(&self, policy: &GcPolicy) -> Result<GcReport, ServiceError> {
        let _lock = self.store.lock_evicting().await?;
        let store = &self.store;
        if !policy.dry_run {
            store.flush_uses().await?;
            store.compact_uses().await?;
        }
        let hosted = self.hosted.as_ref().map(|h| h.prefix.as_str());
        let pinned = pinned(store, hosted).await?;
        let mut cached: Vec<BlobInfo> = store
            .list()
            .await?
            .into_iter()
            .filter(|b| !pinned.contains(&b.digest))
            .collect();
        cached.sort_by_key(|b| b.last_used);
        let before: u64 = cached.iter().map(|b| b.size).sum();
        let mut report = GcReport {
            cached_bytes_before: before,
            cached_bytes_after: before,
            ..GcReport::default()
        };
        let now = SystemTime::now();
        for b in cached {
            let expired = policy
                .max_age
                .is_some_and(|age| now.duration_since(b.last_used).unwrap_or_default() > age);
            let over = policy
                .max_cache_size
                .is_some_and(|max| report.cached_bytes_after > max);
            if !expired && !over {
                break;
            }
            let recent = now.duration_since(b.last_used).unwrap_or_default() < policy.keep_recent;
            if recent {
                continue;
            }
            if self.readers.contains_key(&b.digest) {
                continue;
            }
            if !policy.dry_run {
                store.delete(&b.digest).await?;
            }
            report.cached_bytes_after -= b.size;
            report.evicted.push((b.digest, b.size));
        }
        if !report.evicted.is_empty() {
            let gone: HashSet<Digest> = report.evicted.iter().map(|(d, _)| *d).collect();
            drop_dependents(store, hosted, &pinned, gone, policy.dry_run, &mut report).await?;
        }
        if !policy.dry_run && !report.evicted.is_empty() {
            self.metrics.evicted_bytes.inc_by(report.evicted_bytes());
            self.metrics
                .evicted_objects
                .inc_by(report.evicted.len() as u64);
            self.metrics.store_bytes.set(store.size() as i64);
        }
        Ok(report)
    }
}

/// Everything a hosted repository holds or references.
async fn pinned(store: &Store, hosted: Option<&str>) -> Result<HashSet<Digest>, StoreError> {
    let mut set = HashSet::new();
    if let Some(ns) = hosted {
        for repo in store.list_repos(ns).await? {
            set.extend(store.list_blob_links(ns, &repo).await?);
            set.extend(
                store
                    .list_manifest_links(ns, &repo)
                    .await?
                    .into_iter()
                    .map(|(d, _)| d),
            );
        }
    }
    Ok(set)
}

/// Drops manifests (and then indexes) that reference anything in `gone`, the links to
/// evicted objects, and tags pointing to dropped manifests, in every upstream namespace.
/// A dry run counts exactly the same and deletes nothing.
async fn drop_dependents(
    store: &Store,
    hosted: Option<&str>,
    pinned: &HashSet<Digest>,
    mut gone: HashSet<Digest>,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), ServiceError> {
    // Manifests dropped, to name the untagged ones once tags are known.
    let mut dropped_in: Vec<(String, String, Digest)> = Vec::new();
    let mut tagged: HashSet<(String, String, Digest)> = HashSet::new();
    // Links dropped so far (a dry run still sees them in the store).
    let mut unlinked: HashSet<(String, String, Digest)> = HashSet::new();
    let namespaces: Vec<String> = store
        .list_namespaces()
        .await?
        .into_iter()
        .filter(|ns| Some(ns.as_str()) != hosted)
        .collect();
    // Two rounds: image manifests lose their layers, then indexes lose their manifests.
    for _ in 0..2 {
        let mut dropped = HashSet::new();
        for ns in &namespaces {
            for repo in store.list_repos(ns).await? {
                for (d, link) in store.list_manifest_links(ns, &repo).await? {
                    if unlinked.contains(&(ns.clone(), repo.clone(), d)) {
                        continue;
                    }
                    let bytes = if gone.contains(&d) {
                        None
                    } else {
                        store.read_small(&d).await?
                    };
                    let refs_gone = gone.contains(&d)
                        || bytes.is_some_and(|bytes| {
                            parse_manifest(Some(&link.media_type), &bytes)
                                .map(|p| {
                                    p.blobs.iter().chain(&p.manifests).any(|c| gone.contains(c))
                                })
                                .unwrap_or(false)
                        });
                    if refs_gone {
                        if !dry_run {
                            store.delete_manifest_link(ns, &repo, &d).await?;
                        }
                        dropped_in.push((ns.clone(), repo.clone(), d));
                        unlinked.insert((ns.clone(), repo.clone(), d));
                        report.manifests_dropped += 1;
                        dropped.insert(d);
                    }
                }
            }
        }
        for d in &dropped {
            if pinned.contains(d) {
                continue;
            }
            if gone.contains(d) {
                continue; // evicted already
            }
            if let Some(size) = store.stat(d).await? {
                if !dry_run {
                    store.delete(d).await?;
                }
                report.cached_bytes_after = report.cached_bytes_after.saturating_sub(size);
                report.evicted.push((*d, size));
            }
        }
        gone.extend(dropped);
    }
    for ns in &namespaces {
        for repo in store.list_repos(ns).await? {
            for d in store.list_blob_links(ns, &repo).await? {
                if gone.contains(&d) && !dry_run {
                    store.unlink_blob(ns, &repo, &d).await?;
                }
            }
            for t in store.list_tags(ns, &repo).await? {
                let target = store
                    .get_tag(ns, &repo, &t)
                    .await?
                    .and_then(|r| r.digest().ok());
                if let Some(d) = target.filter(|d| gone.contains(d)) {
                    if !dry_run {
                        store.delete_tag(ns, &repo, &t).await?;
                    }
                    report.tags_dropped += 1;
                    report.images_lost.push(format!("{ns}/{repo}:{t}"));
                    tagged.insert((ns.clone(), repo.clone(), d));
                }
            }
        }
    }
    for (ns, repo, d) in dropped_in {
        if !tagged.contains(&(ns.clone(), repo.clone(), d)) {
            report.images_lost.push(format!("{ns}/{repo}@{d}"));
        }
    }
    report.images_lost.sort();
    Ok(())
}
