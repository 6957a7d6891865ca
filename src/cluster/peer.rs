//! Asking a peer for a blob: `GET <peer>/_entrepot/peer/blob?upstream=&repo=&digest=`,
//! authenticated with the cluster secret, resumed at an offset with `Range`.

use bytes::Bytes;
use futures_util::stream::{LocalBoxStream, StreamExt};

use super::Cluster;
use crate::names::Digest;

/// The header that carries the cluster secret on peer requests.
pub const PEER_SECRET_HEADER: &str = "x-entrepot-cluster";

/// A peer's answer: the blob's full size when known, and its bytes from the asked offset.
pub struct PeerBody {
    pub size: Option<u64>,
    pub body: LocalBoxStream<'static, Result<Bytes, String>>,
}

/// A peer's manifest: bytes, Content-Type and Docker-Content-Digest.
pub struct PeerManifest {
    pub bytes: Bytes,
    pub media_type: Option<String>,
    pub digest: Option<Digest>,
}

/// Manifests above this size are refused (as from an upstream).
const MAX_MANIFEST: usize = 4 << 20;

impl Cluster {
    /// Manifest `reference` of `upstream`/`repo` from `peer`.
    pub async fn fetch_manifest(
        &self,
        peer: &str,
        upstream: &str,
        repo: &str,
        reference: &str,
    ) -> Result<PeerManifest, String> {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("upstream", upstream)
            .append_pair("repo", repo)
            .append_pair("reference", reference)
            .finish();
        let sent = self
            .client(self.timeout)
            .get(format!("{peer}/_entrepot/peer/manifest?{query}"))
            .insert_header((PEER_SECRET_HEADER, self.secret.as_str()))
            .send()
            .await;
        let result = match sent {
            Ok(mut r) if r.status().is_success() => {
                let header = |n: &str| {
                    r.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let media_type = header("content-type");
                let digest = header("docker-content-digest").and_then(|d| d.parse().ok());
                r.body()
                    .limit(MAX_MANIFEST)
                    .await
                    .map(|bytes| PeerManifest {
                        bytes,
                        media_type,
                        digest,
                    })
                    .map_err(|e| format!("peer {peer}: {e}"))
            }
            Ok(r) => Err(format!("peer {peer}: status {}", r.status())),
            Err(e) => Err(format!("peer {peer}: {e}")),
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .peer_requests
            .with_label_values(&["out", label])
            .inc();
        result
    }

    /// Blob `d` of `upstream`/`repo` from `peer`, from byte `from` on. Errors are strings
    /// for the log: the caller moves on to the next peer in rank.
    pub async fn fetch_blob(
        &self,
        peer: &str,
        upstream: &str,
        repo: &str,
        d: &Digest,
        from: u64,
    ) -> Result<PeerBody, String> {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("upstream", upstream)
            .append_pair("repo", repo)
            .append_pair("digest", &d.to_string())
            .finish();
        let mut req = self
            .client(self.timeout)
            .get(format!("{peer}/_entrepot/peer/blob?{query}"))
            .insert_header((PEER_SECRET_HEADER, self.secret.as_str()));
        if from > 0 {
            req = req.insert_header(("range", format!("bytes={from}-")));
        }
        let result = req.send().await;
        let counted = |r: &str| {
            self.metrics
                .peer_requests
                .with_label_values(&["out", r])
                .inc();
        };
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                counted("error");
                return Err(format!("peer {peer}: {e}"));
            }
        };
        let status = resp.status().as_u16();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let size = match (status, from) {
            (200, 0) => header("content-length").and_then(|v| v.parse().ok()),
            // `bytes a-b/total`: must start where this replica stopped.
            (206, _) => {
                let cr = header("content-range").unwrap_or_default();
                let (range, total) = cr.rsplit_once('/').unwrap_or_default();
                let start = range.trim_start_matches("bytes ").split('-').next();
                if start.and_then(|s| s.parse::<u64>().ok()) != Some(from) {
                    counted("error");
                    return Err(format!(
                        "peer {peer}: Content-Range {cr:?} for bytes={from}-"
                    ));
                }
                total.parse().ok()
            }
            _ => {
                counted(if status == 404 { "not_found" } else { "error" });
                return Err(format!("peer {peer}: status {status}"));
            }
        };
        counted("ok");
        let peer = peer.to_string();
        let body = resp
            .map(move |c| c.map_err(|e| format!("peer {peer}: {e}")))
            .boxed_local();
        Ok(PeerBody { size, body })
    }
}
