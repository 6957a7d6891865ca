//! Blob operations that span both tiers: the local directory and, when configured, the
//! shared bucket. Without a bucket each of them is the plain local operation.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::bucket::Bucket;
use crate::names::Digest;

/// The bucket side of a store.
pub(super) struct Shared {
    pub(super) bucket: Arc<Bucket>,
    /// Cap on the local tier.
    pub(super) local_cap: u64,
    /// Uses not yet written to the bucket (digest hex -> seconds since the epoch):
    /// eviction on the bucket goes by the last use on any replica, recorded in batches.
    pub(super) uses: Mutex<HashMap<String, u64>>,
    /// Recent "this marker exists" answers (blob links, private markers), so a warm
    /// request does not wait for the bucket each time. Bounded in time, never "forever":
    /// another replica's change is seen within [`SEEN_FOR`]. Absence is never remembered:
    /// a repository another replica just marked private must be private here at once.
    seen: dashmap::DashMap<String, std::time::Instant>,
    /// One trim of the local tier at a time.
    pub(super) trimming: AtomicBool,
}

/// How long an answer in `Shared::seen` is trusted.
const SEEN_FOR: Duration = Duration::from_secs(10);

impl Shared {
    /// A remembered existence answer for `key`, if recent: only ever "exists". An absent
    /// marker must be looked up each time: another replica may have just made it (a link),
    /// and a "not private" answer kept here would serve content that another replica has
    /// just marked private, before this one saw the marker.
    pub(super) fn seen(&self, key: &str) -> Option<bool> {
        let e = self.seen.get(key)?;
        (e.elapsed() < SEEN_FOR).then_some(true)
    }

    pub(super) fn remember(&self, key: &str, exists: bool) {
        if !exists {
            self.seen.remove(key);
            return;
        }
        if key.contains("/_blobs/") || key.ends_with("/_private") {
            if self.seen.len() > 100_000 {
                self.seen.retain(|_, at| at.elapsed() < SEEN_FOR);
            }
            self.seen.insert(key.to_string(), std::time::Instant::now());
        }
    }
}

impl Shared {
    pub(super) fn new(bucket: Bucket, local_cap: u64) -> Shared {
        Shared {
            bucket: Arc::new(bucket),
            local_cap,
            uses: Mutex::new(HashMap::new()),
            seen: dashmap::DashMap::new(),
            trimming: AtomicBool::new(false),
        }
    }
}

/// The key of a blob in the bucket.
pub(super) fn blob_key(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

pub(super) fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
