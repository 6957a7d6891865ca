//! Blobs: served from the shared store, or filled from upstream once per digest while
//! every requester streams the bytes as they land on disk.

use std::fs::File;

use std::sync::Arc;

use actix_web::http::Method;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::blob_reply::{BlobReply, ByteRange};
use super::fill::{blob_request, Avail, BodyStream, OpenRelay};
use super::fill::{wait_started, Fill};
use super::flight::{Join, Lead};
use super::{content_length, repo_digest_key, ServiceError, Services, Source};
use crate::auth::Caller;
use crate::names::Digest;
use crate::services::{ahead, fill, peers, private};
use crate::upstream::Upstream;

/// How often a request re-joins after fills led through other repositories failed.
const MAX_REJOINS: usize = 4;

/// A joined fill whose upstream headers are in: its progress, file and size.
type FillStart = (watch::Receiver<Fill>, Option<Arc<File>>, Option<u64>);

/// An error about one repository (not found, unauthorized, denied), which must never
/// reach a request that came through another.
fn belongs_to_repo(e: &ServiceError) -> bool {
    matches!(
        e.root(),
        ServiceError::BlobUnknown(_)
            | ServiceError::NameUnknown(_)
            | ServiceError::UpstreamDenied { .. }
            | ServiceError::Unauthorized(_)
            | ServiceError::Denied(_)
    )
}

