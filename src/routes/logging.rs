//! The middleware every request passes: its access line and its request metrics, from
//! what the handler noted on the request ([`RequestInfo`]).
//!
//! Written as a `Transform` with a named future rather than `middleware::from_fn`: that
//! boxes two futures per request and calls through two vtables, a few percent of the
//! CPU of a cached manifest request (measured with perf and a uprobe on malloc).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::BoxBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::Method;
use actix_web::{web, HttpMessage, HttpRequest};

use super::access_log::{self, Line, Logged};
use super::client::Frontend;
use crate::metrics::Metrics;

/// What a request was about, for the access log and metrics: noted by the handlers on
/// the request, in one extension.
#[derive(Clone)]
pub(crate) struct RequestInfo {
    /// Empty until an upstream or hosted repository was picked.
    pub upstream: String,
    pub endpoint: &'static str,
    pub cache: &'static str,
    /// Who made the request (empty: anonymous); set once the caller is known.
    pub user: String,
}

impl RequestInfo {
    pub fn new(endpoint: &'static str) -> RequestInfo {
        RequestInfo {
            upstream: String::new(),
            endpoint,
            cache: "-",
            user: String::new(),
        }
    }

    /// Changes the request's info in place (one box per request), made for
    /// `endpoint` if none was noted yet.
    pub fn note(req: &HttpRequest, endpoint: &'static str, change: impl FnOnce(&mut RequestInfo)) {
        let mut ext = req.extensions_mut();
        change(ext.get_or_insert_with(|| RequestInfo::new(endpoint)));
    }
}

/// The middleware (`App::wrap(AccessLog)`).
pub struct AccessLog;

impl<S> Transform<S, ServiceRequest> for AccessLog
where
    S: Service<ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
    S::Future: Unpin,
{
    type Response = ServiceResponse<Logged>;
    type Error = actix_web::Error;
    type Transform = AccessLogService<S>;
    type InitError = ();
    type Future = std::future::Ready<Result<AccessLogService<S>, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        std::future::ready(Ok(AccessLogService { service }))
    }
}

pub struct AccessLogService<S> {
    service: S,
}

impl<S> Service<ServiceRequest> for AccessLogService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
    S::Future: Unpin,
{
    type Response = ServiceResponse<Logged>;
    type Error = actix_web::Error;
    type Future = Logging<S::Future>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let begun = Begun {
            start: Instant::now(),
            method: req.method().clone(),
            client: req
                .app_data::<web::Data<Frontend>>()
                .and_then(|f| f.client_ip(req.request())),
        };
        Logging {
            inner: self.service.call(req),
            begun: Some(begun),
        }
    }
}

/// What is known of a request before the handler runs.
struct Begun {
    start: Instant,
    method: Method,
    client: Option<std::net::IpAddr>,
}

/// The handler's future, then the line and metrics of its response.
pub struct Logging<F> {
    inner: F,
    /// Taken when the response is ready.
    begun: Option<Begun>,
}

impl<F> Future for Logging<F>
where
    F: Future<Output = Result<ServiceResponse<BoxBody>, actix_web::Error>> + Unpin,
{
    type Output = Result<ServiceResponse<Logged>, actix_web::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = match Pin::new(&mut self.inner).poll(cx) {
            Poll::Ready(res) => res?,
            Poll::Pending => return Poll::Pending,
        };
        // A future is not polled again once ready; if it were, it answers as actix's
        // own futures do.
        let Some(begun) = self.begun.take() else {
            return Poll::Ready(Err(actix_web::error::ErrorInternalServerError(
                "access log: the response was already taken",
            )));
        };
        Poll::Ready(Ok(finish(res, begun)))
    }
}

/// Counts the request and wraps its body in the line written when the body ends.
fn finish(res: ServiceResponse<BoxBody>, begun: Begun) -> ServiceResponse<Logged> {
    // Taken out of the request (not cloned): the line owns them until the body ends.
    let info = res.request().extensions_mut().remove::<RequestInfo>();
    let info = info.unwrap_or_else(|| RequestInfo::new("other"));
    let status = res.status().as_u16();
    let headers = begun.start.elapsed();
    // Borrowed, not cloned (see `routes::state`).
    if let Some(m) = res.request().app_data::<web::Data<Metrics>>() {
        let up = Some(info.upstream.as_str()).filter(|u| !u.is_empty());
        let up = up.unwrap_or("-");
        // Series looked up once per worker thread (see `Metrics::inc`).
        m.inc(&m.requests, &[up, info.endpoint, &status_label(status)]);
        m.observe(
            &m.request_seconds,
            &[up, info.endpoint],
            headers.as_secs_f64(),
        );
    }
    let line = Line {
        method: begun.method,
        uri: res.request().uri().clone(),
        status,
        // An empty name: no upstream was picked (`-`).
        upstream: Some(info.upstream).filter(|u| !u.is_empty()),
        cache: info.cache,
        client: begun.client,
        user: Some(info.user).filter(|u| !u.is_empty()),
        start: begun.start,
        headers_us: access_log::micros(headers),
    };
    res.map_body(|_, body| Logged::new(body, line))
}

/// A status code as a label, without formatting the common ones.
fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    match status {
        200 => "200".into(),
        206 => "206".into(),
        304 => "304".into(),
        401 => "401".into(),
        404 => "404".into(),
        _ => status.to_string().into(),
    }
}
