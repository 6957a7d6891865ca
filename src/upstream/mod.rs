//! HTTP client for upstream registries: auth challenges, tokens, redirects.
//!
//! [`Upstream`] values are built once at start-up and never change. [`UpstreamClient`]
//! pairs one actix worker's connection pool (awc clients are per thread) with the token
//! cache that all workers share, so connections and tokens are reused across requests.

mod auth;
mod backoff;
mod filter;
pub mod network;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::{header, Method, StatusCode};
use awc::ClientResponse;
use base64::Engine as _;
use serde::Deserialize;

pub use auth::{parse_challenge, Challenge, TokenCache};
pub use backoff::{Backoff, Scope};
pub use filter::RepoFilter;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use network::{AddrKind, Network};

/// At most this many redirects are followed (Docker Hub uses one, to its CDN).
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream}: cannot connect: {msg}")]
    Connect { upstream: String, msg: String },
    #[error("upstream {upstream}: auth failed: {msg}")]
    Auth { upstream: String, msg: String },
    #[error("upstream {upstream}: {msg}")]
    Protocol { upstream: String, msg: String },
    /// The upstream said `429`/`503` (now or within its `Retry-After`): not asked again
    /// before `retry_after` has passed.
    #[error("upstream {upstream} is rate limiting or unavailable; retry after {}s", .retry_after.as_secs())]
    RateLimited {
        upstream: String,
        retry_after: Duration,
    },
}

/// One configured upstream registry (read-only after start-up).
pub struct Upstream {
    /// The key: path prefix and `?ns=` host.
    pub name: String,
    pub base: url::Url,
    /// Tried in order when `base` fails or is in back-off; never sent credentials.
    pub fallbacks: Vec<url::Url>,
    pub credentials: Option<(String, String)>,
    /// Clients' own credentials may be forwarded here (`client_credentials`).
    pub client_credentials: bool,
    pub tag_ttl: Duration,
    /// Docker Hub's convention: a one-part name means `library/<name>`.
    pub library_prefix: bool,
    /// Which repositories may be fetched and served.
    pub filter: Arc<RepoFilter>,
    /// Set on a per-request copy that carries a client's own credentials instead of the
    /// configured ones: the identity of those credentials (see [`Creds::id`]).
    pub client: Option<String>,
    /// TLS settings when the upstream has its own CA (`ca_file`); none: public roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Never prints the password.
impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base", &self.base.as_str())
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds every upstream from the config, resolving secrets now so that a missing
    /// password file fails at start-up, not on the first pull.
    pub fn all_from(cfg: &Config) -> Result<Vec<Arc<Upstream>>, ConfigError> {
        let mut out = Vec::new();
        for (name, up) in &cfg.upstreams {
            // A URL copied with its API path (`https://r.example/v2/`) would send every
            // request to `/v2/v2/`: the base is what comes before `/v2`.
            let parse = |u: &str| {
                let trimmed = u.trim_end_matches('/');
                let trimmed = trimmed.strip_suffix("/v2").unwrap_or(trimmed);
                url::Url::parse(trimmed).map_err(|e| ConfigError::Upstream {
                    name: name.clone(),
                    msg: format!("{u}: {e}"),
                })
            };
            let base = parse(&up.url)?;
            let fallbacks = up
                .fallback_urls
                .iter()
                .map(|u| parse(u))
                .collect::<Result<_, _>>()?;
            let password = up.resolve_password(name)?;
            let filter =
                RepoFilter::new(&up.allow, &up.deny).map_err(|e| ConfigError::Upstream {
                    name: name.clone(),
                    msg: format!("allow/deny: {e}"),
                })?;
            let credentials = up
                .username
                .clone()
                .map(|u| (u, password.unwrap_or_default()));
            out.push(Arc::new(Upstream {
                library_prefix: name == "docker.io"
                    || base.host_str() == Some("registry-1.docker.io"),
                name: name.clone(),
                base,
                fallbacks,
                client_credentials: up.client_credentials.unwrap_or(credentials.is_none()),
                credentials,
                tag_ttl: up.tag_ttl(),
                filter: Arc::new(filter),
                client: None,
                tls: up
                    .ca_file
                    .as_deref()
                    .map(|f| tls_with_ca(name, f))
                    .transpose()?,
            }));
        }
        Ok(out)
    }

