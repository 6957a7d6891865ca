//! htpasswd password checks that cannot be turned against the server.
//!
//! bcrypt is slow on purpose, which makes it a CPU lever for anyone who can send a
//! password. So: a verified password is remembered as its SHA-256 per user and later
//! requests compare against that in constant time (a correct password costs nothing);
//! bcrypt runs in a pool of at most half the cores, so serving always has CPU; repeated
//! failures from one client address for one user get `429` for a while (alice failing
//! from another address, or already verified, is not affected, so nobody can lock alice
//! out); and an unknown user costs the same bcrypt as a known one with a wrong password
//! (checked against a dummy hash), so user names cannot be told apart by timing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use super::access::AccessError;
use crate::metrics::Metrics;

/// Failures of one user from one address allowed within [`FAILURE_WINDOW`].
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Entries kept for failure counting and unknown-user verdicts before a purge.
const MAX_TRACKED: usize = 100_000;

/// What a password check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An htpasswd user, password correct.
    User,
    /// Not an htpasswd user (the caller may be presenting its own upstream credentials).
    NotAUser,
}

pub struct Passwords {
    users: HashMap<String, String>,
    /// SHA-256 of each user's last verified password.
    verified: DashMap<String, [u8; 32]>,
    /// SHA-256 of `user\0pass` pairs already found not to be htpasswd users.
    not_users: DashMap<[u8; 32], ()>,
    /// A bcrypt hash of the users' cost, checked for unknown users.
    dummy: Option<String>,
    /// Whether a name that is no user may still be a caller's own upstream credentials
    /// (`anonymous_pull`); if not, an unknown user is just a failed login.
    accept_foreign: bool,
    slots: Semaphore,
    failures: DashMap<(Option<IpAddr>, String), (u32, Instant)>,
    metrics: Arc<Metrics>,
}

impl Passwords {
    pub fn new(
        users: HashMap<String, String>,
        accept_foreign: bool,
        metrics: Arc<Metrics>,
    ) -> Passwords {
        let cost = users
            .values()
            .find_map(|h| h.split('$').nth(2).and_then(|c| c.parse().ok()))
            .unwrap_or(bcrypt::DEFAULT_COST);
        let dummy = (!users.is_empty())
            .then(|| bcrypt::hash("entrepot dummy password", cost).ok())
            .flatten();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Passwords {
            users,
            verified: DashMap::new(),
            not_users: DashMap::new(),
            dummy,
            accept_foreign,
            slots: Semaphore::new((cores / 2).max(1)),
            failures: DashMap::new(),
            metrics,
        }
    }

    /// Checks `user`/`pass` from `peer`.
    pub async fn check(
        &self,
        user: &str,
        pass: &str,
        peer: Option<IpAddr>,
    ) -> Result<Verdict, AccessError> {
        let digest: [u8; 32] = Sha256::digest(pass.as_bytes()).into();
        if let Some(known) = self.verified.get(user) {
            if bool::from(known.ct_eq(&digest)) {
                return Ok(Verdict::User);
            }
        }
        let pair: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(pass.as_bytes())
            .finalize()
            .into();
        if self.accept_foreign && self.not_users.contains_key(&pair) {
            return Ok(Verdict::NotAUser);
        }
        self.throttle(peer, user)?;
        let hash = self.users.get(user).or(self.dummy.as_ref()).cloned();
        let ok = match hash {
            Some(h) => self.bcrypt(pass, h).await && self.users.contains_key(user),
            None => false,
        };
        if ok {
            self.failures.remove(&(peer, user.to_string()));
            self.verified.insert(user.to_string(), digest);
            return Ok(Verdict::User);
        }
        // A wrong password, and an unknown user where only users may log in, look the
        // same: same status, same bcrypt time.
        if self.users.contains_key(user) || !self.accept_foreign {
            self.fail(peer, user);
            return Err(AccessError::BadCredentials);
        }
        if self.not_users.len() >= MAX_TRACKED {
            self.not_users.clear();
        }
        self.not_users.insert(pair, ());
        Ok(Verdict::NotAUser)
    }

    fn fail(&self, peer: Option<IpAddr>, user: &str) {
        if self.failures.len() >= MAX_TRACKED {
            self.failures
                .retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let mut e = self
            .failures
            .entry((peer, user.to_string()))
            .or_insert((0, Instant::now()));
        if e.1.elapsed() >= FAILURE_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    /// `429` with the time left when this address failed too often as this user.
    fn throttle(&self, peer: Option<IpAddr>, user: &str) -> Result<(), AccessError> {
        let Some(e) = self.failures.get(&(peer, user.to_string())) else {
            return Ok(());
        };
        let (count, since) = *e;
        let elapsed = since.elapsed();
        if count < MAX_FAILURES || elapsed >= FAILURE_WINDOW {
            return Ok(());
        }
        self.metrics.auth_throttled.inc();
        Err(AccessError::Throttled(FAILURE_WINDOW - elapsed))
    }

    /// One bcrypt check on the bounded pool.
    async fn bcrypt(&self, pass: &str, hash: String) -> bool {
        let Ok(_slot) = self.slots.acquire().await else {
            return false;
        };
        let pass = pass.to_string();
        tokio::task::spawn_blocking(move || bcrypt::verify(pass, &hash).unwrap_or(false))
            .await
            .unwrap_or(false)
    }
}
