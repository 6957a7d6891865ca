//! HTTP routes: parse the request, pick the upstream, call a service, shape the response.
//!
//! All of `/v2/` is one route whose path is parsed once ([`path::parse`]) rather than
//! one route per name depth.

pub mod path;
mod range;
pub mod target;

use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody, SizedStream};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use futures_util::stream;

use crate::error::OciError;
use crate::metrics::Metrics;
use crate::services::{BlobReply, ManifestReply, Services};
use path::Endpoint;
use target::Router;

const API_VERSION: (&str, &str) = ("Docker-Distribution-API-Version", "registry/2.0");

/// What a request was about, for the access log and metrics.
#[derive(Clone)]
struct RequestInfo {
    upstream: String,
    endpoint: &'static str,
    cache: &'static str,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v2", web::to(v2))
        .route("/v2/{tail:.*}", web::to(v2))
        .route("/metrics", web::get().to(metrics))
        .default_service(web::to(not_found));
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

async fn v2(
    req: HttpRequest,
    svc: web::Data<Services>,
    router: web::Data<Router>,
) -> Result<HttpResponse, OciError> {
    let tail = req.path().strip_prefix("/v2").unwrap_or("");
    let endpoint = path::parse(tail.strip_prefix('/').unwrap_or(tail))?;
    let method = req.method().clone();
    if endpoint != Endpoint::Base && method != Method::GET && method != Method::HEAD {
        return Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{method} is not supported on a mirrored repository"),
        ));
    }
    let ns = ns_param(req.query_string());
    match endpoint {
        Endpoint::Base => Ok(HttpResponse::Ok()
            .insert_header(API_VERSION)
            .json(serde_json::json!({}))),
        Endpoint::Manifest { name, reference } => {
            let t = router.resolve(&name, ns.as_deref())?;
            let accept = header_str(&req, header::ACCEPT);
            let r = svc
                .manifest(&t.upstream, &t.repo, &reference, accept, &method)
                .await;
            note(
                &req,
                &t.upstream.name,
                "manifest",
                r.as_ref().ok().map(|r| r.source.as_str()),
            );
            Ok(manifest_response(r?))
        }
        Endpoint::Blob { name, digest } => {
            let t = router.resolve(&name, ns.as_deref())?;
            let range = header_str(&req, header::RANGE)
                .map(range::parse)
                .transpose()?;
            let r = svc
                .blob(&t.upstream, &t.repo, &digest, range, &method)
                .await;
            note(
                &req,
                &t.upstream.name,
                "blob",
                r.as_ref().ok().map(|r| r.source.as_str()),
            );
            Ok(blob_response(r?, &digest.to_string()))
        }
        Endpoint::TagsList { name } => {
            let t = router.resolve(&name, ns.as_deref())?;
            let query = passthrough_query(req.query_string());
            let r = svc.tags(&t.upstream, &t.repo, &name, &query).await;
            note(
                &req,
                &t.upstream.name,
                "tags",
                r.as_ref().ok().map(|r| r.source.as_str()),
            );
            let r = r?;
            let mut resp = HttpResponse::Ok();
            resp.insert_header(API_VERSION);
            if let Some(link) = r.link {
                resp.insert_header((header::LINK, link));
            }
            Ok(resp.json(r.list))
        }
    }
}

fn header_str(req: &HttpRequest, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn note(req: &HttpRequest, upstream: &str, endpoint: &'static str, cache: Option<&'static str>) {
    req.extensions_mut().insert(RequestInfo {
        upstream: upstream.to_string(),
        endpoint,
        cache: cache.unwrap_or("-"),
    });
}

/// The `ns` query parameter containerd adds for hosts.toml mirrors.
fn ns_param(query: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
}

/// The query without `ns`, for pagination parameters passed upstream.
fn passthrough_query(query: &str) -> String {
    let pairs =
        url::form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k == "n" || k == "last");
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn manifest_response(r: ManifestReply) -> HttpResponse {
    let mut resp = HttpResponse::Ok();
    resp.insert_header(API_VERSION)
        .insert_header(("Docker-Content-Digest", r.digest.to_string()))
        .insert_header((header::ETAG, format!("\"{}\"", r.digest)))
        .insert_header((header::CONTENT_TYPE, r.media_type));
    match r.body {
        Some(b) => resp.body(b),
        None => resp.body(empty_sized(r.size)),
    }
}

fn blob_response(r: BlobReply, digest: &str) -> HttpResponse {
    let mut resp = HttpResponse::build(if r.range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    });
    resp.insert_header(API_VERSION)
        .insert_header(("Docker-Content-Digest", digest))
        .insert_header((header::ETAG, format!("\"{digest}\"")))
        .insert_header((header::CONTENT_TYPE, "application/octet-stream"));
    if r.size.is_some() {
        resp.insert_header((header::ACCEPT_RANGES, "bytes"));
    }
    let (start, end) = r.range.unwrap_or((0, r.size.unwrap_or(0)));
    if let (Some((start, end)), Some(size)) = (r.range, r.size) {
        resp.insert_header((
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        ));
    }
    match (r.body, r.size) {
        (Some(body), Some(_)) => resp.body(SizedStream::new(end - start, body)),
        (Some(body), None) => resp.streaming(body),
        (None, size) => resp.body(empty_sized(size.unwrap_or(0))),
    }
}

/// A body that announces `len` bytes and has none: HEAD responses carry the real
/// Content-Length this way (actix writes no body for HEAD).
fn empty_sized(len: u64) -> BoxBody {
    BoxBody::new(SizedStream::new(
        len,
        stream::empty::<Result<bytes::Bytes, std::io::Error>>(),
    ))
}

/// Access log (one line per request) and request metrics.
pub async fn log_request(
    req: ServiceRequest,
    next: actix_web::middleware::Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().to_string();
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let res = next.call(req).await?;
    let info = res.request().extensions().get::<RequestInfo>().cloned();
    let (upstream, endpoint, cache) = info.as_ref().map_or(("-", "other", "-"), |i| {
        (i.upstream.as_str(), i.endpoint, i.cache)
    });
    let status = res.status().as_u16();
    let bytes = match res.response().body().size() {
        actix_web::body::BodySize::Sized(n) => n as i64,
        _ => -1,
    };
    tracing::info!(
        target: "entrepot::access",
        %method, %path, status, upstream, cache, bytes,
        ms = start.elapsed().as_secs_f64() * 1000.0,
    );
    if let Some(m) = metrics {
        m.requests
            .with_label_values(&[upstream, endpoint, &status.to_string()])
            .inc();
    }
    Ok(res)
}