    /// A copy that authenticates upstream with a client's own credentials.
    pub fn with_client_creds(&self, c: &Creds) -> Arc<Upstream> {
        Arc::new(Upstream {
            name: self.name.clone(),
            base: self.base.clone(),
            fallbacks: self.fallbacks.clone(),
            credentials: Some((c.user.clone(), c.pass.clone())),
            client_credentials: true,
            tag_ttl: self.tag_ttl,
            library_prefix: self.library_prefix,
            filter: self.filter.clone(),
            client: Some(c.id()),
            tls: self.tls.clone(),
        })
    }

    fn basic_header(&self) -> Option<String> {
        self.credentials.as_ref().map(|(u, p)| basic(u, p))
    }
}

/// Public roots plus the CA certificates in `ca_file`, offering h2 and http/1.1.
fn tls_with_ca(
    name: &str,
    ca_file: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let err = |msg: String| ConfigError::Upstream {
        name: name.to_string(),
        msg,
    };
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(format!("ca_file {}: {e}", ca_file.display())))?;
    if certs.is_empty() {
        return Err(err(format!(
            "ca_file {} holds no certificate",
            ca_file.display()
        )));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| err(format!("ca_file {}: {e}", ca_file.display())))?;
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn basic(user: &str, pass: &str) -> String {
    let raw = format!("{user}:{pass}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A client's own credentials for an upstream, forwarded instead of the mirror's.
#[derive(Clone, PartialEq, Eq)]
pub struct Creds {
    pub user: String,
    pub pass: String,
}

impl Creds {
    /// A stable identity that does not reveal the password (token cache and proof keys).
    pub fn id(&self) -> String {
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(format!("{}:{}", self.user, self.pass));
        hex::encode(&h[..12])
    }
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds({}, ***)", self.user)
    }
}

/// A request to an upstream's `/v2/<repo>/<what>` endpoint.
pub struct UpRequest<'a> {
    pub method: Method,
    pub repo: &'a str,
    /// e.g. `manifests/latest`, `blobs/sha256:...`, `tags/list?n=10`.
    pub what: &'a str,
    pub accept: Option<&'a str>,
    /// Ask for the bytes from this offset on (`Range: bytes=N-`).
    pub range_from: Option<u64>,
    /// Only the primary URL may answer (a credential check must not be answered by an
    /// anonymous fallback).
    pub primary_only: bool,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// What every worker's client shares: tokens, back-off, metrics, name resolution.
#[derive(Clone)]
pub struct ClientShared {
    pub tokens: Arc<TokenCache>,
    pub backoff: Arc<Backoff>,
    pub metrics: Arc<Metrics>,
    pub net: Arc<dyn Network>,
}

impl ClientShared {
    pub fn new(metrics: Arc<Metrics>) -> ClientShared {
        ClientShared {
            tokens: Arc::default(),
            backoff: Arc::default(),
            metrics,
            net: Arc::new(network::SystemNetwork),
        }
    }
}

/// Per-worker client; cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    http: awc::Client,
    /// Clients for upstreams with their own CA (`ca_file`), by upstream name.
    custom: std::rc::Rc<std::collections::HashMap<String, awc::Client>>,
    tokens: Arc<TokenCache>,
    backoff: Arc<Backoff>,
    metrics: Arc<Metrics>,
    net: Arc<dyn Network>,
}

fn build_client(timeout: Duration, tls: Option<&Arc<rustls::ClientConfig>>) -> awc::Client {
    let mut connector = awc::Connector::new().timeout(timeout);
    if let Some(cfg) = tls {
        connector = connector.rustls_0_23(cfg.clone());
    }
    awc::Client::builder()
        .disable_redirects()
        .timeout(timeout)
        .add_default_header((
            header::USER_AGENT,
            concat!("entrepot/", env!("CARGO_PKG_VERSION")),
        ))
        .connector(connector)
        .finish()
}

impl UpstreamClient {
    pub fn new(
        shared: &ClientShared,
        timeout: Duration,
        upstreams: &[Arc<Upstream>],
    ) -> UpstreamClient {
        let custom = upstreams
            .iter()
            .filter_map(|u| {
                u.tls
                    .as_ref()
                    .map(|t| (u.name.clone(), build_client(timeout, Some(t))))
            })
            .collect();
        UpstreamClient {
            http: build_client(timeout, None),
            custom: std::rc::Rc::new(custom),
            tokens: shared.tokens.clone(),
            backoff: shared.backoff.clone(),
            metrics: shared.metrics.clone(),
            net: shared.net.clone(),
        }
    }

