//! Prometheus metrics, registered in a registry that is passed in (no statics), so tests
//! and several mirrors in one process never share counters.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// Tells this instance's series apart in the per-thread memory of [`Metrics::inc`]
    /// (tests run several mirrors in one process).
    id: u64,
    /// Requests by upstream, endpoint and status.
    pub requests: IntCounterVec,
    /// Cache lookups by upstream, kind (manifest/blob) and result (hit/miss).
    pub cache: IntCounterVec,
    /// Requests sent upstream by upstream, kind, method and answer class.
    pub upstream_requests: IntCounterVec,
    /// Upstream answers used, by upstream and the URL (primary or fallback) that gave it.
    pub upstream_answers: IntCounterVec,
    /// `429`/`503` answers (and token refusals) that put an upstream in back-off.
    pub rate_limited: IntCounterVec,
    /// Back-off holds set, by upstream, scope (`repository`, `upstream`: one identity's
    /// whole upstream, `url`: unreachable for everyone) and reason.
    pub upstream_holds: IntCounterVec,
    /// Docker Hub's `ratelimit-remaining` / `ratelimit-limit`, by upstream.
    pub ratelimit_remaining: prometheus::IntGaugeVec,
    pub ratelimit_limit: prometheus::IntGaugeVec,
    pub upstream_bytes: IntCounterVec,
    /// Requests that joined a fetch already in flight instead of starting one.
    pub coalesced: IntCounterVec,
    pub digest_mismatches: IntCounterVec,
    /// Cached answers served because the upstream failed (stale-if-error).
    pub stale_serves: IntCounterVec,
    /// Answers given from a worker's copy of the answer to an identical request.
    pub prepared_answers: IntCounterVec,
    /// Ranges of cold blobs fetched from the upstream ahead of their fill, by upstream.
    pub ranges_ahead: IntCounterVec,
    /// Ranges served ahead of a fill that differed from the verified blob, by upstream.
    pub range_mismatches: IntCounterVec,
    /// Body bytes sent to clients by source (cache/upstream).
    pub served_bytes: IntCounterVec,
    pub store_bytes: IntGauge,
    /// The configured `max_cache_size` (0: none), for "near the cap" alerts.
    pub cache_limit_bytes: IntGauge,
    /// `[[policy]]` verdicts, by policy and result (`admitted`, `denied`, `audit_denied`).
    pub policy_decisions: IntCounterVec,
    /// Bytes held by the memory of hot manifests and metadata (`server.memory_cache`).
    pub memory_cache_bytes: IntGauge,
    /// Lookups in that memory, by `result` (`hit`, `miss`).
    pub memory_cache_lookups: IntCounterVec,
    /// Writes the store refused, by reason (e.g. `no_space`: passed through uncached).
    pub store_errors: IntCounterVec,
    pub evicted_bytes: prometheus::IntCounter,
    /// New upload sessions refused, by the cap (`per_user`, `total`).
    pub upload_refusals: IntCounterVec,
    /// Idle upload sessions dropped to make room for a new one.
    pub uploads_reclaimed: prometheus::IntCounter,
    /// Logins refused with `429` after repeated failures (one address, one user).
    pub auth_throttled: prometheus::IntCounter,
    pub evicted_objects: prometheus::IntCounter,
    pub fills_in_flight: IntGauge,
    /// Bytes fills borrowed from the backlog pool while their disk stalled.
    pub fill_backlog_bytes: IntGauge,
    /// Time to the response (headers; bodies stream on), by upstream and endpoint.
    pub request_seconds: prometheus::HistogramVec,
    /// Time to an upstream's response headers, by upstream and kind.
    pub upstream_seconds: prometheus::HistogramVec,
    /// Requests to the S3 bucket by operation and result (ok/not_found/error).
    pub s3_requests: IntCounterVec,
    /// S3 request latency by operation (to the response; streamed bodies go on).
    pub s3_seconds: prometheus::HistogramVec,
    /// Bytes read from (`in`) and written to (`out`) the bucket.
    pub s3_bytes: IntCounterVec,
    /// Bucket objects whose bytes did not match their digest (deleted, fetched again).
    pub bucket_corrupt: prometheus::IntCounter,
    /// Replicas of the cluster by state (up/down).
    pub cluster_peers: prometheus::IntGaugeVec,
    /// Peer requests by direction (out: asked of a peer; in: answered for one) and result.
    pub peer_requests: IntCounterVec,
}

