//! The store's memory of hot small objects: manifests (by digest) and the metadata objects
//! a manifest request reads (tag records, manifest links, private markers), bounded by
//! bytes (`server.memory_cache`, 32 MiB by default).
//!
//! Why: a warm manifest request used to open and read four or five files (link, size
//! record, manifest, its mtime for eviction order), and those system calls were most of
//! its cost next to the socket's. Served from here it touches no file.
//!
//! Why an entry lives only [`FRESH`]: this process writes through the store, which
//! updates or drops the entry, but another process may write the same files (`entrepot
//! import` or `gc` run beside `serve`). Re-reading a hot object once a second costs
//! nothing at thousands of requests a second, and bounds how long such a change goes
//! unseen. Absence is remembered only for markers that `serve` alone writes (the private
//! marker, asked on every request): a tag that `entrepot import` just wrote is served
//! at once. Metadata in a bucket is not kept here (replicas write it; the bucket tier
//! keeps its own short memory of what exists); manifest bytes are, since a digest's bytes
//! never change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::Weighter;

/// How long an entry is believed without looking at the disk again.
pub const FRESH: Duration = Duration::from_secs(1);

/// What is known of one key.
#[derive(Clone)]
enum Known {
    /// No such object.
    Absent,
    /// The object exists; its bytes when they were read.
    Present(Option<Bytes>),
    /// A manifest as served from a repository (see [`Hot::served`]), true while nothing
    /// was written since `generation`.
    Served {
        served: std::sync::Arc<Served>,
        generation: u64,
    },
    /// A blob served from a repository (see [`Hot::served_size`]): its size, true while
    /// nothing was written since `generation`.
    ServedSize { size: u64, generation: u64 },
}

impl Known {
    /// The same knowledge (a served manifest is never the same as anything).
    fn same(&self, other: &Known) -> bool {
        match (self, other) {
            (Known::Absent, Known::Absent) => true,
            (Known::Present(a), Known::Present(b)) => a == b,
            _ => false,
        }
    }
}

/// A manifest served from a repository by digest or by tag.
pub struct Served {
    pub digest: crate::names::Digest,
    pub media_type: std::sync::Arc<str>,
    pub body: Bytes,
    /// Past this the answer needs a fresh look (a tag's TTL ends); `None`: a second.
    pub until: Option<Instant>,
}

/// How long a served manifest holds: while the memory's generation is the one it was
/// read at, for [`FRESH`] from `at`, and before `until`. A copy made of it (the routes'
/// prepared answers) holds exactly as long, asked through [`Hot::still`].
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    generation: u64,
    at: Instant,
    until: Option<Instant>,
}

#[derive(Clone)]
struct Entry {
    known: Known,
    at: Instant,
}

/// Bytes an entry holds, with the key and bookkeeping (never 0: a weightless entry would
/// never leave).
#[derive(Clone)]
struct ByBytes;

impl Weighter<Box<str>, Entry> for ByBytes {
    fn weight(&self, key: &Box<str>, e: &Entry) -> u64 {
        let body = match &e.known {
            Known::Present(Some(b)) => b.len(),
            Known::Served { served, .. } => served.media_type.len() + served.body.len() + 80,
            _ => 0,
        };
        (key.len() + body + 96) as u64
    }
}

/// Counts for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HotStats {
    pub bytes: u64,
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
}

