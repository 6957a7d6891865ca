//! The state of one blob fill, watched by every request that streams it: where the fill
//! stands ([`Phase`], one type with its transitions written here and nowhere else) and
//! what readers need to follow it (the file, what is written, the recent bytes).

use std::fs::File;
use std::sync::Arc;

use tokio::sync::watch;

use super::recent::{Readers, Recent};
use crate::services::ServiceError;

/// Where a fill stands. Moves forward only: `Waiting -> Receiving -> Verified ->
/// Committed`, or to `Passthrough` (the store refused the bytes) before verification; any
/// phase may end in `Failed`, which readers see before anything else.
#[derive(Debug, Clone, Default)]
pub enum Phase {
    /// The source's headers have not arrived.
    #[default]
    Waiting,
    /// The source answered with a success status; bytes arrive.
    Receiving,
    /// All bytes arrived and match the digest: readers may send the last byte (the fsync
    /// and rename into the store follow).
    Verified,
    /// Verified and moved into the store.
    Committed,
    /// The store could not take the bytes (disk full): `written` bytes are readable from
    /// the file (if any) and readers relay the rest from the upstream themselves.
    Passthrough,
    /// The fill failed: every reader ends with this error.
    Failed(Arc<ServiceError>),
}

/// Progress of one blob download, watched by every request streaming it.
#[derive(Default)]
pub struct Fill {
    /// `<upstream>/<repo>` the fill was started for.
    pub origin: String,
    pub file: Option<Arc<File>>,
    /// Content-Length announced by the upstream.
    pub size: Option<u64>,
    /// Bytes in `file`, which readers may read (the rest, up to what was received, is
    /// still in `recent`).
    pub written: u64,
    /// The bytes received last, for the readers that keep up (see [`Recent`]).
    pub recent: Recent,
    /// Where the readers are, so the fill waits a moment for one that lags.
    pub readers: Arc<Readers>,
    phase: Phase,
}

impl Fill {
    /// A fill about to start for `<upstream>/<repo>`.
    pub fn for_origin(origin: String) -> Fill {
        Fill {
            origin,
            ..Fill::default()
        }
    }

    /// A fill that found the blob already committed: `size` bytes readable in `file`.
    pub fn committed_as(origin: String, file: Arc<File>, size: u64) -> Fill {
        Fill {
            origin,
            file: Some(file),
            size: Some(size),
            written: size,
            phase: Phase::Committed,
            ..Fill::default()
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The source answered with a success status.
    pub fn start(&mut self) {
        if matches!(self.phase, Phase::Waiting) {
            self.phase = Phase::Receiving;
        }
    }

    /// All bytes arrived and match the digest.
    pub fn verify(&mut self) {
        if matches!(self.phase, Phase::Waiting | Phase::Receiving) {
            self.phase = Phase::Verified;
        }
    }

    /// The verified bytes are in the store, `written` of them.
    pub fn commit(&mut self, written: u64) {
        if !matches!(self.phase, Phase::Failed(_)) {
            self.written = written;
            self.phase = Phase::Committed;
        }
    }

    /// The store refused the bytes: readers relay from the upstream.
    pub fn pass_through(&mut self) {
        if matches!(self.phase, Phase::Waiting | Phase::Receiving) {
            self.phase = Phase::Passthrough;
        }
    }

    /// The fill failed, whatever it had reached.
    pub fn fail(&mut self, e: Arc<ServiceError>) {
        self.phase = Phase::Failed(e);
    }

    /// The source's headers arrived (and the fill did not fail before that).
    pub fn started(&self) -> bool {
        !matches!(self.phase, Phase::Waiting | Phase::Failed(_))
    }

    /// The bytes checked out (committed or about to be).
    pub fn verified(&self) -> bool {
        matches!(self.phase, Phase::Verified | Phase::Committed)
    }

    pub fn committed(&self) -> bool {
        matches!(self.phase, Phase::Committed)
    }

    pub fn passthrough(&self) -> bool {
        matches!(self.phase, Phase::Passthrough)
    }

    pub fn error(&self) -> Option<&Arc<ServiceError>> {
        match &self.phase {
            Phase::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Nothing more will happen: committed, failed or relaying.
    pub fn ended(&self) -> bool {
        matches!(
            self.phase,
            Phase::Committed | Phase::Failed(_) | Phase::Passthrough
        )
    }
}

/// A source that sends nothing for this long is abandoned.
pub(in crate::services) const IDLE_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(60);

/// Waits for a fill's upstream headers (or its failure).
pub(in crate::services) async fn wait_started(
    rx: &mut watch::Receiver<Fill>,
) -> Result<(Option<Arc<File>>, Option<u64>), ServiceError> {
    loop {
        {
            let f = rx.borrow_and_update();
            if let Some(e) = f.error() {
                return Err(ServiceError::Shared(e.clone()));
            }
            if f.started() && (f.file.is_some() || f.passthrough()) {
                return Ok((f.file.clone(), f.size));
            }
        }
        if rx.changed().await.is_err() {
            return Err(ServiceError::Unavailable(
                "fill ended without a result".into(),
            ));
        }
    }
}

/// Waits until the fill's bytes all arrived and matched the digest. A fill that relays
/// without storing (disk full) never verifies a part a reader could be given: refused.
pub(in crate::services) async fn wait_verified(
    rx: &mut watch::Receiver<Fill>,
) -> Result<(), ServiceError> {
    loop {
        {
            let f = rx.borrow_and_update();
            if let Some(e) = f.error() {
                return Err(ServiceError::Shared(e.clone()));
            }
            if f.verified() {
                return Ok(());
            }
            if f.passthrough() {
                return Err(ServiceError::Unavailable(
                    "the store is full: a part of this blob cannot be verified before it is served; retry without Range".into(),
                ));
            }
        }
        if rx.changed().await.is_err() {
            return Err(ServiceError::Unavailable(
                "fill ended without a result".into(),
            ));
        }
    }
}

/// Whether a write failed because the disk (or quota) is full.
pub(in crate::services) fn no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Arc<ServiceError> {
        Arc::new(ServiceError::Unavailable("source broke".into()))
    }

    #[test]
    fn a_fill_moves_forward_only() {
        let mut f = Fill::default();
        assert!(!f.started() && !f.ended());
        f.start();
        assert!(f.started() && !f.verified());
        f.verify();
        f.start();
        assert!(f.verified() && !f.committed());
        f.pass_through();
        assert!(!f.passthrough(), "verified bytes never turn into a relay");
        f.commit(42);
        assert!(f.committed() && f.verified() && f.ended());
        assert_eq!(f.written, 42);
        f.verify();
        assert!(f.committed());
    }

    #[test]
    fn a_failure_wins_over_any_phase_and_stays() {
        for mut f in [
            Fill::default(),
            Fill::committed_as(String::new(), Arc::new(tempfile_file()), 1),
        ] {
            f.fail(failed());
            assert!(f.error().is_some() && f.ended() && !f.started());
            f.commit(1);
            f.verify();
            assert!(f.error().is_some(), "{:?}", f.phase());
        }
    }

    #[test]
    fn a_relay_starts_and_ends_the_fill() {
        let mut f = Fill::default();
        f.pass_through();
        assert!(f.passthrough() && f.started() && f.ended() && !f.verified());
    }

    fn tempfile_file() -> File {
        File::open("/dev/null").expect("/dev/null")
    }
}
