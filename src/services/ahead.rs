//! Ranges ahead of a fill, for lazy-pulling snapshotters (eStargz, SOCI, zstd:chunked):
//! they read a layer's footer and table of contents first, then the chunks files need.
//! A range the running fill has not reached (nor will within [`SLACK`] bytes) is asked
//! of the upstream as that range, at once, instead of waiting for the fill. Identical
//! ranges asked at once share one upstream request.
//!
//! Such bytes cannot be checked against the blob's digest when sent (lazy formats check
//! their own chunks). Each range served ahead is remembered by its SHA-256; once the fill
//! has verified and stored the blob, they are compared with the stored bytes: a mismatch
//! is logged, counted (`entrepot_range_mismatches_total`) and the repository's upstream
//! is treated as corrupt for that blob. `verify_ranges = "before"` on an upstream keeps
//! ranges waiting for the fill instead.

use std::sync::Arc;

use actix_web::http::Method;
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::blob_reply::BlobReply;
use super::fill::{self, Fill};
use super::flight::Join;
use super::{repo_digest_key, ServiceError, Services, Source};
use crate::names::Digest;
use crate::upstream::Upstream;

/// A range starting within this many bytes past what the fill received is left to the
/// fill (it gets there in tens of milliseconds at the rates fills run).
pub(super) const SLACK: u64 = 4 << 20;
/// Largest range fetched ahead (bigger ones follow the fill): bytes held in memory
/// while they are sent. eStargz chunks and tables of contents fit.
pub(super) const MAX_RANGE: u64 = 4 << 20;
/// Most ahead-of-fill fetches at once, for the whole mirror: with [`MAX_RANGE`], at most
/// 64 MiB held by them.
const MAX_FLIGHTS: usize = 16;
/// Ranges remembered per blob for the check after the fill, and blobs remembered (about
/// 150 bytes each: under 10 MiB in all).
const MAX_REMEMBERED: usize = 64;
const MAX_BLOBS: usize = 1024;

/// An ahead-of-fill fetch, as its followers see it.
#[derive(Clone, Default)]
pub enum Fetch {
    #[default]
    Pending,
    /// The bytes, and the blob's size from the upstream's `Content-Range`.
    Done(Bytes, Option<u64>),
    /// The upstream did not serve the range (no 206): follow the fill instead.
    Declined,
    Failed(Arc<ServiceError>),
}

/// A range served ahead, to compare with the stored blob.
#[derive(Clone)]
pub struct Served {
    start: u64,
    len: u64,
    sha256: [u8; 32],
    upstream: String,
    repo: String,
    /// The key under which a mismatch marks the upstream corrupt for this repository.
    corrupt_key: String,
}

/// The mirror's ahead-of-fill state.
#[derive(Default)]
pub struct Ahead {
    flights: Arc<super::flight::Flights<String, Fetch>>,
    served: dashmap::DashMap<Digest, Vec<Served>>,
}

/// An explicit `bytes=a-b` range (up to [`MAX_RANGE`]) that can go to the upstream
/// before any fill has answered: `[a, b + 1)`.
pub(super) fn explicit(up: &Upstream, range: Option<super::ByteRange>) -> Option<(u64, u64)> {
    match range? {
        super::ByteRange::From(a, Some(b)) => Some((a, b + 1)).filter(|r| may(up, *r)),
        _ => None,
    }
}

/// Whether `up` lets ranges go ahead of fills and `[start, end)` is small enough to.
fn may(up: &Upstream, (start, end): (u64, u64)) -> bool {
    up.ranges_ahead && end - start <= MAX_RANGE
}

/// Whether `[start, end)` should be fetched ahead of the fill `rx`.
pub(super) fn wanted(up: &Upstream, rx: &watch::Receiver<Fill>, start: u64, end: u64) -> bool {
    if !may(up, (start, end)) {
        return false;
    }
    let f = rx.borrow();
    if f.verified() || f.ended() {
        return false;
    }
    start > f.recent.received().max(f.written) + SLACK
}

