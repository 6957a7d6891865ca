//! HTTP routes: parse the request, identify the caller, pick the upstream or hosted
//! repository, call a service, shape the response.
//!
//! All of `/v2/` is one route whose path is parsed once ([`path::parse`]) rather than
//! one route per name depth; [`v2`] dispatches on the parsed endpoint and the method.

pub mod access_log;
mod client;
mod error;
mod logging;
pub mod path;
mod peer;
mod prepared;
mod pull;
mod push;
mod range;
mod reply;
mod status_page;
pub mod target;
mod token;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};

use crate::auth::{Access, Caller, Need};
use crate::metrics::Metrics;
use crate::services::Services;
use error::OciError;
use path::Endpoint;
use target::{Router, Target};

pub use client::Frontend;
pub use logging::AccessLog;
use logging::RequestInfo;

/// Sent on every registry answer; header name and value parsed at compile time.
const API_VERSION: (header::HeaderName, header::HeaderValue) = (
    header::HeaderName::from_static("docker-distribution-api-version"),
    header::HeaderValue::from_static("registry/2.0"),
);

/// The registry API, `/healthz`, and `/metrics` unless it has its own listener.
pub fn configure(cfg: &mut web::ServiceConfig, with_metrics: bool) {
    // `/v2` and everything under it reach `v2` as the default service: a `{tail:.*}`
    // route is matched by a regex engine on every request (14% of the CPU of a cached
    // manifest request, measured with perf); the static routes below are plain lookups.
    cfg.route("/token", web::get().to(token::token))
        .route("/healthz", web::get().to(healthz))
        .route("/", web::get().to(status_page::page))
        .route("/_entrepot/peer/health", web::get().to(peer::health))
        .route("/_entrepot/peer/manifest", web::get().to(peer::manifest))
        .route("/_entrepot/peer/blob", web::get().to(peer::blob))
        .route("/_entrepot/peer/blob", web::head().to(peer::blob));
    if with_metrics {
        configure_metrics(cfg);
    }
    cfg.default_service(web::to(v2));
}

/// `/metrics` alone (for `metrics_listen`).
pub fn configure_metrics(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics));
}

/// Liveness/readiness: the process serves requests (no auth, no upstream involved).
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn not_found() -> HttpResponse {
    OciError::new(
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
        "not a registry endpoint",
    )
    .error_response()
}

async fn metrics(m: web::Data<Metrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(m.render())
}

/// Everything a handler needs about one request.
pub(crate) struct Ctx<'a> {
    pub req: &'a HttpRequest,
    pub svc: &'a Services,
    pub router: &'a Router,
    pub caller: Caller,
    pub method: Method,
}

impl Ctx<'_> {
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.req.headers().get(name).and_then(|v| v.to_str().ok())
    }

    fn query(&self, key: &str) -> Option<String> {
        url::form_urlencoded::parse(self.req.query_string().as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    fn resolve(&self, name: &str) -> Result<Target, OciError> {
        Ok(self.router.resolve(name, self.query("ns").as_deref())?)
    }

    /// Notes the upstream and cache result for the access log.
    fn note(&self, upstream: &str, endpoint: &'static str, cache: Option<&'static str>) {
        RequestInfo::note(self.req, endpoint, |i| {
            i.upstream.clear();
            i.upstream.push_str(upstream);
            i.endpoint = endpoint;
            i.cache = cache.unwrap_or("-");
        });
    }

    fn hosted_prefix(&self) -> &str {
        self.svc
            .mirror
            .hosted
            .as_ref()
            .map_or("", |h| h.prefix.as_str())
    }
}

/// The app's shared state, borrowed from the request: extracting each `web::Data` clones
/// its `Arc`, and on the state the workers share that is an atomic both cores write.
fn state<T: 'static>(req: &HttpRequest) -> Result<&T, OciError> {
    req.app_data::<web::Data<T>>()
        .map(|d| d.get_ref())
        .ok_or_else(|| {
            OciError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                format!(
                    "{} is not configured on this server",
                    std::any::type_name::<T>()
                ),
            )
        })
}

async fn v2(req: HttpRequest, body: web::Payload) -> Result<HttpResponse, OciError> {
    let (svc, router) = (state::<Services>(&req)?, state::<Router>(&req)?);
    if let Some(answer) = prepared::answer(&req, svc) {
        return Ok(answer);
    }
    let (access, front) = (state::<Access>(&req)?, state::<Frontend>(&req)?);
    let Some(tail) = req
        .path()
        .strip_prefix("/v2")
        .filter(|t| t.is_empty() || t.starts_with('/'))
    else {
        return Ok(not_found().await);
    };
    let endpoint = path::parse(tail.strip_prefix('/').unwrap_or(tail))
        .map_err(|e| path_error(e, req.method()))?;
    let need = need(&endpoint, req.method());
    // What the request was about, for the log and metrics, even if it fails before a
    // handler says more (405, 416, 401).
    req.extensions_mut()
        .insert(RequestInfo::new(endpoint_kind(&endpoint)));
    let challenge = |e: OciError| e.challenged(&token::challenge(&front.public_base(&req), need));
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let id = access
        .identify(auth, front.client_ip(&req))
        .await
        .map_err(|e| challenge(e.into()))?;
    RequestInfo::note(&req, "other", |i| i.user.push_str(id.caller.name()));
    let ctx = Ctx {
        req: &req,
        svc,
        router,
        caller: id.caller.clone(),
        method: req.method().clone(),
    };
    if let Need::Push(name) | Need::Delete(name) = need {
        read_only_mirror(&ctx, name)?;
    }
    access
        .authorize(&id, need)
        .map_err(|e| challenge(e.into()))?;
    dispatch(&ctx, &endpoint, body).await.map_err(challenge)
}

