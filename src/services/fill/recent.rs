//! The bytes a fill received last, kept in memory so the requests that keep up with the
//! download are sent them as they arrive: the client of a cold pull goes at the source's
//! speed instead of waiting for each batch to be written, hashed and read back from the
//! file. Readers that fall behind (or join late) read the file instead.
//!
//! The chunks are the ones the source delivered (`Bytes` are shared, not copied), bounded:
//! only chunks already on disk are dropped, the oldest first, once more than [`KEEP`]
//! bytes are held, so a reader can always find a byte in memory or in the file.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bytes already on disk kept for readers a little behind. A client on a busy 2-core
/// machine falls a few MiB behind whenever it misses a core; at 4 MiB (lagging at 2) the
/// fill waited for it 90-185 ms per cold 256 MiB pull, at 16 MiB 15-70 ms (benches/cold.rs
/// BENCH_SOLO=ab). Memory: at most this plus `MAX_PENDING` per fill in progress, plus
/// the loans from the mirror's backlog pool (`backlog::POOL` for all fills together).
const KEEP: usize = 16 * 1024 * 1024;

#[derive(Default)]
pub struct Recent {
    /// (offset in the blob, bytes), contiguous, in order.
    chunks: VecDeque<(u64, Bytes)>,
    /// Bytes received from the fill's sources so far (the end of the last chunk).
    received: u64,
    held: usize,
}

impl Recent {
    /// Takes the next bytes from the source.
    pub fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        let len = b.len();
        self.chunks.push_back((self.received, b));
        self.received += len as u64;
        self.held += len;
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// Drops the oldest chunks that end at or below `written` while more than [`KEEP`]
    /// bytes are held.
    pub fn trim(&mut self, written: u64) {
        while self.held > KEEP {
            match self.chunks.front() {
                Some((at, b)) if at + b.len() as u64 <= written => {
                    self.held -= b.len();
                    self.chunks.pop_front();
                }
                _ => break,
            }
        }
    }

    /// The bytes from `pos` (below `limit`) to the end of the chunk holding `pos`, when
    /// that chunk is still in memory.
    pub fn at(&self, pos: u64, limit: u64) -> Option<Bytes> {
        if pos >= limit || pos >= self.received {
            return None;
        }
        let i = self.chunks.partition_point(|(off, _)| *off <= pos);
        let (off, b) = self.chunks.get(i.checked_sub(1)?)?;
        let from = (pos - off) as usize;
        let to = ((limit - off) as usize).min(b.len());
        (from < to).then(|| b.slice(from..to))
    }
}

/// How far a keep-up reader may lag behind the source before the fill waits for it:
/// well inside what [`Recent`] holds, so it is still sent from memory.
const LAG: u64 = (KEEP / 2) as u64;

/// How long a fill waits, in all, for one lagging reader before leaving it behind (it
/// then reads the file): a client slower than the source must not slow the fill for
/// long. A client that only missed a core for a moment lags over and over during a
/// pull; at 20 ms in all it was left behind early in every busy cold pull, and its reads
/// of the (uncached, directly written) file then took the cores from the fill itself.
const PATIENCE: Duration = Duration::from_millis(250);

/// The readers of a fill and how far each got, so the fill can wait a moment for one
/// that lags. On a busy machine a reader falls behind by a few MiB only because it did
/// not get a core in time; once out of memory it would read the file back, which costs
/// more than the wait (and with direct writes the file is not in the page cache).
#[derive(Default)]
pub struct Readers {
    list: Mutex<Vec<Weak<Reader>>>,
}

/// One reader's progress (dropped with the response).
#[derive(Default)]
pub struct Reader {
    pos: AtomicU64,
    /// Left behind: the fill no longer waits for it.
    behind: AtomicBool,
    /// How long the fill waited for it (only the fill touches this).
    wait: Mutex<Wait>,
}

/// The time a fill has spent waiting for one reader: the episodes that ended, and since
/// when it has been lagging now. Charged by the clock, not per check: a reader often
/// catches up before the next check, and a short sleep on a busy machine takes longer.
#[derive(Default)]
struct Wait {
    total: Duration,
    since: Option<Instant>,
}

