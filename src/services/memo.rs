//! Answers remembered for a few seconds: an upstream's "no such blob" (so a HEAD for a
//! random digest does not cost an upstream request every time) and "that blob was
//! corrupt" (so a broken upstream blob is not downloaded again on every request).

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Keys at most this many; past it, expired entries go (then all, if none expired).
const MAX_KEYS: usize = 100_000;

pub struct Memo {
    until: DashMap<String, Instant>,
    ttl: Duration,
}

impl Memo {
    pub fn new(ttl: Duration) -> Memo {
        Memo {
            until: DashMap::new(),
            ttl,
        }
    }

    pub fn remember(&self, key: String) {
        if self.until.len() >= MAX_KEYS {
            let now = Instant::now();
            self.until.retain(|_, t| *t > now);
            if self.until.len() >= MAX_KEYS {
                self.until.clear();
            }
        }
        self.until.insert(key, Instant::now() + self.ttl);
    }

    pub fn holds(&self, key: &str) -> bool {
        match self.until.get(key).map(|t| *t) {
            Some(t) if t > Instant::now() => true,
            Some(_) => {
                self.until.remove(key);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_for_its_ttl() {
        let m = Memo::new(Duration::from_millis(30));
        m.remember("a".into());
        assert!(m.holds("a") && !m.holds("b"));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!m.holds("a"));
    }
}
