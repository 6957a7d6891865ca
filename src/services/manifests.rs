//! Manifests: by digest from the store forever; by tag from the store within the
//! upstream's `tag_ttl`, then revalidated with a HEAD (which Docker Hub does not count
//! against pull limits); served stale when the upstream is down.

use std::sync::Arc;

use actix_web::http::{header, Method};
use bytes::Bytes;

use super::flight::Join;
use super::{content_length, ServiceError, Services, Source};
use crate::auth::Caller;
use crate::media::{Accepted, UPSTREAM_ACCEPT};
use crate::names::{Digest, Reference};
use crate::store::{ManifestLink, TagRecord};
use crate::upstream::{UpRequest, Upstream};

/// Largest manifest accepted, from upstream or client (Distribution's limit too).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

pub struct ManifestReply {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// `None` for HEAD.
    pub body: Option<Bytes>,
    pub source: Source,
}

/// A manifest fetched from upstream and stored.
pub struct Fetched {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// The result of a manifest flight, `None` while it runs.
pub type Pending = Option<Result<Arc<Fetched>, Arc<ServiceError>>>;

impl Services {
    pub async fn manifest(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &Reference,
        accepted: Accepted,
        method: &Method,
        caller: &Caller,
    ) -> Result<ManifestReply, ServiceError> {
        let r = self
            .upstream_manifest(up, repo, reference, method, caller)
            .await?;
        negotiate(r, reference, accepted)
    }