pub struct Hot {
    /// `None` when `server.memory_cache` is 0.
    cache: Option<Cache<Box<str>, Entry, ByBytes>>,
    /// The largest entry kept: a few so that one huge manifest cannot push out the rest.
    max_entry: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Bumped by every change of what is known (a write, a removal, a re-read that
    /// finds something else): a served manifest is only believed while it has not moved.
    generation: AtomicU64,
}

/// The answer of a lookup.
pub enum Lookup {
    /// Known absent.
    Absent,
    /// Known present (bytes when asked for and known).
    Present(Option<Bytes>),
    /// Not known (or no longer fresh): ask the disk.
    Unknown,
}

impl Hot {
    pub fn new(capacity: u64) -> Hot {
        let cache = (capacity > 0).then(|| {
            // Estimated items: manifests of a few KB plus their metadata.
            let items = (capacity / 2048).clamp(64, 1 << 20) as usize;
            Cache::with_weighter(items, capacity, ByBytes)
        });
        Hot {
            cache,
            max_entry: (capacity / 16).min(4 << 20) as usize,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// Where the record of changes stands: read before looking at what a served manifest
    /// is made of, given back to [`Hot::remember_served`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A manifest served from a repository under `key`, if remembered within the last
    /// [`FRESH`] (and before its `until`) and nothing changed in this memory since. One
    /// lookup instead of the three a manifest request makes (the private marker, the
    /// link or tag record, the bytes) and a record's parse. With its [`Stamp`].
    pub fn served(&self, key: &str) -> Option<(std::sync::Arc<Served>, Stamp)> {
        let e = self.cache.as_ref()?.get(key)?;
        let Known::Served { served, generation } = e.known else {
            return None;
        };
        let stamp = self.holding(generation, e.at, served.until)?;
        Some((served, stamp))
    }

    /// Whether a served entry with this stamp would still be served.
    pub fn still(&self, s: &Stamp) -> bool {
        s.at.elapsed() < FRESH
            && s.generation == self.generation()
            && s.until.is_none_or(|u| Instant::now() < u)
    }

    /// The stamp of a served entry (manifest or size) if it still holds, counted as a
    /// hit.
    fn holding(&self, generation: u64, at: Instant, until: Option<Instant>) -> Option<Stamp> {
        let stamp = Stamp {
            generation,
            at,
            until,
        };
        if !self.still(&stamp) {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(stamp)
    }

    /// Keeps a served entry read while the memory stood at `generation`; not if
    /// anything changed since (then what was read may already be stale).
    fn keep_served(&self, key: &str, known: Known, generation: u64) {
        if generation != self.generation() {
            return;
        }
        if let Some(c) = &self.cache {
            let at = Instant::now();
            c.insert(key.into(), Entry { known, at });
        }
    }

    /// Remembers a served manifest, read while the memory stood at `generation` (see
    /// [`Hot::keep_served`]).
    pub fn remember_served(&self, key: &str, served: Served, generation: u64) {
        if served.body.len() > self.max_entry {
            return;
        }
        let served = std::sync::Arc::new(served);
        self.keep_served(key, Known::Served { served, generation }, generation);
    }

    /// The size of a blob served from a repository under `key`, if remembered within the
    /// last [`FRESH`] and nothing changed in this memory since: one lookup instead of
    /// the five a blob HEAD makes (private marker, bytes in memory, size record, link,
    /// recorded use).
    pub fn served_size(&self, key: &str) -> Option<(u64, Stamp)> {
        let e = self.cache.as_ref()?.get(key)?;
        let Known::ServedSize { size, generation } = e.known else {
            return None;
        };
        Some((size, self.holding(generation, e.at, None)?))
    }

    /// Remembers a served blob's size, read while the memory stood at `generation`
    /// (see [`Hot::keep_served`]).
    pub fn remember_served_size(&self, key: &str, size: u64, generation: u64) {
        self.keep_served(key, Known::ServedSize { size, generation }, generation);
    }

    /// What is fresh about `key`; `with_bytes`: presence alone is not enough.
    pub fn lookup(&self, key: &str, with_bytes: bool) -> Lookup {
        let answer = match self.peek(key) {
            Lookup::Present(None) if with_bytes => Lookup::Unknown,
            known => known,
        };
        let counter = match answer {
            Lookup::Unknown => &self.misses,
            _ => &self.hits,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        answer
    }

    /// Remembers the object's bytes (`None`: absent).
    pub fn remember(&self, key: &str, bytes: Option<&[u8]>) {
        let known = match bytes {
            Some(b) if b.len() > self.max_entry => {
                return self.forget(key);
            }
            Some(b) => Known::Present(Some(Bytes::copy_from_slice(b))),
            None => Known::Absent,
        };
        self.put(key, known);
    }

    /// Remembers that the object exists, without its bytes (kept if already known).
    pub fn remember_exists(&self, key: &str) {
        if let Lookup::Present(_) = self.peek(key) {
            return;
        }
        self.put(key, Known::Present(None));
    }

    pub fn forget(&self, key: &str) {
        if let Some(c) = &self.cache {
            c.remove(key);
        }
        self.changed();
    }

    pub fn stats(&self) -> HotStats {
        HotStats {
            bytes: self.cache.as_ref().map_or(0, |c| c.weight()),
            entries: self.cache.as_ref().map_or(0, |c| c.len() as u64),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// What is fresh about `key`, uncounted.
    fn peek(&self, key: &str) -> Lookup {
        match self.cache.as_ref().and_then(|c| c.get(key)) {
            Some(e) if e.at.elapsed() < FRESH => match e.known {
                Known::Absent => Lookup::Absent,
                Known::Present(b) => Lookup::Present(b),
                Known::Served { .. } | Known::ServedSize { .. } => Lookup::Unknown,
            },
            _ => Lookup::Unknown,
        }
    }

    fn put(&self, key: &str, known: Known) {
        let Some(c) = &self.cache else {
            return;
        };
        // A re-read that finds what was known (once a second for every hot key) changes
        // nothing: served manifests stay.
        let same = c.peek(key).is_some_and(|e| e.known.same(&known));
        c.insert(
            key.into(),
            Entry {
                known,
                at: Instant::now(),
            },
        );
        if !same {
            self.changed();
        }
    }

    /// Counts a change, after it is in: a served manifest read before it is then not
    /// remembered, nor believed (see [`Hot::remember_served`]).
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(l: Lookup) -> Option<Vec<u8>> {
        match l {
            Lookup::Present(Some(b)) => Some(b.to_vec()),
            _ => None,
        }
    }

    #[test]
    fn remembers_bytes_absence_and_presence() {
        let h = Hot::new(1 << 20);
        assert!(matches!(h.lookup("a", true), Lookup::Unknown));
        h.remember("a", Some(b"one"));
        assert_eq!(bytes(h.lookup("a", true)), Some(b"one".to_vec()));
        h.remember("b", None);
        assert!(matches!(h.lookup("b", false), Lookup::Absent));
        // Presence alone answers `exists`, not `get`.
        h.remember_exists("c");
        assert!(matches!(h.lookup("c", false), Lookup::Present(None)));
        assert!(matches!(h.lookup("c", true), Lookup::Unknown));
        // Presence does not drop known bytes.
        h.remember_exists("a");
        assert_eq!(bytes(h.lookup("a", true)), Some(b"one".to_vec()));
        h.forget("a");
        assert!(matches!(h.lookup("a", true), Lookup::Unknown));
        let s = h.stats();
        assert_eq!((s.hits, s.misses), (4, 3));
        assert!(s.bytes > 0 && s.entries == 2, "{s:?}");
    }

    #[test]
    fn bounded_by_bytes_and_off_at_zero() {
        let h = Hot::new(64 << 10);
        for i in 0..200 {
            h.remember(&format!("k{i}"), Some(&[7u8; 1024]));
        }
        assert!(h.stats().bytes <= 64 << 10, "{:?}", h.stats());
        // An entry over a sixteenth of the capacity is not kept.
        h.remember("big", Some(&vec![0u8; 8 << 10]));
        assert!(matches!(h.lookup("big", true), Lookup::Unknown));
        let off = Hot::new(0);
        off.remember("a", Some(b"x"));
        assert!(matches!(off.lookup("a", true), Lookup::Unknown));
        assert_eq!(off.stats().bytes, 0);
    }

    #[test]
    fn served_manifests_last_while_nothing_changes() {
        let h = Hot::new(1 << 20);
        let served = |until| Served {
            digest: crate::names::Digest::of(b"{}"),
            media_type: "application/json".into(),
            body: Bytes::from_static(b"{}"),
            until,
        };
        let g = h.generation();
        h.remember_served("s", served(None), g);
        let (s, stamp) = h.served("s").expect("served");
        assert!(h.still(&stamp));
        assert_eq!(
            (&*s.media_type, &s.body[..]),
            ("application/json", &b"{}"[..])
        );
        // A re-read that finds what was known keeps it; any change ends it.
        h.remember("repos/x/_tags/1", Some(b"{}"));
        let g = h.generation();
        h.remember_served("s", served(None), g);
        h.remember("repos/x/_tags/1", Some(b"{}"));
        assert!(h.served("s").is_some(), "same bytes read again");
        h.remember("repos/x/_tags/1", Some(b"{ }"));
        assert!(h.served("s").is_none(), "other bytes");
        assert!(!h.still(&stamp), "a copy ends with its entry");
        h.remember_served("s", served(None), h.generation());
        h.remember("repos/x/_private", None);
        assert!(
            h.served("s").is_none(),
            "a marker known absent for the first time"
        );
        // What was read before a change is not kept.
        let g = h.generation();
        h.forget("repos/x/_manifests/ab");
        h.remember_served("s", served(None), g);
        assert!(h.served("s").is_none());
        // A served entry is not a plain object.
        h.remember_served("s", served(None), h.generation());
        assert!(matches!(h.lookup("s", false), Lookup::Unknown));
        // Nor is it served past its `until` (a tag's TTL).
        h.remember_served("t", served(Some(Instant::now())), h.generation());
        assert!(h.served("t").is_none());
    }

    #[test]
    fn served_sizes_last_while_nothing_changes() {
        let h = Hot::new(1 << 20);
        h.remember_served_size("b", 78, h.generation());
        assert_eq!(h.served_size("b").map(|(size, _)| size), Some(78));
        assert!(h.served("b").is_none(), "a size is not a manifest");
        assert!(matches!(h.lookup("b", false), Lookup::Unknown));
        let g = h.generation();
        h.forget("sizes/ab");
        assert!(h.served_size("b").is_none(), "a removal ends it");
        h.remember_served_size("b", 78, g);
        assert!(
            h.served_size("b").is_none(),
            "read before a change: not kept"
        );
    }
}
