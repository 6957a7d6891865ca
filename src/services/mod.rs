//! Cache logic: store lookups, singleflight fills, tag TTLs, stale-if-error.
//!
//! [`Mirror`] is the state every worker shares (store, in-flight maps, metrics);
//! [`Services`] adds one worker's upstream client. Routes call these methods with an
//! already-resolved upstream and repository and never see the store or the client.

mod ahead;
mod blobs;
mod catalog;
mod fill;
mod flight;
pub mod gc;

mod blob_reply;
mod hosted;
mod inventory;
mod manifest_fetch;
mod manifest_refs;
mod manifests;
mod memo;
mod page;
mod peers;
mod policy;
mod private;
mod pull;
mod referrers;
mod status;
mod tags;
mod uploads;

use std::sync::Arc;

use actix_web::http::StatusCode;

pub use blob_reply::{BlobReply, ByteRange};
pub use fill::{backlog, memory, BodyStream};
pub use hosted::Hosted;
pub use inventory::{walk as inventory_walk, RepoSummary};
pub use manifest_fetch::MAX_MANIFEST_SIZE;
pub use manifests::ManifestReply;
pub use page::Page;
pub use status::{FillStatus, Status, UpstreamStatus};
pub use tags::{TagList, TagsReply};
pub use uploads::{UploadLimits, UploadStatus, Uploads};

use crate::metrics::Metrics;
use crate::names::Digest;
use crate::store::{Store, StoreError};
use crate::upstream::{UpRequest, Upstream, UpstreamClient, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    #[error("repository unknown upstream: {0}")]
    NameUnknown(String),
    #[error("{0}")]
    Unavailable(String),
    /// The upstream said "slow down" (`429`/`503`) and nothing cached could answer.
    #[error("upstream {upstream} is rate limiting or unavailable; retry after {}s", .retry_after.as_secs())]
    RateLimited {
        upstream: String,
        retry_after: std::time::Duration,
    },
    #[error("upstream {upstream} denied access to {repo} ({status})")]
    UpstreamDenied {
        upstream: String,
        repo: String,
        status: u16,
    },
    #[error("upstream {upstream} sent content that does not match {expected} (got {actual})")]
    DigestMismatch {
        upstream: String,
        expected: String,
        actual: String,
    },
    #[error("manifest is larger than {MAX_MANIFEST_SIZE} bytes")]
    ManifestTooLarge,
    #[error("upstream {upstream}: {msg}")]
    BadUpstream { upstream: String, msg: String },
    #[error("range not satisfiable (blob has {size} bytes)")]
    RangeNotSatisfiable { size: u64 },
    #[error("{0}")]
    Denied(String),
    /// The repository's content was fetched with someone's own upstream credentials and
    /// this caller has not shown the upstream that it may read it.
    #[error("{0}")]
    Unauthorized(String),
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    #[error("invalid manifest: {0}")]
    ManifestInvalid(String),
    #[error("manifest references unknown {0}")]
    ManifestBlobUnknown(String),
    #[error("upload unknown: {0}")]
    UploadUnknown(String),
    #[error("upload range: {0}")]
    UploadRange(String),
    /// A cap on open resources (upload sessions) is reached.
    #[error("{0}")]
    TooMany(String),
    #[error("the request body sent nothing for {}s", .0.as_secs())]
    BodyTimeout(std::time::Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The same error, shared by every request that waited on one flight.
    #[error("{0}")]
    Shared(Arc<ServiceError>),
}

impl From<UpstreamError> for ServiceError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Connect { .. } | UpstreamError::Proxy { .. } => {
                ServiceError::Unavailable(e.to_string())
            }
            UpstreamError::RateLimited {
                upstream,
                retry_after,
            } => ServiceError::RateLimited {
                upstream,
                retry_after,
            },
            UpstreamError::Auth { upstream, msg } | UpstreamError::Protocol { upstream, msg } => {
                ServiceError::BadUpstream { upstream, msg }
            }
        }
    }
}

impl ServiceError {
    /// The error behind any number of [`ServiceError::Shared`] wrappers.
    pub fn root(&self) -> &ServiceError {
        match self {
            ServiceError::Shared(inner) => inner.root(),
            e => e,
        }
    }

    /// Whether a cached answer may be served instead (the upstream is down, overloaded or
    /// rate limiting, as opposed to saying "no").
    fn allows_stale(&self) -> bool {
        matches!(
            self.root(),
            ServiceError::Unavailable(_) | ServiceError::RateLimited { .. }
        )
    }
}