/// `[start, end)` of `d` from the upstream, shared by identical requests; `None` when
/// the upstream does not serve ranges or too many run: the caller follows the fill.
pub(super) async fn serve(
    svc: &Services,
    up: &Upstream,
    repo: &str,
    d: &Digest,
    (start, end): (u64, u64),
    size: Option<u64>,
    will_fill: bool,
) -> Result<Option<BlobReply>, ServiceError> {
    let ahead = &svc.mirror.ahead;
    if ahead.flights.in_flight() >= MAX_FLIGHTS {
        return Ok(None);
    }
    // Per upstream, credential and repository: a range is only ever shared between
    // requests the upstream would answer alike.
    let key = format!("{} {start}-{end}", repo_digest_key(up, repo, d));
    let mut rx = match ahead.flights.join(key, Fetch::default) {
        Join::Leader(lead) => {
            let opened = match open(svc, up, repo, d, start, end).await {
                Ok(o) => o,
                Err(e) => {
                    let e = Arc::new(e);
                    let _ = lead.tx.send(Fetch::Failed(e.clone()));
                    return Err(ServiceError::Shared(e));
                }
            };
            let Some((body, total)) = opened else {
                let _ = lead.tx.send(Fetch::Declined);
                return Ok(None);
            };
            count(svc, up);
            let relay = Relay {
                body,
                got: bytes::BytesMut::with_capacity((end - start) as usize),
                want: (end - start) as usize,
                total,
                lead,
                check: will_fill.then(|| Check::new(up, repo, d, start)),
                what: format!("{} {repo}@{d} bytes={start}-{}", up.name, end - 1),
                svc: svc.clone(),
            };
            return Ok(Some(BlobReply {
                size: size.or(total),
                range: Some((start, end)),
                body: Some(relay.stream()),
                source: Source::Upstream,
                served: None,
            }));
        }
        Join::Follower(rx) => rx,
    };
    let outcome = rx
        .wait_for(|f| !matches!(f, Fetch::Pending))
        .await
        .map(|f| f.clone())
        .unwrap_or(Fetch::Declined);
    let (bytes, total) = match outcome {
        Fetch::Done(b, total) => (b, total),
        Fetch::Declined | Fetch::Pending => return Ok(None),
        Fetch::Failed(e) => return Err(ServiceError::Shared(e)),
    };
    // The leader remembered these bytes for the check after the fill.
    count(svc, up);
    let end = start + bytes.len() as u64;
    let body = fill::stream::BodyStream::from_bytes(bytes, svc.mirror.metrics.clone());
    Ok(Some(BlobReply {
        size: size.or(total),
        range: Some((start, end)),
        body: Some(body),
        source: Source::Upstream,
        served: None,
    }))
}

fn count(svc: &Services, up: &Upstream) {
    svc.mirror
        .metrics
        .ranges_ahead
        .with_label_values(&[&up.name])
        .inc();
}

/// The leader's range, streamed to its client as it arrives from the upstream (reading
/// it whole first was most of the wait on a fast link) and kept, so that followers get
/// the same bytes and the fill can check them. A body longer or shorter than asked ends
/// the client's response with an error (its headers are sent by then) and fails the
/// followers; a leader whose client leaves drops the flight, and its followers follow
/// the fill.
struct Relay {
    body: awc::ClientResponse,
    got: bytes::BytesMut,
    want: usize,
    total: Option<u64>,
    lead: super::flight::Lead<String, Fetch>,
    /// `None` when no fill will run (`range_fill = false`): nothing to check against.
    check: Option<Check>,
    /// `<upstream> <repo>@<digest> bytes=<a>-<b>`, for the log.
    what: String,
    svc: Services,
}

impl Relay {
    fn stream(self) -> fill::stream::BodyStream {
        let metrics = self.svc.mirror.metrics.clone();
        let s = futures_util::stream::unfold(Some(self), |relay| async move {
            let mut r = relay?;
            match r.body.next().await {
                Some(Ok(chunk)) if r.got.len() + chunk.len() <= r.want => {
                    r.got.extend_from_slice(&chunk);
                    Some((Ok(chunk), Some(r)))
                }
                Some(Ok(_)) => Some((Err(r.fail("more bytes than the range asked")), None)),
                Some(Err(e)) => Some((Err(r.fail(&e.to_string())), None)),
                None if r.got.len() == r.want => {
                    r.done();
                    None
                }
                None => Some((Err(r.fail("fewer bytes than the range asked")), None)),
            }
        });
        fill::stream::BodyStream::from_stream(s.boxed_local(), &metrics)
    }

