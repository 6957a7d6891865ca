//! Handing the memory of finished fills back to the system.
//!
//! A cold fill holds up to `recent::KEEP` + `pump::MAX_PENDING` bytes of the source's
//! chunks, plus what it borrowed from the mirror's `backlog::POOL` while its disk
//! stalled. They are ~32 KiB each, below glibc's mmap threshold, so once freed they stay
//! in its heaps: in `benches/mirror.rs` a process that had filled a few large blobs kept
//! 55-75 MiB resident while it then served 64 warm streams. Once no fill is in progress
//! and at least [`ENOUGH`] bytes were filled since the last release, `malloc_trim`
//! returns the free pages (the next cold fill takes them back; a warm stream never uses
//! them).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::services::Mirror;

/// How often the mirror looks whether it went idle.
const EVERY: Duration = Duration::from_secs(2);

/// Bytes filled since the last release that make the next one worth it.
const ENOUGH: u64 = 16 * 1024 * 1024;

impl Mirror {
    /// Counts bytes a fill received (see [`release_when_idle`]).
    pub(in crate::services) fn filled(&self, bytes: u64) {
        self.filled.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Runs for the life of the server (spawn it on the actix system).
pub async fn release_when_idle(mirror: Arc<Mirror>) {
    let mut released = 0u64;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let filled = mirror.filled.load(Ordering::Relaxed);
        if filled - released < ENOUGH || mirror.blob_flights.in_flight() > 0 {
            continue;
        }
        released = filled;
        // A trim of a large heap takes a few ms: not on a worker.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only gives free pages of the allocator's heaps back to the
    // kernel; it takes the allocator's own locks and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}
