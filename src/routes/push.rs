//! Writes to hosted repositories: blob uploads (monolithic, chunked, cross-repository
//! mount), manifest PUT/DELETE, blob DELETE. [`super::writable`] has already checked that
//! the target is hosted and the caller may push.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpResponse};

use super::error::OciError;
use super::path::PathError;
use super::target::Target;
use super::{reply, Ctx, API_VERSION};
use crate::names::{Digest, Reference};
use crate::services::MAX_MANIFEST_SIZE;

fn hosted_repo(ctx: &Ctx<'_>, name: &str) -> Result<String, OciError> {
    match ctx.resolve(name)? {
        Target::Hosted { repo } => Ok(repo),
        Target::Upstream { .. } => Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "not a hosted repository",
        )),
    }
}

/// A digest from the query, refused as the path's digests are (400 DIGEST_INVALID).
fn parse_digest(s: &str) -> Result<Digest, OciError> {
    Ok(s.parse::<Digest>().map_err(PathError::from)?)
}

fn digest_param(ctx: &Ctx<'_>) -> Result<Option<Digest>, OciError> {
    ctx.query("digest").as_deref().map(parse_digest).transpose()
}

fn created(name: &str, digest: &Digest) -> HttpResponse {
    HttpResponse::Created()
        .insert_header(API_VERSION)
        .insert_header((header::LOCATION, format!("/v2/{name}/blobs/{digest}")))
        .insert_header(("Docker-Content-Digest", digest.to_string()))
        .finish()
}

fn in_progress(status: StatusCode, name: &str, id: &str, offset: u64) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(API_VERSION)
        .insert_header((header::LOCATION, format!("/v2/{name}/blobs/uploads/{id}")))
        .insert_header((header::RANGE, reply::upload_range(offset)))
        .insert_header(("Docker-Upload-UUID", id))
        .finish()
}

/// `POST .../blobs/uploads/`: mount (`?mount=&from=`), monolithic (`?digest=`), or start.
pub async fn upload_start(
    ctx: &Ctx<'_>,
    name: &str,
    body: web::Payload,
) -> Result<HttpResponse, OciError> {
    let repo = hosted_repo(ctx, name)?;
    ctx.note(ctx.hosted_prefix(), "upload", None);
    if let (Some(mount), Some(from)) = (ctx.query("mount"), ctx.query("from")) {
        let d = parse_digest(&mount)?;
        if let Ok(from) = super::path::valid_name(&from) {
            let source = ctx.resolve(&from)?;
            let ns = source.namespace(ctx.hosted_prefix());
            if ctx.svc.mount_blob(&repo, &d, ns, source.repo()).await? {
                return Ok(created(name, &d));
            }
        }
    }
    // Checked before a session (and its file) exists, so a bad digest leaks nothing.
    let digest = digest_param(ctx)?;
    let status = ctx.svc.upload_start(&repo, ctx.caller.name()).await?;
    if let Some(d) = digest {
        let owner = ctx.caller.name();
        ctx.svc
            .upload_finish(&repo, &status.id, owner, &d, body)
            .await?;
        return Ok(created(name, &d));
    }
    Ok(in_progress(StatusCode::ACCEPTED, name, &status.id, 0))
}

pub async fn upload_status(ctx: &Ctx<'_>, name: &str, id: &str) -> Result<HttpResponse, OciError> {
    let repo = hosted_repo(ctx, name)?;
    let s = ctx.svc.upload_status(&repo, id, ctx.caller.name()).await?;
    Ok(in_progress(StatusCode::NO_CONTENT, name, id, s.offset))
}

/// `PATCH`: one chunk; `Content-Range: <start>-<end>` must continue the upload.
pub async fn upload_patch(
    ctx: &Ctx<'_>,
    name: &str,
    id: &str,
    body: web::Payload,
) -> Result<HttpResponse, OciError> {
    let repo = hosted_repo(ctx, name)?;
    ctx.note(ctx.hosted_prefix(), "upload", None);
    let range = ctx
        .header(header::CONTENT_RANGE)
        .map(content_range)
        .transpose()?;
    let s = ctx
        .svc
        .upload_append(&repo, id, ctx.caller.name(), range, body)
        .await?;
    Ok(in_progress(StatusCode::ACCEPTED, name, id, s.offset))
}

