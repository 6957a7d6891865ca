//! What the mirror holds, per repository: tags, bytes, when it was last pulled, and how
//! often it was resolved since start. `entrepot ls` walks the store for it; the status
//! page reads a snapshot refreshed in the background (at most every [`REFRESH`]), so a
//! page view never walks the store.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;

use super::{Mirror, ServiceError};
use crate::store::Store;

/// How old the snapshot may get before a page view starts a new walk.
const REFRESH: Duration = Duration::from_secs(60);
/// Repositories whose pulls are counted (names come from requests that were served: a
/// bound all the same).
const MAX_COUNTED: usize = 10_000;

/// One repository of the store.
#[derive(Debug, Clone)]
pub struct RepoSummary {
    /// `<upstream or hosted prefix>/<repository>`.
    pub name: String,
    pub hosted: bool,
    pub tags: Vec<String>,
    /// Bytes of the blobs linked to it (a blob shared by two repositories counts in both).
    pub bytes: u64,
    /// The last use of any of its blobs.
    pub last_pulled: Option<SystemTime>,
    /// Tag resolutions (`GET`/`HEAD .../manifests/<tag>`) since this process started.
    pub pulls: u64,
}

/// The status page's view of the store, and the pull counter.
#[derive(Default)]
pub struct Inventory {
    snapshot: RwLock<Option<(Instant, Arc<Vec<RepoSummary>>)>>,
    walking: std::sync::atomic::AtomicBool,
    /// Pulls per repository, keyed by a hash of its name (the name kept beside it).
    pulls: DashMap<u64, (String, u64)>,
    keys: std::collections::hash_map::RandomState,
}

/// The key of `<ns>/<repo>` in the pull counter (keyed per process).
fn name_key(keys: &std::collections::hash_map::RandomState, ns: &str, repo: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = keys.build_hasher();
    h.write(ns.as_bytes());
    h.write_u8(b'/');
    h.write(repo.as_bytes());
    h.finish()
}

impl Inventory {
    /// Counts one resolution of a tag of `ns/repo` (no allocation once the repository
    /// is known: this runs on every tag request).
    pub fn count_pull(&self, ns: &str, repo: &str) {
        let key = name_key(&self.keys, ns, repo);
        if let Some(mut n) = self.pulls.get_mut(&key) {
            n.1 += 1;
        } else if self.pulls.len() < MAX_COUNTED {
            self.pulls
                .entry(key)
                .or_insert_with(|| (format!("{ns}/{repo}"), 0))
                .1 += 1;
        }
    }

    fn pulls_of(&self, name: &str) -> u64 {
        let (ns, repo) = name.split_once('/').unwrap_or((name, ""));
        self.pulls
            .get(&name_key(&self.keys, ns, repo))
            .filter(|e| e.0 == name)
            .map_or(0, |e| e.1)
    }

    /// The last snapshot (none before the first walk) and its age. Its `pulls` are as
    /// walked (0): [`Inventory::top`] adds them to what it picks.
    pub fn snapshot(&self) -> Option<(Duration, Arc<Vec<RepoSummary>>)> {
        let g = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        let (at, repos) = g.as_ref()?;
        Some((at.elapsed(), repos.clone()))
    }

    /// The `n` largest of `repos`, and the `n` most pulled (those pulled at all), with
    /// their pull counts; only those are copied.
    pub fn top(&self, repos: &[RepoSummary], n: usize) -> (Vec<RepoSummary>, Vec<RepoSummary>) {
        let counted = |r: &RepoSummary, pulls: u64| RepoSummary { pulls, ..r.clone() };
        let mut by_size: Vec<&RepoSummary> = repos.iter().collect();
        by_size.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
        let largest = by_size
            .into_iter()
            .take(n)
            .map(|r| counted(r, self.pulls_of(&r.name)))
            .collect();
        let mut by_pulls: Vec<(u64, &RepoSummary)> = repos
            .iter()
            .map(|r| (self.pulls_of(&r.name), r))
            .filter(|(p, _)| *p > 0)
            .collect();
        by_pulls.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        let pulled = by_pulls
            .into_iter()
            .take(n)
            .map(|(p, r)| counted(r, p))
            .collect();
        (largest, pulled)
    }
}

/// Every repository that holds an image (a tag or a manifest) and is not private,
/// optionally only those whose name starts with `prefix`, sorted by name. Blocking
/// enough to belong on a worker of its own (see [`super::offload_low`]).
pub async fn walk(
    store: &Store,
    hosted: Option<&str>,
    prefix: Option<&str>,
) -> Result<Vec<RepoSummary>, ServiceError> {
    let blobs: HashMap<_, _> = store
        .list()
        .await?
        .into_iter()
        .map(|b| (b.digest, (b.size, b.last_used)))
        .collect();
    let mut out = Vec::new();
    for ns in store.list_namespaces().await? {
        for repo in store.list_repos(&ns).await? {
            let name = format!("{ns}/{repo}");
            if prefix.is_some_and(|p| !name.starts_with(p)) {
                continue;
            }
            let Some((tags, manifests)) = super::catalog::listed(store, &ns, &repo).await? else {
                continue;
            };
            let (mut bytes, mut last) = (0, None::<SystemTime>);
            let linked = store.list_blob_links(&ns, &repo).await?;
            for d in linked.iter().chain(manifests.iter().map(|(d, _)| d)) {
                if let Some((size, used)) = blobs.get(d) {
                    bytes += size;
                    last = Some(last.map_or(*used, |l| l.max(*used)));
                }
            }
            out.push(RepoSummary {
                hosted: Some(ns.as_str()) == hosted,
                name,
                tags,
                bytes,
                last_pulled: last,
                pulls: 0,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

impl Mirror {
    /// Starts a background walk if the snapshot is missing or older than [`REFRESH`]
    /// (one at a time); the page goes on with what it has.
    pub fn refresh_inventory(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        let fresh = self
            .inventory
            .snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < REFRESH);
        if fresh || self.inventory.walking.swap(true, Ordering::AcqRel) {
            return;
        }
        let mirror = Arc::clone(self);
        actix_web::rt::spawn(async move {
            let m = mirror.clone();
            let hosted = m.hosted.as_ref().map(|h| h.prefix.clone());
            let walked =
                super::offload_low(async move { walk(&m.store, hosted.as_deref(), None).await })
                    .await;
            match walked {
                Ok(repos) => {
                    *mirror
                        .inventory
                        .snapshot
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), Arc::new(repos)));
                }
                Err(e) => tracing::warn!(error = %e, "inventory walk for the status page failed"),
            }
            mirror.inventory.walking.store(false, Ordering::Release);
        });
    }
}
