//! Upstream authentication: `WWW-Authenticate` challenges and a shared token cache.
//!
//! Docker Hub, Quay and GHCR answer an anonymous request with
//! `401 WWW-Authenticate: Bearer realm=..,service=..,scope=..`; the client fetches a token
//! from `realm` (with Basic credentials, if it has any) and retries. Tokens are cached per
//! (upstream, scope, credential) until shortly before they expire, and the challenge is
//! remembered per upstream so that later requests fetch a token up front instead of eating
//! a 401 first.
//!
//! Credentials go only where they belong: only a challenge the upstream's own origin
//! issued is answered with them and remembered (the client checks the origin), and every
//! realm is fetched at an address the redirect policy allows ([`super::network`]), the
//! connection pinned to it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix_web::http::{header, StatusCode};
use awc::ClientResponse;
use dashmap::DashMap;
use serde::Deserialize;

use super::backoff::retry_after;
use super::configured::Upstream;
use super::error::{rate_limited, UpstreamError};
use super::network::{self, Network};

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

/// Whose credentials a request goes out with, and the token cache key for them: tokens
/// fetched with one client's credentials are never used for another's requests.
pub(super) struct Who<'a> {
    /// Whose challenges and tokens: the upstream's key for its primary URL, the URL
    /// itself for a fallback, the origin for a redirect target.
    pub(super) site: String,
    /// The configured URL the request started from: a token realm must live on the kind
    /// of network it lives on (or a public one).
    pub(super) base: &'a url::Url,
    pub(super) scope: &'a str,
    pub(super) cache_key: String,
    pub(super) basic: Option<String>,
}

impl<'a> Who<'a> {
    pub(super) fn new(up: &Upstream, base: &'a url::Url, scope: &'a str) -> Who<'a> {
        let cache_key = match &up.client {
            Some(id) => format!("{scope}#{id}"),
            None => scope.to_string(),
        };
        Who {
            site: up.name.clone(),
            base,
            scope,
            cache_key,
            basic: up.basic_header(),
        }
    }

    /// No credentials at all: for fallback URLs.
    pub(super) fn anonymous_at(base: &'a url::Url, scope: &'a str) -> Who<'a> {
        Who {
            site: base.to_string(),
            base,
            scope,
            cache_key: scope.to_string(),
            basic: None,
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// What fetching a token takes from the client: the connection pool for the upstream,
/// name resolution, and the token cache every worker shares.
pub(super) struct TokenSource<'a> {
    pub(super) http: &'a awc::Client,
    pub(super) net: &'a dyn Network,
    pub(super) tokens: &'a TokenCache,
    /// Where the realm's request goes (directly, or through the upstream's proxy).
    pub(super) proxies: &'a crate::egress::Proxies,
}

impl TokenSource<'_> {
    /// The Authorization value for `scope`, from the cache, or fetched if the upstream is
    /// known to want a token. `fresh` skips the cache (after a 401 with a cached token).
    pub(super) async fn header(
        &self,
        up: &Upstream,
        who: &Who<'_>,
        fresh: bool,
    ) -> Result<Option<String>, UpstreamError> {
        if !fresh {
            if let Some(t) = self.tokens.token(&who.site, &who.cache_key) {
                return Ok(Some(format!("Bearer {t}")));
            }
        }
        match self.tokens.challenge(&who.site) {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(who.basic.clone()),
            Some(Challenge::Bearer { realm, service, .. }) => {
                let token = self.fetch(up, who, &realm, service.as_deref()).await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Fetches a token from `realm`. Every realm, whoever's credentials go there, must
    /// resolve to an address the redirect policy allows for the URL the request started
    /// from ([`super::network`]), and the connection goes to exactly that address: a challenge
    /// cannot point the mirror, or the credentials, into a network the upstream is not on.
    pub(super) async fn fetch(
        &self,
        up: &Upstream,
        who: &Who<'_>,
        realm: &str,
        service: Option<&str>,
    ) -> Result<String, UpstreamError> {
        let err = |msg: String| UpstreamError::Auth {
            upstream: up.name.clone(),
            msg,
        };
        let mut url =
            url::Url::parse(realm).map_err(|e| err(format!("token realm {realm:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(err(format!("token realm {realm:?} is not an http(s) URL")));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", who.scope);
        }
        let own = network::kinds(self.net, self.proxies, up, who.base).await?;
        let addr =
            network::checked_addr(self.net, self.proxies, up, "token realm", &url, &own).await?;
        let mut req = self.http.get(url.as_str());
        if let Some(a) = addr {
            req = req.address(a);
        }
        if let Some(b) = &who.basic {
            req = req.insert_header((header::AUTHORIZATION, b.as_str()));
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| err(format!("token endpoint: {e}")))?;
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(rate_limited(up, retry_after(resp.headers())));
        }
        if !status.is_success() {
            return Err(err(format!("token endpoint answered {status}")));
        }
        let body: TokenResponse = resp
            .json()
            .limit(1 << 20)
            .await
            .map_err(|e| err(format!("token response: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| err("token response has no token".into()))?;
        // The spec's default lifetime is 60 s when `expires_in` is absent.
        let ttl = Duration::from_secs(body.expires_in.unwrap_or(60).max(60));
        self.tokens
            .put_token(&who.site, &who.cache_key, token.clone(), ttl);
        Ok(token)
    }
}

/// The challenge of a `401` answer (none for any other status, or without a readable one).
pub(super) fn challenge_of(resp: &ClientResponse) -> Option<Challenge> {
    if resp.status() != StatusCode::UNAUTHORIZED {
        return None;
    }
    resp.headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge)
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
