//! Prepared answers: a worker's copies of the answers it gave anonymous manifest GETs
//! and blob HEADs from the served memory, given again to the same request without
//! parsing, routing or asking the services, for exactly as long as the served entry
//! they copy holds (`Services::still_served`: nothing changed in the memory, under a
//! second old, within a tag's TTL).
//!
//! Why: nodes pull the same manifests anonymously, over and over, and a cached manifest
//! answer spent about a microsecond of CPU on steps whose outcome cannot have changed
//! (measured with perf; issue 28's goal is static-file speed).
//!
//! Two requests are the same when both are GETs (or both HEADs) without an
//! `Authorization` header, with the same path and query and the same `Accept` lines. Everything else the answer
//! depends on is the mirror's configuration, which does not change while it runs: the
//! route, the upstream's repository filter, whether anonymous callers may pull, and
//! that no signature policy covers the repository (a policy judges every request, so
//! those answers are never copied).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use actix_web::body::BoxBody;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse};

use super::logging::RequestInfo;
use super::reply;
use crate::services::Services;
use crate::store::Stamp;
use crate::upstream::Upstream;

/// Answers a worker keeps at most; past it the ones that no longer hold are dropped,
/// then all (a request only ever costs the usual path).
const MAX_PREPARED: usize = 64;

/// Largest manifest copied (most are a few KB): with [`MAX_PREPARED`], at most 1 MiB per
/// worker (workers are one per core), and usually the same bytes as the served memory's
/// (shared, not copied).
const MAX_BODY: usize = 16 * 1024;

/// The body of a copied answer.
#[derive(Clone)]
pub(super) enum Copied {
    /// A manifest's bytes.
    Bytes(Bytes),
    /// A HEAD's: no bytes, their length.
    Sized(u64),
}

struct Prepared {
    body: Copied,
    headers: Vec<(HeaderName, HeaderValue)>,
    upstream: Arc<Upstream>,
    repo: String,
    /// What the usual path counts it as (`manifest`, `blob`).
    kind: &'static str,
    by_tag: bool,
    stamp: Stamp,
}

thread_local! {
    static PREPARED: RefCell<HashMap<Box<[u8]>, Prepared, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
    /// The key of the request at hand, built here (no allocation per request).
    static KEY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A request that may be answered from a copy: a GET or HEAD without credentials.
fn eligible(req: &HttpRequest) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.headers().contains_key(header::AUTHORIZATION)
}

/// Runs `f` with the request's key: method, path and query, then each `Accept` line.
fn with_key<R>(req: &HttpRequest, f: impl FnOnce(&[u8]) -> R) -> R {
    KEY.with_borrow_mut(|k| {
        k.clear();
        k.extend_from_slice(req.method().as_str().as_bytes());
        k.push(b' ');
        let uri = req.uri();
        let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        k.extend_from_slice(path.as_bytes());
        for v in req.headers().get_all(header::ACCEPT) {
            k.push(b'\n');
            k.extend_from_slice(v.as_bytes());
        }
        f(k)
    })
}

/// The prepared answer to `req`, if one holds; counted and noted as the usual path
/// would (a cache hit of its upstream, a pull by tag).
pub(super) fn answer(req: &HttpRequest, svc: &Services) -> Option<HttpResponse> {
    if !eligible(req) {
        return None;
    }
    let (resp, upstream, repo, kind, by_tag) = with_key(req, |key| {
        PREPARED.with_borrow_mut(|m| {
            let p = m.get(key)?;
            if !svc.still_served(&p.stamp) {
                m.remove(key);
                return None;
            }
            let body = match &p.body {
                Copied::Bytes(b) => BoxBody::new(b.clone()),
                Copied::Sized(len) => reply::empty_sized(*len),
            };
            let mut resp = HttpResponse::with_body(StatusCode::OK, body);
            let headers = resp.headers_mut();
            for (name, value) in &p.headers {
                headers.insert(name.clone(), value.clone());
            }
            let up = p.upstream.clone();
            Some((resp, up, p.repo.clone(), p.kind, p.by_tag))
        })
    })?;
    svc.count_served_again(&upstream, &repo, kind, by_tag);
    RequestInfo::note(req, kind, |i| {
        i.upstream.push_str(&upstream.name);
        i.cache = "hit";
    });
    Some(resp)
}

/// What a copy is made of: the answer given, and what the usual path counted it under.
pub(super) struct Given<'a> {
    pub upstream: &'a Arc<Upstream>,
    pub repo: &'a str,
    /// What the usual path counts it as: `manifest` or `blob`.
    pub kind: &'static str,
    pub by_tag: bool,
    /// Set when the answer came from the served memory.
    pub stamp: Option<Stamp>,
    pub body: Option<Copied>,
}

/// Keeps a copy of the answer `resp` to `req` when it may be given again (see the
/// module's doc).
pub(super) fn keep(req: &HttpRequest, svc: &Services, given: Given<'_>, resp: &HttpResponse) {
    let (Some(stamp), Some(body)) = (given.stamp, given.body) else {
        return;
    };
    // A copy answers the method it was made for: bytes a GET, a length a HEAD (a
    // blob GET's length alone would answer a GET with no body).
    let fits = match (&body, req.method()) {
        (Copied::Bytes(b), &Method::GET) => b.len() <= MAX_BODY,
        (Copied::Sized(_), &Method::HEAD) => true,
        _ => false,
    };
    if !fits || !eligible(req) || !svc.may_copy(given.upstream, given.repo) {
        return;
    }
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let p = Prepared {
        body,
        headers,
        upstream: given.upstream.clone(),
        repo: given.repo.to_string(),
        kind: given.kind,
        by_tag: given.by_tag,
        stamp,
    };
    with_key(req, |key| {
        PREPARED.with_borrow_mut(|m| {
            if m.len() >= MAX_PREPARED {
                m.retain(|_, p| svc.still_served(&p.stamp));
            }
            if m.len() >= MAX_PREPARED {
                m.clear();
            }
            m.insert(key.into(), p);
        })
    });
}
