//! Back-off, shared by every worker: an upstream that answered `429`/`503` is not asked
//! again until its `Retry-After` has passed (a mirror hammering a rate-limited Docker Hub
//! only burns the limit further), and a failing URL in a fallback chain is skipped for a
//! short while so requests go straight to the next one.
//!
//! A hold covers the narrowest scope the answer proves, so that one request cannot take
//! an upstream away from everyone: any registry may answer `503` for one broken
//! repository, and anyone who can name that repository could otherwise keep the whole
//! upstream held. The scopes ([`Scope`]):
//! - a repository, for one identity (the mirror's own or anonymous, or one client's own
//!   credentials): a `429`/`503`/5xx about it. At most [`MAX_REPO_HOLD`].
//! - the whole URL for one identity: the token endpoint refused, Docker Hub said
//!   `ratelimit-remaining: 0`, or [`PROMOTE_AFTER`] distinct repositories were held at
//!   once. At most [`MAX_RETRY_AFTER`].
//! - the whole URL for everyone: it could not be reached at all (only while a fallback
//!   URL can answer instead), for [`FAILED_URL_BACKOFF`].
//!
//! Every table is bounded ([`MAX_KEYS`] entries; a repository table per identity holds
//! at most [`PROMOTE_AFTER`] names).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::{HeaderMap, RETRY_AFTER};
use dashmap::DashMap;

/// Back-off after `429`/`503` without a `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Longest back-off honoured for an upstream-wide answer, whatever `Retry-After` says
/// (Docker Hub may say hours: the upstream is asked again this often to notice the limit
/// lifting).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Longest hold of one repository (or of a whole URL held because several were).
pub const MAX_REPO_HOLD: Duration = Duration::from_secs(300);
/// Back-off of a URL that failed (connect error, timeout, 5xx) while a fallback exists.
pub const FAILED_URL_BACKOFF: Duration = Duration::from_secs(10);
/// Distinct repositories held at once for one identity that make the hold URL-wide.
pub const PROMOTE_AFTER: usize = 3;
/// Entries each table keeps at most (they are keyed by client input: identities).
pub const MAX_KEYS: usize = 10_000;

/// What a hold covers (and its label in metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One repository, for one identity.
    Repository,
    /// The whole URL, for one identity.
    Upstream,
    /// The whole URL, for everyone: it does not answer.
    Url,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Repository => "repository",
            Scope::Upstream => "upstream",
            Scope::Url => "url",
        }
    }
}

/// Who a hold is for: a URL, and whose credentials went there ("" for the mirror's own
/// or none; a client credential's id otherwise).
type Ident = (String, String);

#[derive(Default)]
pub struct Backoff {
    urls: DashMap<String, Instant>,
    upstreams: DashMap<Ident, Instant>,
    repos: DashMap<Ident, HashMap<String, Instant>>,
}

fn ident(url: &str, who: &str) -> Ident {
    (url.to_string(), who.to_string())
}

fn left(until: Instant) -> Option<Duration> {
    let d = until.saturating_duration_since(Instant::now());
    (!d.is_zero()).then_some(d)
}

impl Backoff {
    /// How long a request for `repo` at `url` as `who` must still wait, if at all, and
    /// which hold says so.
    pub fn remaining(&self, url: &str, who: &str, repo: &str) -> Option<(Duration, Scope)> {
        if let Some(d) = self.urls.get(url).and_then(|u| left(*u)) {
            return Some((d, Scope::Url));
        }
        let key = ident(url, who);
        if let Some(d) = self.upstreams.get(&key).and_then(|u| left(*u)) {
            return Some((d, Scope::Upstream));
        }
        let repos = self.repos.get(&key)?;
        repos
            .get(repo)
            .and_then(|u| left(*u))
            .map(|d| (d, Scope::Repository))
    }

