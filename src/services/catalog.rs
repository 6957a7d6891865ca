//! `_catalog` from a sorted listing kept in memory, so no request walks the store.
//!
//! Repositories are added as the services create them (a manifest or blob linked, a
//! repository leaving the private set) and removed when they turn private; a walk of the
//! store on a blocking thread reconciles the rest (deletions, eviction) at most every
//! [`REFRESH`], while requests keep being answered from the listing they have.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::page::{paginate, Page};
use super::{ServiceError, Services};
use crate::names::Digest;
use crate::store::{ManifestLink, Store, StoreError};

/// How old the listing may get before a background walk refreshes it.
const REFRESH: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Catalog {
    state: RwLock<State>,
    walking: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Sorted `<namespace>/<repo>` names.
    names: Vec<String>,
    /// When the last walk finished (`None`: never).
    walked: Option<Instant>,
    /// Changes since the running walk began: applied on top of its result, which may
    /// have read the store before they happened.
    since_walk: Vec<(String, bool)>,
}

impl Catalog {
    /// Records a repository that now exists (idempotent).
    pub fn add(&self, ns: &str, repo: &str) {
        self.change(format!("{ns}/{repo}"), true);
    }

    pub fn remove(&self, ns: &str, repo: &str) {
        self.change(format!("{ns}/{repo}"), false);
    }

    fn change(&self, name: String, present: bool) {
        let mut g = self.state.write().unwrap_or_else(|e| e.into_inner());
        if self.walking.load(Ordering::Acquire) {
            g.since_walk.push((name.clone(), present));
        }
        apply(&mut g.names, name, present);
    }

    /// Whether `<namespace>/<repo>` is listed (public, holding content).
    pub fn contains(&self, name: &str) -> bool {
        let g = self.state.read().unwrap_or_else(|e| e.into_inner());
        g.names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }

    fn page(&self, n: Option<usize>, last: Option<&str>) -> Page {
        let g = self.state.read().unwrap_or_else(|e| e.into_inner());
        paginate(&g.names, n, last)
    }

    fn age(&self) -> Option<Duration> {
        let g = self.state.read().unwrap_or_else(|e| e.into_inner());
        g.walked.map(|t| t.elapsed())
    }

    /// Starts a walk: changes from now on are kept to be replayed over its result.
    fn begin_walk(&self) -> bool {
        let mut g = self.state.write().unwrap_or_else(|e| e.into_inner());
        if self.walking.swap(true, Ordering::AcqRel) {
            return false;
        }
        g.since_walk.clear();
        true
    }

    /// Ends a walk with its result (`None` if it failed).
    fn end_walk(&self, walked: Option<Vec<String>>) {
        let mut g = self.state.write().unwrap_or_else(|e| e.into_inner());
        if let Some(mut names) = walked {
            for (name, present) in std::mem::take(&mut g.since_walk) {
                apply(&mut names, name, present);
            }
            g.names = names;
            g.walked = Some(Instant::now());
        }
        self.walking.store(false, Ordering::Release);
    }
}

fn apply(names: &mut Vec<String>, name: String, present: bool) {
    match (names.binary_search(&name), present) {
        (Err(at), true) => names.insert(at, name),
        (Ok(at), false) => {
            names.remove(at);
        }
        _ => {}
    }
}

/// Every non-private repository in the store that still holds an image (a manifest or
/// a tag: eviction may have taken everything and left the directory), sorted (a walk:
/// see [`super::offload`]).
async fn walk(store: Arc<Store>) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for ns in store.list_namespaces().await? {
        for repo in store.list_repos(&ns).await? {
            if listed(&store, &ns, &repo).await?.is_some() {
                names.push(format!("{ns}/{repo}"));
            }
        }
    }
    names.sort();
    Ok(names)
}

/// A repository `_catalog` (and the status page) may show: it holds an image (a tag or
/// a manifest; eviction may have left only its directory) and is not private. Its tags
/// and manifest links, for callers that go on with them.
pub(super) async fn listed(
    store: &Store,
    ns: &str,
    repo: &str,
) -> Result<Option<(Vec<String>, Vec<(Digest, ManifestLink)>)>, StoreError> {
    let tags = store.list_tags(ns, repo).await?;
    let manifests = store.list_manifest_links(ns, repo).await?;
    if (tags.is_empty() && manifests.is_empty()) || store.is_private(ns, repo).await? {
        return Ok(None);
    }
    Ok(Some((tags, manifests)))
}

impl super::Mirror {
    /// Walks the store on a blocking thread and replaces the listing (one walk at a time;
    /// also run at start-up so the first `_catalog` need not wait for it).
    pub fn refresh_catalog(self: &Arc<Self>) {
        if !self.catalog.begin_walk() {
            return;
        }
        let mirror = Arc::clone(self);
        actix_web::rt::spawn(async move {
            let walked = super::offload_low(walk(mirror.store.clone()))
                .await
                .inspect_err(|e| tracing::warn!(error = %e, "catalog refresh failed"))
                .ok();
            mirror.catalog.end_walk(walked);
        });
    }

    /// Lists an upstream repository in `_catalog` unless it is private.
    pub(super) async fn list_repo(&self, ns: &str, repo: &str) -> Result<(), ServiceError> {
        if !self.store.is_private(ns, repo).await? {
            self.catalog.add(ns, repo);
        }
        Ok(())
    }
}

impl Services {
    /// `_catalog`: hosted repositories and cached (non-private) upstream repositories,
    /// as `<prefix>/<repo>`.
    pub async fn catalog(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Page, ServiceError> {
        let catalog = &self.mirror.catalog;
        match catalog.age() {
            None if catalog.begin_walk() => {
                let walked = super::offload(walk(self.mirror.store.clone())).await;
                catalog.end_walk(walked.as_ref().ok().cloned());
                walked?;
            }
            // The start-up walk is running: wait for it (bounded) rather than answer
            // from a listing that may miss what is on disk.
            None => {
                for _ in 0..600 {
                    if catalog.age().is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Some(age) if age > REFRESH => self.mirror.refresh_catalog(),
            Some(_) => {}
        }
        Ok(catalog.page(n, last))
    }
}
