//! GET/HEAD: manifests, blobs, tags, referrers, catalog.

use actix_web::http::{header, Method, StatusCode};
use actix_web::HttpResponse;
use serde_json::json;

use super::error::OciError;
use super::target::Target;
use super::{prepared, range, reply, Ctx, API_VERSION};
use crate::media::Accepted;
use crate::names::{Digest, Reference};

pub async fn manifest(
    ctx: &Ctx<'_>,
    name: &str,
    reference: &Reference,
) -> Result<HttpResponse, OciError> {
    let head = ctx.method == Method::HEAD;
    let accepted = Accepted::from_lines(
        ctx.req
            .headers()
            .get_all(header::ACCEPT)
            .filter_map(|v| v.to_str().ok()),
    );
    match ctx.resolve(name)? {
        Target::Upstream { upstream, repo } => {
            let r = ctx
                .svc
                .manifest(
                    &upstream,
                    &repo,
                    reference,
                    accepted,
                    &ctx.method,
                    &ctx.caller,
                )
                .await;
            ctx.note(
                &upstream.name,
                "manifest",
                r.as_ref().ok().map(|r| r.source.as_str()),
            );
            let r = r?;
            let (stamp, body) = (r.served, r.body.clone());
            let resp = reply::manifest(r);
            let given = prepared::Given {
                upstream: &upstream,
                repo: &repo,
                kind: "manifest",
                by_tag: matches!(reference, Reference::Tag(_)),
                stamp,
                body: body.map(prepared::Copied::Bytes),
            };
            prepared::keep(ctx.req, ctx.svc, given, &resp);
            Ok(resp)
        }
        Target::Hosted { repo } => {
            ctx.note(ctx.hosted_prefix(), "manifest", Some("hosted"));
            let r = Box::pin(ctx.svc.hosted_manifest(&repo, reference, accepted, head)).await?;
            Ok(reply::manifest(r))
        }
    }
}

pub async fn blob(ctx: &Ctx<'_>, name: &str, digest: &Digest) -> Result<HttpResponse, OciError> {
    // Range is defined for GET only (RFC 9110 §14.2); an If-Range that is not this
    // blob's ETag asks for the whole blob.
    let asked = match ctx.header(header::RANGE) {
        Some(v) if ctx.method == Method::GET && if_range_holds(ctx, digest) => range::parse(v)?,
        _ => range::Asked::Whole,
    };
    let target = ctx.resolve(name)?;
    match asked {
        range::Asked::Whole => {
            let r = fetch(ctx, &target, digest, None, &ctx.method).await?;
            let (stamp, size) = (r.served, r.size);
            let resp = reply::blob(r, digest);
            if let Target::Upstream { upstream, repo } = &target {
                let given = prepared::Given {
                    upstream,
                    repo,
                    kind: "blob",
                    by_tag: false,
                    stamp,
                    body: size.map(prepared::Copied::Sized),
                };
                prepared::keep(ctx.req, ctx.svc, given, &resp);
            }
            Ok(resp)
        }
        range::Asked::One(r) => Ok(reply::blob(
            fetch(ctx, &target, digest, Some(r), &ctx.method).await?,
            digest,
        )),
        range::Asked::Many(parts) => multipart(ctx, &target, digest, &parts).await,
    }
}

/// `If-Range` absent, or naming this blob's ETag (the only validator a blob has).
fn if_range_holds(ctx: &Ctx<'_>, digest: &Digest) -> bool {
    ctx.header(header::IF_RANGE)
        .is_none_or(|v| v.trim() == format!("\"{digest}\""))
}

/// One blob request through the services, for an upstream or a hosted repository.
async fn fetch(
    ctx: &Ctx<'_>,
    target: &Target,
    digest: &Digest,
    range: Option<crate::services::ByteRange>,
    method: &Method,
) -> Result<crate::services::BlobReply, OciError> {
    Ok(match target {
        Target::Upstream { upstream, repo } => {
            let r = ctx
                .svc
                .blob(upstream, repo, digest, range, method, &ctx.caller)
                .await;
            ctx.note(
                &upstream.name,
                "blob",
                r.as_ref().ok().map(|r| r.source.as_str()),
            );
            r?
        }
        Target::Hosted { repo } => {
            ctx.note(ctx.hosted_prefix(), "blob", Some("hosted"));
            ctx.svc
                .hosted_blob(repo, digest, range, *method == Method::HEAD)
                .await?
        }
    })
}

