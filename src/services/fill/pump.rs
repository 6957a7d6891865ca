//! Moving a fill's bytes from its source to its readers, its file and its hash.
//!
//! Three things happen to every chunk, on as many cores as there are: the task reading
//! the source hands it to the readers that keep up at once (`Fill::recent`), and two
//! blocking "lanes", one thread each for the whole fill, take it from a channel (in
//! batches of 256 KiB, one wake-up each): one
//! writes it to the temp file, one hashes it. Hashing and writing cost about the same per
//! byte; done one after the other they were the longest chain of a cold pull, and a lane
//! started per batch by this task waited for it to be scheduled twice per batch. The
//! readers get the blob's last byte once the hash lane has checked the whole blob, even
//! if the write lane is still behind (what it has not written is still in memory).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::backlog::Loan;
use super::state::{no_space, Fill, IDLE_TIMEOUT};
use crate::names::Digest;
use crate::services::flight::Lead;
use crate::services::{ServiceError, Services};
use crate::store::{BlobWriter, StoreError};
use crate::upstream::Upstream;

/// Bytes a fill may receive ahead of either lane on its own (bounded memory per blob);
/// beyond that it borrows from the mirror's [`Backlog`](super::backlog). The write lane
/// waits for the disk on each direct write, and a disk stalls now and then for 100-450 ms:
/// at 4 MiB the source stopped 50-200 ms per cold 256 MiB pull, at 16 MiB 10-80 ms in
/// quiet runs and up to 450 ms back to back (the readers are sent the bytes from memory
/// meanwhile).
const MAX_PENDING: u64 = 16 * 1024 * 1024;

/// Bytes handed to the lanes at a time.
const LANE_BATCH: usize = 256 * 1024;

/// How often a fill waiting for a lagging reader looks again.
const PACE_STEP: std::time::Duration = std::time::Duration::from_millis(1);

/// How one source of a fill ended.
pub(in crate::services) enum Pumped {
    /// All its bytes are written and hashed.
    Done(BlobWriter),
    /// It broke after `writer.written()` bytes (all of them written and hashed); the
    /// writer is intact for the next source to go on from there.
    Broke(BlobWriter, String),
    /// The disk is full (readers were told to relay from the upstream).
    Full,
}

/// One blocking thread working through the chunks sent to it, telling the pump after
/// each run of them; it hands its state back when the channel closes.
struct Lane<T> {
    tx: Option<mpsc::Sender<Vec<Bytes>>>,
    /// Bytes the lane is done with.
    done: Arc<AtomicU64>,
    task: JoinHandle<T>,
    result: Option<T>,
}

impl<T: Send + 'static> Lane<T> {
    /// Starts a lane that applies `step` to each chunk (a failed step ends the lane).
    fn start<S: Send + 'static>(
        mut state: S,
        progress: Arc<Notify>,
        mut step: impl FnMut(&mut S, &[u8]) -> std::io::Result<()> + Send + 'static,
        finish: impl FnOnce(S, std::io::Result<()>) -> T + Send + 'static,
    ) -> Lane<T> {
        let (tx, rx) = mpsc::channel::<Vec<Bytes>>();
        let done = Arc::new(AtomicU64::new(0));
        let counter = done.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut r = Ok(());
            'run: while let Ok(first) = rx.recv() {
                let mut n = 0;
                for c in std::iter::once(first).chain(rx.try_iter()).flatten() {
                    if let Err(e) = step(&mut state, &c) {
                        r = Err(e);
                        break 'run;
                    }
                    n += c.len() as u64;
                }
                counter.fetch_add(n, Ordering::Release);
                progress.notify_one();
            }
            progress.notify_one();
            finish(state, r)
        });
        Lane {
            tx: Some(tx),
            done,
            task,
            result: None,
        }
    }

    fn send(&self, b: Vec<Bytes>) {
        if let Some(tx) = &self.tx {
            // A closed channel means the lane failed; its result says why.
            let _ = tx.send(b);
        }
    }

    /// No more chunks: the lane ends once it is through the queued ones.
    fn close(&mut self) {
        self.tx = None;
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Waits for the lane's end (never ready once it ended).
    async fn ended(&mut self) -> Result<(), ServiceError> {
        if self.result.is_some() {
            return std::future::pending().await;
        }
        let r = (&mut self.task)
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
        self.result = Some(r);
        Ok(())
    }
}

