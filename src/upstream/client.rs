//! The HTTP client of the upstreams: one request, sent to the first URL of the upstream
//! that is not held (back-off) and answers, with the upstream's own challenge answered
//! and redirects followed under the address policy.
//!
//! [`UpstreamClient`] pairs one actix worker's connection pool (awc clients are per
//! thread) with what all workers share ([`ClientShared`]: tokens, back-off, metrics, name
//! resolution), so connections and tokens are reused across requests.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::{header, Method, StatusCode};
use awc::ClientResponse;

use super::auth::{challenge_of, Challenge, TokenCache, TokenSource, Who};
use super::backoff::{self, Backoff, Scope};
use super::configured::Upstream;
use super::error::{connect_error, protocol, rate_limited, UpstreamError};
use super::network::{self, Network};
use crate::egress::{client_connector, Proxies};
use crate::metrics::Metrics;

/// At most this many redirects are followed (Docker Hub uses one, to its CDN).
const MAX_REDIRECTS: usize = 5;

/// A request to an upstream's `/v2/<repo>/<what>` endpoint.
pub struct UpRequest<'a> {
    pub method: Method,
    pub repo: &'a str,
    /// e.g. `manifests/latest`, `blobs/sha256:...`, `tags/list?n=10`.
    pub what: &'a str,
    pub accept: Option<&'a str>,
    /// Ask for the bytes from this offset on (`Range: bytes=N-`).
    pub range_from: Option<u64>,
    /// ... up to this offset, inclusive (`Range: bytes=N-M`).
    pub range_to: Option<u64>,
    /// Only the primary URL may answer (a credential check must not be answered by an
    /// anonymous fallback).
    pub primary_only: bool,
}

/// What every worker's client shares: tokens, back-off, metrics, name resolution.
#[derive(Clone)]
pub struct ClientShared {
    pub tokens: Arc<TokenCache>,
    pub backoff: Arc<Backoff>,
    pub metrics: Arc<Metrics>,
    pub net: Arc<dyn Network>,
    /// The environment's egress proxies (an upstream's own `proxy` wins).
    pub proxies: Arc<Proxies>,
}

impl ClientShared {
    pub fn new(metrics: Arc<Metrics>) -> ClientShared {
        ClientShared {
            tokens: Arc::default(),
            backoff: Arc::default(),
            metrics,
            net: Arc::new(network::SystemNetwork),
            proxies: Proxies::none(),
        }
    }

    /// The same, connecting through `proxies` (see [`crate::egress`]).
    pub fn with_proxies(mut self, proxies: Arc<Proxies>) -> ClientShared {
        self.proxies = proxies;
        self
    }
}

/// Per-worker client; cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    http: awc::Client,
    /// Clients for upstreams with their own CA (`ca_file`) or proxy, by upstream name.
    custom: std::rc::Rc<std::collections::HashMap<String, awc::Client>>,
    /// The environment's proxies.
    proxies: Arc<Proxies>,
    tokens: Arc<TokenCache>,
    backoff: Arc<Backoff>,
    metrics: Arc<Metrics>,
    net: Arc<dyn Network>,
    /// `server.upstream_timeout`, for messages.
    timeout: Duration,
}

