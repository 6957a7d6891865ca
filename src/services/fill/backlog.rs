//! Memory the fills in progress may borrow to keep reading their sources while the disk
//! stalls.
//!
//! Each fill may receive `MAX_PENDING` (pump.rs) bytes ahead of its write lane
//! on its own. A busy disk (another process's page cache being written back, the host
//! flushing) stalls single direct writes for 100-450 ms; at 16 MiB ahead a cold 256 MiB
//! pull then stopped reading its upstream for that long, once or twice per pull
//! (`waited_for_disk_ms` in the fill's log line, `benches/cold.rs` back to back). Beyond
//! its own share a fill borrows from one pool for the whole mirror, so eight fills at once
//! cannot hold eight times the pool, and hands the loan back as its disk catches up.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes all fills together may hold beyond their own share.
pub const POOL: u64 = 80 * 1024 * 1024;

/// Loans are taken in steps of this much, not per chunk.
const STEP: u64 = 4 * 1024 * 1024;

/// The mirror's pool of backlog memory.
pub struct Backlog {
    free: AtomicU64,
    /// Bytes lent out, for operators (`entrepot_fill_backlog_bytes`).
    lent: Option<prometheus::IntGauge>,
}

impl Default for Backlog {
    fn default() -> Backlog {
        Backlog {
            free: AtomicU64::new(POOL),
            lent: None,
        }
    }
}

impl Backlog {
    /// A pool whose loans are shown on `lent`.
    pub fn shown_on(lent: prometheus::IntGauge) -> Backlog {
        Backlog {
            lent: Some(lent),
            ..Backlog::default()
        }
    }

    /// Bytes not lent out now.
    #[cfg(test)]
    fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes if the pool has them.
    fn take(&self, n: u64) -> bool {
        let taken = self
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| f.checked_sub(n))
            .is_ok();
        if taken {
            self.show(n as i64);
        }
        taken
    }

    fn give(&self, n: u64) {
        self.free.fetch_add(n, Ordering::AcqRel);
        self.show(-(n as i64));
    }

    fn show(&self, delta: i64) {
        if let Some(g) = &self.lent {
            g.add(delta);
        }
    }
}

/// One fill's loan from the [`Backlog`], given back when dropped.
pub struct Loan<'a> {
    pool: &'a Backlog,
    held: u64,
}

impl<'a> Loan<'a> {
    pub fn new(pool: &'a Backlog) -> Loan<'a> {
        Loan { pool, held: 0 }
    }

    /// Whether the fill may hold `extra` bytes beyond its own share: the loan grows (in
    /// [`STEP`]s) to cover them if the pool allows, and shrinks when the fill needs less.
    pub fn covers(&mut self, extra: u64) -> bool {
        let want = extra.div_ceil(STEP) * STEP;
        if want < self.held {
            self.pool.give(self.held - want);
            self.held = want;
        } else if want > self.held {
            if !self.pool.take(want - self.held) {
                return false;
            }
            self.held = want;
        }
        true
    }
}

impl Drop for Loan<'_> {
    fn drop(&mut self) {
        self.pool.give(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lends_within_the_pool_and_takes_it_back() {
        let pool = Backlog::default();
        let mut a = Loan::new(&pool);
        let mut b = Loan::new(&pool);
        assert!(a.covers(0));
        assert_eq!(pool.free(), POOL);
        assert!(a.covers(1));
        assert_eq!(pool.free(), POOL - STEP, "a whole step at a time");
        assert!(a.covers(POOL - STEP));
        assert!(!b.covers(2 * STEP), "the pool is short");
        assert!(b.covers(0));
        assert!(a.covers(STEP), "a needs less now");
        assert_eq!(pool.free(), POOL - STEP);
        assert!(b.covers(2 * STEP));
        drop(a);
        drop(b);
        assert_eq!(pool.free(), POOL);
    }

    #[test]
    fn the_gauge_shows_what_is_lent() {
        let g = prometheus::IntGauge::new("lent", "lent").expect("gauge");
        let pool = Backlog::shown_on(g.clone());
        let mut a = Loan::new(&pool);
        assert!(a.covers(STEP + 1));
        assert_eq!(g.get(), 2 * STEP as i64);
        assert!(!Loan::new(&pool).covers(POOL), "refused: nothing shown");
        assert_eq!(g.get(), 2 * STEP as i64);
        drop(a);
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn a_short_pool_keeps_what_is_held() {
        let pool = Backlog::default();
        let mut a = Loan::new(&pool);
        let mut b = Loan::new(&pool);
        assert!(a.covers(STEP));
        assert!(b.covers(POOL - STEP));
        assert!(a.covers(STEP), "still within its loan");
        assert!(!a.covers(STEP + 1));
    }
}
