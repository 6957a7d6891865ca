//! The state of the mirror as the status page shows it, read from memory only: metrics,
//! back-off holds, the last answer of each upstream, fills in flight, `_catalog`'s listing
//! and the inventory snapshot. Nothing here walks the store or asks an upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::inventory::RepoSummary;
use super::Services;
use crate::upstream::{Scope, Upstream};

/// Images listed per table (largest, most pulled) and fills shown.
const TOP: usize = 10;

pub struct UpstreamStatus {
    pub name: String,
    pub url: String,
    pub fallbacks: Vec<String>,
    /// The class of the last answer (`2xx` ... `5xx`, `error`) and how long ago.
    pub last_answer: Option<(&'static str, Duration)>,
    /// A hold of the whole upstream for the mirror's own requests: for how long, scope.
    pub held: Option<(Duration, Scope)>,
    pub repos_held: usize,
    /// Docker Hub's `ratelimit-remaining` / `ratelimit-limit`, when it sent them.
    pub ratelimit: Option<(f64, f64)>,
    pub hits: f64,
    pub misses: f64,
    /// Body bytes received from it.
    pub fetched_bytes: f64,
    pub stale_serves: f64,
}

pub struct FillStatus {
    /// `<upstream>/<repository>`; `None` when that repository is not listed in
    /// `_catalog` (private, or not yet): the page never names what `_catalog` hides.
    pub origin: Option<String>,
    pub digest: String,
    pub written: u64,
    pub size: Option<u64>,
}

pub struct Status {
    pub upstreams: Vec<UpstreamStatus>,
    pub hosted: Option<String>,
    pub served_from_cache: f64,
    pub served_from_upstream: f64,
    pub store_bytes: f64,
    pub cache_limit: f64,
    pub fills: Vec<FillStatus>,
    pub fills_total: usize,
    /// The inventory snapshot's age and its repositories (none before the first walk).
    pub inventory: Option<(Duration, usize)>,
    pub largest: Vec<RepoSummary>,
    pub most_pulled: Vec<RepoSummary>,
}

impl Services {
    /// The page's view; starts a background inventory walk when the snapshot is stale.
    pub fn status(&self, upstreams: &[Arc<Upstream>]) -> Status {
        self.mirror.refresh_inventory();
        let r = self.metrics().read();
        let upstreams = upstreams
            .iter()
            .map(|up| {
                let name = up.name.as_str();
                let (held, repos_held) = self.client.holds(up);
                let ratelimit = r
                    .get(
                        "entrepot_upstream_ratelimit_remaining",
                        &[("upstream", name)],
                    )
                    .zip(r.get("entrepot_upstream_ratelimit_limit", &[("upstream", name)]));
                UpstreamStatus {
                    name: up.name.clone(),
                    url: up.base.to_string(),
                    fallbacks: up.fallbacks.iter().map(|u| u.to_string()).collect(),
                    last_answer: self
                        .mirror
                        .last_answer
                        .get(name)
                        .map(|a| (a.1, a.0.elapsed())),
                    held,
                    repos_held,
                    ratelimit,
                    hits: r.sum(
                        "entrepot_cache_requests_total",
                        &[("upstream", name), ("result", "hit")],
                    ),
                    misses: r.sum(
                        "entrepot_cache_requests_total",
                        &[("upstream", name), ("result", "miss")],
                    ),
                    fetched_bytes: r.sum("entrepot_upstream_bytes_total", &[("upstream", name)]),
                    stale_serves: r.sum("entrepot_stale_serves_total", &[("upstream", name)]),
                }
            })
            .collect();
        let listed = |origin: &str| self.mirror.catalog.contains(origin);
        let (fills_total, fills) = self.mirror.blob_flights.sample(TOP, |d, f| FillStatus {
            origin: Some(f.origin.clone()).filter(|o| listed(o)),
            digest: d.to_string(),
            written: f.written.max(f.recent.received()),
            size: f.size,
        });
        let snapshot = self.mirror.inventory.snapshot();
        let (largest, most_pulled) = match &snapshot {
            Some((_, repos)) => self.mirror.inventory.top(repos, TOP),
            None => (Vec::new(), Vec::new()),
        };
        Status {
            upstreams,
            hosted: self.mirror.hosted.as_ref().map(|h| h.prefix.clone()),
            served_from_cache: r.sum("entrepot_served_bytes_total", &[("source", "cache")]),
            served_from_upstream: r.sum("entrepot_served_bytes_total", &[("source", "upstream")]),
            store_bytes: r.sum("entrepot_store_size_bytes", &[]),
            cache_limit: r.sum("entrepot_cache_limit_bytes", &[]),
            fills,
            fills_total,
            inventory: snapshot.as_ref().map(|(age, repos)| (*age, repos.len())),
            largest,
            most_pulled,
        }
    }
}

/// The last answer of an upstream, kept per upstream name (one entry per configured
/// upstream).
pub type LastAnswers = dashmap::DashMap<String, (Instant, &'static str)>;
