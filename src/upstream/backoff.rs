//! Back-off per upstream URL, shared by every worker: a URL that answered `429`/`503` is
//! not asked again until its `Retry-After` has passed (a mirror hammering a rate-limited
//! Docker Hub only burns the limit further), and a failing URL in a fallback chain is
//! skipped for a short while so requests go straight to the next one.

use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::{HeaderMap, RETRY_AFTER};
use dashmap::DashMap;

/// Back-off after `429`/`503` without a `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Longest back-off honoured, whatever `Retry-After` says (Docker Hub may say hours: the
/// upstream is asked again this often to notice the limit lifting).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Back-off of a URL that failed (connect error, timeout, 5xx) while a fallback exists.
pub const FAILED_URL_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Backoff {
    until: DashMap<String, Instant>,
}

impl Backoff {
    /// How long `url` must still be left alone, if at all.
    pub fn remaining(&self, url: &str) -> Option<Duration> {
        let until = *self.until.get(url)?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.until.remove_if(url, |_, u| *u <= Instant::now());
            return None;
        }
        Some(left)
    }

    /// Leaves `url` alone for `d` (never shortening a longer back-off already set).
    pub fn hold(&self, url: &str, d: Duration) {
        let until = Instant::now() + d.min(MAX_RETRY_AFTER);
        self.until
            .entry(url.to_string())
            .and_modify(|u| *u = (*u).max(until))
            .or_insert(until);
    }
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
        assert_eq!(b.remaining("u"), None);
        b.hold("u", Duration::from_secs(60));
        b.hold("u", Duration::from_millis(1));
        assert!(b
            .remaining("u")
            .is_some_and(|d| d > Duration::from_secs(50)));
        b.hold("v", Duration::ZERO);
        assert_eq!(b.remaining("v"), None);
    }
}