fn counter(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn plain_counter(
    reg: &Registry,
    name: &str,
    help: &str,
) -> prometheus::Result<prometheus::IntCounter> {
    let c = prometheus::IntCounter::new(name, help)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Buckets from 0.5 ms (cache hits) to 30 s (slow upstreams).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn histogram(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<prometheus::HistogramVec> {
    let h = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )?;
    reg.register(Box::new(h.clone()))?;
    Ok(h)
}

fn gauge_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<prometheus::IntGaugeVec> {
    let g = prometheus::IntGaugeVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge(reg: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new(registry: Registry) -> prometheus::Result<Metrics> {
        let r = &registry;
        Ok(Metrics {
            requests: counter(
                r,
                "entrepot_http_requests_total",
                "Requests served",
                &["upstream", "endpoint", "status"],
            )?,
            cache: counter(
                r,
                "entrepot_cache_requests_total",
                "Cache lookups",
                &["upstream", "kind", "result"],
            )?,
            upstream_requests: counter(
                r,
                "entrepot_upstream_requests_total",
                "Requests sent to upstreams, by the class of their answer (2xx..5xx, error: none)",
                &["upstream", "kind", "method", "status"],
            )?,
            upstream_answers: counter(
                r,
                "entrepot_upstream_answers_total",
                "Upstream answers used, by the URL that gave them",
                &["upstream", "url"],
            )?,
            rate_limited: counter(
                r,
                "entrepot_upstream_rate_limited_total",
                "429/503 answers that put an upstream URL in back-off",
                &["upstream"],
            )?,
            upstream_holds: counter(
                r,
                "entrepot_upstream_holds_total",
                "Back-off holds set, by scope (repository, upstream, url) and reason",
                &["upstream", "scope", "reason"],
            )?,
            ratelimit_remaining: gauge_vec(
                r,
                "entrepot_upstream_ratelimit_remaining",
                "The upstream's ratelimit-remaining header (Docker Hub pulls left)",
                &["upstream"],
            )?,
            ratelimit_limit: gauge_vec(
                r,
                "entrepot_upstream_ratelimit_limit",
                "The upstream's ratelimit-limit header",
                &["upstream"],
            )?,
            upstream_bytes: counter(
                r,
                "entrepot_upstream_bytes_total",
                "Body bytes received from upstreams",
                &["upstream"],
            )?,
            coalesced: counter(
                r,
                "entrepot_coalesced_requests_total",
                "Requests that joined an in-flight fetch",
                &["kind"],
            )?,
            digest_mismatches: counter(
                r,
                "entrepot_digest_mismatches_total",
                "Upstream content that did not match its digest",
                &["upstream"],
            )?,
            stale_serves: counter(
                r,
                "entrepot_stale_serves_total",
                "Cached manifests served because the upstream failed",
                &["upstream"],
            )?,
            prepared_answers: counter(
                r,
                "entrepot_prepared_answers_total",
                "Anonymous requests answered from a worker's copy of the answer to an identical request (also counted as cache hits)",
                &["upstream", "kind"],
            )?,
            ranges_ahead: counter(
                r,
                "entrepot_ranges_ahead_total",
                "Ranges of cold blobs fetched from the upstream ahead of their fill",
                &["upstream"],
            )?,
            range_mismatches: counter(
                r,
                "entrepot_range_mismatches_total",
                "Ranges served ahead of a fill that differed from the verified blob",
                &["upstream"],
            )?,
            served_bytes: counter(
                r,
                "entrepot_served_bytes_total",
                "Body bytes sent to clients",
                &["source"],
            )?,
            store_bytes: gauge(
                r,
                "entrepot_store_size_bytes",
                "Bytes of content in the store",
            )?,
            fills_in_flight: gauge(r, "entrepot_fills_in_flight", "Blob downloads in progress")?,
            fill_backlog_bytes: gauge(
                r,
                "entrepot_fill_backlog_bytes",
                "Bytes cold fills hold beyond their own 16 MiB while the disk stalls (pool: 80 MiB)",
            )?,
            policy_decisions: counter(
                r,
                "entrepot_policy_decisions_total",
                "Signed-only policy verdicts on manifests and blobs, by policy and result",
                &["policy", "result"],
            )?,
            memory_cache_bytes: gauge(
                r,
                "entrepot_memory_cache_bytes",
                "Bytes of hot manifests and metadata held in memory (server.memory_cache)",
            )?,
            memory_cache_lookups: counter(
                r,
                "entrepot_memory_cache_lookups_total",
                "Lookups in the memory of hot manifests and metadata, by result",
                &["result"],
            )?,
            cache_limit_bytes: gauge(
                r,
                "entrepot_cache_limit_bytes",
                "Configured max_cache_size (0: unbounded)",
            )?,
            request_seconds: histogram(
                r,
                "entrepot_http_request_duration_seconds",
                "Time to respond (headers)",
                &["upstream", "endpoint"],
            )?,
            upstream_seconds: histogram(
                r,
                "entrepot_upstream_request_duration_seconds",
                "Time to an upstream's response headers",
                &["upstream", "kind"],
            )?,
            s3_requests: counter(
                r,
                "entrepot_s3_requests_total",
                "Requests to the S3 bucket",
                &["op", "result"],
            )?,
            s3_seconds: histogram(
                r,
                "entrepot_s3_request_duration_seconds",
                "Time to an S3 response",
                &["op"],
            )?,
            s3_bytes: counter(
                r,
                "entrepot_s3_bytes_total",
                "Bytes read from (in) and written to (out) the S3 bucket",
                &["direction"],
            )?,
            bucket_corrupt: plain_counter(
                r,
                "entrepot_s3_corrupt_objects_total",
                "Bucket objects whose bytes did not match their digest",
            )?,
            cluster_peers: gauge_vec(
                r,
                "entrepot_cluster_peers",
                "Replicas of the cluster by state",
                &["state"],
            )?,
            peer_requests: counter(
                r,
                "entrepot_peer_requests_total",
                "Blob requests between replicas, by direction and result",
                &["direction", "result"],
            )?,
            store_errors: counter(
                r,
                "entrepot_store_write_errors_total",
                "Store writes refused",
                &["reason"],
            )?,
            upload_refusals: counter(
                r,
                "entrepot_upload_refusals_total",
                "New upload sessions refused with 429, by the cap that refused them",
                &["cap"],
            )?,
            uploads_reclaimed: plain_counter(
                r,
                "entrepot_upload_sessions_reclaimed_total",
                "Idle upload sessions dropped to make room for a new one",
            )?,
            auth_throttled: plain_counter(
                r,
                "entrepot_auth_throttled_total",
                "Logins refused after repeated failures from one address for one user",
            )?,
            evicted_bytes: plain_counter(
                r,
                "entrepot_evicted_bytes_total",
                "Bytes evicted from the cache",
            )?,
            evicted_objects: plain_counter(
                r,
                "entrepot_evicted_objects_total",
                "Objects evicted from the cache",
            )?,
            registry,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Creates every series known in advance at zero, so dashboards and alerts see
    /// `0`, not "no data", before the first event; the bucket's and the cluster's series
    /// are only exposed when they are configured (no S3 panels full of zeros).
    pub fn init_labels(&self, upstreams: &[&str], s3: bool, cluster: bool) {
        if !s3 {
            let _ = self.registry.unregister(Box::new(self.s3_requests.clone()));
            let _ = self.registry.unregister(Box::new(self.s3_seconds.clone()));
            let _ = self.registry.unregister(Box::new(self.s3_bytes.clone()));
            let _ = self
                .registry
                .unregister(Box::new(self.bucket_corrupt.clone()));
        }
        if !cluster {
            let _ = self
                .registry
                .unregister(Box::new(self.cluster_peers.clone()));
            let _ = self
                .registry
                .unregister(Box::new(self.peer_requests.clone()));
        }
        for up in upstreams {
            for class in ["2xx", "4xx", "5xx", "error"] {
                for (kind, method) in [("manifest", "GET"), ("blob", "GET")] {
                    self.upstream_requests
                        .with_label_values(&[up, kind, method, class]);
                }
            }
            for kind in ["manifest", "blob"] {
                for result in ["hit", "miss"] {
                    self.cache.with_label_values(&[up, kind, result]);
                }
                self.prepared_answers.with_label_values(&[up, kind]);
            }
            for c in [
                &self.range_mismatches,
                &self.stale_serves,
                &self.digest_mismatches,
                &self.rate_limited,
                &self.upstream_bytes,
            ] {
                c.with_label_values(&[up]);
            }
        }
        for kind in ["manifest", "blob"] {
            self.coalesced.with_label_values(&[kind]);
        }
        for source in ["cache", "upstream"] {
            self.served_bytes.with_label_values(&[source]);
        }
        self.store_errors.with_label_values(&["no_space"]);
        if s3 {
            for d in ["in", "out"] {
                self.s3_bytes.with_label_values(&[d]);
            }
        }
        if cluster {
            for r in ["ok", "error", "not_found", "unauthorized"] {
                for d in ["in", "out"] {
                    self.peer_requests.with_label_values(&[d, r]);
                }
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encode error: {e}\n"))
    }
}

/// The registry's values at one moment, for pages that show a few of them (one gather,
/// no series created by looking).
pub struct Readings(Vec<prometheus::proto::MetricFamily>);

impl Metrics {
    pub fn read(&self) -> Readings {
        Readings(self.registry.gather())
    }
}

impl Readings {
    /// The sum of `name`'s series (counter or gauge) whose labels include all of
    /// `labels`; `None` when no series matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = self.0.iter().find(|f| f.get_name() == name)?;
        let matching: Vec<f64> = family
            .get_metric()
            .iter()
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.get_name() == *k && l.get_value() == *v)
                })
            })
            .map(|m| match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            })
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// [`Readings::get`], 0 when absent.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Series a thread looked up at most, past which lookups go to the vector each time
/// (labels hold upstream names and status codes: a few hundred series in practice).
const MAX_LOCAL_SERIES: usize = 4096;

/// A series this thread looked up: its labels (to tell hash collisions apart) and handle.
struct Local<T> {
    id: u64,
    vec: usize,
    labels: Box<[Box<str>]>,
    series: T,
}

/// Keyed by a foldhash of the labels, not SipHash: the labels are the mirror's own words
/// (upstream names, endpoints, status codes), not a client's, and SipHash was a tenth of
/// the cost of a small request's metrics.
type LocalSeries<T> =
    std::cell::RefCell<std::collections::HashMap<u64, Vec<Local<T>>, foldhash::fast::FixedState>>;

thread_local! {
    static COUNTERS: LocalSeries<prometheus::IntCounter> = Default::default();
    static HISTOGRAMS: LocalSeries<prometheus::Histogram> = Default::default();
}

/// `vec.with_label_values(labels)`, looked up once per thread: each lookup hashed the
/// labels, took the vector's lock and cloned the series' `Arc` (atomics both workers
/// write), for every request, three times (measured with perf on small requests).
fn local<V, T: Clone>(
    cache: &'static std::thread::LocalKey<LocalSeries<T>>,
    id: u64,
    vec: &V,
    labels: &[&str],
    lookup: impl FnOnce() -> T,
    with: impl FnOnce(&T),
) {
    use std::hash::BuildHasher as _;
    let addr = vec as *const V as usize;
    let key = foldhash::fast::FixedState::default().hash_one((id, addr, labels));
    cache.with_borrow_mut(|map| {
        let same = |l: &Local<T>| {
            l.id == id && l.vec == addr && l.labels.iter().map(|b| &**b).eq(labels.iter().copied())
        };
        if let Some(l) = map.get(&key).and_then(|ls| ls.iter().find(|l| same(l))) {
            return with(&l.series);
        }
        let series = lookup();
        with(&series);
        if map.len() < MAX_LOCAL_SERIES {
            map.entry(key).or_default().push(Local {
                id,
                vec: addr,
                labels: labels.iter().map(|l| Box::from(*l)).collect(),
                series,
            });
        }
    })
}

impl Metrics {
    /// `vec.with_label_values(labels).inc()`, the series found through this thread's
    /// memory (see [`local`]). `vec` must be one of this instance's.
    pub fn inc(&self, vec: &IntCounterVec, labels: &[&str]) {
        local(
            &COUNTERS,
            self.id,
            vec,
            labels,
            || vec.with_label_values(labels),
            |c| c.inc(),
        );
    }

    /// `vec.with_label_values(labels).observe(v)`, as [`Metrics::inc`].
    pub fn observe(&self, vec: &prometheus::HistogramVec, labels: &[&str], v: f64) {
        local(
            &HISTOGRAMS,
            self.id,
            vec,
            labels,
            || vec.with_label_values(labels),
            |h| h.observe(v),
        );
    }
}