    fn fail(&self, why: &str) -> ServiceError {
        let msg = format!(
            "upstream range {} ({} bytes asked, {} received): {why}",
            self.what,
            self.want,
            self.got.len()
        );
        tracing::warn!(error = %msg, "a range fetched ahead of the fill ended early: its client got part of it");
        let shared = Arc::new(ServiceError::Unavailable(msg.clone()));
        let _ = self.lead.tx.send(Fetch::Failed(shared));
        ServiceError::Unavailable(msg)
    }

    fn done(&mut self) {
        let bytes = std::mem::take(&mut self.got).freeze();
        if let Some(c) = &self.check {
            c.record(&self.svc, &bytes);
        }
        let _ = self.lead.tx.send(Fetch::Done(bytes, self.total));
    }
}

/// Asks the upstream for exactly `[start, end)`; `None` if it answers anything but a
/// `206` for that range. With the blob's size from `Content-Range`, when it says.
async fn open(
    svc: &Services,
    up: &Upstream,
    repo: &str,
    d: &Digest,
    start: u64,
    end: u64,
) -> Result<Option<(awc::ClientResponse, Option<u64>)>, ServiceError> {
    let what = format!("blobs/{d}");
    let mut req = fill::blob_request(Method::GET, repo, &what, Some(start));
    req.range_to = Some(end - 1);
    let resp = svc
        .upstream_ok(up, "blob_range", req, || {
            ServiceError::BlobUnknown(d.to_string())
        })
        .await?;
    if resp.status() != actix_web::http::StatusCode::PARTIAL_CONTENT {
        return Ok(None);
    }
    // `bytes a-b/total`: anything but the range asked is left to the fill.
    let Some((range, total)) = resp
        .headers()
        .get(actix_web::http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes "))
        .and_then(|v| v.split_once('/'))
    else {
        return Ok(None);
    };
    if range.trim() != format!("{start}-{}", end - 1) {
        return Ok(None);
    }
    let total = total.trim().parse::<u64>().ok();
    Ok(Some((resp, total)))
}

/// What the leader keeps of a range served ahead, for the check after the fill.
struct Check {
    start: u64,
    upstream: String,
    repo: String,
    digest: Digest,
    corrupt_key: String,
}

impl Check {
    fn new(up: &Upstream, repo: &str, d: &Digest, start: u64) -> Check {
        Check {
            start,
            upstream: up.name.clone(),
            repo: repo.to_string(),
            digest: *d,
            corrupt_key: repo_digest_key(up, repo, d),
        }
    }

    fn record(&self, svc: &Services, bytes: &Bytes) {
        let served = &svc.mirror.ahead.served;
        let d = &self.digest;
        if served.len() >= MAX_BLOBS && !served.contains_key(d) {
            return;
        }
        let mut list = served.entry(*d).or_default();
        let len = bytes.len() as u64;
        if list.len() < MAX_REMEMBERED
            && !list.iter().any(|s| s.start == self.start && s.len == len)
        {
            list.push(Served {
                start: self.start,
                len,
                sha256: Sha256::digest(bytes).into(),
                upstream: self.upstream.clone(),
                repo: self.repo.clone(),
                corrupt_key: self.corrupt_key.clone(),
            });
        }
    }
}

/// After the fill stored `d`: compares every range served ahead with the stored bytes.
pub(super) async fn check(svc: &Services, d: &Digest) {
    let Some((_, served)) = svc.mirror.ahead.served.remove(d) else {
        return;
    };
    let store = svc.mirror.store.clone();
    let dd = *d;
    let hashes = super::offload(async move {
        let mut out = Vec::new();
        for s in &served {
            let bytes = store.read_range(&dd, s.start, s.len)?;
            let same = bytes
                .as_deref()
                .map(|b| <[u8; 32]>::from(Sha256::digest(b)) == s.sha256);
            out.push((s.clone(), same));
        }
        Ok::<_, ServiceError>(out)
    })
    .await;
    let Ok(checked) = hashes else {
        return;
    };
    for (s, same) in checked {
        if same == Some(false) {
            svc.mirror
                .metrics
                .range_mismatches
                .with_label_values(&[&s.upstream])
                .inc();
            tracing::error!(upstream = %s.upstream, repo = %s.repo, digest = %d, start = s.start, len = s.len, "a range served ahead of the fill differs from the verified blob: the upstream sent wrong bytes for it");
            svc.mirror.corrupt.remember(s.corrupt_key.clone());
        }
    }
}