/// `Content-Range: <start>-<end>` (inclusive) of a chunk.
fn content_range(v: &str) -> Result<(u64, u64), OciError> {
    let v = v
        .trim()
        .trim_start_matches("bytes ")
        .trim_start_matches("bytes=");
    let parsed = v.split_once('-').and_then(|(a, b)| {
        let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        (b >= a).then_some((a, b))
    });
    parsed.ok_or_else(|| {
        OciError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "BLOB_UPLOAD_INVALID",
            format!("bad Content-Range {v:?}"),
        )
    })
}

/// `PUT ...?digest=`: the last bytes (if any), verified, committed.
pub async fn upload_put(
    ctx: &Ctx<'_>,
    name: &str,
    id: &str,
    body: web::Payload,
) -> Result<HttpResponse, OciError> {
    let repo = hosted_repo(ctx, name)?;
    ctx.note(ctx.hosted_prefix(), "upload", None);
    let d = digest_param(ctx)?.ok_or_else(|| {
        OciError::new(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            "digest query parameter required",
        )
    })?;
    ctx.svc
        .upload_finish(&repo, id, ctx.caller.name(), &d, body)
        .await?;
    Ok(created(name, &d))
}

pub async fn upload_cancel(ctx: &Ctx<'_>, name: &str, id: &str) -> Result<HttpResponse, OciError> {
    let repo = hosted_repo(ctx, name)?;
    ctx.svc.upload_cancel(&repo, id, ctx.caller.name()).await?;
    Ok(HttpResponse::NoContent()
        .insert_header(API_VERSION)
        .finish())
}

pub async fn put_manifest(
    ctx: &Ctx<'_>,
    name: &str,
    reference: &Reference,
    body: web::Payload,
) -> Result<HttpResponse, OciError> {
    let repo = hosted_repo(ctx, name)?;
    ctx.note(ctx.hosted_prefix(), "manifest", None);
    let too_large = || {
        OciError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "MANIFEST_INVALID",
            format!("manifest exceeds {MAX_MANIFEST_SIZE} bytes"),
        )
    };
    let bytes = body
        .to_bytes_limited(MAX_MANIFEST_SIZE)
        .await
        .map_err(|_| too_large())?
        .map_err(|e| OciError::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", e.to_string()))?;
    let content_type = ctx.header(header::CONTENT_TYPE);
    let (digest, subject) = ctx
        .svc
        .put_manifest(&repo, reference, content_type, bytes)
        .await?;
    let mut resp = HttpResponse::Created();
    resp.insert_header(API_VERSION)
        .insert_header((header::LOCATION, format!("/v2/{name}/manifests/{digest}")))
        .insert_header(("Docker-Content-Digest", digest.to_string()));
    if let Some(s) = subject {
        resp.insert_header(("OCI-Subject", s.to_string()));
    }
    Ok(resp.finish())
}

pub async fn delete_manifest(
    ctx: &Ctx<'_>,
    name: &str,
    reference: &Reference,
) -> Result<HttpResponse, OciError> {
    let repo = hosted_repo(ctx, name)?;
    ctx.note(ctx.hosted_prefix(), "manifest", None);
    ctx.svc.delete_manifest(&repo, reference).await?;
    Ok(HttpResponse::Accepted().insert_header(API_VERSION).finish())
}

pub async fn delete_blob(
    ctx: &Ctx<'_>,
    name: &str,
    digest: &Digest,
) -> Result<HttpResponse, OciError> {
    let repo = hosted_repo(ctx, name)?;
    ctx.svc.delete_blob(&repo, digest).await?;
    Ok(HttpResponse::Accepted().insert_header(API_VERSION).finish())
}