impl Services {
    /// Waits for the fill of `d`, if one runs, to end. A body's last byte reaches its
    /// reader as soon as the blob checked out, before the fill's fsync and rename: a
    /// caller that reads the store next (the CLI's `export`) waits for the commit here.
    pub async fn blob_settled(&self, d: &Digest) {
        let Some(mut rx) = self.mirror.blob_flights.follow(d) else {
            return;
        };
        loop {
            let ended = {
                let f = rx.borrow_and_update();
                f.ended()
            };
            // A closed channel: the leader is gone, the fill over either way.
            if ended || rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// A blob for another replica of the cluster (which checked its client's access): as
    /// [`Services::blob`] for an anonymous caller, never forwarded to a peer again.
    pub async fn peer_blob(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        d: &Digest,
        range: Option<ByteRange>,
        method: &Method,
    ) -> Result<BlobReply, ServiceError> {
        let r = self
            .blob_from(up, repo, d, range, method, &Caller::Anonymous, false)
            .await;
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics()
            .peer_requests
            .with_label_values(&["in", result])
            .inc();
        r
    }

    /// `forward`: a fill may be led through the blob's owner in the cluster.
    #[allow(clippy::too_many_arguments)]
    async fn blob_from(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        d: &Digest,
        range: Option<ByteRange>,
        method: &Method,
        caller: &Caller,
        forward: bool,
    ) -> Result<BlobReply, ServiceError> {
        let head = method == Method::HEAD;
        // Callers whose own upstream credentials do not come into play are served alike
        // (as manifests are, see `upstream_manifest`): a blob found stored for this
        // repository a moment ago, with nothing changed since, is known from one lookup.
        let plain = private::served_alike(up, repo, caller)?;
        if let Some((size, stamp)) = self
            .store()
            .served_blob(&up.name, repo, d)
            .filter(|_| plain)
        {
            if let Some(r) = self.stored_hit(up, d, size, range, head).await {
                return r.map(|r| BlobReply {
                    served: Some(stamp),
                    ..r
                });
            }
        }
        // Read before anything a served blob is made of (see `remember_served_blob`).
        let generation = self.store().served_generation().filter(|_| plain);
        let up =
            &private::upstream_for(self, up, repo, caller, private::ProbePath("blobs/", d)).await?;
        if let Some(size) = self.store().stat(d).await? {
            if self.store().blob_linked(&up.name, repo, d).await?
                || self.confirm_upstream(up, repo, d).await?
            {
                if let Some(r) = self.stored_hit(up, d, size, range, head).await {
                    // Eviction goes by last use; a failed touch only makes it less
                    // precise. A served blob's use is this one (under a second ago).
                    if self.store().touch(d).is_ok() {
                        if let Some(g) = generation {
                            self.store()
                                .remember_served_blob(&up.name, repo, d, size, g);
                        }
                    }
                    return r;
                }
            }
        }
        self.count_cache(up, "miss");
        let missing = repo_digest_key(up, repo, d);
        if self.mirror.missing.holds(&missing) {
            return Err(ServiceError::BlobUnknown(d.to_string()));
        }
        let corrupt = repo_digest_key(up, repo, d);
        if self.mirror.corrupt.holds(&corrupt) {
            self.metrics()
                .digest_mismatches
                .with_label_values(&[&up.name])
                .inc();
            return Err(ServiceError::BadUpstream {
                upstream: up.name.clone(),
                msg: format!(
                    "sent corrupt bytes for {d} within the last minute; not asked again yet"
                ),
            });
        }
        let r = if head {
            self.head_upstream(up, repo, d).await
        } else {
            self.stream_fill(up, repo, d, range, forward).await
        };
        if let Err(e) = &r {
            if matches!(e.root(), ServiceError::BlobUnknown(_)) {
                self.mirror.missing.remember(missing);
            }
        }
        r
    }

    /// The stored blob's reply, counted as a hit; `None` if it was removed (`gc`) or
    /// found short and quarantined since its size was known (a size is remembered a
    /// second): then it is fetched again.
    async fn stored_hit(
        &self,
        up: &Upstream,
        d: &Digest,
        size: u64,
        range: Option<ByteRange>,
        head: bool,
    ) -> Option<Result<BlobReply, ServiceError>> {
        match fill::stored(self, d, size, range, head).await {
            Err(ServiceError::BlobUnknown(_)) => None,
            r => {
                self.count_cache(up, "hit");
                Some(r)
            }
        }
    }

    fn count_cache(&self, up: &Upstream, result: &str) {
        let m = self.metrics();
        m.inc(&m.cache, &[&up.name, "blob", result]);
    }

    /// The blob is stored (through another repository or upstream) but not known to
    /// belong to this one: ask the upstream with a HEAD, which downloads nothing.
    async fn confirm_upstream(
        &self,
        up: &Upstream,
        repo: &str,
        d: &Digest,
    ) -> Result<bool, ServiceError> {
        self.head_upstream(up, repo, d).await?;
        self.store().link_blob(&up.name, repo, d).await?;
        self.mirror.list_repo(&up.name, repo).await?;
        Ok(true)
    }

    async fn head_upstream(
        &self,
        up: &Upstream,
        repo: &str,
        d: &Digest,
    ) -> Result<BlobReply, ServiceError> {
        let what = format!("blobs/{d}");
        let req = blob_request(Method::HEAD, repo, &what, None);
        let resp = self
            .upstream_ok(up, "blob", req, || ServiceError::BlobUnknown(d.to_string()))
            .await?;
        Ok(BlobReply {
            size: content_length(resp.headers()),
            range: None,
            body: None,
            source: Source::Upstream,
            served: None,
        })
    }

    /// Joins (or starts) the fill for `d` and streams from it once upstream headers are in.
    async fn stream_fill(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        d: &Digest,
        range: Option<ByteRange>,
        forward: bool,
    ) -> Result<BlobReply, ServiceError> {
        let origin = format!("{}/{repo}", up.name);
        if let Some(r) = self
            .range_first(up, repo, d, range, &origin, forward)
            .await?
        {
            return Ok(r);
        }
        let (rx, file, size) = self.join_fill(up, repo, d, &origin, forward).await?;
        let range = match (range, size) {
            (Some(r), Some(size)) => Some(r.resolve(size)?),
            _ => None,
        };
        // A range the fill has not reached: asked of the upstream at once.
        if let Some((start, end)) = range.filter(|(s, e)| ahead::wanted(up, &rx, *s, *e)) {
            if let Some(r) = ahead::serve(self, up, repo, d, (start, end), size, true).await? {
                return Ok(r);
            }
        }
        let (start, end) = range.unwrap_or((0, size.unwrap_or(u64::MAX)));
        let relay: OpenRelay = {
            let (this, up, repo, d) = (self.clone(), up.clone(), repo.to_string(), *d);
            Box::new(move |pos| {
                Box::pin(async move { Ok(fill::relay_from(&this, &up, &repo, &d, pos).await?.1) })
            })
        };
        let body = BodyStream::new(
            file,
            start,
            end,
            Avail::Fill(rx, Some(relay)),
            self.mirror.metrics.clone(),
            "upstream",
        );
        Ok(BlobReply {
            size,
            range,
            body: Some(body),
            source: Source::Upstream,
            served: None,
        })
    }

    /// An explicit range goes to the upstream at once, when no fill runs or the running
    /// one has not reached it: the footer a snapshotter asks first must not wait for a
    /// fill's headers. The fill (when `range_fill`) starts once the range is on its way:
    /// on a fast link the two would compete for the same cores. `None`: follow the fill.
    async fn range_first(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        d: &Digest,
        range: Option<ByteRange>,
        origin: &str,
        forward: bool,
    ) -> Result<Option<BlobReply>, ServiceError> {
        let Some((start, end)) = ahead::explicit(up, range) else {
            return Ok(None);
        };
        let running = self.mirror.blob_flights.follow(d);
        if running
            .as_ref()
            .is_some_and(|rx| !ahead::wanted(up, rx, start, end))
        {
            return Ok(None);
        }
        let will_fill = running.is_some() || up.range_fill;
        let Some(mut reply) =
            ahead::serve(self, up, repo, d, (start, end), None, will_fill).await?
        else {
            return Ok(None);
        };
        if running.is_none() && up.range_fill {
            // Started once the range was sent (or its client left): on a fast link a fill
            // hashes and writes at the speed of the cores the range needs.
            let (this, up, repo, d, origin) = (
                self.clone(),
                up.clone(),
                repo.to_string(),
                *d,
                origin.to_string(),
            );
            let start_fill = move || {
                actix_web::rt::spawn(async move {
                    let _ = this.join_fill(&up, &repo, &d, &origin, forward).await;
                });
            };
            reply.body = reply.body.take().map(|b| b.on_end(start_fill));
        }
        Ok(Some(reply))
    }

    /// Joins (or starts) the fill of `d` for `origin` and waits for its upstream headers.
    /// A fill led through another repository whose upstream said "not here" (or "not for
    /// you") must not fail this request: once the upstream has confirmed that this
    /// repository holds the blob, the request leads a fill of its own (still one per digest
    /// at a time), so a guessed digest asked through a wrong repository cannot make real
    /// pulls fail.
    async fn join_fill(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        d: &Digest,
        origin: &str,
        forward: bool,
    ) -> Result<FillStart, ServiceError> {
        let mut confirmed = false;
        for _ in 0..MAX_REJOINS {
            let init = || Fill::for_origin(origin.to_string());
            let mut rx = match self.mirror.blob_flights.join(*d, init) {
                Join::Leader(lead) => {
                    let rx = lead.subscribe();
                    let this = self.clone();
                    let (up, repo, d) = (up.clone(), repo.to_string(), *d);
                    // Detached: a client that disconnects must not abort the fill that
                    // other waiters and the cache depend on.
                    actix_web::rt::spawn(async move {
                        this.run_fill(lead, &up, &repo, &d, forward).await
                    });
                    rx
                }
                Join::Follower(rx) => {
                    self.metrics().coalesced.with_label_values(&["blob"]).inc();
                    // A fill started for another repository: this one must hold the blob
                    // too (no cross-repository leaks), which the upstream confirms with a
                    // HEAD.
                    if rx.borrow().origin != origin && !confirmed {
                        self.confirm_upstream(up, repo, d).await?;
                        confirmed = true;
                    }
                    rx
                }
            };
            match wait_started(&mut rx).await {
                Ok((file, size)) => return Ok((rx, file, size)),
                Err(e) if rx.borrow().origin != origin && belongs_to_repo(&e) => {
                    // Wait for that flight to end (its entry is gone once the sender is
                    // dropped), then try again: this request may lead the next one.
                    while rx.changed().await.is_ok() {}
                }
                Err(e) => return Err(e),
            }
        }
        Err(ServiceError::Unavailable(format!(
            "blob {d}: fills through other repositories kept failing"
        )))
    }

    async fn run_fill(
        self,
        lead: Lead<Digest, Fill>,
        up: &Upstream,
        repo: &str,
        d: &Digest,
        forward: bool,
    ) {
        let gauge = &self.metrics().fills_in_flight;
        gauge.inc();
        if let Err(e) = self.fill(&lead, up, repo, d, forward).await {
            tracing::warn!(upstream = %up.name, repo, digest = %d, error = %e, "blob fill failed");
            lead.tx.send_modify(|f| f.fail(Arc::new(e)));
        }
        gauge.dec();
    }

    async fn fill(
        &self,
        lead: &Lead<Digest, Fill>,
        up: &Upstream,
        repo: &str,
        d: &Digest,
        forward: bool,
    ) -> Result<(), ServiceError> {
        // A fill that committed between our store lookup and our join: serve its result.
        if let (Some(size), Some(file)) = (self.store().local_size(d)?, self.store().open_blob(d)?)
        {
            lead.tx.send_modify(|f| {
                *f = Fill::committed_as(std::mem::take(&mut f.origin), Arc::new(file), size);
            });
            return Ok(());
        }
        // Another replica may have filled the bucket since this request looked.
        if self.store().stat(d).await?.is_some() {
            return fill::copy_from_bucket(self, lead, d).await;
        }
        if let Some(ranked) = peers::owners(self, up, d).filter(|_| forward) {
            return peers::fill_via_peers(self, lead, up, repo, d, ranked).await;
        }
        let what = format!("blobs/{d}");
        let req = blob_request(Method::GET, repo, &what, None);
        let resp = self
            .upstream_ok(up, "blob", req, || ServiceError::BlobUnknown(d.to_string()))
            .await?;
        let size = content_length(resp.headers());
        let body = resp.map(|c| c.map_err(|e| e.to_string()));
        let Some(w) = fill::write_fill(self, lead, d, body, size, Some(up)).await? else {
            return Ok(());
        };
        fill::finish_fill(self, lead, up, repo, d, w, size, true).await?;
        // Ranges served ahead of this fill are compared with the verified bytes now.
        ahead::check(self, d).await;
        Ok(())
    }
}

/// A blob through the cache (stored, or filled once from the upstream), before any
/// policy: what a client's pull (`pull.rs`) and a policy reading a signature's payload
/// start from.
pub(super) async fn ungated(
    svc: &Services,
    up: &Arc<Upstream>,
    repo: &str,
    d: &Digest,
    range: Option<ByteRange>,
    method: &Method,
    caller: &Caller,
) -> Result<BlobReply, ServiceError> {
    svc.blob_from(up, repo, d, range, method, caller, true)
        .await
}
