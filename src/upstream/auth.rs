//! Upstream authentication: `WWW-Authenticate` challenges and a shared token cache.
//!
//! Docker Hub, Quay and GHCR answer an anonymous request with
//! `401 WWW-Authenticate: Bearer realm=..,service=..,scope=..`; the client fetches a token
//! from `realm` (with Basic credentials, if it has any) and retries. Tokens are cached per
//! (upstream, scope) until shortly before they expire, and the challenge is remembered per
//! upstream so that later requests fetch a token up front instead of eating a 401 first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Basic realm="x"` or `Bearer realm="..",service="..",scope=".."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = parse_params(rest);
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// `k="v",k2=v2` with commas allowed inside quotes (scopes like `pull,push`).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        out.insert(key, value.to_string());
        rest = next.trim_start_matches([',', ' ']);
    }
    out
}

/// Bearer tokens by (upstream, scope), and the last challenge seen per upstream.
#[derive(Default)]
pub struct TokenCache {
    tokens: DashMap<(String, String), (String, Instant)>,
    challenges: DashMap<String, Challenge>,
}

/// A token is dropped this long before the upstream said it expires, so that a request
/// started just before expiry does not fail in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

impl TokenCache {
    pub fn token(&self, upstream: &str, scope: &str) -> Option<String> {
        let key = (upstream.to_string(), scope.to_string());
        let entry = self.tokens.get(&key)?;
        if entry.1 > Instant::now() {
            return Some(entry.0.clone());
        }
        drop(entry);
        self.tokens.remove(&key);
        None
    }

    pub fn put_token(&self, upstream: &str, scope: &str, token: String, ttl: Duration) {
        let until = Instant::now() + ttl.saturating_sub(EXPIRY_MARGIN);
        self.tokens
            .insert((upstream.to_string(), scope.to_string()), (token, until));
    }

    pub fn challenge(&self, upstream: &str) -> Option<Challenge> {
        self.challenges.get(upstream).map(|c| c.clone())
    }

    pub fn put_challenge(&self, upstream: &str, c: Challenge) {
        self.challenges.insert(upstream.to_string(), c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn tokens_expire() {
        let c = TokenCache::default();
        c.put_token("u", "s", "t".into(), Duration::from_secs(300));
        assert_eq!(c.token("u", "s").as_deref(), Some("t"));
        c.put_token("u", "s2", "t".into(), Duration::from_secs(5));
        assert_eq!(c.token("u", "s2"), None);
    }
}