/// Maps an upstream's non-success status to an error for `what` in `repo`.
fn status_error(
    up: &Upstream,
    repo: &str,
    status: StatusCode,
    unknown: ServiceError,
) -> ServiceError {
    match status.as_u16() {
        404 => unknown,
        401 | 403 => ServiceError::UpstreamDenied {
            upstream: up.name.clone(),
            repo: repo.to_string(),
            status: status.as_u16(),
        },
        s if s == 429 || s >= 500 => {
            ServiceError::Unavailable(format!("upstream {} answered {status}", up.name))
        }
        _ => ServiceError::BadUpstream {
            upstream: up.name.clone(),
            msg: format!("unexpected status {status}"),
        },
    }
}

/// The key of what one upstream (with these credentials) said of `d` in `repo`: it has
/// none ([`Mirror::missing`](Mirror)), or it sent corrupt bytes for it
/// (`Mirror::corrupt`). Both cover only that repository and credential: bad bytes under
/// one repository must not make the same layer fail through another.
fn repo_digest_key(up: &Upstream, repo: &str, d: &Digest) -> String {
    format!(
        "{}\n{}\n{repo}\n{d}",
        up.name,
        up.client.as_deref().unwrap_or("")
    )
}

/// The `Content-Length` of an upstream answer, if it has a readable one.
fn content_length(h: &actix_web::http::header::HeaderMap) -> Option<u64> {
    h.get(actix_web::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Where a reply's bytes came from, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
    /// Cached, served because the upstream failed.
    Stale,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "hit",
            Source::Upstream => "miss",
            Source::Stale => "stale",
        }
    }
}

/// State shared by all workers.
pub struct Mirror {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub hosted: Option<Hosted>,
    /// Successful upstream re-checks of private repositories, by credential and repo.
    proofs: dashmap::DashMap<String, std::time::Instant>,
    /// Committed objects being streamed to clients right now (eviction skips them).
    readers: Arc<dashmap::DashMap<Digest, usize>>,
    blob_flights: Arc<flight::Flights<Digest, fill::Fill>>,
    manifest_flights: Arc<flight::Flights<String, manifest_fetch::Pending>>,
    /// `_catalog`'s listing.
    catalog: catalog::Catalog,
    /// Blobs an upstream said it does not have, per upstream, credential and repository.
    missing: memo::Memo,
    /// Blobs an upstream sent corrupt, per upstream.
    corrupt: memo::Memo,
    /// The other replicas sharing the bucket, when there are any.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Bytes received by fills so far (see [`memory::release_when_idle`]).
    filled: std::sync::atomic::AtomicU64,
    /// Memory fills may borrow to keep going while the disk stalls.
    backlog: backlog::Backlog,
    /// What the store holds, for the status page, and pulls counted per repository.
    inventory: inventory::Inventory,
    /// Each upstream's last answer (class, when), for the status page.
    last_answer: status::LastAnswers,
    /// Ranges fetched ahead of fills, and what was served that way (checked later).
    ahead: ahead::Ahead,
    /// `[[policy]]`: signed-only repositories and what was decided about them.
    gate: policy::Gate,
}

impl Mirror {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, hosted: Option<Hosted>) -> Mirror {
        let backlog = backlog::Backlog::shown_on(metrics.fill_backlog_bytes.clone());
        Mirror {
            store,
            metrics,
            hosted,
            proofs: Default::default(),
            readers: Default::default(),
            blob_flights: Arc::default(),
            manifest_flights: Arc::default(),
            catalog: catalog::Catalog::default(),
            missing: memo::Memo::new(std::time::Duration::from_secs(5)),
            corrupt: memo::Memo::new(std::time::Duration::from_secs(60)),
            cluster: None,
            filled: Default::default(),
            backlog,
            inventory: Default::default(),
            last_answer: Default::default(),
            ahead: Default::default(),
            gate: Default::default(),
        }
    }

    /// The same, with `[[policy]]` enforced.
    pub fn with_policies(mut self, policies: crate::policy::Policies) -> Mirror {
        self.gate = policy::Gate::new(policies);
        self
    }

    /// The same, one replica of `cluster`.
    pub fn with_cluster(mut self, cluster: Arc<crate::cluster::Cluster>) -> Mirror {
        self.cluster = Some(cluster);
        self
    }
}