    /// This worker's default connection pool (public CAs), which the shared bucket's
    /// presigned reads use as well.
    pub fn pool(&self) -> &awc::Client {
        &self.http
    }

    /// The connection pool for `up` (its own when it has its own CA).
    fn http(&self, up: &Upstream) -> &awc::Client {
        self.custom.get(&up.name).unwrap_or(&self.http)
    }

    /// Sends `req` to the first of the upstream's URLs (primary, then `fallback_urls`)
    /// that is not in back-off and answers. A connect error, a timeout or a 5xx moves on
    /// to the next URL; a `429`/`503` also holds the narrowest scope it proves (see
    /// [`backoff`]) for its `Retry-After`. When every URL is failing or in back-off the
    /// last failure is returned ([`UpstreamError::RateLimited`] when it was a rate limit).
    pub async fn send(
        &self,
        up: &Upstream,
        req: &UpRequest<'_>,
    ) -> Result<ClientResponse, UpstreamError> {
        let urls: Vec<&url::Url> = std::iter::once(&up.base)
            .chain(
                up.fallbacks
                    .iter()
                    .take(if req.primary_only { 0 } else { usize::MAX }),
            )
            .collect();
        let mut last = None;
        for (i, base) in urls.iter().enumerate() {
            let at = At {
                up,
                base,
                // Fallbacks are asked anonymously: the mirror's identity there.
                who: if i == 0 {
                    up.client.as_deref().unwrap_or("")
                } else {
                    ""
                },
                repo: req.repo,
                more: i + 1 < urls.len(),
            };
            if let Some((left, _)) = self.backoff.remaining(base.as_str(), at.who, req.repo) {
                last = Some(rate_limited(up, left));
                continue;
            }
            let answer = self.send_to(up, base, i == 0, req).await;
            match self.judge(&at, answer) {
                Ok(resp) => {
                    self.metrics
                        .upstream_answers
                        .with_label_values(&[&up.name, shown(base)])
                        .inc();
                    if i > 0 {
                        tracing::info!(upstream = %up.name, url = shown(base), "answered by a fallback URL");
                    }
                    return Ok(resp);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| rate_limited(up, backoff::DEFAULT_RETRY_AFTER)))
    }

    /// Whether an answer is the one to use; otherwise the error to remember, with the
    /// scope it proves held (see [`backoff`]).
    fn judge(
        &self,
        at: &At<'_>,
        answer: Result<ClientResponse, UpstreamError>,
    ) -> Result<ClientResponse, UpstreamError> {
        let up = at.up;
        let resp = match answer {
            Ok(resp) => resp,
            // Only the token endpoint answers so inside `send_to`: upstream-wide.
            Err(UpstreamError::RateLimited { retry_after, .. }) => {
                self.metrics
                    .rate_limited
                    .with_label_values(&[&up.name])
                    .inc();
                let d = self.hold(at, Scope::Upstream, "token_refused", retry_after);
                return Err(rate_limited(up, d));
            }
            Err(e) => {
                if at.more {
                    self.hold(at, Scope::Url, "unreachable", backoff::FAILED_URL_BACKOFF);
                }
                return Err(e);
            }
        };
        let exhausted = self.observe_ratelimit(up, &resp);
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            self.metrics
                .rate_limited
                .with_label_values(&[&up.name])
                .inc();
            let d = backoff::retry_after(resp.headers());
            let d = if exhausted {
                self.hold(at, Scope::Upstream, "ratelimit_exhausted", d)
            } else {
                self.hold(at, Scope::Repository, "rate_limited", d)
            };
            return Err(rate_limited(up, d));
        }
        if status.is_server_error() && at.more {
            self.hold(
                at,
                Scope::Repository,
                "server_error",
                backoff::FAILED_URL_BACKOFF,
            );
            return Err(protocol(
                up,
                format!("{} answered {status}", shown(at.base)),
            ));
        }
        Ok(resp)
    }

