//! Moving a fill's bytes from its source to its readers, its file and its hash.
//!
//! Three things happen to every chunk, on as many cores as there are: the task reading
//! the source hands it to the readers that keep up at once (`Fill::recent`), and two
//! blocking "lanes" take what arrived meanwhile in one batch each: one writes it to the
//! temp file, one hashes it. Hashing and writing cost about the same per byte; done one
//! after the other they were the longest chain of a cold pull. The readers get the
//! blob's last byte once the hash lane has checked the whole blob, even if the write
//! lane is still behind (what it has not written is still in memory).

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::Sha256;
use tokio::task::JoinHandle;

use super::blobs::Fill;
use super::fill::IDLE_TIMEOUT;
use super::flight::Lead;
use super::{ServiceError, Services};
use crate::names::Digest;
use crate::store::{BlobWriter, StoreError};
use crate::upstream::Upstream;

/// Bytes received ahead of either lane at most, per fill (bounded memory per blob).
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// How one source of a fill ended.
pub(super) enum Pumped {
    /// All its bytes are written and hashed.
    Done(BlobWriter),
    /// It broke after `writer.written()` bytes (all of them written and hashed); the
    /// writer is intact for the next source to go on from there.
    Broke(BlobWriter, String),
    /// The disk is full (readers were told to relay from the upstream).
    Full,
}

/// How often a fill waiting for a lagging reader looks again.
const PACE_STEP: std::time::Duration = std::time::Duration::from_millis(1);

/// Bytes a lane waits for before it starts a batch (unless the source is done): each
/// batch costs a hand-off to a blocking thread, and chunks from the network are small
/// (tens of KiB).
const MIN_BATCH: usize = 512 * 1024;

/// Work on one blocking thread at a time, fed in batches: what arrives while a batch
/// runs waits in `queue`, and goes next in one go.
struct Lane<T> {
    queue: Vec<Bytes>,
    queued: usize,
    busy: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Lane<T> {
    fn new() -> Self {
        Lane {
            queue: Vec::new(),
            queued: 0,
            busy: None,
        }
    }

    fn push(&mut self, b: Bytes) {
        self.queued += b.len();
        self.queue.push(b);
    }

    fn idle(&self) -> bool {
        self.busy.is_none() && self.queue.is_empty()
    }

    /// Starts `work` on the queued batch when nothing runs; `state` is what the work
    /// needs and hands back (the writer, the hasher).
    fn start<S: Send + 'static>(
        &mut self,
        state: &mut Option<S>,
        last: bool,
        work: impl FnOnce(S, Vec<Bytes>) -> T + Send + 'static,
    ) {
        if self.busy.is_some() || self.queue.is_empty() || (self.queued < MIN_BATCH && !last) {
            return;
        }
        let Some(s) = state.take() else { return };
        let batch = std::mem::take(&mut self.queue);
        self.queued = 0;
        self.busy = Some(tokio::task::spawn_blocking(move || work(s, batch)));
    }

    /// Waits for the running batch (never ready when none runs).
    async fn done(&mut self) -> Result<T, ServiceError> {
        let r = match self.busy.as_mut() {
            Some(h) => h.await,
            None => std::future::pending().await,
        };
        self.busy = None;
        r.map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())).into())
    }
}

type Written = (BlobWriter, std::io::Result<u64>);

impl Services {
    /// Appends `body` (from `source`) to a fill's file. A source that breaks leaves the
    /// writer intact (everything received before the break kept) for another source to
    /// go on from where it stopped.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn pump<S>(
        &self,
        lead: &Lead<Digest, Fill>,
        d: &Digest,
        mut w: BlobWriter,
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
        let mut hashed = w.written();
        let mut hasher = Some(w.take_hasher());
        let mut writer = Some(w);
        let (mut writes, mut hashes) = (Lane::<Written>::new(), Lane::<Sha256>::new());
        let (mut ended, mut broke, mut checked) = (false, None::<String>, false);
        let readers = lead.tx.borrow().readers.clone();
        let mut paced = false;
        let lost = || ServiceError::Unavailable("fill lost its writer".into());
        loop {
            let source_done = ended || broke.is_some();
            writes.start(&mut writer, source_done, |mut w, batch| {
                let r = batch
                    .iter()
                    .try_fold(0, |n, c| w.write_unhashed(c).map(|_| n + c.len() as u64));
                (w, r)
            });
            hashes.start(&mut hasher, source_done, |mut h, batch| {
                batch.iter().for_each(|c| sha2::Digest::update(&mut h, c));
                h
            });
            if source_done && hashes.idle() && !checked {
                checked = true;
                let h = hasher.as_ref().ok_or_else(lost)?;
                if broke.is_none() && size.is_none_or(|s| s == hashed) {
                    // Release the readers' last byte as soon as the blob checks out.
                    if Digest::from_hasher(h.clone()) == *d {
                        lead.tx.send_modify(|f| f.verified = true);
                    }
                }
            }
            if source_done && writes.idle() && hashes.idle() {
                break;
            }
            let room = writes.queued.max(hashes.queued) < MAX_PENDING;
            paced = room && !source_done && readers.lagging(hashed, PACE_STEP * paced as u32);
            let reading = !source_done && room && !paced;
            tokio::select! {
                biased;
                h = hashes.done() => hasher = Some(h?),
                r = writes.done() => {
                    let (back, result) = r?;
                    match result {
                        Ok(n) => {
                            if let Some(m) = &bytes_metric {
                                m.inc_by(n);
                            }
                            let in_file = back.in_file();
                            lead.tx.send_modify(|f| {
                                f.written = in_file;
                                f.recent.trim(in_file);
                            });
                            writer = Some(back);
                        }
                        Err(e) if super::fill::no_space(&e) && up.is_some() => {
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
                _ = tokio::time::sleep(PACE_STEP), if paced => {}
                next = tokio::time::timeout(IDLE_TIMEOUT, body.next()), if reading => {
                    match next {
                        Err(_) => broke = Some(format!("{source}: stalled")),
                        Ok(None) => ended = true,
                        Ok(Some(Err(e))) => broke = Some(format!("{source}: {e}")),
                        Ok(Some(Ok(b))) => {
                            hashed += b.len() as u64;
                            lead.tx.send_modify(|f| f.recent.push(b.clone()));
                            hashes.push(b.clone());
                            writes.push(b);
                        }
                    }
                }
            }
        }
        let mut w = writer.ok_or_else(lost)?;
        w.put_hasher(hasher.ok_or_else(lost)?);
        Ok(match broke {
            Some(e) => Pumped::Broke(w, e),
            None => Pumped::Done(w),
        })
    }
}