    /// What holds `url` for the mirror's own identity now, for the status page: the
    /// whole URL or upstream (how long, which scope), and how many repositories are held.
    pub fn summary(&self, url: &str) -> (Option<(Duration, Scope)>, usize) {
        let whole = self.remaining(url, "", "");
        let now = Instant::now();
        let repos = self
            .repos
            .get(&ident(url, ""))
            .map_or(0, |m| m.values().filter(|u| **u > now).count());
        (whole, repos)
    }

    /// Leaves `url` alone for everyone for `d` (at most [`FAILED_URL_BACKOFF`]); the time
    /// held.
    pub fn hold_url(&self, url: &str, d: Duration) -> Duration {
        let d = d.min(FAILED_URL_BACKOFF);
        if bounded(&self.urls, |u| *u) {
            extend(self.urls.entry(url.to_string()), d);
        }
        d
    }

    /// Leaves `url` alone for `who` for `d` (at most [`MAX_RETRY_AFTER`]); the time held.
    pub fn hold_upstream(&self, url: &str, who: &str, d: Duration) -> Duration {
        let d = d.min(MAX_RETRY_AFTER);
        if bounded(&self.upstreams, |u| *u) {
            extend(self.upstreams.entry(ident(url, who)), d);
        }
        d
    }

    /// Leaves `repo` at `url` alone for `who` for `d` (at most [`MAX_REPO_HOLD`]); when
    /// [`PROMOTE_AFTER`] distinct repositories are held at once, the whole URL is held for
    /// `who` until the first of them ends. Returns the scope now held and for how long.
    pub fn hold_repo(&self, url: &str, who: &str, repo: &str, d: Duration) -> (Scope, Duration) {
        let d = d.min(MAX_REPO_HOLD);
        let until = Instant::now() + d;
        let latest = |m: &HashMap<String, Instant>| m.values().max().copied();
        if !bounded(&self.repos, |m| latest(m).unwrap_or_else(Instant::now)) {
            return (Scope::Repository, d);
        }
        let key = ident(url, who);
        let promote = {
            let mut held = self.repos.entry(key.clone()).or_default();
            let now = Instant::now();
            held.retain(|_, u| *u > now);
            let e = held.entry(repo.to_string()).or_insert(until);
            *e = (*e).max(until);
            (held.len() >= PROMOTE_AFTER).then(|| held.values().min().copied())
        };
        let Some(first_end) = promote.flatten() else {
            return (Scope::Repository, d);
        };
        self.repos.remove(&key);
        let d = first_end.saturating_duration_since(Instant::now());
        if bounded(&self.upstreams, |u| *u) {
            extend(self.upstreams.entry(key), d);
        }
        (Scope::Upstream, d)
    }
}

/// Never shortens a longer hold already set.
fn extend<K: Eq + std::hash::Hash>(e: dashmap::mapref::entry::Entry<'_, K, Instant>, d: Duration) {
    let until = Instant::now() + d;
    e.and_modify(|u| *u = (*u).max(until)).or_insert(until);
}

/// Whether `map` has room for one more key: expired entries are dropped when it is full.
/// A table still full of live holds takes no more (the request is answered all the same;
/// only the memory of its hold is lost).
fn bounded<K: Eq + std::hash::Hash, V>(map: &DashMap<K, V>, until: impl Fn(&V) -> Instant) -> bool {
    if map.len() < MAX_KEYS {
        return true;
    }
    let now = Instant::now();
    map.retain(|_, v| until(v) > now);
    map.len() < MAX_KEYS
}

/// `Retry-After` as seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`]; the default
/// when absent or unreadable.
pub fn retry_after(h: &HeaderMap) -> Duration {
    let parsed = h
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v.trim()));
    parsed.unwrap_or(DEFAULT_RETRY_AFTER).min(MAX_RETRY_AFTER)
}

fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Docker Hub's `ratelimit-limit`/`ratelimit-remaining` (`100;w=21600`): the number.
pub fn ratelimit_header(h: &HeaderMap, name: &str) -> Option<i64> {
    let v = h.get(name)?.to_str().ok()?;
    v.split(';').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")])),
            Duration::from_secs(7)
        );
        assert_eq!(retry_after(&headers(&[])), DEFAULT_RETRY_AFTER);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "86400")])),
            MAX_RETRY_AFTER
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = retry_after(&headers(&[("retry-after", &later)]));
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(120));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)])),
            Duration::ZERO
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "soon")])),
            DEFAULT_RETRY_AFTER
        );
    }

    #[test]
    fn ratelimit_numbers() {
        let h = headers(&[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "76;w=21600"),
        ]);
        assert_eq!(ratelimit_header(&h, "ratelimit-limit"), Some(100));
        assert_eq!(ratelimit_header(&h, "ratelimit-remaining"), Some(76));
        assert_eq!(ratelimit_header(&h, "x"), None);
    }

    #[test]
    fn holds_expire_and_never_shorten() {
        let b = Backoff::default();
        assert_eq!(b.remaining("u", "", "r"), None);
        b.hold_upstream("u", "", Duration::from_secs(60));
        b.hold_upstream("u", "", Duration::from_millis(1));
        assert!(b
            .remaining("u", "", "r")
            .is_some_and(|(d, s)| d > Duration::from_secs(50) && s == Scope::Upstream));
        b.hold_upstream("v", "", Duration::ZERO);
        assert_eq!(b.remaining("v", "", "r"), None);
    }

    #[test]
    fn a_repository_hold_covers_that_repository_and_identity_only() {
        let b = Backoff::default();
        assert_eq!(
            b.hold_repo("u", "", "broken", Duration::from_secs(600)),
            (Scope::Repository, MAX_REPO_HOLD)
        );
        let (d, s) = b.remaining("u", "", "broken").expect("held");
        assert_eq!(s, Scope::Repository);
        assert!(d <= MAX_REPO_HOLD && d > MAX_REPO_HOLD - Duration::from_secs(5));
        assert_eq!(b.remaining("u", "", "other"), None, "another repository");
        assert_eq!(
            b.remaining("u", "client-1", "broken"),
            None,
            "another identity"
        );
        assert_eq!(b.remaining("u2", "", "broken"), None, "another URL");
    }

    #[test]
    fn several_repositories_held_hold_the_upstream_for_that_identity() {
        let b = Backoff::default();
        b.hold_repo("u", "", "a", Duration::from_secs(30));
        b.hold_repo("u", "", "a", Duration::from_secs(30));
        assert_eq!(b.remaining("u", "", "z"), None, "one repository twice");
        b.hold_repo("u", "", "b", Duration::from_secs(60));
        assert_eq!(
            b.hold_repo("u", "", "c", Duration::from_secs(60)).0,
            Scope::Upstream
        );
        let (d, s) = b.remaining("u", "", "z").expect("held");
        assert_eq!(s, Scope::Upstream);
        assert!(
            d <= Duration::from_secs(30),
            "until the first hold ends: {d:?}"
        );
        assert_eq!(b.remaining("u", "client-1", "z"), None);
    }

    #[test]
    fn an_unreachable_url_is_held_for_everyone_briefly() {
        let b = Backoff::default();
        assert_eq!(
            b.hold_url("u", Duration::from_secs(600)),
            FAILED_URL_BACKOFF
        );
        let (d, s) = b.remaining("u", "client-1", "r").expect("held");
        assert_eq!(s, Scope::Url);
        assert!(d <= FAILED_URL_BACKOFF);
    }

    #[test]
    fn tables_are_bounded() {
        let b = Backoff::default();
        for i in 0..MAX_KEYS + 50 {
            b.hold_repo("u", &format!("client-{i}"), "r", Duration::from_secs(60));
        }
        assert_eq!(b.repos.len(), MAX_KEYS);
        assert!(b.remaining("u", "client-0", "r").is_some());
    }
}