    /// Holds `scope` for `d` (several repositories held at once widen a repository hold
    /// to the upstream), counted by scope and reason and logged; the time held.
    fn hold(&self, at: &At<'_>, scope: Scope, reason: &'static str, d: Duration) -> Duration {
        let url = at.base.as_str();
        let (scope, reason, d) = match scope {
            Scope::Url => (scope, reason, self.backoff.hold_url(url, d)),
            Scope::Upstream => (scope, reason, self.backoff.hold_upstream(url, at.who, d)),
            Scope::Repository => match self.backoff.hold_repo(url, at.who, at.repo, d) {
                (Scope::Repository, d) => (Scope::Repository, reason, d),
                (widened, d) => (widened, "several_repositories", d),
            },
        };
        let up = &at.up.name;
        self.metrics
            .upstream_holds
            .with_label_values(&[up, scope.label(), reason])
            .inc();
        let client = !at.who.is_empty();
        tracing::warn!(upstream = %up, url = shown(at.base), repo = at.repo, scope = scope.label(), reason, client, secs = d.as_secs(), "upstream held: backing off");
        d
    }

    /// Docker Hub's pull-limit headers, as gauges (an alert can fire before the limit);
    /// whether the limit is used up (`ratelimit-remaining: 0`).
    fn observe_ratelimit(&self, up: &Upstream, resp: &ClientResponse) -> bool {
        let h = resp.headers();
        for (name, gauge) in [
            ("ratelimit-remaining", &self.metrics.ratelimit_remaining),
            ("ratelimit-limit", &self.metrics.ratelimit_limit),
        ] {
            if let Some(n) = backoff::ratelimit_header(h, name) {
                gauge.with_label_values(&[&up.name]).set(n);
            }
        }
        backoff::ratelimit_header(h, "ratelimit-remaining") == Some(0)
    }

    /// One URL of the upstream: answers one auth challenge and follows redirects. A 401
    /// that survives the challenge is returned as is, for the caller to map. Credentials
    /// go only to the primary URL; a fallback is asked anonymously (with its own
    /// anonymous tokens, kept apart from the primary's). Only a challenge that `base`'s
    /// own origin issued is answered with them and remembered: a redirect target's 401
    /// comes back as it is.
    async fn send_to(
        &self,
        up: &Upstream,
        base: &url::Url,
        primary: bool,
        req: &UpRequest<'_>,
    ) -> Result<ClientResponse, UpstreamError> {
        let scope = format!("repository:{}:pull", req.repo);
        let url = format!(
            "{}/v2/{}/{}",
            base.as_str().trim_end_matches('/'),
            req.repo,
            req.what
        );
        let who = if primary {
            Who::new(up, base, &scope)
        } else {
            Who::anonymous_at(base, &scope)
        };
        let auth = self.auth_header(up, &who, false).await?;
        let first = self.send_following(up, base, req, &url, auth).await?;
        let Some(challenge) = first.own_challenge() else {
            return Ok(first.resp);
        };
        self.tokens.put_challenge(&who.site, challenge);
        let auth = self.auth_header(up, &who, true).await?;
        if auth.is_none() {
            return Ok(first.resp);
        }
        Ok(self.send_following(up, base, req, &url, auth).await?.resp)
    }