fn build_client(
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
    proxies: Arc<Proxies>,
) -> awc::Client {
    let mut connector = client_connector(proxies).timeout(timeout);
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
            .filter(|u| u.tls.is_some() || u.proxy.is_some())
            .map(|u| {
                let proxies = u.proxy.clone().unwrap_or_else(|| shared.proxies.clone());
                (
                    u.name.clone(),
                    build_client(timeout, u.tls.as_ref(), proxies),
                )
            })
            .collect();
        UpstreamClient {
            http: build_client(timeout, None, shared.proxies.clone()),
            custom: std::rc::Rc::new(custom),
            proxies: shared.proxies.clone(),
            tokens: shared.tokens.clone(),
            backoff: shared.backoff.clone(),
            metrics: shared.metrics.clone(),
            net: shared.net.clone(),
            timeout,
        }
    }

    /// Back-off now in force for `up`'s primary URL, for the mirror's own requests:
    /// (a hold of the whole URL or upstream, repositories held).
    pub fn holds(&self, up: &Upstream) -> (Option<(Duration, Scope)>, usize) {
        self.backoff.summary(up.base.as_str())
    }

    /// This worker's default connection pool (public CAs), which the shared bucket's
    /// presigned reads use as well.
    pub fn pool(&self) -> &awc::Client {
        &self.http
    }

    /// The answer of the proxy itself, when `resp` came from one (see
    /// [`super::error::proxy_answer`]).
    fn proxy_answer(&self, at: &At<'_>, resp: &ClientResponse) -> Option<UpstreamError> {
        // The status first: every upstream answer passes here, and only a proxy's own
        // needs the route looked up.
        if !super::error::from_proxy(resp.status(), resp.headers()) {
            return None;
        }
        let base = at.base;
        let route = self.proxies(at.up).route(
            base.scheme(),
            base.host_str()?,
            base.port_or_known_default()?,
        )?;
        Some(super::error::proxy_answer(
            at.up,
            &route.shown,
            shown(base),
            resp.status(),
        ))
    }

    /// The proxies `up`'s requests go through (its own, or the environment's).
    pub(super) fn proxies<'a>(&'a self, up: &'a Upstream) -> &'a Proxies {
        up.proxy.as_deref().unwrap_or(&self.proxies)
    }

    /// The connection pool for `up` (its own when it has its own CA).
    fn http(&self, up: &Upstream) -> &awc::Client {
        self.custom.get(&up.name).unwrap_or(&self.http)
    }

    /// Token fetching for `up`, on its connection pool.
    fn token_source<'a>(&'a self, up: &'a Upstream) -> TokenSource<'a> {
        TokenSource {
            http: self.http(up),
            net: &*self.net,
            tokens: &self.tokens,
            proxies: self.proxies(up),
        }
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
        if let Some(e) = self.proxy_answer(at, &resp) {
            return Err(e);
        }
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
        let auth = self.token_source(up).header(up, &who, false).await?;
        let first = self.send_following(up, base, req, &url, auth).await?;
        let Some(challenge) = first.own_challenge() else {
            return Ok(first.resp);
        };
        self.tokens.put_challenge(&who.site, challenge);
        let auth = self.token_source(up).header(up, &who, true).await?;
        if auth.is_none() {
            return Ok(first.resp);
        }
        Ok(self.send_following(up, base, req, &url, auth).await?.resp)
    }

    /// Sends and follows redirects. The upstream's Authorization goes only to the
    /// upstream's own origin, never to a CDN it redirects to. A hop to another origin goes
    /// only to an address the redirect policy allows ([`super::network`]), and a Bearer challenge
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
                let proxies = self.proxies(up);
                let own = match &own {
                    Some(k) => k,
                    None => own.insert(network::kinds(&*self.net, proxies, up, base).await?),
                };
                let addr = network::checked_addr(&*self.net, proxies, up, "redirect to", &url, own)
                    .await?;
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
        addr: Option<std::net::SocketAddr>,
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
            .send_once(up, req, url, bearer.as_deref(), addr)
            .await?;
        let Some(Challenge::Bearer { realm, service, .. }) = challenge_of(&resp) else {
            return Ok(resp);
        };
        let token = self
            .token_source(up)
            .fetch(up, &who, &realm, service.as_deref())
            .await?;
        let bearer = format!("Bearer {token}");
        self.send_once(up, req, url, Some(&bearer), addr).await
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
                let to = req.range_to.map_or(String::new(), |t| t.to_string());
                r = r.insert_header((header::RANGE, format!("bytes={from}-{to}")));
            }
            if let Some(a) = auth {
                r = r.insert_header((header::AUTHORIZATION, a));
            }
            match r.send().await {
                Ok(resp) => return Ok(resp),
                Err(e) if dead_connection(&e) => last = Some(e),
                Err(e) => return Err(connect_error(up, url, self.timeout, e)),
            }
        }
        Err(connect_error(
            up,
            url,
            self.timeout,
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
            credentials: Some(("mirror".into(), "secret".into())),
            ..Upstream::for_tests("hub", &format!("http://127.0.0.1:{port}"))
        }
    }

    fn blob_get() -> UpRequest<'static> {
        UpRequest {
            method: Method::GET,
            repo: "lib/app",
            what: "blobs/sha256:00",
            accept: None,
            range_from: None,
            range_to: None,
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
