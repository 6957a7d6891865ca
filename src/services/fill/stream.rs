//! Blob bodies read from a file with positional reads, either a committed blob or the temp
//! file of a fill in progress (then the reader waits for the fill to get ahead of it).
//!
//! Only a bounded chunk is in memory per response, whatever the blob's size. When a fill
//! cannot write (disk full) the readers relay the rest straight from the upstream.

use std::fs::File;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::stream::{LocalBoxStream, Stream, StreamExt};
use tokio::sync::watch;

use dashmap::DashMap;

use super::recent::Reader;
use super::state::Fill;
use crate::metrics::Metrics;
use crate::names::Digest;
use crate::services::ServiceError;
use crate::store::read_chunk;

/// Bytes per step: large enough to keep thread hand-offs rare, small enough that 64
/// streams hold little memory.
const CHUNK: u64 = 512 * 1024;

fn spawn_read(
    file: Arc<File>,
    pos: u64,
    len: usize,
) -> tokio::task::JoinHandle<std::io::Result<Bytes>> {
    tokio::task::spawn_blocking(move || read_chunk(&file, pos, len))
}

/// The body of a blob response.
pub struct BodyStream {
    inner: LocalBoxStream<'static, Result<Bytes, ServiceError>>,
}

/// Bytes from upstream starting at an offset, for when the disk cannot take them.
pub type Relay = LocalBoxStream<'static, Result<Bytes, ServiceError>>;

/// Opens a [`Relay`] from the given offset.
pub type OpenRelay = Box<dyn FnOnce(u64) -> LocalBoxFuture<'static, Result<Relay, ServiceError>>>;

impl BodyStream {
    /// A body already in memory (a range fetched ahead of a fill).
    pub fn from_bytes(bytes: Bytes, metrics: Arc<Metrics>) -> BodyStream {
        let once = futures_util::stream::once(async move { Ok(bytes) }).boxed_local();
        BodyStream::from_stream(once, &metrics)
    }

    /// A body relayed from the upstream as it arrives (a range fetched ahead of a fill,
    /// to its first client), counted as served from the upstream.
    pub fn from_stream(inner: Relay, metrics: &Metrics) -> BodyStream {
        let served = metrics.served_bytes.with_label_values(&["upstream"]);
        BodyStream {
            inner: inner
                .inspect(move |c| {
                    if let Ok(b) = c {
                        served.inc_by(b.len() as u64);
                    }
                })
                .boxed_local(),
        }
    }

    /// Runs `f` when this body is dropped: after its last byte was sent, or when the
    /// client left.
    pub fn on_end(self, f: impl FnOnce() + 'static) -> BodyStream {
        struct Guard<F: FnOnce()>(Option<F>);
        impl<F: FnOnce()> Drop for Guard<F> {
            fn drop(&mut self) {
                if let Some(f) = self.0.take() {
                    f();
                }
            }
        }
        let guard = Guard(Some(f));
        BodyStream {
            inner: self
                .inner
                .map(move |chunk| {
                    let _ = &guard;
                    chunk
                })
                .boxed_local(),
        }
    }
}

