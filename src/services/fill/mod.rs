//! The blob fill: one download per missing digest, written to the local tier and hashed
//! while every request for that digest streams it. What only the fill uses lives here:
//! its state and the waits on it ([`state`]: one type, its transitions in one place), the
//! two lanes that hash and write ([`pump`]), the readers ([`stream`]) and the recent-bytes
//! window they read from ([`recent`]), the memory borrowed while the disk stalls
//! ([`backlog`]) and handed back once fills are idle ([`memory`]).
//!
//! This file serves stored bytes (local, or copied from the bucket as readers stream) and
//! opens a fill's file; the request-level decisions (cached? linked? lead or join?) stay
//! in `services/blobs.rs`.

pub mod backlog;
pub mod memory;
mod pump;
mod recent;
mod state;
pub(in crate::services) mod stream;
#[cfg(test)]
mod tests;

pub(in crate::services) use pump::{pump, Pumped};
pub(in crate::services) use state::{wait_started, Fill};
pub use stream::BodyStream;
pub(in crate::services) use stream::{Avail, OpenRelay, Relay};

use std::sync::Arc;

use actix_web::http::Method;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::blob_reply::{BlobReply, ByteRange};
use super::flight::{Join, Lead};
use super::{content_length, repo_digest_key, ServiceError, Services, Source};
use crate::names::Digest;
use crate::store::{BlobWriter, StoreError};
use crate::upstream::{UpRequest, Upstream};
use state::no_space;
use stream::Reading;