/// What a fill that stopped reading its source waits for.
#[derive(Clone, Copy)]
enum Wait {
    /// The write lane (the disk) is [`MAX_PENDING`] behind.
    Disk,
    /// The hash lane (a core) is [`MAX_PENDING`] behind.
    Hash,
    /// A client fell behind (see `recent::Readers::lagging`).
    Clients,
}

/// Where a fill's time went besides reading its source: waiting for the disk, for a core
/// to hash on, or for a client that fell behind. Logged once per fill, so an operator
/// sees what holds the cold pulls back.
struct Stalls {
    start: std::time::Instant,
    /// Since when, and for what, the fill is stalled.
    current: Option<(std::time::Instant, Wait)>,
    /// Time spent per [`Wait`], in its order.
    spent: [std::time::Duration; 3],
}

impl Stalls {
    fn new() -> Stalls {
        Stalls {
            start: std::time::Instant::now(),
            current: None,
            spent: Default::default(),
        }
    }

    /// The pump looks again at `now`, waiting for `wait` (or for nothing).
    fn enter(&mut self, now: std::time::Instant, wait: Option<Wait>) {
        if let Some((since, on)) = self.current.take() {
            self.spent[on as usize] += now.saturating_duration_since(since);
        }
        self.current = wait.map(|w| (now, w));
    }

    fn log(&self, d: &Digest, source: &str, bytes: u64) {
        let ms = |t: std::time::Duration| t.as_millis() as u64;
        tracing::info!(
            digest = %d,
            source,
            bytes,
            ms = ms(self.start.elapsed()),
            waited_for_disk_ms = ms(self.spent[Wait::Disk as usize]),
            waited_for_hash_ms = ms(self.spent[Wait::Hash as usize]),
            waited_for_clients_ms = ms(self.spent[Wait::Clients as usize]),
            "fill pumped"
        );
    }
}

/// Tells a fill's readers how far they may read the file, and drops from memory what they
/// no longer need there.
fn show_in_file(lead: &Lead<Digest, Fill>, in_file: u64) {
    lead.tx.send_modify(|f| {
        f.written = in_file;
        f.recent.trim(in_file);
    });
}

/// Gives up caching this blob: the store is full. Clients still get their bytes.
pub(in crate::services) fn pass_through(
    svc: &Services,
    lead: &Lead<Digest, Fill>,
    up: &Upstream,
    d: &Digest,
    size: Option<u64>,
    e: &std::io::Error,
) {
    svc.metrics()
        .store_errors
        .with_label_values(&["no_space"])
        .inc();
    tracing::warn!(upstream = %up.name, digest = %d, error = %e, "store is full: passing the blob through uncached");
    lead.tx.send_modify(|f| {
        f.size = size;
        f.pass_through();
    });
}