async fn dispatch(
    ctx: &Ctx<'_>,
    endpoint: &Endpoint,
    body: web::Payload,
) -> Result<HttpResponse, OciError> {
    // Pulls of manifests and blobs run inline; the other endpoints are boxed, so that
    // this future (moved into the handler's box on every request) stays as small as
    // the pull path needs, not as large as the largest upload path.
    match (endpoint, ctx.method.clone()) {
        (Endpoint::Base, _) => Ok(HttpResponse::Ok()
            .insert_header(API_VERSION)
            .json(serde_json::json!({}))),
        (Endpoint::Catalog, Method::GET) => Box::pin(pull::catalog(ctx)).await,
        (Endpoint::Manifest { name, reference }, Method::GET | Method::HEAD) => {
            pull::manifest(ctx, name, reference).await
        }
        (Endpoint::Manifest { name, reference }, Method::PUT) => {
            Box::pin(push::put_manifest(ctx, name, reference, body)).await
        }
        (Endpoint::Manifest { name, reference }, Method::DELETE) => {
            Box::pin(push::delete_manifest(ctx, name, reference)).await
        }
        (Endpoint::Blob { name, digest }, Method::GET | Method::HEAD) => {
            pull::blob(ctx, name, digest).await
        }
        (Endpoint::Blob { name, digest }, Method::DELETE) => {
            Box::pin(push::delete_blob(ctx, name, digest)).await
        }
        (Endpoint::TagsList { name }, Method::GET) => Box::pin(pull::tags(ctx, name)).await,
        (Endpoint::Referrers { name, digest }, Method::GET) => {
            Box::pin(pull::referrers(ctx, name, digest)).await
        }
        (Endpoint::UploadStart { name }, Method::POST) => {
            Box::pin(push::upload_start(ctx, name, body)).await
        }
        (Endpoint::Upload { name, id }, Method::GET) => {
            Box::pin(push::upload_status(ctx, name, id)).await
        }
        (Endpoint::Upload { name, id }, Method::PATCH) => {
            Box::pin(push::upload_patch(ctx, name, id, body)).await
        }
        (Endpoint::Upload { name, id }, Method::PUT) => {
            Box::pin(push::upload_put(ctx, name, id, body)).await
        }
        (Endpoint::Upload { name, id }, Method::DELETE) => {
            Box::pin(push::upload_cancel(ctx, name, id)).await
        }
        (_, m) => Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{m} is not supported on this endpoint"),
        )),
    }
}

fn endpoint_kind(e: &Endpoint) -> &'static str {
    match e {
        Endpoint::Base => "base",
        Endpoint::Catalog => "catalog",
        Endpoint::Manifest { .. } => "manifest",
        Endpoint::Blob { .. } => "blob",
        Endpoint::TagsList { .. } => "tags",
        Endpoint::UploadStart { .. } | Endpoint::Upload { .. } => "upload",
        Endpoint::Referrers { .. } => "referrers",
    }
}

/// A malformed manifest reference names no manifest: reads and deletes get `404
/// MANIFEST_UNKNOWN` (as every registry answers, and the OCI conformance suite expects);
/// only a PUT, which would create it, is told `400`.
fn path_error(e: path::PathError, method: &Method) -> OciError {
    if e == path::PathError::Reference && method != Method::PUT {
        return OciError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", e.to_string());
    }
    e.into()
}

/// What the request needs the caller to be allowed: deleting content is `delete`, every
/// other write (uploads, manifest PUT, cancelling an upload) `push`.
fn need<'a>(e: &'a Endpoint, method: &Method) -> Need<'a> {
    let name = match e {
        Endpoint::Base => return Need::Ping,
        Endpoint::Catalog => return Need::Catalog,
        Endpoint::Manifest { name, .. }
        | Endpoint::Blob { name, .. }
        | Endpoint::TagsList { name }
        | Endpoint::UploadStart { name }
        | Endpoint::Upload { name, .. }
        | Endpoint::Referrers { name, .. } => name.as_str(),
    };
    match *method {
        Method::GET | Method::HEAD => Need::Pull(name),
        Method::DELETE if matches!(e, Endpoint::Manifest { .. } | Endpoint::Blob { .. }) => {
            Need::Delete(name)
        }
        _ => Need::Push(name),
    }
}

/// Writes go only to hosted repositories: a write to a mirrored upstream is `405`, before
/// any credential is asked for.
fn read_only_mirror(ctx: &Ctx<'_>, name: &str) -> Result<(), OciError> {
    match ctx.resolve(name)? {
        Target::Hosted { .. } => Ok(()),
        Target::Upstream { upstream, .. } => {
            let hint = match ctx.svc.mirror.hosted.as_ref() {
                Some(h) => format!("; push to {}/<repository> instead", h.prefix),
                None => String::new(),
            };
            Err(OciError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                format!("{} is a read-only mirror of {}{hint}", name, upstream.name),
            ))
        }
    }
}