impl Reader {
    pub fn at(&self, pos: u64) {
        self.pos.store(pos, Ordering::Relaxed);
    }
}

impl Readers {
    pub fn join(&self, pos: u64) -> Arc<Reader> {
        let r = Arc::new(Reader::default());
        r.at(pos);
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&r));
        r
    }

    /// Whether a reader still kept up with lags more than [`LAG`] behind `received` at
    /// `now`; readers that lagged for [`PATIENCE`] in all are left behind.
    pub fn lagging(&self, received: u64, now: Instant) -> bool {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let mut lagging = false;
        for r in list.iter().filter_map(Weak::upgrade) {
            if r.behind.load(Ordering::Relaxed) {
                continue;
            }
            let mut w = r.wait.lock().unwrap_or_else(|e| e.into_inner());
            if r.pos.load(Ordering::Relaxed) + LAG >= received {
                if let Some(since) = w.since.take() {
                    w.total += now.saturating_duration_since(since);
                }
                continue;
            }
            let since = *w.since.get_or_insert(now);
            if w.total + now.saturating_duration_since(since) >= PATIENCE {
                r.behind.store(true, Ordering::Relaxed);
            } else {
                lagging = true;
            }
        }
        lagging
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(sizes: &[usize]) -> Recent {
        let mut r = Recent::default();
        for (i, n) in sizes.iter().enumerate() {
            r.push(Bytes::from(vec![i as u8; *n]));
        }
        r
    }

    #[test]
    fn finds_the_chunk_holding_a_byte() {
        let r = filled(&[3, 4, 5]);
        assert_eq!(r.received(), 12);
        assert_eq!(r.at(0, 12).as_deref(), Some(&[0u8; 3][..]));
        assert_eq!(r.at(4, 12).as_deref(), Some(&[1u8; 3][..]));
        // Never past the limit (the held-back last byte).
        assert_eq!(r.at(7, 11).as_deref(), Some(&[2u8; 4][..]));
        assert_eq!(r.at(11, 11), None);
        assert_eq!(r.at(12, 13), None);
    }

    #[test]
    fn waits_for_a_lagging_reader_only_so_long() {
        let readers = Readers::default();
        let fast = readers.join(0);
        let slow = readers.join(0);
        let t = Instant::now();
        fast.at(10 * LAG);
        slow.at(10 * LAG - 1);
        assert!(!readers.lagging(10 * LAG, t), "within LAG");
        slow.at(LAG);
        assert!(readers.lagging(10 * LAG, t));
        assert!(readers.lagging(10 * LAG, t + PATIENCE / 2));
        // It caught up: that wait is charged all the same.
        slow.at(10 * LAG);
        assert!(!readers.lagging(10 * LAG, t + PATIENCE * 3 / 4));
        slow.at(LAG);
        let t = t + PATIENCE;
        assert!(readers.lagging(10 * LAG, t));
        assert!(
            !readers.lagging(10 * LAG, t + PATIENCE / 4),
            "patience used up"
        );
        fast.at(20 * LAG);
        slow.at(10 * LAG);
        assert!(!readers.lagging(20 * LAG, t), "left behind for good");
        drop(fast);
        drop(slow);
        assert!(!readers.lagging(u64::MAX, t));
    }

    #[test]
    fn trims_only_what_is_on_disk() {
        let mut r = filled(&[KEEP, KEEP, 10]);
        r.trim(0);
        assert!(r.at(0, u64::MAX).is_some(), "nothing on disk: all kept");
        r.trim(KEEP as u64);
        assert!(
            r.at(0, u64::MAX).is_none(),
            "first chunk on disk and over KEEP"
        );
        assert!(r.at(KEEP as u64, u64::MAX).is_some());
        r.trim(u64::MAX);
        assert!(r.at(2 * KEEP as u64, u64::MAX).is_some(), "KEEP bytes stay");
    }
}