/// One worker's view: shared state plus its own upstream connection pool.
#[derive(Clone)]
pub struct Services {
    pub mirror: Arc<Mirror>,
    client: UpstreamClient,
}

impl Services {
    pub fn new(mirror: Arc<Mirror>, client: UpstreamClient) -> Services {
        Services { mirror, client }
    }

    fn store(&self) -> &Store {
        &self.mirror.store
    }

    /// The name of the `[[policy]]` covering `<ns>/<repo>`, if one does.
    pub fn policy_for(&self, ns: &str, repo: &str) -> Option<&str> {
        self.mirror.gate.find(ns, repo).map(|p| p.name.as_str())
    }

    fn metrics(&self) -> &Metrics {
        &self.mirror.metrics
    }

    /// The hosted repositories, or `NAME_UNKNOWN` when the config has none.
    fn hosted(&self) -> Result<&Hosted, ServiceError> {
        self.mirror
            .hosted
            .as_ref()
            .ok_or_else(|| ServiceError::NameUnknown("no hosted repositories".into()))
    }

    /// Sends a request upstream, counting it by the class of its answer (`2xx` ...
    /// `5xx`, or `error` when none came), so failures do not look like successes.
    async fn upstream(
        &self,
        up: &Upstream,
        kind: &str,
        req: UpRequest<'_>,
    ) -> Result<awc::ClientResponse, ServiceError> {
        let start = std::time::Instant::now();
        let resp = self.client.send(up, &req).await;
        self.metrics()
            .upstream_seconds
            .with_label_values(&[&up.name, kind])
            .observe(start.elapsed().as_secs_f64());
        let class = match &resp {
            Ok(r) => status_class(r.status()),
            Err(_) => "error",
        };
        // One entry per configured upstream: only the first answer allocates its key.
        let now = std::time::Instant::now();
        match self.mirror.last_answer.get_mut(&up.name) {
            Some(mut last) => *last = (now, class),
            None => {
                self.mirror
                    .last_answer
                    .insert(up.name.clone(), (now, class));
            }
        }
        self.metrics()
            .upstream_requests
            .with_label_values(&[&up.name, kind, req.method.as_str(), class])
            .inc();
        Ok(resp?)
    }

    /// [`Services::upstream`], with a non-2xx answer turned into the error it means
    /// ([`status_error`]; `unknown` for a 404).
    async fn upstream_ok(
        &self,
        up: &Upstream,
        kind: &str,
        req: UpRequest<'_>,
        unknown: impl FnOnce() -> ServiceError,
    ) -> Result<awc::ClientResponse, ServiceError> {
        let repo = req.repo;
        let resp = self.upstream(up, kind, req).await?;
        if !resp.status().is_success() {
            return Err(status_error(up, repo, resp.status(), unknown()));
        }
        Ok(resp)
    }
}

impl Mirror {
    /// Trims the local tier in the background once a write took it over its cap (with a
    /// bucket; the periodic pass catches the rest).
    pub(crate) fn keep_local_tier(&self) {
        if !self.store.local_over_cap() {
            return;
        }
        let store = self.store.clone();
        actix_web::rt::spawn(async move {
            if let Err(e) = offload(async move { store.trim_local().await }).await {
                tracing::warn!(error = %e, "could not trim the local tier");
            }
        });
    }
}

/// Runs store work that blocks (a walk of the local store, an fsync, a hash of a whole
/// file) on a blocking thread, so no async worker stalls on the disk. `fut` may await the
/// bucket too: this worker's runtime keeps driving its timers meanwhile.
pub(crate) async fn offload<T, E, F>(fut: F) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    let h = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || h.block_on(fut))
        .await
        .map_err(|e| E::from(StoreError::Io(std::io::Error::other(e.to_string()))))?
}

/// Like [`offload`], on a thread of its own at a lower CPU priority (nice 10), for
/// background walks such as an eviction pass: when the cores are busy, serving goes first.
pub(crate) async fn offload_low<T, E, F>(fut: F) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    let h = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("entrepot-bg".into())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(h.block_on(fut));
        });
    if let Err(e) = spawned {
        return Err(E::from(StoreError::Io(e)));
    }
    rx.await
        .map_err(|e| E::from(StoreError::Io(std::io::Error::other(e.to_string()))))?
}

/// Lowers the calling thread's CPU priority (Linux: per-thread nice 10); a failure only
/// leaves it at the normal priority.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread; no memory is passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// `2xx`, `3xx`, `4xx` or `5xx` (anything else: `other`).
fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() / 100 {
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}
