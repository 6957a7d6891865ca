//! Copying a blob into the local tier while readers stream it: the bytes come from an
//! upstream (then also into the shared bucket, when there is one) or from the bucket
//! (another replica fetched it, or this replica's local copy was trimmed).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::blobs::{BlobReply, ByteRange, Fill};
use super::flight::{Join, Lead};
use super::stream::{Avail, BodyStream};
use super::{ServiceError, Services, Source};
use crate::names::Digest;
use crate::store::{BlobWriter, StoreError};
use crate::upstream::Upstream;

/// A source that sends nothing for this long is abandoned.
pub(super) const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Services {
    /// A stored blob: from the local tier, or (held only by the bucket) copied into it
    /// once, every request streaming the bytes as they arrive.
    pub(super) async fn stored(
        &self,
        d: &Digest,
        size: u64,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<BlobReply, ServiceError> {
        if head || self.store().local_size(d)?.is_some() {
            return self.cached(d, size, range, head);
        }
        let init = Fill::default;
        let mut rx = match self.mirror.blob_flights.join(d.clone(), init) {
            Join::Leader(lead) => {
                let rx = lead.subscribe();
                let (this, d) = (self.clone(), d.clone());
                actix_web::rt::spawn(async move {
                    if let Err(e) = this.copy_from_bucket(&lead, &d).await {
                        tracing::warn!(digest = %d, error = %e, "copy from the bucket failed");
                        lead.tx.send_modify(|f| f.error = Some(Arc::new(e)));
                    }
                });
                rx
            }
            Join::Follower(rx) => rx,
        };
        let (file, _) = super::blobs::wait_started(&mut rx).await?;
        let range = range.map(|r| r.resolve(size)).transpose()?;
        let (start, end) = range.unwrap_or((0, size));
        let body = BodyStream::new(
            file,
            start,
            end,
            Avail::Fill(rx, None),
            self.mirror.metrics.clone(),
            "bucket",
        );
        Ok(BlobReply {
            size: Some(size),
            range,
            body: Some(body),
            source: Source::Cache,
        })
    }

    /// Leads the copy of `d` from the bucket into the local tier. Bytes that do not match
    /// the digest are never kept: the bucket object is deleted (counted), so the next
    /// request fetches the blob again.
    pub(super) async fn copy_from_bucket(
        &self,
        lead: &Lead<Digest, Fill>,
        d: &Digest,
    ) -> Result<(), ServiceError> {
        let Some((size, body)) = self.store().read_shared(d, 0).await? else {
            return Err(ServiceError::BlobUnknown(d.to_string()));
        };
        let body = body.map(|c| c.map_err(|e| e.to_string()));
        let Some(w) = self.write_fill(lead, d, body, Some(size), None).await? else {
            return Ok(());
        };
        if w.digest() != *d || w.written() != size {
            self.metrics().bucket_corrupt.inc();
            self.store().reject_shared(d).await?;
            return Err(ServiceError::Unavailable(format!(
                "the bucket's copy of {d} is corrupt (hashes to {}); deleted, ask again",
                w.digest()
            )));
        }
        lead.tx.send_modify(|f| f.verified = true);
        let (expected, store) = (d.clone(), self.mirror.store.clone());
        super::offload(async move { store.commit(w, &expected, Some(size)) }).await?;
        lead.tx.send_modify(|f| f.committed = true);
        self.mirror.keep_local_tier();
        Ok(())
    }

    /// Writes `body` into a new local file, telling the readers of `lead`
    /// how far they may read. `None` when the local disk is full (readers relay from `up`).
    pub(super) async fn write_fill<S>(
        &self,
        lead: &Lead<Digest, Fill>,
        d: &Digest,
        body: S,
        size: Option<u64>,
        up: Option<&Upstream>,
    ) -> Result<Option<BlobWriter>, ServiceError>
    where
        S: Stream<Item = Result<Bytes, String>> + Unpin,
    {
        let Some(w) = self.begin_fill(lead, d, size, up)? else {
            return Ok(None);
        };
        let source = up.map_or("the bucket".to_string(), |u| format!("upstream {}", u.name));
        match self.pump(lead, d, w, body, &source, size, up).await? {
            Pumped::Done(w) => Ok(Some(w)),
            Pumped::Broke(_, e) => Err(ServiceError::Unavailable(e)),
            Pumped::Full => Ok(None),
        }
    }

    /// Opens the local file of a fill and tells its readers; `None` when the disk is full
    /// (readers relay from `up`).
    pub(super) fn begin_fill(
        &self,
        lead: &Lead<Digest, Fill>,
        d: &Digest,
        size: Option<u64>,
        up: Option<&Upstream>,
    ) -> Result<Option<BlobWriter>, ServiceError> {
        let w = match self.store().begin() {
            Ok(w) => w,
            Err(StoreError::Io(e)) if no_space(&e) && up.is_some() => {
                if let Some(up) = up {
                    self.pass_through(lead, up, d, size, &e);
                }
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        lead.tx.send_modify(|f| {
            f.file = Some(w.reader());
            f.size = size;
            f.started = true;
        });
        Ok(Some(w))
    }

    /// Appends `body` (from `source`) to a fill's file. A source that breaks leaves the
    /// writer intact for another source to go on from where it stopped.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn pump<S>(
        &self,
        lead: &Lead<Digest, Fill>,
        d: &Digest,
        w: BlobWriter,
        mut body: S,
        source: &str,
        size: Option<u64>,
        up: Option<&Upstream>,
    ) -> Result<Pumped, ServiceError>
    where
        S: Stream<Item = Result<Bytes, String>> + Unpin,
    {
        let bytes_metric = up
            .filter(|_| source.starts_with("upstream"))
            .map(|u| self.metrics().upstream_bytes.with_label_values(&[&u.name]));
        // Receiving never waits for the disk: this task keeps draining the source into
        // `pending` (up to MAX_PENDING) while a blocking thread hashes and writes what came
        // before, then takes everything received meanwhile in one go. (Waiting for each
        // write before reading on kept batches at the size of the client's socket buffer,
        // ~64 KiB: thousands of hand-offs per blob, and idle cores.) Each chunk also goes
        // to the readers that keep up as soon as it arrives (`Fill::recent`).
        let mut pending: Vec<Bytes> = Vec::new();
        let mut pending_len = 0usize;
        let mut ended = false;
        let mut broke: Option<String> = None;
        let mut writing: Option<tokio::task::JoinHandle<(BlobWriter, std::io::Result<u64>)>> = None;
        let mut w = Some(w);
        let lost = || ServiceError::Unavailable("fill lost its writer".into());
        loop {
            if writing.is_none() && pending_len > 0 && broke.is_none() {
                let batch = std::mem::take(&mut pending);
                pending_len = 0;
                let mut writer = w.take().ok_or_else(lost)?;
                writing = Some(tokio::task::spawn_blocking(move || {
                    let r = batch
                        .iter()
                        .try_fold(0, |n, c| writer.write(c).map(|_| n + c.len() as u64));
                    (writer, r)
                }));
            }
            let reading = !ended && broke.is_none() && pending_len < MAX_PENDING;
            if writing.is_none() && !reading {
                break;
            }
            tokio::select! {
                biased;
                done = async {
                    match writing.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if writing.is_some() => {
                    writing = None;
                    let (back, result) =
                        done.map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
                    match result {
                        Ok(n) => {
                            if let Some(m) = &bytes_metric {
                                m.inc_by(n);
                            }
                            let total = back.written();
                            lead.tx.send_modify(|f| {
                                f.written = total;
                                f.recent.trim(total);
                            });
                            w = Some(back);
                        }
                        Err(e) if no_space(&e) && up.is_some() => {
                            // Dropping the writer removes the partial file; readers keep
                            // their handle on the bytes already written and relay the rest.
                            drop(back);
                            if let Some(up) = up {
                                self.pass_through(lead, up, d, size, &e);
                            }
                            return Ok(Pumped::Full);
                        }
                        Err(e) => return Err(StoreError::from(e).into()),
                    }
                }
                next = tokio::time::timeout(IDLE_TIMEOUT, body.next()), if reading => {
                    match next {
                        Err(_) => broke = Some(format!("{source}: stalled")),
                        Ok(None) => ended = true,
                        Ok(Some(Err(e))) => broke = Some(format!("{source}: {e}")),
                        Ok(Some(Ok(b))) => {
                            pending_len += b.len();
                            lead.tx.send_modify(|f| f.recent.push(b.clone()));
                            pending.push(b);
                        }
                    }
                }
            }
        }
        let w = w.ok_or_else(lost)?;
        match broke {
            // What arrived before the break is dropped with `pending`: the next source
            // starts at `w.written()`.
            Some(e) => {
                let at = w.written();
                lead.tx.send_modify(|f| f.recent.truncate(at));
                Ok(Pumped::Broke(w, e))
            }
            None => Ok(Pumped::Done(w)),
        }
    }
}

/// Bytes received ahead of the disk at most, per fill (bounded memory per blob).
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// How one source of a fill ended.
pub(super) enum Pumped {
    /// All its bytes are written.
    Done(BlobWriter),
    /// It broke after `writer.written()` bytes; the writer is intact.
    Broke(BlobWriter, String),
    /// The disk is full (readers were told to relay from the upstream).
    Full,
}

/// Copies a fill's verified bytes from its local file into the bucket. It starts once the
/// digest checked out (nothing unverified is ever sent), so the clients of a cold pull
/// and the bucket never compete for the machine; a failed copy leaves the blob local only
/// (logged), and the next replica to miss it fetches it again.
pub(super) async fn copy_to_bucket(
    mut rx: tokio::sync::watch::Receiver<Fill>,
    store: Arc<crate::store::Store>,
    d: Digest,
) {
    let file = loop {
        let (file, verified, failed) = {
            let f = rx.borrow_and_update();
            let failed = f.error.is_some() || f.passthrough;
            (f.file.clone(), f.verified || f.committed, failed)
        };
        if failed {
            return;
        }
        if verified {
            break file;
        }
        if rx.changed().await.is_err() && !rx.borrow().verified && !rx.borrow().committed {
            return;
        }
    };
    let (Some(file), size) = (file, rx.borrow().written) else {
        return;
    };
    if let Err(e) = upload_file(&store, &d, file, size).await {
        tracing::warn!(digest = %d, error = %e, "bucket copy failed; the blob stays local only");
    }
}

/// Uploads `size` bytes of `file` as blob `d`, part by part.
async fn upload_file(
    store: &crate::store::Store,
    d: &Digest,
    file: Arc<std::fs::File>,
    size: u64,
) -> Result<(), ServiceError> {
    let Some(mut upload) = store.upload_shared(d).await? else {
        return Ok(());
    };
    let part = crate::store::bucket::PART as u64;
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(part) as usize;
        let (f, at) = (file.clone(), pos);
        let bytes = tokio::task::spawn_blocking(move || super::stream::read_chunk(&f, at, n))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
            .map_err(StoreError::from)?;
        upload.push(bytes).await?;
        pos += n as u64;
    }
    Ok(upload.complete().await?)
}

/// Whether a write failed because the disk (or quota) is full.
fn no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}
