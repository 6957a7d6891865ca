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
use crate::store::{Store, StoreError};

/// How old the listing may get before a background walk refreshes it.
const REFRESH: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Catalog {
    /// Sorted `<namespace>/<repo>` names and when the last walk finished (`None`: never).
    names: RwLock<(Vec<String>, Option<Instant>)>,
    walking: AtomicBool,
}

impl Catalog {
    /// Records a repository that now exists (idempotent).
    pub fn add(&self, ns: &str, repo: &str) {
        let name = format!("{ns}/{repo}");
        let mut g = self.names.write().unwrap_or_else(|e| e.into_inner());
        if let Err(at) = g.0.binary_search(&name) {
            g.0.insert(at, name);
        }
    }

    pub fn remove(&self, ns: &str, repo: &str) {
        let name = format!("{ns}/{repo}");
        let mut g = self.names.write().unwrap_or_else(|e| e.into_inner());
        if let Ok(at) = g.0.binary_search(&name) {
            g.0.remove(at);
        }
    }

    fn page(&self, n: Option<usize>, last: Option<&str>) -> Page {
        let g = self.names.read().unwrap_or_else(|e| e.into_inner());
        paginate(&g.0, n, last)
    }

    fn age(&self) -> Option<Duration> {
        let g = self.names.read().unwrap_or_else(|e| e.into_inner());
        g.1.map(|t| t.elapsed())
    }

    fn replace(&self, names: Vec<String>) {
        let mut g = self.names.write().unwrap_or_else(|e| e.into_inner());
        *g = (names, Some(Instant::now()));
    }
}

/// Every non-private repository in the store, sorted (a walk: blocking threads only).
fn walk(store: &Store) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for ns in store.list_namespaces()? {
        for repo in store.list_repos(&ns)? {
            if !store.is_private(&ns, &repo)? {
                names.push(format!("{ns}/{repo}"));
            }
        }
    }
    names.sort();
    Ok(names)
}

impl super::Mirror {
    /// Walks the store on a blocking thread and replaces the listing (one walk at a time;
    /// also run at start-up so the first `_catalog` need not wait for it).
    pub fn refresh_catalog(self: &Arc<Self>) {
        if self.catalog.walking.swap(true, Ordering::AcqRel) {
            return;
        }
        let mirror = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            match walk(&mirror.store) {
                Ok(names) => mirror.catalog.replace(names),
                Err(e) => tracing::warn!(error = %e, "catalog refresh failed"),
            }
            mirror.catalog.walking.store(false, Ordering::Release);
        });
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
            None => {
                let names = self.blocking(walk).await?;
                catalog.replace(names);
            }
            Some(age) if age > REFRESH => self.mirror.refresh_catalog(),
            Some(_) => {}
        }
        Ok(catalog.page(n, last))
    }
}