    /// The Authorization value for `scope`, from the cache, or fetched if the upstream is
    /// known to want a token. `fresh` skips the cache (after a 401 with a cached token).
    async fn auth_header(
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
                let token = self
                    .fetch_token(up, who, &realm, service.as_deref())
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Fetches a token from `realm`. Every realm, whoever's credentials go there, must
    /// resolve to an address the redirect policy allows for the URL the request started
    /// from ([`network`]), and the connection goes to exactly that address: a challenge
    /// cannot point the mirror, or the credentials, into a network the upstream is not on.
    async fn fetch_token(
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
        let own = self.kinds(up, who.base).await?;
        let addr = self.checked_addr(up, "token realm", &url, &own).await?;
        let mut req = self.http(up).get(url.as_str()).address(addr);
        if let Some(b) = &who.basic {
            req = req.insert_header((header::AUTHORIZATION, b.as_str()));
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| err(format!("token endpoint: {e}")))?;
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(rate_limited(up, backoff::retry_after(resp.headers())));
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

    /// Sends and follows redirects. The upstream's Authorization goes only to the
    /// upstream's own origin, never to a CDN it redirects to. A hop to another origin goes
    /// only to an address the redirect policy allows ([`network`]), and a Bearer challenge
    /// from it is answered with an anonymous token of its own.
    async fn send_following(
        &self,
        up: &Upstream,
        base: &url::Url,
        req: &UpRequest<'_>,
        url: &str,
        auth: Option<String>,
    ) -> Result<Followed, UpstreamError> {
        let origin = base.origin();
        let mut url = url::Url::parse(url).map_err(|e| protocol(up, format!("bad url: {e}")))?;
        let mut own = None;
        for _ in 0..=MAX_REDIRECTS {
            let from_origin = url.origin() == origin;
            let resp = if from_origin {
                self.send_once(up, req, &url, auth.as_deref(), None).await?
            } else {
                let own = match &own {
                    Some(k) => k,
                    None => own.insert(self.kinds(up, base).await?),
                };
                let addr = self.checked_addr(up, "redirect to", &url, own).await?;
                self.send_elsewhere(up, base, req, &url, addr).await?
            };
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(Followed { resp, from_origin });
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| protocol(up, "redirect without Location".into()))?;
            url = url
                .join(location)
                .map_err(|e| protocol(up, format!("bad redirect {location:?}: {e}")))?;
        }
        Err(protocol(up, "too many redirects".into()))
    }

    /// A redirected request to another origin, at `addr`: anonymous, or with that
    /// origin's own anonymous token when it challenges for one.
    async fn send_elsewhere(
        &self,
        up: &Upstream,
        base: &url::Url,
        req: &UpRequest<'_>,
        url: &url::Url,
        addr: std::net::SocketAddr,
    ) -> Result<ClientResponse, UpstreamError> {
        let site = url.origin().ascii_serialization();
        let scope = format!("repository:{}:pull", req.repo);
        let who = Who {
            site: site.clone(),
            base,
            scope: &scope,
            cache_key: scope.clone(),
            basic: None,
        };
        let cached = self.tokens.token(&site, &who.cache_key);
        let bearer = cached.map(|t| format!("Bearer {t}"));
        let resp = self
            .send_once(up, req, url, bearer.as_deref(), Some(addr))
            .await?;
        let Some(Challenge::Bearer { realm, service, .. }) = challenge_of(&resp) else {
            return Ok(resp);
        };
        let token = self
            .fetch_token(up, &who, &realm, service.as_deref())
            .await?;
        let bearer = format!("Bearer {token}");
        self.send_once(up, req, url, Some(&bearer), Some(addr))
            .await
    }

    /// The kinds of network the upstream's own URL lives on.
    async fn kinds(&self, up: &Upstream, base: &url::Url) -> Result<Vec<AddrKind>, UpstreamError> {
        let addrs = network::addresses(&*self.net, base)
            .await
            .map_err(|e| connect_msg(up, format!("resolve {base}: {e}")))?;
        Ok(addrs.iter().map(|a| self.net.kind(a.ip())).collect())
    }

    /// The address to connect to for `what` (a redirect, a token realm) at `url`: every
    /// address the name has must be allowed (else one answer of a rotating name could
    /// reach the inside).
    async fn checked_addr(
        &self,
        up: &Upstream,
        what: &str,
        url: &url::Url,
        own: &[AddrKind],
    ) -> Result<std::net::SocketAddr, UpstreamError> {
        let addrs = network::addresses(&*self.net, url)
            .await
            .map_err(|e| connect_msg(up, format!("resolve {url}: {e}")))?;
        if let Some(bad) = addrs
            .iter()
            .find(|a| !network::allowed(self.net.kind(a.ip()), own))
        {
            tracing::warn!(upstream = %up.name, what, target = %url.origin().ascii_serialization(), address = %bad.ip(), "refused a host in a network the upstream is not on");
            return Err(protocol(
                up,
                format!(
                    "{what} {} refused: it resolves to {} ({:?}), a network the upstream is not on",
                    url.origin().ascii_serialization(),
                    bad.ip(),
                    self.net.kind(bad.ip())
                ),
            ));
        }
        addrs
            .first()
            .copied()
            .ok_or_else(|| connect_msg(up, format!("{url}: no address")))
    }

    /// One request to `url`. A pooled connection that the upstream closed without saying
    /// so (an HTTP/1.0 answer, a proxy dropping it after a 401) fails before any response
    /// byte: every upstream request is a GET or HEAD, so it is sent once more, on a new
    /// connection.
    async fn send_once(
        &self,
        up: &Upstream,
        req: &UpRequest<'_>,
        url: &url::Url,
        auth: Option<&str>,
        addr: Option<std::net::SocketAddr>,
    ) -> Result<ClientResponse, UpstreamError> {
        let mut last = None;
        for _ in 0..2 {
            let mut r = self.http(up).request(req.method.clone(), url.as_str());
            if let Some(a) = addr {
                r = r.address(a);
            }
            if let Some(a) = req.accept {
                r = r.insert_header((header::ACCEPT, a));
            }
            if let Some(from) = req.range_from {
                r = r.insert_header((header::RANGE, format!("bytes={from}-")));
            }
            if let Some(a) = auth {
                r = r.insert_header((header::AUTHORIZATION, a));
            }
            match r.send().await {
                Ok(resp) => return Ok(resp),
                Err(e) if dead_connection(&e) => last = Some(e),
                Err(e) => return Err(connect_error(up, e)),
            }
        }
        Err(connect_error(
            up,
            last.unwrap_or(awc::error::SendRequestError::Timeout),
        ))
    }
}

/// A reused connection found closed: nothing was answered on it.
fn dead_connection(e: &awc::error::SendRequestError) -> bool {
    use awc::error::{ConnectError, SendRequestError};
    match e {
        SendRequestError::Connect(ConnectError::Disconnected) => true,
        SendRequestError::Send(_) => true,
        SendRequestError::Connect(ConnectError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

fn connect_error(up: &Upstream, e: awc::error::SendRequestError) -> UpstreamError {
    connect_msg(up, e.to_string())
}

fn connect_msg(up: &Upstream, msg: String) -> UpstreamError {
    UpstreamError::Connect {
        upstream: up.name.clone(),
        msg,
    }
}

/// Whose credentials a request goes out with, and the token cache key for them: tokens
/// fetched with one client's credentials are never used for another's requests.
struct Who<'a> {
    /// Whose challenges and tokens: the upstream's key for its primary URL, the URL
    /// itself for a fallback, the origin for a redirect target.
    site: String,
    /// The configured URL the request started from: a token realm must live on the kind
    /// of network it lives on (or a public one).
    base: &'a url::Url,
    scope: &'a str,
    cache_key: String,
    basic: Option<String>,
}

impl<'a> Who<'a> {
    fn new(up: &Upstream, base: &'a url::Url, scope: &'a str) -> Who<'a> {
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
    fn anonymous_at(base: &'a url::Url, scope: &'a str) -> Who<'a> {
        Who {
            site: base.to_string(),
            base,
            scope,
            cache_key: scope.to_string(),
            basic: None,
        }
    }
}

/// Where one attempt of [`UpstreamClient::send`] went, for the back-off it may set.
struct At<'a> {
    up: &'a Upstream,
    base: &'a url::Url,
    /// Whose credentials: "" for the mirror's own (or none), else a client's id.
    who: &'a str,
    repo: &'a str,
    /// Another URL can answer instead.
    more: bool,
}

/// The final answer of a request after its redirects, and whether it came from the
/// origin the request was sent to (only such an answer's challenge is the upstream's).
struct Followed {
    resp: ClientResponse,
    from_origin: bool,
}

impl Followed {
    /// The challenge to answer with the upstream's credentials: none when the 401 came
    /// from a redirect target (a CDN, or a host the upstream was made to point at).
    fn own_challenge(&self) -> Option<Challenge> {
        if !self.from_origin {
            return None;
        }
        challenge_of(&self.resp)
    }
}

/// The challenge of a `401` answer (none for any other status, or without a readable one).
fn challenge_of(resp: &ClientResponse) -> Option<Challenge> {
    if resp.status() != StatusCode::UNAUTHORIZED {
        return None;
    }
    resp.headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge)
}

