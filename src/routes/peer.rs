//! The internal endpoints replicas of a cluster call on each other, authenticated with the
//! cluster secret: `GET /_entrepot/peer/health` and
//! `GET|HEAD /_entrepot/peer/blob?upstream=&repo=&digest=` (Range honoured) and
//! `GET /_entrepot/peer/manifest?upstream=&repo=&reference=`. What is asked this way is
//! fetched here (from the local tier, the bucket or the upstream), never forwarded again.

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use super::error::OciError;
use super::logging::RequestInfo;
use super::target::{Router, Target};
use super::{path, range, reply};
use crate::cluster::PEER_SECRET_HEADER;
use crate::names::Digest;
use crate::services::Services;

fn check(req: &HttpRequest, svc: &Services) -> Result<(), OciError> {
    let Some(cluster) = &svc.mirror.cluster else {
        return Err(OciError::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "not a cluster member",
        ));
    };
    let given = req
        .headers()
        .get(PEER_SECRET_HEADER)
        .and_then(|v| v.to_str().ok());
    if !cluster.admits(given) {
        svc.mirror
            .metrics
            .peer_requests
            .with_label_values(&["in", "unauthorized"])
            .inc();
        return Err(OciError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "peer requests need the cluster secret",
        ));
    }
    Ok(())
}

pub async fn health(req: HttpRequest, svc: web::Data<Services>) -> Result<HttpResponse, OciError> {
    check(&req, &svc)?;
    Ok(HttpResponse::Ok().content_type("text/plain").body("ok\n"))
}

/// The upstream repository `upstream`/`repo` names, validated like any request's.
fn upstream_repo(
    router: &Router,
    upstream: &str,
    repo: &str,
) -> Result<(std::sync::Arc<crate::upstream::Upstream>, String), OciError> {
    let invalid = |m: String| OciError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", m);
    let name =
        path::valid_name(&format!("{upstream}/{repo}")).map_err(|e| invalid(e.to_string()))?;
    match router.resolve(&name, None)? {
        Target::Upstream { upstream, repo } => Ok((upstream, repo)),
        Target::Hosted { .. } => Err(invalid(format!("{upstream} is not an upstream"))),
    }
}

#[derive(serde::Deserialize)]
pub struct ManifestQuery {
    upstream: String,
    repo: String,
    reference: String,
}

pub async fn manifest(
    req: HttpRequest,
    q: web::Query<ManifestQuery>,
    svc: web::Data<Services>,
    router: web::Data<Router>,
) -> Result<HttpResponse, OciError> {
    check(&req, &svc)?;
    let (upstream, repo) = upstream_repo(&router, &q.upstream, &q.repo)?;
    let reference = path::parse_reference(&q.reference)
        .map_err(|_| OciError::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", "bad reference"))?;
    RequestInfo::note(&req, "peer", |i| i.upstream.push_str(&upstream.name));
    let f = svc.peer_manifest(&upstream, &repo, &reference).await?;
    Ok(HttpResponse::Ok()
        .content_type(f.media_type.as_str())
        .insert_header(("Docker-Content-Digest", f.digest.to_string()))
        .body(f.bytes.clone()))
}

#[derive(serde::Deserialize)]
pub struct BlobQuery {
    upstream: String,
    repo: String,
    digest: String,
}

pub async fn blob(
    req: HttpRequest,
    q: web::Query<BlobQuery>,
    svc: web::Data<Services>,
    router: web::Data<Router>,
) -> Result<HttpResponse, OciError> {
    check(&req, &svc)?;
    let (upstream, repo) = upstream_repo(&router, &q.upstream, &q.repo)?;
    let digest: Digest = q
        .digest
        .parse()
        .map_err(|_| OciError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "bad digest"))?;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(range::parse)
        .transpose()?
        .and_then(|a| match a {
            // Peers ask for one open range (where a broken source stopped).
            range::Asked::One(r) => Some(r),
            _ => None,
        });
    RequestInfo::note(&req, "peer", |i| i.upstream.push_str(&upstream.name));
    let method = if req.method() == Method::HEAD {
        Method::HEAD
    } else {
        Method::GET
    };
    let r = svc
        .peer_blob(&upstream, &repo, &digest, range, &method)
        .await?;
    Ok(reply::blob(r, &digest))
}