/// Several ranges: `206 multipart/byteranges` with the satisfiable parts, in the order
/// asked (one left: a plain 206). Each part is its own request to the services, so a
/// cold blob's parts follow its fill like single ranges do.
async fn multipart(
    ctx: &Ctx<'_>,
    target: &Target,
    digest: &Digest,
    asked: &[crate::services::ByteRange],
) -> Result<HttpResponse, OciError> {
    let head = fetch(ctx, target, digest, None, &Method::HEAD).await?;
    let Some(size) = head.size else {
        return Ok(reply::blob(
            fetch(ctx, target, digest, None, &ctx.method).await?,
            digest,
        ));
    };
    let parts = range::satisfiable(asked, size);
    match parts.as_slice() {
        [] => Err(crate::services::ServiceError::RangeNotSatisfiable { size }.into()),
        [(s, e)] => {
            let one = crate::services::ByteRange::From(*s, Some(e - 1));
            Ok(reply::blob(
                fetch(ctx, target, digest, Some(one), &ctx.method).await?,
                digest,
            ))
        }
        _ => {
            let mut bodies = Vec::with_capacity(parts.len());
            for (s, e) in &parts {
                let one = crate::services::ByteRange::From(*s, Some(e - 1));
                let r = fetch(ctx, target, digest, Some(one), &ctx.method).await?;
                bodies.push(r.body);
            }
            Ok(reply::multipart(digest, size, &parts, bodies))
        }
    }
}

fn page_params(ctx: &Ctx<'_>) -> Result<(Option<usize>, Option<String>), OciError> {
    let n = match ctx.query("n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            OciError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                "n must be a number",
            )
        })?),
        None => None,
    };
    Ok((n, ctx.query("last")))
}

pub async fn tags(ctx: &Ctx<'_>, name: &str) -> Result<HttpResponse, OciError> {
    let (n, last) = page_params(ctx)?;
    let path = format!("/v2/{name}/tags/list");
    match ctx.resolve(name)? {
        Target::Upstream { upstream, repo } => {
            let query = passthrough_query(ctx.req.query_string());
            let r = ctx
                .svc
                .tags(&upstream, &repo, name, &query, &ctx.caller)
                .await;
            ctx.note(
                &upstream.name,
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
        Target::Hosted { repo } => {
            ctx.note(ctx.hosted_prefix(), "tags", Some("hosted"));
            let page = ctx.svc.hosted_tags(&repo, n, last.as_deref()).await?;
            Ok(reply::page(
                json!({"name": name, "tags": page.items}),
                &page,
                &path,
                n,
            ))
        }
    }
}

pub async fn catalog(ctx: &Ctx<'_>) -> Result<HttpResponse, OciError> {
    let (n, last) = page_params(ctx)?;
    let page = ctx.svc.catalog(n, last.as_deref()).await?;
    Ok(reply::page(
        json!({"repositories": page.items}),
        &page,
        "/v2/_catalog",
        n,
    ))
}

pub async fn referrers(
    ctx: &Ctx<'_>,
    name: &str,
    digest: &Digest,
) -> Result<HttpResponse, OciError> {
    let filter = ctx.query("artifactType");
    let index = match ctx.resolve(name)? {
        Target::Upstream { upstream, repo } => {
            ctx.note(&upstream.name, "referrers", None);
            ctx.svc
                .upstream_referrers(&upstream, &repo, digest, filter.as_deref(), &ctx.caller)
                .await?
        }
        Target::Hosted { repo } => {
            ctx.note(ctx.hosted_prefix(), "referrers", Some("hosted"));
            ctx.svc.referrers(&repo, digest, filter.as_deref()).await?
        }
    };
    let mut resp = HttpResponse::Ok();
    resp.insert_header(API_VERSION)
        .insert_header((header::CONTENT_TYPE, crate::media::OCI_INDEX));
    if filter.is_some() {
        resp.insert_header(("OCI-Filters-Applied", "artifactType"));
    }
    Ok(resp.body(index.to_string()))
}

/// The query without `ns`, for pagination parameters passed upstream.
fn passthrough_query(query: &str) -> String {
    let pairs =
        url::form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k == "n" || k == "last");
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}