    async fn upstream_manifest(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &Reference,
        method: &Method,
        caller: &Caller,
    ) -> Result<ManifestReply, ServiceError> {
        let up = &self
            .upstream_for(up, repo, caller, &format!("manifests/{reference}"))
            .await?;
        let head = method == Method::HEAD;
        let mut stale = None;
        match reference {
            Reference::Digest(d) => {
                if let Some(r) = self.cached_by_digest(&up.name, repo, d, head).await? {
                    return Ok(self.count(up, r));
                }
            }
            Reference::Tag(tag) => {
                if let Some(rec) = self.store().get_tag(&up.name, repo, tag).await? {
                    match self.cached_tag(up, repo, tag, &rec, head).await {
                        Ok(Some(r)) => return Ok(self.count(up, r)),
                        Ok(None) => {}
                        Err(e) if e.allows_stale() => stale = Some((rec, e)),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if let Some((rec, e)) = stale {
            return self.serve_stale(up, &rec, head, e).await;
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
        let r = self.fetch_uncached(up, repo, reference, head).await;
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
        let f = self.fetch_coalesced(up, repo, reference, true).await?;
        Ok(ManifestReply {
            digest: f.digest.clone(),
            media_type: f.media_type.clone(),
            size: f.bytes.len() as u64,
            body: (!head).then(|| f.bytes.clone()),
            source: Source::Upstream,
        })
    }

    fn count(&self, up: &Upstream, r: ManifestReply) -> ManifestReply {
        self.metrics()
            .cache
            .with_label_values(&[&up.name, "manifest", "hit"])
            .inc();
        let _ = self.store().touch(&r.digest);
        r
    }

    async fn serve_stale(
        &self,
        up: &Upstream,
        rec: &TagRecord,
        head: bool,
        e: ServiceError,
    ) -> Result<ManifestReply, ServiceError> {
        match self
            .stored_reply(&rec.digest()?, &rec.media_type, head, Source::Stale)
            .await?
        {
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

    pub(super) async fn cached_by_digest(
        &self,
        ns: &str,
        repo: &str,
        d: &Digest,
        head: bool,
    ) -> Result<Option<ManifestReply>, ServiceError> {
        match self.store().get_manifest_link(ns, repo, d).await? {
            Some(link) => {
                self.stored_reply(d, &link.media_type, head, Source::Cache)
                    .await
            }
            None => Ok(None),
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
            if !self.revalidate(up, repo, tag, &d).await? {
                return Ok(None);
            }
            let fresh = TagRecord {
                checked_at: crate::store::now_secs(),
                ..rec.clone()
            };
            self.store().put_tag(&up.name, repo, tag, &fresh).await?;
        }
        self.stored_reply(&d, &rec.media_type, head, Source::Cache)
            .await
    }

    /// Whether the upstream still maps `tag` to `d` (HEAD only).
    async fn revalidate(
        &self,
        up: &Upstream,
        repo: &str,
        tag: &str,
        d: &Digest,
    ) -> Result<bool, ServiceError> {
        let what = format!("manifests/{tag}");
        let resp = self
            .upstream_ok(
                up,
                "manifest",
                manifest_request(Method::HEAD, repo, &what),
                || ServiceError::ManifestUnknown(tag.into()),
            )
            .await?;
        Ok(header_digest(resp.headers()).as_ref() == Some(d))
    }

    pub(super) async fn stored_reply(
        &self,
        d: &Digest,
        media_type: &str,
        head: bool,
        source: Source,
    ) -> Result<Option<ManifestReply>, ServiceError> {
        let (size, body) = if head {
            match self.store().stat(d).await? {
                Some(size) => (size, None),
                None => return Ok(None),
            }
        } else {
            match self.store().read_small(d).await? {
                Some(b) => (b.len() as u64, Some(Bytes::from(b))),
                None => return Ok(None),
            }
        };
        Ok(Some(ManifestReply {
            digest: d.clone(),
            media_type: media_type.to_string(),
            size,
            body,
            source,
        }))
    }

    /// Answers a HEAD from an upstream HEAD; `None` if the upstream gave no digest (then
    /// the caller fetches the manifest to compute it).
    async fn head_manifest(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<ManifestReply>, ServiceError> {
        let what = format!("manifests/{reference}");
        let resp = self
            .upstream_ok(
                up,
                "manifest",
                manifest_request(Method::HEAD, repo, &what),
                || ServiceError::ManifestUnknown(reference.to_string()),
            )
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
            media_type,
            size,
            body: None,
            source: Source::Upstream,
        }))
    }

    /// One upstream GET per (upstream, repo, reference, credential), however many ask;
    /// with `forward`, asked of the reference's owner in the cluster first.
    pub(super) async fn fetch_coalesced(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &Reference,
        forward: bool,
    ) -> Result<Arc<Fetched>, ServiceError> {
        let key = format!(
            "{}\n{repo}\n{reference}\n{}",
            up.name,
            up.client.as_deref().unwrap_or("")
        );
        let mut rx = match self.mirror.manifest_flights.join(key, || None) {
            Join::Leader(lead) => {
                let rx = lead.subscribe();
                let this = self.clone();
                let (up, repo, reference) = (up.clone(), repo.to_string(), reference.clone());
                actix_web::rt::spawn(async move {
                    let r = this.fetch_routed(&up, &repo, &reference, forward).await;
                    lead.tx
                        .send_replace(Some(r.map(Arc::new).map_err(Arc::new)));
                });
                rx
            }
            Join::Follower(rx) => {
                self.metrics()
                    .coalesced
                    .with_label_values(&["manifest"])
                    .inc();
                rx
            }
        };
        let done = rx.wait_for(Option::is_some).await.map_err(|_| {
            ServiceError::Unavailable("manifest fetch ended without a result".into())
        })?;
        match &*done {
            Some(Ok(f)) => Ok(f.clone()),
            Some(Err(e)) => Err(ServiceError::Shared(e.clone())),
            None => Err(ServiceError::Unavailable(
                "manifest fetch ended without a result".into(),
            )),
        }
    }

    /// The manifest a flight that ended between this request's cache lookup and its join
    /// just stored (a digest linked to the repository, or a tag confirmed within its TTL):
    /// a late request, here or from another replica, must not fetch it again.
    pub(super) async fn just_stored(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<Fetched>, ServiceError> {
        let (digest, media_type) = match reference {
            Reference::Digest(d) => {
                match self.store().get_manifest_link(&up.name, repo, d).await? {
                    Some(link) => (d.clone(), link.media_type),
                    None => return Ok(None),
                }
            }
            Reference::Tag(t) => match self.store().get_tag(&up.name, repo, t).await? {
                Some(rec) if rec.age() < up.tag_ttl => (rec.digest()?, rec.media_type),
                _ => return Ok(None),
            },
        };
        Ok(self.store().read_small(&digest).await?.map(|b| Fetched {
            digest,
            media_type,
            bytes: Bytes::from(b),
        }))
    }

    pub(super) async fn fetch_manifest(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
    ) -> Result<Fetched, ServiceError> {
        let what = format!("manifests/{reference}");
        let mut resp = self
            .upstream_ok(
                up,
                "manifest",
                manifest_request(Method::GET, repo, &what),
                || ServiceError::ManifestUnknown(reference.to_string()),
            )
            .await?;
        if content_length(resp.headers()).is_some_and(|n| n > MAX_MANIFEST_SIZE as u64) {
            return Err(ServiceError::ManifestTooLarge);
        }
        let announced = header_digest(resp.headers());
        let media_type = content_type(resp.headers());
        let bytes = resp
            .body()
            .limit(MAX_MANIFEST_SIZE)
            .await
            .map_err(|e| match e {
                awc::error::PayloadError::Overflow => ServiceError::ManifestTooLarge,
                e => ServiceError::Unavailable(format!("upstream {}: {e}", up.name)),
            })?;
        self.metrics()
            .upstream_bytes
            .with_label_values(&[&up.name])
            .inc_by(bytes.len() as u64);
        let digest = Digest::of(&bytes);
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => announced,
        };
        if let Some(expected) = expected.filter(|e| *e != digest) {
            self.metrics()
                .digest_mismatches
                .with_label_values(&[&up.name])
                .inc();
            tracing::error!(upstream = %up.name, repo, %expected, actual = %digest, "upstream sent a manifest that does not match its digest");
            return Err(ServiceError::DigestMismatch {
                upstream: up.name.clone(),
                expected: expected.to_string(),
                actual: digest.to_string(),
            });
        }
        let media_type = media_type
            .or_else(|| body_media_type(&bytes))
            .unwrap_or_else(|| crate::media::OCI_MANIFEST.into());
        let fetched = Fetched {
            digest,
            media_type,
            bytes,
        };
        self.keep_manifest(up, repo, reference, &fetched).await?;
        Ok(fetched)
    }

    /// Stores a verified manifest, links it to the repository and records the tag.
    async fn keep_manifest(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
        f: &Fetched,
    ) -> Result<(), ServiceError> {
        let listed = repo;
        let (ns, repo) = (up.name.clone(), repo.to_string());
        let (d, bytes) = (f.digest.clone(), f.bytes.clone());
        let link = ManifestLink {
            media_type: f.media_type.clone(),
        };
        let tag = match reference {
            Reference::Tag(t) => Some((
                t.clone(),
                TagRecord {
                    digest: d.to_string(),
                    media_type: f.media_type.clone(),
                    size: bytes.len() as u64,
                    checked_at: crate::store::now_secs(),
                },
            )),
            Reference::Digest(_) => None,
        };
        let s = self.mirror.store.clone();
        super::offload(async move {
            if s.stat(&d).await?.is_none() {
                s.put_small(&d, &bytes).await?;
            }
            s.put_manifest_link(&ns, &repo, &d, &link).await?;
            if let Some((t, rec)) = tag {
                s.put_tag(&ns, &repo, &t, &rec).await?;
            }
            Ok::<_, ServiceError>(())
        })
        .await?;
        self.mirror.list_repo(&up.name, listed).await?;
        self.metrics().store_bytes.set(self.store().size() as i64);
        Ok(())
    }
}

fn manifest_request<'a>(method: Method, repo: &'a str, what: &'a str) -> UpRequest<'a> {
    UpRequest {
        method,
        repo,
        what,
        accept: Some(UPSTREAM_ACCEPT),
        range_from: None,
        primary_only: false,
    }
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

pub(super) fn header_digest(h: &header::HeaderMap) -> Option<Digest> {
    h.get("docker-content-digest")?.to_str().ok()?.parse().ok()
}

pub(super) fn content_type(h: &header::HeaderMap) -> Option<String> {
    let v = h.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let t = v.split(';').next()?.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// The `mediaType` field of a manifest, or what its shape says it is.
pub(super) fn body_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    p.media_type
        .or_else(|| p.manifests.map(|_| crate::media::OCI_INDEX.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_from_body() {
        assert_eq!(
            body_media_type(br#"{"manifests":[]}"#).as_deref(),
            Some(crate::media::OCI_INDEX)
        );
        assert_eq!(
            body_media_type(br#"{"mediaType":"x"}"#).as_deref(),
            Some("x")
        );
        assert_eq!(body_media_type(b"nope"), None);
    }
}