fn rate_limited(up: &Upstream, retry_after: Duration) -> UpstreamError {
    UpstreamError::RateLimited {
        upstream: up.name.clone(),
        retry_after,
    }
}

fn protocol(up: &Upstream, msg: String) -> UpstreamError {
    UpstreamError::Protocol {
        upstream: up.name.clone(),
        msg,
    }
}

/// A URL as configured (no trailing `/`), for metric labels and logs.
fn shown(base: &url::Url) -> &str {
    base.as_str().trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::network::{AddrKind, Network};
    use super::*;
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpListener};
    use std::sync::Mutex;

    /// Maps `evil.test` to 127.0.0.9 and calls that address link-local, and 127.0.0.1
    /// public: the refusal is exercised without any address outside loopback.
    struct TestNet {
        evil_port: u16,
        asked: Mutex<Vec<String>>,
    }

    impl Network for TestNet {
        fn resolve<'a>(
            &'a self,
            host: &'a str,
            _port: u16,
        ) -> futures_util::future::BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
            if let Ok(mut a) = self.asked.lock() {
                a.push(host.to_string());
            }
            let addr = SocketAddr::from(([127, 0, 0, 9], self.evil_port));
            Box::pin(async move { Ok(vec![addr]) })
        }

        fn kind(&self, ip: IpAddr) -> AddrKind {
            if ip == IpAddr::from([127, 0, 0, 9]) {
                AddrKind::LinkLocal
            } else {
                AddrKind::Public
            }
        }
    }

    /// A server on 127.0.0.1 that answers every request with `head` (status line and
    /// headers, no body).
    fn answering(head: String) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for s in l.incoming().take(4).flatten() {
                let mut s = s;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "{head}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        port
    }

    /// A server on 127.0.0.1 that answers every request with a 307 to `location`.
    fn redirector(location: String) -> u16 {
        answering(format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}"
        ))
    }

    fn hub_at(port: u16) -> Upstream {
        Upstream {
            name: "hub".into(),
            base: url::Url::parse(&format!("http://127.0.0.1:{port}")).expect("url"),
            fallbacks: Vec::new(),
            credentials: Some(("mirror".into(), "secret".into())),
            client_credentials: false,
            tag_ttl: Duration::from_secs(1),
            library_prefix: false,
            filter: Default::default(),
            client: None,
            tls: None,
        }
    }

    fn blob_get() -> UpRequest<'static> {
        UpRequest {
            method: Method::GET,
            repo: "lib/app",
            what: "blobs/sha256:00",
            accept: None,
            range_from: None,
            primary_only: true,
        }
    }

    /// A listener on 127.0.0.9 (which [`TestNet`] calls link-local) that counts accepts.
    struct Evil {
        listener: TcpListener,
        port: u16,
    }

    impl Evil {
        fn start() -> Evil {
            let listener = TcpListener::bind("127.0.0.9:0").expect("bind 127.0.0.9");
            listener.set_nonblocking(true).expect("nonblocking");
            let port = listener.local_addr().expect("addr").port();
            Evil { listener, port }
        }

        fn accepted(&self) -> usize {
            std::thread::sleep(Duration::from_millis(100));
            let mut n = 0;
            while self.listener.accept().is_ok() {
                n += 1;
            }
            n
        }
    }

    /// A blob GET of the upstream on `port` (with credentials), where `evil.test` is
    /// `evil`: its error, which must say "refused", and the names resolved.
    async fn send_refused(evil: &Evil, port: u16) -> (String, Arc<TestNet>) {
        let net = Arc::new(TestNet {
            evil_port: evil.port,
            asked: Mutex::new(Vec::new()),
        });
        let registry = prometheus::Registry::new();
        let mut shared = ClientShared::new(Arc::new(Metrics::new(registry).expect("metrics")));
        shared.net = net.clone();
        let client = UpstreamClient::new(&shared, Duration::from_secs(5), &[]);
        let r = client.send(&hub_at(port), &blob_get()).await;
        let err = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("refused"), "{err}");
        (err, net)
    }

    #[actix_web::test]
    async fn a_token_realm_in_another_network_gets_no_request_and_no_credentials() {
        let evil = Evil::start();
        let port = answering(format!(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://evil.test:{}/token\",service=\"x\"",
            evil.port
        ));
        let (err, _) = send_refused(&evil, port).await;
        assert!(err.contains("evil.test"), "{err}");
        assert_eq!(evil.accepted(), 0, "nothing connected to the realm");
    }

    #[actix_web::test]
    async fn a_redirect_into_another_network_is_refused_before_any_connect() {
        let evil = Evil::start();
        let port = redirector(format!("http://evil.test:{}/latest/meta-data/", evil.port));
        let (err, net) = send_refused(&evil, port).await;
        assert!(err.contains("127.0.0.9"), "{err}");
        // Nothing ever connected to the refused address.
        assert_eq!(evil.accepted(), 0);
        assert_eq!(
            net.asked.lock().map(|a| a.clone()).unwrap_or_default(),
            ["evil.test"]
        );
    }
}
