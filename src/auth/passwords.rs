//! htpasswd password checks that cannot be turned against the server.
//!
//! bcrypt is slow on purpose, which makes it a CPU lever for anyone who can send a
//! password. So: a verified password is remembered as its SHA-256 per user and later
//! requests compare against that in constant time (a correct password costs nothing);
//! bcrypt runs in a pool of at most half the cores, so serving always has CPU; an unknown
//! user costs the same bcrypt as a known one with a wrong password (checked against a
//! dummy hash), so user names cannot be told apart by timing.
//!
//! Attempts are throttled per client address ([`Attempts`]): one user's failures from one
//! address, and (where a name that is no user may be a caller's own upstream
//! credentials) the unknown names one address tries. An attempt is counted *before* its
//! bcrypt runs, so a burst gets no more checks than the limit however it arrives; alice
//! failing from another address, or already verified, is not affected, so nobody can lock
//! alice out (behind a reverse proxy, `server.trusted_proxies` gives each client its own
//! address). Names and passwords are bounded before anything is hashed or kept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, Semaphore};

use super::caller::AccessError;
use crate::metrics::Metrics;

/// Failures of one user from one address allowed within [`FAILURE_WINDOW`].
const MAX_FAILURES: u32 = 5;
/// Unknown names one address may have checked within [`FAILURE_WINDOW`] (each costs a
/// bcrypt; a name found to be no user is remembered and costs nothing again).
const MAX_UNKNOWN: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Entries kept for attempt counting and unknown-user verdicts.
const MAX_TRACKED: usize = 100_000;
/// The longest user name taken (longer: refused before any hashing).
pub const MAX_USER_LEN: usize = 256;
/// The longest password taken (a caller's own upstream credentials may be long tokens,
/// e.g. a `_json_key`).
pub const MAX_PASS_LEN: usize = 8192;
/// How long an attempt waits for the checks ahead of it before it is refused.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// What a password check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An htpasswd user, password correct.
    User,
    /// Not an htpasswd user (the caller may be presenting its own upstream credentials).
    NotAUser,
}

/// Whose attempts are counted together: one user (by the SHA-256 of the name) from one
/// address, or every unknown name from one address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    User(Option<IpAddr>, [u8; 32]),
    Unknown(Option<IpAddr>),
}

/// Attempts of one [`Key`] within the window: finished failures and checks in flight.
struct Attempts {
    failures: u32,
    in_flight: u32,
    since: Instant,
}

/// What [`Passwords::admit`] decided.
enum Admit {
    Go,
    /// The checks in flight could use up the limit: wait for them.
    Wait,
    Throttled(Duration),
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
    attempts: DashMap<Key, Attempts>,
    /// Woken whenever a check ends, for the attempts waiting on it.
    settled: Notify,
    metrics: Arc<Metrics>,
}

