//! Fills led through the blob's owner in the cluster: the owner does the one upstream
//! fetch and streams it to every replica that asks; if it is down or dies mid-stream, the
//! next peer in rank takes over and this replica goes on from the byte it reached.

use futures_util::StreamExt;

use super::fill::Fill;
use super::fill::Pumped;
use super::flight::Lead;
use super::{ServiceError, Services};
use crate::names::Digest;
use crate::services::{ahead, fill};
use crate::store::BlobWriter;
use crate::upstream::Upstream;

/// One source of a fill: its full size (when known) and its bytes from an offset.
type Source = (
    Option<u64>,
    futures_util::stream::LocalBoxStream<'static, Result<bytes::Bytes, String>>,
);

impl Services {
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
        let (total, body) = fill::relay_from(self, up, repo, d, from).await?;
        Ok((
            total,
            body.map(|c| c.map_err(|e| e.to_string())).boxed_local(),
        ))
    }
}

/// The ranked peers for `key` when another replica owns it and a request may be sent
/// there (not with a client's own credentials: the owner fetches with the mirror's).
pub(super) fn ranked_elsewhere(svc: &Services, up: &Upstream, key: &str) -> Option<Vec<String>> {
    let cluster = svc.mirror.cluster.as_ref()?;
    if up.client.is_some() {
        return None;
    }
    let ranked = cluster.rank(key);
    (!cluster.is_me(ranked.first()?)).then_some(ranked)
}

/// The ranked peers for `d` when another replica owns it and this request may be sent
/// there: not with a client's own credentials (the owner would fetch with the
/// mirror's), not without a cluster.
pub(super) fn owners(svc: &Services, up: &Upstream, d: &Digest) -> Option<Vec<String>> {
    ranked_elsewhere(svc, up, &d.to_string())
}

/// Fills `d` from the first peer in `ranked` that serves it, going on from the byte
/// reached with the next one whenever a source fails; reaching this replica in the
/// ranking means fetching from the upstream itself.
pub(super) async fn fill_via_peers(
    svc: &Services,
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
        let me = svc.mirror.cluster.as_ref().is_some_and(|c| c.is_me(peer));
        let opened = if me {
            svc.open_upstream(up, repo, d, from).await
        } else {
            svc.open_peer(peer, up, repo, d, from).await
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
            None => match fill::begin_fill(svc, lead, d, size, Some(up))? {
                Some(w) => w,
                None => return Ok(()),
            },
        };
        let source = if me {
            format!("upstream {}", up.name)
        } else {
            format!("peer {peer}")
        };
        match fill::pump(svc, lead, d, writer, body, &source, size, Some(up)).await? {
            // A peer that dies may just close its connection: a body shorter than
            // the blob is a broken source, not the end.
            Pumped::Done(short) if size.is_some_and(|s| short.written() < s) => {
                tracing::warn!(%peer, digest = %d, at = short.written(), "source ended early; going on from the next peer in rank");
                last_error = format!("{source} ended at byte {}", short.written());
                w = Some(short);
            }
            Pumped::Done(done) => {
                fill::finish_fill(svc, lead, up, repo, d, done, size, from_upstream).await?;
                ahead::check(svc, d).await;
                return Ok(());
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