/// Appends `body` (from `source`) to a fill's file. A source that breaks leaves the
/// writer intact (everything received before the break kept) for another source to
/// go on from where it stopped.
#[allow(clippy::too_many_arguments)]
pub(in crate::services) async fn pump<S>(
    svc: &Services,
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
        .map(|u| svc.metrics().upstream_bytes.with_label_values(&[&u.name]));
    let start = w.written();
    let hasher = w.take_hasher();
    let progress = Arc::new(Notify::new());
    let in_file = Arc::new(AtomicU64::new(w.in_file()));
    let shown = in_file.clone();
    let mut writes = Lane::start(
        w,
        progress.clone(),
        move |w: &mut BlobWriter, c| {
            w.write_unhashed(c)?;
            shown.store(w.in_file(), Ordering::Release);
            Ok(())
        },
        |w, r| (w, r),
    );
    let mut hashes = Lane::start(
        hasher,
        progress.clone(),
        |h: &mut Sha256, c| {
            sha2::Digest::update(h, c);
            Ok(())
        },
        |h, _| h,
    );
    let mut received = start;
    let (mut ended, mut broke) = (false, None::<String>);
    let readers = lead.tx.borrow().readers.clone();
    // Chunks go to the lanes in batches: one wake-up of each lane thread per batch,
    // not per network read (~23 KiB).
    let (mut batch, mut batched) = (Vec::new(), 0usize);
    let mut stalls = Stalls::new();
    let mut loan = Loan::new(&svc.mirror.backlog);
    loop {
        if let Some((w, Err(e))) = writes.result.take_if(|(_, r)| r.is_err()) {
            if no_space(&e) && up.is_some() {
                // Dropping the writer removes the partial file; readers keep their
                // handle on the bytes already written and relay the rest.
                drop(w);
                if let Some(up) = up {
                    pass_through(svc, lead, up, d, size, &e);
                }
                return Ok(Pumped::Full);
            }
            return Err(StoreError::from(e).into());
        }
        if writes.result.is_some() && hashes.result.is_some() {
            break;
        }
        let source_done = ended || broke.is_some();
        let (wrote, hashed) = (writes.done(), hashes.done());
        let lag = (received - start).saturating_sub(wrote.min(hashed));
        let room = loan.covers((lag + 1).saturating_sub(MAX_PENDING));
        let now = std::time::Instant::now();
        let lagging = room && !source_done && readers.lagging(received, now);
        let reading = !source_done && room && !lagging;
        let wait = match () {
            _ if source_done => None,
            _ if !room && wrote <= hashed => Some(Wait::Disk),
            _ if !room => Some(Wait::Hash),
            _ if lagging => Some(Wait::Clients),
            _ => None,
        };
        stalls.enter(now, wait);
        tokio::select! {
            biased;
            _ = progress.notified() => show_in_file(lead, in_file.load(Ordering::Acquire)),
            r = hashes.ended() => {
                r?;
                let ok = broke.is_none() && size.is_none_or(|s| s == received);
                if let Some(h) = hashes.result.as_ref().filter(|_| ok) {
                    // Release the readers' last byte as soon as the blob checks out.
                    if Digest::from_hasher(h.clone()) == *d {
                        lead.tx.send_modify(Fill::verify);
                    }
                }
            }
            r = writes.ended() => r?,
            _ = tokio::time::sleep(PACE_STEP), if lagging => {}
            next = tokio::time::timeout(IDLE_TIMEOUT, body.next()), if reading => {
                match next {
                    Err(_) => broke = Some(format!("{source}: stalled")),
                    Ok(None) => ended = true,
                    Ok(Some(Err(e))) => broke = Some(format!("{source}: {e}")),
                    Ok(Some(Ok(b))) => {
                        received += b.len() as u64;
                        if let Some(m) = &bytes_metric {
                            m.inc_by(b.len() as u64);
                        }
                        lead.tx.send_modify(|f| f.recent.push(b.clone()));
                        batched += b.len();
                        batch.push(b);
                    }
                }
                let last = ended || broke.is_some();
                if (batched >= LANE_BATCH || last) && !batch.is_empty() {
                    hashes.send(batch.clone());
                    writes.send(std::mem::take(&mut batch));
                    batched = 0;
                }
                if last {
                    writes.close();
                    hashes.close();
                }
            }
        }
    }
    let lost = || ServiceError::Unavailable("fill lost its writer".into());
    let (mut w, _) = writes.result.take().ok_or_else(lost)?;
    w.put_hasher(hashes.result.take().ok_or_else(lost)?);
    show_in_file(lead, w.in_file());
    stalls.log(d, source, received - start);
    svc.mirror.filled(received - start);
    Ok(match broke {
        Some(e) => Pumped::Broke(w, e),
        None => Pumped::Done(w),
    })
}
