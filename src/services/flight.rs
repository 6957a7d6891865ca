//! Singleflight: at most one upstream fetch per key, however many requests want it.
//!
//! The first request for a key becomes the leader and gets a `watch::Sender`; every later
//! request gets a `watch::Receiver` of the same value and follows its progress (for blobs:
//! how many bytes are on disk, so followers stream while the download runs). The entry is
//! removed when the leader's [`Lead`] is dropped, after its last update, so a late request
//! either still sees the final value or finds the result in the store.

use std::hash::Hash;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

pub struct Flights<K: Eq + Hash, V> {
    map: DashMap<K, watch::Receiver<V>>,
}

impl<K: Eq + Hash, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            map: DashMap::new(),
        }
    }
}

pub enum Join<K: Eq + Hash + Clone, V> {
    Leader(Lead<K, V>),
    Follower(watch::Receiver<V>),
}

/// Held by the leader; dropping it ends the flight.
pub struct Lead<K: Eq + Hash + Clone, V> {
    pub tx: watch::Sender<V>,
    flights: Arc<Flights<K, V>>,
    key: K,
}

impl<K: Eq + Hash + Clone, V> Flights<K, V> {
    /// Joins the flight for `key`, starting it with `init` if none is running.
    pub fn join(self: &Arc<Self>, key: K, init: impl FnOnce() -> V) -> Join<K, V> {
        match self.map.entry(key.clone()) {
            Entry::Occupied(e) => Join::Follower(e.get().clone()),
            Entry::Vacant(e) => {
                let (tx, rx) = watch::channel(init());
                e.insert(rx);
                Join::Leader(Lead {
                    tx,
                    flights: self.clone(),
                    key,
                })
            }
        }
    }

    /// The flight for `key`, if one is running.
    pub fn follow(&self, key: &K) -> Option<watch::Receiver<V>> {
        self.map.get(key).map(|rx| rx.clone())
    }

    /// Flights running now.
    pub fn in_flight(&self) -> usize {
        self.map.len()
    }

    /// How many flights run, and `view` of at most `limit` of them (for a status page).
    pub fn sample<T>(&self, limit: usize, mut view: impl FnMut(&K, &V) -> T) -> (usize, Vec<T>) {
        let total = self.map.len();
        let shown = self
            .map
            .iter()
            .take(limit)
            .map(|e| view(e.key(), &e.value().borrow()))
            .collect();
        (total, shown)
    }
}

impl<K: Eq + Hash + Clone, V> Lead<K, V> {
    pub fn subscribe(&self) -> watch::Receiver<V> {
        self.tx.subscribe()
    }
}

impl<K: Eq + Hash + Clone, V> Drop for Lead<K, V> {
    fn drop(&mut self) {
        self.flights.map.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_leader_until_dropped() {
        let f: Arc<Flights<u32, u32>> = Arc::default();
        let Join::Leader(lead) = f.join(1, || 0) else {
            panic!("first join must lead")
        };
        let Join::Follower(rx) = f.join(1, || 0) else {
            panic!("second join must follow")
        };
        lead.tx.send_replace(7);
        assert_eq!(*rx.borrow(), 7);
        assert_eq!(f.in_flight(), 1);
        drop(lead);
        assert_eq!(f.in_flight(), 0);
        assert!(matches!(f.join(1, || 0), Join::Leader(_)));
    }
}