/// Settles an admitted attempt when dropped (a cancelled request counts as failed).
struct Admitted<'a> {
    passwords: &'a Passwords,
    key: Key,
    failed: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.passwords.settle(self.key, self.failed);
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
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
            attempts: DashMap::new(),
            settled: Notify::new(),
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
        if user.len() > MAX_USER_LEN || pass.len() > MAX_PASS_LEN {
            return Err(AccessError::BadCredentials);
        }
        let digest = sha256(&[pass.as_bytes()]);
        let pair = sha256(&[user.as_bytes(), &[0], pass.as_bytes()]);
        // A verified password, or a pair already found to be no user, costs nothing.
        let remembered = || {
            if self.is_verified(user, &digest) {
                return Some(Verdict::User);
            }
            (self.accept_foreign && self.not_users.contains_key(&pair)).then_some(Verdict::NotAUser)
        };
        if let Some(v) = remembered() {
            return Ok(v);
        }
        let known = self.users.contains_key(user);
        if !known && self.accept_foreign && self.dummy.is_none() {
            // No users at all: nothing to check, nothing to spend.
            return Ok(Verdict::NotAUser);
        }
        let key = if known || !self.accept_foreign {
            Key::User(peer, sha256(&[user.as_bytes()]))
        } else {
            Key::Unknown(peer)
        };
        let Some(mut admitted) = self.wait_admitted(key, || remembered().is_some()).await? else {
            // A check that ran while this one waited settled this very pair.
            return remembered().ok_or(AccessError::BadCredentials);
        };
        let hash = self.users.get(user).or(self.dummy.as_ref()).cloned();
        let ok = match hash {
            Some(h) => self.bcrypt(pass, h).await && known,
            None => false,
        };
        if ok {
            admitted.failed = false;
            self.verified.insert(user.to_string(), digest);
            return Ok(Verdict::User);
        }
        // A wrong password, and an unknown user where only users may log in, look the
        // same: same status, same bcrypt time.
        if known || !self.accept_foreign {
            return Err(AccessError::BadCredentials);
        }
        if self.not_users.len() >= MAX_TRACKED {
            self.not_users.clear();
        }
        self.not_users.insert(pair, ());
        Ok(Verdict::NotAUser)
    }

    fn is_verified(&self, user: &str, digest: &[u8; 32]) -> bool {
        self.verified
            .get(user)
            .is_some_and(|known| bool::from(known.ct_eq(digest)))
    }

    /// Reserves an attempt for `key`, waiting (bounded) while checks in flight could use
    /// up its limit; `429` with the time left once they did.
    /// `None` as soon as `remembered` says another check settled the answer meanwhile.
    async fn wait_admitted(
        &self,
        key: Key,
        remembered: impl Fn() -> bool,
    ) -> Result<Option<Admitted<'_>>, AccessError> {
        let deadline = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if remembered() {
                return Ok(None);
            }
            match self.admit(key) {
                Admit::Go => {
                    return Ok(Some(Admitted {
                        passwords: self,
                        key,
                        failed: true,
                    }))
                }
                Admit::Throttled(left) => {
                    self.metrics.auth_throttled.inc();
                    return Err(AccessError::Throttled(left));
                }
                Admit::Wait => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        self.metrics.auth_throttled.inc();
                        return Err(AccessError::Throttled(MAX_WAIT));
                    }
                }
            }
        }
    }

    /// The one place attempts are counted: a check is admitted only while the failures
    /// so far plus the checks in flight stay under the key's limit.
    fn admit(&self, key: Key) -> Admit {
        // Unknown names from one address are checked one at a time: the same pair sent
        // at once is checked once, the rest find it remembered.
        let (limit, max_in_flight) = match key {
            Key::User(..) => (MAX_FAILURES, MAX_FAILURES),
            Key::Unknown(_) => (MAX_UNKNOWN, 1),
        };
        if !self.attempts.contains_key(&key) && self.attempts.len() >= MAX_TRACKED {
            self.attempts
                .retain(|_, a| a.in_flight > 0 || a.since.elapsed() < FAILURE_WINDOW);
            if self.attempts.len() >= MAX_TRACKED {
                return Admit::Throttled(FAILURE_WINDOW);
            }
        }
        let mut a = self.attempts.entry(key).or_insert_with(|| Attempts {
            failures: 0,
            in_flight: 0,
            since: Instant::now(),
        });
        let elapsed = a.since.elapsed();
        if elapsed >= FAILURE_WINDOW {
            a.failures = 0;
            a.since = Instant::now();
        }
        if a.failures >= limit {
            return Admit::Throttled(FAILURE_WINDOW.saturating_sub(a.since.elapsed()));
        }
        if a.failures + a.in_flight >= limit || a.in_flight >= max_in_flight {
            return Admit::Wait;
        }
        a.in_flight += 1;
        Admit::Go
    }

    /// An admitted check ended: a failure is counted, a success clears the key.
    fn settle(&self, key: Key, failed: bool) {
        if let Some(mut a) = self.attempts.get_mut(&key) {
            a.in_flight = a.in_flight.saturating_sub(1);
            if failed {
                a.failures += 1;
            } else {
                a.failures = 0;
            }
        }
        self.attempts
            .remove_if(&key, |_, a| a.failures == 0 && a.in_flight == 0);
        self.settled.notify_waiters();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn passwords(accept_foreign: bool) -> Arc<Passwords> {
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).expect("metrics"));
        let hash = bcrypt::hash("right", 4).expect("bcrypt");
        let users = HashMap::from([("alice".to_string(), hash)]);
        Arc::new(Passwords::new(users, accept_foreign, metrics))
    }

    async fn burst(
        p: &Arc<Passwords>,
        n: usize,
        user: &str,
        pass: impl Fn(usize) -> String,
    ) -> Vec<Result<Verdict, AccessError>> {
        let peer = Some(IpAddr::from([10, 0, 0, 1]));
        let checks = (0..n).map(|i| {
            let (p, user, pass) = (p.clone(), user.to_string(), pass(i));
            async move { p.check(&user, &pass, peer).await }
        });
        futures_util::future::join_all(checks).await
    }

    #[tokio::test]
    async fn a_burst_of_wrong_passwords_gets_the_limit_checked_and_the_rest_throttled() {
        let p = passwords(false);
        let got = burst(&p, 40, "alice", |i| format!("wrong{i}")).await;
        let bad = got
            .iter()
            .filter(|r| matches!(r, Err(AccessError::BadCredentials)))
            .count();
        let held = got
            .iter()
            .filter(|r| matches!(r, Err(AccessError::Throttled(_))))
            .count();
        assert_eq!((bad, held), (5, 35));
    }

    #[tokio::test]
    async fn concurrent_correct_logins_all_pass_and_count_no_failure() {
        let p = passwords(false);
        let got = burst(&p, 8, "alice", |_| "right".into()).await;
        assert!(got.iter().all(|r| r == &Ok(Verdict::User)), "{got:?}");
        assert!(p.attempts.is_empty(), "nothing counted against alice");
        // And five wrong ones afterwards are still five checks.
        let got = burst(&p, 6, "alice", |i| format!("wrong{i}")).await;
        assert_eq!(
            got.iter()
                .filter(|r| matches!(r, Err(AccessError::BadCredentials)))
                .count(),
            5
        );
    }

    #[tokio::test]
    async fn long_names_and_passwords_are_refused_before_anything_is_kept() {
        let p = passwords(true);
        let long = "n".repeat(MAX_USER_LEN + 1);
        assert_eq!(
            p.check(&long, "x", None).await,
            Err(AccessError::BadCredentials)
        );
        let huge = "p".repeat(MAX_PASS_LEN + 1);
        assert_eq!(
            p.check("alice", &huge, None).await,
            Err(AccessError::BadCredentials)
        );
        assert!(p.attempts.is_empty() && p.not_users.is_empty());
    }

    #[tokio::test]
    async fn unknown_names_from_one_address_are_checked_ten_a_minute() {
        let p = passwords(true);
        let got = burst(&p, 30, "", |_| "pw".into()).await;
        // All with the same (empty) name and password: one check, the rest remembered.
        assert!(got.iter().all(|r| r == &Ok(Verdict::NotAUser)), "{got:?}");
        let peer = Some(IpAddr::from([10, 0, 0, 2]));
        let mut held = 0;
        for i in 0..30 {
            if let Err(AccessError::Throttled(_)) =
                p.check(&format!("stranger{i}"), "pw", peer).await
            {
                held += 1;
            }
        }
        assert_eq!(held, 20);
    }
}
