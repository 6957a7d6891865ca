//! Fills led through the blob's owner in the cluster: the owner does the one upstream
//! fetch and streams it to every replica that asks; if it is down or dies mid-stream, the
//! next peer in rank takes over and this replica goes on from the byte it reached.

use futures_util::StreamExt;

use std::sync::Arc;

use super::fill::Fill;
use super::fill::Pumped;
use super::flight::Lead;
use super::manifests::{body_media_type, Fetched};
use super::{ServiceError, Services};
use crate::auth::Caller;
use crate::cluster::PeerManifest;
use crate::names::{Digest, Reference};
use crate::store::BlobWriter;
use crate::upstream::Upstream;

/// One source of a fill: its full size (when known) and its bytes from an offset.
type Source = (
    Option<u64>,
    futures_util::stream::LocalBoxStream<'static, Result<bytes::Bytes, String>>,
);

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
        let probe = format!("manifests/{reference}");
        let up = self
            .upstream_for(up, repo, &Caller::Anonymous, &probe)
            .await?;
        self.fetch_coalesced(&up, repo, reference, false).await
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
        let ranked = self.ranked_elsewhere(up, &key).filter(|_| forward);
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

    /// The ranked peers for `key` when another replica owns it and a request may be sent
    /// there (not with a client's own credentials: the owner fetches with the mirror's).
    fn ranked_elsewhere(&self, up: &Upstream, key: &str) -> Option<Vec<String>> {
        let cluster = self.mirror.cluster.as_ref()?;
        if up.client.is_some() {
            return None;
        }
        let ranked = cluster.rank(key);
        (!cluster.is_me(ranked.first()?)).then_some(ranked)
    }

    /// The ranked peers for `d` when another replica owns it and this request may be sent
    /// there: not with a client's own credentials (the owner would fetch with the
    /// mirror's), not without a cluster.
    pub(super) fn owners(&self, up: &Upstream, d: &Digest) -> Option<Vec<String>> {
        self.ranked_elsewhere(up, &d.to_string())
    }

    /// Fills `d` from the first peer in `ranked` that serves it, going on from the byte
    /// reached with the next one whenever a source fails; reaching this replica in the
    /// ranking means fetching from the upstream itself.
    pub(super) async fn fill_via_peers(
        &self,
        lead: &Lead<Digest, Fill>,
        up: &Upstream,
        repo: &str,
        d: &Digest,
        ranked: Vec<String>,
    ) -> Result<(), ServiceError> {
        let mut w: Option<BlobWriter> = None;
        let mut size = None;
        let mut from_upstream = false;
        let mut last_error = String::new();
        for peer in &ranked {
            let from = w.as_ref().map_or(0, |w| w.written());
            let me = self.mirror.cluster.as_ref().is_some_and(|c| c.is_me(peer));
            let opened = if me {
                self.open_upstream(up, repo, d, from).await
            } else {
                self.open_peer(peer, up, repo, d, from).await
            };
            let (total, body) = match opened {
                Ok(s) => s,
                Err(e) if me => return Err(e),
                Err(e) => {
                    tracing::warn!(%peer, digest = %d, error = %e, "peer did not serve the blob; trying the next");
                    last_error = e.to_string();
                    continue;
                }
            };
            from_upstream |= me;
            size = size.or(total);
            let writer = match w.take() {
                Some(w) => w,
                None => match self.begin_fill(lead, d, size, Some(up))? {
                    Some(w) => w,
                    None => return Ok(()),
                },
            };
            let source = if me {
                format!("upstream {}", up.name)
            } else {
                format!("peer {peer}")
            };
            match self
                .pump(lead, d, writer, body, &source, size, Some(up))
                .await?
            {
                // A peer that dies may just close its connection: a body shorter than
                // the blob is a broken source, not the end.
                Pumped::Done(short) if size.is_some_and(|s| short.written() < s) => {
                    tracing::warn!(%peer, digest = %d, at = short.written(), "source ended early; going on from the next peer in rank");
                    last_error = format!("{source} ended at byte {}", short.written());
                    w = Some(short);
                }
                Pumped::Done(done) => {
                    return self
                        .finish_fill(lead, up, repo, d, done, size, from_upstream)
                        .await;
                }
                Pumped::Broke(kept, e) => {
                    tracing::warn!(%peer, digest = %d, at = kept.written(), error = %e, "source broke; going on from the next peer in rank");
                    last_error = e;
                    w = Some(kept);
                }
                Pumped::Full => return Ok(()),
            }
        }
        Err(ServiceError::Unavailable(format!(
            "no peer could serve {d}: {last_error}"
        )))
    }

    async fn open_peer(
        &self,
        peer: &str,
        up: &Upstream,
        repo: &str,
        d: &Digest,
        from: u64,
    ) -> Result<Source, ServiceError> {
        let cluster = self
            .mirror
            .cluster
            .as_ref()
            .ok_or_else(|| ServiceError::Unavailable("no cluster".into()))?;
        let got = cluster
            .fetch_blob(peer, &up.name, repo, d, from)
            .await
            .map_err(ServiceError::Unavailable)?;
        Ok((got.size, got.body))
    }

    /// This replica's own upstream GET of `d` from byte `from` on.
    async fn open_upstream(
        &self,
        up: &Upstream,
        repo: &str,
        d: &Digest,
        from: u64,
    ) -> Result<Source, ServiceError> {
        let (total, body) = self.relay_from(up, repo, d, from).await?;
        Ok((
            total,
            body.map(|c| c.map_err(|e| e.to_string())).boxed_local(),
        ))
    }
}

/// A peer's manifest, if its bytes match the digest asked for (or the one it announced).
fn verify_fetched(reference: &Reference, m: PeerManifest) -> Option<Fetched> {
    let digest = Digest::of(&m.bytes);
    let expected = match reference {
        Reference::Digest(d) => Some(d.clone()),
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