impl Stream for BodyStream {
    type Item = Result<Bytes, ServiceError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// Marks a committed object as being read, so eviction leaves it alone until dropped.
pub struct Reading {
    readers: Arc<DashMap<Digest, usize>>,
    digest: Digest,
}

impl Reading {
    pub fn new(readers: Arc<DashMap<Digest, usize>>, digest: Digest) -> Reading {
        *readers.entry(digest).or_insert(0) += 1;
        Reading { readers, digest }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.readers.remove_if_mut(&self.digest, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// How far the file can be read.
pub enum Avail {
    /// A committed blob: everything.
    Complete(Reading),
    /// A fill in progress, and how to go on from upstream if it stops writing.
    Fill(watch::Receiver<Fill>, Option<OpenRelay>),
}

/// What a reader may do next.
enum Next {
    /// Send these bytes, received by the fill and still in memory.
    Received(Bytes),
    /// Read the file up to this offset.
    Upto(u64),
    /// The fill stopped writing at or before `pos`: continue from upstream.
    Relay,
}

/// A chunk being read ahead of the reader: (offset, length, the read task).
type Ahead = (u64, usize, tokio::task::JoinHandle<std::io::Result<Bytes>>);

struct Cursor {
    file: Option<Arc<File>>,
    /// For committed blobs, the next chunk is read while this one goes to the socket.
    ahead: Option<Ahead>,
    relay: Option<Relay>,
    pos: u64,
    end: u64,
    avail: Avail,
    /// This reader's progress, for a fill that waits for readers lagging a little.
    progress: Option<Arc<Reader>>,
    /// `entrepot_served_bytes_total` for this body's source, looked up once (not per chunk).
    served: prometheus::IntCounter,
}

impl BodyStream {
    /// Streams `[start, end)` of `file`.
    pub fn new(
        file: Option<Arc<File>>,
        start: u64,
        end: u64,
        avail: Avail,
        metrics: Arc<Metrics>,
        source: &'static str,
    ) -> BodyStream {
        let progress = match &avail {
            Avail::Fill(rx, _) => Some(rx.borrow().readers.join(start)),
            Avail::Complete(_) => None,
        };
        let cur = Cursor {
            file,
            ahead: None,
            relay: None,
            pos: start,
            end,
            avail,
            progress,
            served: metrics.served_bytes.with_label_values(&[source]),
        };
        let inner = futures_util::stream::unfold(Some(cur), |cur| async move {
            let mut cur = cur?;
            match cur.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), Some(cur))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        });
        BodyStream {
            inner: inner.boxed_local(),
        }
    }
}

impl Cursor {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ServiceError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        if self.relay.is_some() {
            return self.relayed().await;
        }
        let readable = match self.wait_readable().await? {
            Next::Received(b) => {
                self.advance(b.len());
                return Ok(Some(b));
            }
            Next::Upto(n) => n,
            Next::Relay => return self.start_relay().await,
        };
        if readable <= self.pos {
            return Ok(None);
        }
        let len = (readable.min(self.end) - self.pos).min(CHUNK) as usize;
        let file = self
            .file
            .clone()
            .ok_or_else(|| ServiceError::Unavailable("no file to read".into()))?;
        let pos = self.pos;
        let task = match self.ahead.take() {
            Some((p, l, task)) if p == pos && l == len => task,
            _ => spawn_read(file.clone(), pos, len),
        };
        let chunk = task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(crate::store::StoreError::from)?;
        self.advance(len);
        if matches!(self.avail, Avail::Complete(_)) && self.pos < self.end {
            let next = (self.end - self.pos).min(CHUNK) as usize;
            self.ahead = Some((self.pos, next, spawn_read(file, self.pos, next)));
        }
        Ok(Some(chunk))
    }

    /// Moves past `len` bytes sent: counted, and told to a fill that watches its readers.
    fn advance(&mut self, len: usize) {
        self.pos += len as u64;
        if let Some(p) = &self.progress {
            p.at(self.pos);
        }
        self.served.inc_by(len as u64);
    }

    /// Waits until the byte at `pos` may be sent and returns it from memory or the
    /// readable limit of the file (at or below `pos` only at the end of a committed fill).
    /// During a fill the last byte is held back until the digest is verified, so a client
    /// never receives a complete body that turned out to be corrupt.
    async fn wait_readable(&mut self) -> Result<Next, ServiceError> {
        let rx = match &mut self.avail {
            Avail::Complete(_) => return Ok(Next::Upto(self.end)),
            Avail::Fill(rx, _) => rx,
        };
        loop {
            {
                let fill = rx.borrow_and_update();
                if let Some(e) = fill.error() {
                    return Err(ServiceError::Shared(e.clone()));
                }
                let done = fill.verified();
                if fill.passthrough() {
                    return Ok(if fill.written > self.pos {
                        Next::Upto(fill.written)
                    } else {
                        Next::Relay
                    });
                }
                let received = fill.recent.received();
                let limit = if done {
                    // Verified: all received, maybe not all written yet (the rest is
                    // still in memory).
                    fill.written.max(received)
                } else {
                    // The blob's last byte (the last received one when the size is not
                    // known) waits for the digest.
                    fill.size
                        .unwrap_or(received)
                        .saturating_sub(1)
                        .min(received)
                };
                if let Some(b) = fill.recent.at(self.pos, limit.min(self.end)) {
                    return Ok(Next::Received(b));
                }
                if done || limit.min(fill.written) > self.pos {
                    return Ok(Next::Upto(limit.min(fill.written)));
                }
            }
            if rx.changed().await.is_err() {
                return Err(ServiceError::Unavailable(
                    "fill ended without a result".into(),
                ));
            }
        }
    }

    async fn start_relay(&mut self) -> Result<Option<Bytes>, ServiceError> {
        let open = match &mut self.avail {
            Avail::Fill(_, open) => open.take(),
            Avail::Complete(_) => None,
        };
        let open = open.ok_or_else(|| {
            ServiceError::Unavailable("the fill stopped and cannot be relayed".into())
        })?;
        self.relay = Some(open(self.pos).await?);
        self.relayed().await
    }

    async fn relayed(&mut self) -> Result<Option<Bytes>, ServiceError> {
        let Some(relay) = self.relay.as_mut() else {
            return Ok(None);
        };
        let Some(chunk) = relay.next().await.transpose()? else {
            return Ok(None);
        };
        let keep = (self.end - self.pos).min(chunk.len() as u64) as usize;
        self.advance(keep);
        Ok(Some(chunk.slice(..keep)))
    }
}