impl Services {
    /// Verifies and stores a finished download; a mismatch is counted and logged with the
    /// upstream that sent it.
    async fn commit(
        &self,
        w: BlobWriter,
        size: Option<u64>,
        up: &Upstream,
        repo: &str,
        d: &Digest,
    ) -> Result<(), ServiceError> {
        let (expected, store) = (*d, self.mirror.store.clone());
        let committed = super::offload(async move { store.commit(w, &expected, size) }).await;
        match committed.map_err(ServiceError::from) {
            Ok(_) => {
                self.metrics().store_bytes.set(self.store().size() as i64);
                self.mirror.keep_local_tier();
                Ok(())
            }
            Err(ServiceError::Store(StoreError::DigestMismatch { expected, actual })) => {
                self.metrics()
                    .digest_mismatches
                    .with_label_values(&[&up.name])
                    .inc();
                tracing::error!(upstream = %up.name, repo, %expected, %actual, "upstream sent a corrupt blob; not stored");
                self.mirror.corrupt.remember(repo_digest_key(up, repo, d));
                Err(ServiceError::DigestMismatch {
                    upstream: up.name.clone(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                })
            }
            Err(ServiceError::Store(StoreError::SizeMismatch { expected, actual })) => {
                Err(ServiceError::BadUpstream {
                    upstream: up.name.clone(),
                    msg: format!("blob {d}: announced {expected} bytes, sent {actual}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// A committed blob from the local tier (`range` resolved against its size).
    pub(in crate::services) fn cached(
        &self,
        d: &Digest,
        size: u64,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<BlobReply, ServiceError> {
        let range = range.map(|r| r.resolve(size)).transpose()?;
        let body = if head {
            None
        } else {
            let file = self
                .store()
                .open_blob(d)?
                .ok_or_else(|| ServiceError::BlobUnknown(d.to_string()))?;
            let (start, end) = range.unwrap_or((0, size));
            Some(BodyStream::new(
                Some(Arc::new(file)),
                start,
                end,
                Avail::Complete(Reading::new(self.mirror.readers.clone(), *d)),
                self.mirror.metrics.clone(),
                "cache",
            ))
        };
        Ok(BlobReply {
            size: Some(size),
            range,
            body,
            source: Source::Cache,
            served: None,
        })
    }
}

/// Copies a fill's verified bytes from its local file into the bucket. It starts once the
/// blob is committed (nothing unverified is ever sent, and the file is whole), so the
/// clients of a cold pull and the bucket never compete for the machine; a failed copy
/// leaves the blob local only (logged), and the next replica to miss it fetches it again.
pub(in crate::services) async fn copy_to_bucket(
    mut rx: tokio::sync::watch::Receiver<Fill>,
    store: Arc<crate::store::Store>,
    d: Digest,
) {
    let (file, size) = loop {
        let (file, size, committed, failed) = {
            let f = rx.borrow_and_update();
            let failed = f.error().is_some() || f.passthrough();
            (f.file.clone(), f.written, f.committed(), failed)
        };
        if failed {
            return;
        }
        if committed {
            break (file, size);
        }
        if rx.changed().await.is_err() && !rx.borrow().committed() {
            return;
        }
    };
    let Some(file) = file else {
        return;
    };
    if let Err(e) = store.copy_to_shared(&d, file, size).await {
        tracing::warn!(digest = %d, error = %e, "bucket copy failed; the blob stays local only");
    }
}

/// An upstream request for `blobs/<digest>` (`what`).
pub(in crate::services) fn blob_request<'a>(
    method: Method,
    repo: &'a str,
    what: &'a str,
    range_from: Option<u64>,
) -> UpRequest<'a> {
    UpRequest {
        method,
        repo,
        what,
        accept: None,
        range_from,
        range_to: None,
        primary_only: false,
    }
}

/// Verifies, stores and links a fill's bytes; with `to_bucket`, this replica fetched
/// them from the upstream and also copies them to the bucket (from the local file,
/// once verified: clients and the local tier go at the upstream's speed).
#[allow(clippy::too_many_arguments)]
pub(in crate::services) async fn finish_fill(
    svc: &Services,
    lead: &Lead<Digest, Fill>,
    up: &Upstream,
    repo: &str,
    d: &Digest,
    w: BlobWriter,
    size: Option<u64>,
    to_bucket: bool,
) -> Result<(), ServiceError> {
    let verified = w.digest() == *d && size.is_none_or(|s| s == w.written());
    if verified {
        // Clients need not wait for the fsync: release them once the bytes check out.
        lead.tx.send_modify(Fill::verify);
    }
    if to_bucket {
        let (rx, store, d) = (lead.subscribe(), svc.mirror.store.clone(), *d);
        actix_web::rt::spawn(super::fill::copy_to_bucket(rx, store, d));
    }
    let total = w.written();
    svc.commit(w, size, up, repo, d).await?;
    svc.store().link_blob(&up.name, repo, d).await?;
    svc.mirror.list_repo(&up.name, repo).await?;
    lead.tx.send_modify(|f| f.commit(total));
    Ok(())
}

/// Upstream bytes of `d` from offset `pos` on (a `Range` request; a server that
/// ignores it has the skipped bytes dropped here), with the blob's full size when the
/// upstream sent it whole (a `206` does not say it in `Content-Length`).
pub(in crate::services) async fn relay_from(
    svc: &Services,
    up: &Upstream,
    repo: &str,
    d: &Digest,
    pos: u64,
) -> Result<(Option<u64>, super::fill::Relay), ServiceError> {
    let what = format!("blobs/{d}");
    let req = blob_request(Method::GET, repo, &what, Some(pos).filter(|p| *p > 0));
    let resp = svc
        .upstream_ok(up, "blob", req, || ServiceError::BlobUnknown(d.to_string()))
        .await?;
    let status = resp.status();
    let partial = status == actix_web::http::StatusCode::PARTIAL_CONTENT;
    let total = (!partial).then(|| content_length(resp.headers())).flatten();
    let mut skip = if partial { 0 } else { pos };
    let name = up.name.clone();
    let stream = resp.map(move |chunk| {
        let mut chunk =
            chunk.map_err(|e| ServiceError::Unavailable(format!("upstream {name}: {e}")))?;
        let drop = skip.min(chunk.len() as u64) as usize;
        skip -= drop as u64;
        Ok(chunk.split_off(drop))
    });
    Ok((total, stream.boxed_local()))
}

/// A stored blob: from the local tier, or (held only by the bucket) copied into it
/// once, every request streaming the bytes as they arrive.
pub(in crate::services) async fn stored(
    svc: &Services,
    d: &Digest,
    size: u64,
    range: Option<ByteRange>,
    head: bool,
) -> Result<BlobReply, ServiceError> {
    if head || svc.store().local_size(d)?.is_some() {
        return svc.cached(d, size, range, head);
    }
    let init = Fill::default;
    let mut rx = match svc.mirror.blob_flights.join(*d, init) {
        Join::Leader(lead) => {
            let rx = lead.subscribe();
            let (this, d) = (svc.clone(), *d);
            actix_web::rt::spawn(async move {
                if let Err(e) = copy_from_bucket(&this, &lead, &d).await {
                    tracing::warn!(digest = %d, error = %e, "copy from the bucket failed");
                    lead.tx.send_modify(|f| f.fail(Arc::new(e)));
                }
            });
            rx
        }
        Join::Follower(rx) => rx,
    };
    let (file, _) = state::wait_started(&mut rx).await?;
    let range = range.map(|r| r.resolve(size)).transpose()?;
    if range.is_some() {
        // A range may end before the last byte, which alone waits for the digest: the
        // bucket's bytes are served in part only once all of them checked out (an
        // altered object then fails here, and is deleted, instead of being served).
        state::wait_verified(&mut rx).await?;
    }
    let (start, end) = range.unwrap_or((0, size));
    let body = BodyStream::new(
        file,
        start,
        end,
        Avail::Fill(rx, None),
        svc.mirror.metrics.clone(),
        "bucket",
    );
    Ok(BlobReply {
        size: Some(size),
        range,
        body: Some(body),
        source: Source::Cache,
        served: None,
    })
}

/// Leads the copy of `d` from the bucket into the local tier. Bytes that do not match
/// the digest are never kept: the bucket object is deleted (counted), so the next
/// request fetches the blob again.
pub(in crate::services) async fn copy_from_bucket(
    svc: &Services,
    lead: &Lead<Digest, Fill>,
    d: &Digest,
) -> Result<(), ServiceError> {
    let read = svc.store().read_shared_here(svc.client.pool(), d).await?;
    let Some((size, body)) = read else {
        return Err(ServiceError::BlobUnknown(d.to_string()));
    };
    let body = body.map(|c| c.map_err(|e| e.to_string()));
    let Some(w) = write_fill(svc, lead, d, body, Some(size), None).await? else {
        return Ok(());
    };
    if w.digest() != *d || w.written() != size {
        svc.metrics().bucket_corrupt.inc();
        svc.store().reject_shared(d).await?;
        return Err(ServiceError::Unavailable(format!(
            "the bucket's copy of {d} is corrupt (hashes to {}); deleted, ask again",
            w.digest()
        )));
    }
    lead.tx.send_modify(Fill::verify);
    let (expected, store) = (*d, svc.mirror.store.clone());
    super::offload(async move { store.commit(w, &expected, Some(size)) }).await?;
    lead.tx.send_modify(|f| f.commit(size));
    svc.mirror.keep_local_tier();
    Ok(())
}

/// Writes `body` into a new local file, telling the readers of `lead`
/// how far they may read. `None` when the local disk is full (readers relay from `up`).
pub(in crate::services) async fn write_fill<S>(
    svc: &Services,
    lead: &Lead<Digest, Fill>,
    d: &Digest,
    body: S,
    size: Option<u64>,
    up: Option<&Upstream>,
) -> Result<Option<BlobWriter>, ServiceError>
where
    S: Stream<Item = Result<Bytes, String>> + Unpin,
{
    let Some(w) = begin_fill(svc, lead, d, size, up)? else {
        return Ok(None);
    };
    let source = up.map_or("the bucket".to_string(), |u| format!("upstream {}", u.name));
    match pump(svc, lead, d, w, body, &source, size, up).await? {
        Pumped::Done(w) => Ok(Some(w)),
        Pumped::Broke(_, e) => Err(ServiceError::Unavailable(e)),
        Pumped::Full => Ok(None),
    }
}

/// Opens the local file of a fill and tells its readers; `None` when the disk is full
/// (readers relay from `up`).
pub(in crate::services) fn begin_fill(
    svc: &Services,
    lead: &Lead<Digest, Fill>,
    d: &Digest,
    size: Option<u64>,
    up: Option<&Upstream>,
) -> Result<Option<BlobWriter>, ServiceError> {
    let w = match svc.store().begin() {
        Ok(w) => w,
        Err(StoreError::Io(e)) if no_space(&e) && up.is_some() => {
            if let Some(up) = up {
                pump::pass_through(svc, lead, up, d, size, &e);
            }
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    lead.tx.send_modify(|f| {
        f.file = Some(w.reader());
        f.size = size;
        f.start();
    });
    Ok(Some(w))
}
