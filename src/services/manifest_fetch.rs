//! Fetching a manifest: one upstream GET per (upstream, repository, reference,
//! credential) however many ask, asked of the reference's owner in a cluster first, and
//! the server side of that peer request; the fetched manifest verified and kept.
//! `manifests.rs` decides when to fetch (cached? within the tag TTL? stale?).

use std::sync::Arc;

use actix_web::http::{header, Method};
use bytes::Bytes;

use super::flight::Join;
use super::{content_length, ServiceError, Services};
use crate::auth::Caller;
use crate::cluster::PeerManifest;
use crate::media::UPSTREAM_ACCEPT;
use crate::names::{Digest, Reference};
use crate::services::{peers, private};
use crate::store::{ManifestLink, TagRecord};
use crate::upstream::{UpRequest, Upstream};

/// Largest manifest accepted, from upstream or client (Distribution's limit too).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// A manifest fetched from upstream and stored.
pub struct Fetched {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// The result of a manifest flight, `None` while it runs.
pub type Pending = Option<Result<Arc<Fetched>, Arc<ServiceError>>>;

impl Services {
    /// A manifest for another replica: fetched here (coalesced), never forwarded again.
    pub async fn peer_manifest(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &Reference,
    ) -> Result<Arc<Fetched>, ServiceError> {
        let r = self.peer_manifest_for_anyone(up, repo, reference).await;
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics()
            .peer_requests
            .with_label_values(&["in", result])
            .inc();
        r
    }

    /// As for an anonymous caller (the asking replica sends no client's credentials): a
    /// private repository's manifest only after the upstream confirmed the mirror may read
    /// it, as for blobs.
    async fn peer_manifest_for_anyone(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &Reference,
    ) -> Result<Arc<Fetched>, ServiceError> {
        let probe = private::ProbePath("manifests/", reference);
        let up = private::upstream_for(self, up, repo, &Caller::Anonymous, probe).await?;
        fetch_coalesced(self, &up, repo, reference, false).await
    }

    /// A manifest from the reference's owner (which fetches it once for the cluster and
    /// stores it in the bucket), verified here; from the upstream when this replica is
    /// the owner, or when no peer above it in rank answers.
    pub(super) async fn fetch_routed(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
        forward: bool,
    ) -> Result<Fetched, ServiceError> {
        if let Some(f) = self.just_stored(up, repo, reference).await? {
            return Ok(f);
        }
        let key = format!("manifest {}/{repo}:{reference}", up.name);
        let ranked = peers::ranked_elsewhere(self, up, &key).filter(|_| forward);
        for peer in ranked.unwrap_or_default() {
            let Some(cluster) = &self.mirror.cluster else {
                break;
            };
            if cluster.is_me(&peer) {
                break;
            }
            match cluster
                .fetch_manifest(&peer, &up.name, repo, &reference.to_string())
                .await
            {
                Ok(m) => match verify_fetched(reference, m) {
                    Some(f) => {
                        self.mirror.list_repo(&up.name, repo).await?;
                        return Ok(f);
                    }
                    None => {
                        tracing::warn!(%peer, %reference, "peer sent a manifest that does not match; asking the next")
                    }
                },
                Err(e) => {
                    tracing::warn!(%peer, %reference, error = %e, "peer did not serve the manifest; trying the next")
                }
            }
        }
        self.fetch_manifest(up, repo, reference).await
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
                    Some(link) => (*d, link.media_type),
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
            bytes: b,
        }))
    }

    pub(super) async fn fetch_manifest(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
    ) -> Result<Fetched, ServiceError> {
        let mut resp = ask_manifest(self, up, Method::GET, repo, &reference.to_string()).await?;
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
            Reference::Digest(d) => Some(*d),
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
        let (d, bytes) = (f.digest, f.bytes.clone());
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
        range_to: None,
        primary_only: false,
    }
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

/// A peer's manifest, if its bytes match the digest asked for (or the one it announced).
fn verify_fetched(reference: &Reference, m: PeerManifest) -> Option<Fetched> {
    let digest = Digest::of(&m.bytes);
    let expected = match reference {
        Reference::Digest(d) => Some(*d),
        Reference::Tag(_) => m.digest,
    };
    if expected.is_some_and(|e| e != digest) {
        return None;
    }
    let media_type = m
        .media_type
        .or_else(|| body_media_type(&m.bytes))
        .unwrap_or_else(|| crate::media::OCI_MANIFEST.into());
    Some(Fetched {
        digest,
        media_type,
        bytes: m.bytes,
    })
}

/// `manifests/<reference>` of `repo` upstream with `method`; a non-2xx as the error
/// it means (a 404: this reference is unknown).
pub(super) async fn ask_manifest(
    svc: &Services,
    up: &Upstream,
    method: Method,
    repo: &str,
    reference: &str,
) -> Result<awc::ClientResponse, ServiceError> {
    let what = format!("manifests/{reference}");
    let req = manifest_request(method, repo, &what);
    svc.upstream_ok(up, "manifest", req, || {
        ServiceError::ManifestUnknown(reference.to_string())
    })
    .await
}

/// One upstream GET per (upstream, repo, reference, credential), however many ask;
/// with `forward`, asked of the reference's owner in the cluster first.
pub(super) async fn fetch_coalesced(
    svc: &Services,
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
    let mut rx = match svc.mirror.manifest_flights.join(key, || None) {
        Join::Leader(lead) => {
            let rx = lead.subscribe();
            let this = svc.clone();
            let (up, repo, reference) = (up.clone(), repo.to_string(), reference.clone());
            actix_web::rt::spawn(async move {
                let r = this.fetch_routed(&up, &repo, &reference, forward).await;
                lead.tx
                    .send_replace(Some(r.map(Arc::new).map_err(Arc::new)));
            });
            rx
        }
        Join::Follower(rx) => {
            svc.metrics()
                .coalesced
                .with_label_values(&["manifest"])
                .inc();
            rx
        }
    };
    let done = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| ServiceError::Unavailable("manifest fetch ended without a result".into()))?;
    match &*done {
        Some(Ok(f)) => Ok(f.clone()),
        Some(Err(e)) => Err(ServiceError::Shared(e.clone())),
        None => Err(ServiceError::Unavailable(
            "manifest fetch ended without a result".into(),
        )),
    }
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
