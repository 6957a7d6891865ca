//! Manifests: by digest from the store forever; by tag from the store within the
//! upstream's `tag_ttl`, then revalidated with a HEAD (which Docker Hub does not count
//! against pull limits); served stale when the upstream is down.

use std::sync::Arc;

use actix_web::http::Method;
use bytes::Bytes;

use super::manifest_fetch::{content_type, header_digest};
use super::{content_length, ServiceError, Services, Source};
use crate::auth::Caller;
use crate::media::Accepted;
use crate::names::{Digest, Reference};
use crate::services::{manifest_fetch, private};
use crate::store::TagRecord;
use crate::upstream::Upstream;

pub struct ManifestReply {
    pub digest: Digest,
    /// Shared with the served-manifest memory: a hit copies no string.
    pub media_type: Arc<str>,
    pub size: u64,
    /// `None` for HEAD.
    pub body: Option<Bytes>,
    pub source: Source,
    /// Set when the reply came from the served-manifest memory: how long the same
    /// answer holds (see [`Services::still_served`]).
    pub served: Option<crate::store::Stamp>,
}

impl Services {
    async fn upstream_manifest(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &Reference,
        method: &Method,
        caller: &Caller,
    ) -> Result<ManifestReply, ServiceError> {
        let head = method == Method::HEAD;
        // Callers whose own upstream credentials do not come into play (anonymous, the
        // mirror's users) are all served alike: a manifest served to one of them a moment
        // ago, with nothing changed since, is served again from one lookup.
        let plain = private::served_alike(up, repo, caller)?;
        if plain && !head {
            if let Some((s, stamp)) = self.store().served_manifest(&up.name, repo, reference) {
                let r = ManifestReply {
                    digest: s.digest,
                    media_type: s.media_type.clone(),
                    size: s.body.len() as u64,
                    body: Some(s.body.clone()),
                    source: Source::Cache,
                    served: Some(stamp),
                };
                return Ok(self.count(up, r));
            }
        }
        // Read before anything that a served manifest is made of (see `remember_served`).
        let generation = self.store().served_generation().filter(|_| plain);
        let up = &private::upstream_for(
            self,
            up,
            repo,
            caller,
            private::ProbePath("manifests/", reference),
        )
        .await?;
        let mut stale = None;
        match reference {
            Reference::Digest(d) => {
                if let Some(r) = cached_by_digest(self, &up.name, repo, d, head).await? {
                    self.remember_served(up, repo, reference, &r, None, generation);
                    return Ok(self.count(up, r));
                }
            }
            Reference::Tag(tag) => {
                if let Some(rec) = self.store().get_tag(&up.name, repo, tag).await? {
                    match self.cached_tag(up, repo, tag, &rec, head).await {
                        Ok(Some(r)) => {
                            // Served again from memory until the record's TTL ends.
                            let left = up.tag_ttl.checked_sub(rec.age());
                            if let Some(left) = left.filter(|l| !l.is_zero()) {
                                let until = Some(std::time::Instant::now() + left);
                                self.remember_served(up, repo, reference, &r, until, generation);
                            }
                            return Ok(self.count(up, r));
                        }
                        Ok(None) => {}
                        Err(e) if e.allows_stale() => stale = Some((rec, e)),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if let Some((rec, e)) = stale {
            return Box::pin(self.serve_stale(up, &rec, head, e)).await;
        }
        self.metrics()
            .cache
            .with_label_values(&[&up.name, "manifest", "miss"])
            .inc();
        // A digest the upstream just said it does not have (a digest never changes its
        // mind; a tag may, so tags are always asked).
        let missing = match reference {
            Reference::Digest(d) => Some(super::repo_digest_key(up, repo, d)),
            Reference::Tag(_) => None,
        };
        if missing
            .as_deref()
            .is_some_and(|k| self.mirror.missing.holds(k))
        {
            return Err(ServiceError::ManifestUnknown(reference.to_string()));
        }
        // Boxed, as the other paths that go upstream: the hot path's future (a cached
        // manifest) stays a few hundred bytes instead of kilobytes moved per request.
        let r = Box::pin(self.fetch_uncached(up, repo, reference, head)).await;
        if let (Err(e), Some(k)) = (&r, missing) {
            if matches!(e.root(), ServiceError::ManifestUnknown(_)) {
                self.mirror.missing.remember(k);
            }
        }
        r
    }

    /// An upstream HEAD (for a HEAD) or a coalesced GET, stored.
    async fn fetch_uncached(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &Reference,
        head: bool,
    ) -> Result<ManifestReply, ServiceError> {
        if head {
            if let Some(r) = self.head_manifest(up, repo, reference).await? {
                return Ok(r);
            }
        }
        let f = manifest_fetch::fetch_coalesced(self, up, repo, reference, true).await?;
        Ok(ManifestReply {
            digest: f.digest,
            media_type: f.media_type.as_str().into(),
            size: f.bytes.len() as u64,
            body: (!head).then(|| f.bytes.clone()),
            source: Source::Upstream,
            served: None,
        })
    }

    /// Remembers a GET's reply as served (see `Store::remember_served`); `generation`
    /// is `None` for callers whose own credentials count, and with a bucket.
    fn remember_served(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
        r: &ManifestReply,
        until: Option<std::time::Instant>,
        generation: Option<u64>,
    ) {
        let (Some(g), Some(body)) = (generation, &r.body) else {
            return;
        };
        let served = crate::store::Served {
            digest: r.digest,
            media_type: r.media_type.clone(),
            body: body.clone(),
            until,
        };
        self.store()
            .remember_served(&up.name, repo, reference, served, g);
    }

    /// Whether a reply that came from the served-manifest memory (`ManifestReply::served`)
    /// would be served again as it is: a copy of it may be given while this holds.
    pub fn still_served(&self, stamp: &crate::store::Stamp) -> bool {
        self.store().still_served(stamp)
    }

    /// Whether a request about this repository may be answered from a copy of a served
    /// reply: not when a signature policy covers it (a policy judges every request).
    pub fn may_copy(&self, up: &Upstream, repo: &str) -> bool {
        self.mirror.gate.find(&up.name, repo).is_none()
    }

    /// What an answer given again from a copy of a served reply counts: a hit of its
    /// kind (`manifest`, `blob`) and, for a manifest by tag, the image's pull (as the
    /// usual path does), and the copy's use (`entrepot_prepared_answers_total`).
    pub fn count_served_again(&self, up: &Upstream, repo: &str, kind: &str, by_tag: bool) {
        let m = self.metrics();
        m.inc(&m.cache, &[&up.name, kind, "hit"]);
        m.inc(&m.prepared_answers, &[&up.name, kind]);
        if by_tag {
            self.mirror.inventory.count_pull(&up.name, repo);
        }
    }

    /// Counts a hit. (The use is recorded by [`stored_reply`], which read the bytes.)
    fn count(&self, up: &Upstream, r: ManifestReply) -> ManifestReply {
        let m = self.metrics();
        m.inc(&m.cache, &[&up.name, "manifest", "hit"]);
        r
    }

    async fn serve_stale(
        &self,
        up: &Upstream,
        rec: &TagRecord,
        head: bool,
        e: ServiceError,
    ) -> Result<ManifestReply, ServiceError> {
        let stored =
            stored_reply(self, &rec.digest()?, &rec.media_type, head, Source::Stale).await?;
        match stored.or_else(|| record_reply(rec, head, Source::Stale)) {
            Some(r) => {
                self.metrics()
                    .stale_serves
                    .with_label_values(&[&up.name])
                    .inc();
                tracing::warn!(upstream = %up.name, error = %e, "serving cached tag while the upstream fails");
                Ok(r)
            }
            None => Err(e),
        }
    }

    /// A cached tag, revalidated upstream once its TTL has passed. `Ok(None)`: the tag
    /// moved (or the cache lost the bytes) and must be fetched.
    async fn cached_tag(
        &self,
        up: &Upstream,
        repo: &str,
        tag: &str,
        rec: &TagRecord,
        head: bool,
    ) -> Result<Option<ManifestReply>, ServiceError> {
        let d = rec.digest()?;
        if rec.age() >= up.tag_ttl {
            if !Box::pin(self.revalidate(up, repo, tag, &d)).await? {
                return Ok(None);
            }
            let fresh = TagRecord {
                checked_at: crate::store::now_secs(),
                ..rec.clone()
            };
            self.store().put_tag(&up.name, repo, tag, &fresh).await?;
        }
        let stored = stored_reply(self, &d, &rec.media_type, head, Source::Cache).await?;
        Ok(stored.or_else(|| record_reply(rec, head, Source::Cache)))
    }

    /// Whether the upstream still maps `tag` to `d` (HEAD only).
    async fn revalidate(
        &self,
        up: &Upstream,
        repo: &str,
        tag: &str,
        d: &Digest,
    ) -> Result<bool, ServiceError> {
        let resp = manifest_fetch::ask_manifest(self, up, Method::HEAD, repo, tag).await?;
        Ok(header_digest(resp.headers()).as_ref() == Some(d))
    }

    /// Answers a HEAD from an upstream HEAD; `None` if the upstream gave no digest (then
    /// the caller fetches the manifest to compute it).
    async fn head_manifest(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<ManifestReply>, ServiceError> {
        let resp =
            manifest_fetch::ask_manifest(self, up, Method::HEAD, repo, &reference.to_string())
                .await?;
        let (Some(digest), Some(size), Some(media_type)) = (
            header_digest(resp.headers()),
            content_length(resp.headers()),
            content_type(resp.headers()),
        ) else {
            return Ok(None);
        };
        if let Reference::Tag(tag) = reference {
            // Clients resolve a tag with HEAD, then GET by digest: remember the mapping so
            // the tag still resolves when the upstream is down.
            let rec = TagRecord {
                digest: digest.to_string(),
                media_type: media_type.clone(),
                size,
                checked_at: crate::store::now_secs(),
            };
            self.store().put_tag(&up.name, repo, tag, &rec).await?;
        }
        Ok(Some(ManifestReply {
            digest,
            media_type: media_type.into(),
            size,
            body: None,
            source: Source::Upstream,
            served: None,
        }))
    }
}

/// A manifest through the cache (store, tag TTL, upstream, stale serving), before any
/// policy, pull count or type negotiation: what a client's pull (`pull.rs`) and a
/// policy reading a signature start from.
pub(super) async fn ungated(
    svc: &Services,
    up: &Arc<Upstream>,
    repo: &str,
    reference: &Reference,
    method: &Method,
    caller: &Caller,
) -> Result<ManifestReply, ServiceError> {
    svc.upstream_manifest(up, repo, reference, method, caller)
        .await
}

/// The reply if the client accepts its type; otherwise `404 MANIFEST_UNKNOWN`, as
/// Distribution answers a type mismatch (the manifest stays cached for other clients).
pub(super) fn negotiate(
    r: ManifestReply,
    reference: &Reference,
    accepted: Accepted,
) -> Result<ManifestReply, ServiceError> {
    if accepted.admits(&r.media_type) {
        return Ok(r);
    }
    Err(ServiceError::ManifestUnknown(format!(
        "{reference} is a {}, which the request's Accept header does not list",
        r.media_type
    )))
}

/// A HEAD answered from the tag record alone (digest, type and size), for a tag whose
/// manifest was only ever HEADed: containerd resolving an image it already holds sends
/// nothing else, and must still resolve it while the upstream is down.
fn record_reply(rec: &TagRecord, head: bool, source: Source) -> Option<ManifestReply> {
    if !head || rec.size == 0 || rec.media_type.is_empty() {
        return None;
    }
    Some(ManifestReply {
        digest: rec.digest().ok()?,
        media_type: rec.media_type.as_str().into(),
        size: rec.size,
        body: None,
        source,
        served: None,
    })
}

pub(super) async fn cached_by_digest(
    svc: &Services,
    ns: &str,
    repo: &str,
    d: &Digest,
    head: bool,
) -> Result<Option<ManifestReply>, ServiceError> {
    match svc.store().get_manifest_link(ns, repo, d).await? {
        Some(link) => stored_reply(svc, d, &link.media_type, head, Source::Cache).await,
        None => Ok(None),
    }
}

pub(super) async fn stored_reply(
    svc: &Services,
    d: &Digest,
    media_type: &str,
    head: bool,
    source: Source,
) -> Result<Option<ManifestReply>, ServiceError> {
    // A use is recorded for eviction: `read_small` does when it reads the bytes (from
    // memory, they were read under a second ago); `stat` does not.
    let (size, body) = if head {
        match svc.store().stat(d).await? {
            Some(size) => {
                let _ = svc.store().touch(d);
                (size, None)
            }
            None => return Ok(None),
        }
    } else {
        match svc.store().read_small(d).await? {
            Some(b) => (b.len() as u64, Some(b)),
            None => return Ok(None),
        }
    };
    Ok(Some(ManifestReply {
        digest: *d,
        media_type: media_type.into(),
        size,
        body,
        source,
        served: None,
    }))
}
