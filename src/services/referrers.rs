//! The OCI 1.1 referrers API for pull-through images: signatures, SBOMs and attestations
//! of an upstream image, from the upstream's referrers API where it has one, else from the
//! referrers tag schema (`sha256-<hex>` tag holding an index), which is what registries
//! without the API (Distribution 2.8, older Harbor, ECR) carry. The index is cached like a
//! tag: served within the upstream's `tag_ttl`, re-asked after it, served stale when the
//! upstream fails.

use std::sync::Arc;

use actix_web::http::{header, Method, StatusCode};
use bytes::Bytes;
use serde_json::{json, Value};

use super::manifest_fetch::MAX_MANIFEST_SIZE;
use super::{ServiceError, Services};
use crate::auth::Caller;
use crate::media::{OCI_INDEX, UPSTREAM_ACCEPT};
use crate::names::Digest;
use crate::services::private;
use crate::store::TagRecord;
use crate::upstream::{UpRequest, Upstream};

impl Services {
    /// The referrers of `subject` in an upstream repository, as an OCI index, filtered
    /// by `artifact_type` when given. No referrers: an empty index.
    pub async fn upstream_referrers(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
        caller: &Caller,
    ) -> Result<Value, ServiceError> {
        let up = &private::upstream_for(
            self,
            up,
            repo,
            caller,
            private::ProbePath("manifests/", subject),
        )
        .await?;
        let cached = self
            .store()
            .get_referrers_index(&up.name, repo, subject)
            .await?;
        let stored = match &cached {
            Some(rec) => self.store().read_small(&rec.digest()?).await?,
            None => None,
        };
        let index = match (&cached, stored) {
            (Some(rec), Some(bytes)) if rec.age() < up.tag_ttl => bytes,
            (_, stored) => match self.fetch_referrers(up, repo, subject).await {
                Ok(bytes) => bytes,
                Err(e) if e.allows_stale() && stored.is_some() => {
                    self.metrics()
                        .stale_serves
                        .with_label_values(&[&up.name])
                        .inc();
                    stored.unwrap_or_default()
                }
                Err(e) => return Err(e),
            },
        };
        Ok(filtered(&index, artifact_type))
    }

    /// Asks the upstream's referrers API, then the fallback tag; stores the answer.
    async fn fetch_referrers(
        &self,
        up: &Upstream,
        repo: &str,
        subject: &Digest,
    ) -> Result<Bytes, ServiceError> {
        let api = format!("referrers/{subject}");
        let bytes = match self.get_index(up, repo, &api, OCI_INDEX).await? {
            Some(b) => b,
            // No referrers API: the referrers tag schema; no such tag, no referrers.
            None => {
                let tag = format!("manifests/sha256-{}", subject.hex());
                match self.get_index(up, repo, &tag, UPSTREAM_ACCEPT).await? {
                    Some(b) => b,
                    None => Bytes::from(empty_index().to_string()),
                }
            }
        };
        let d = Digest::of(&bytes);
        let rec = TagRecord {
            digest: d.to_string(),
            media_type: OCI_INDEX.into(),
            size: bytes.len() as u64,
            checked_at: crate::store::now_secs(),
        };
        let (ns, repo, subject, b) = (up.name.clone(), repo.to_string(), *subject, bytes.clone());
        let s = self.mirror.store.clone();
        super::offload(async move {
            if s.stat(&d).await?.is_none() {
                s.put_small(&d, &b).await?;
            }
            s.put_referrers_index(&ns, &repo, &subject, &rec).await
        })
        .await?;
        Ok(bytes)
    }

    /// GET `what` expecting an image index; `None` when the upstream has none there (404,
    /// or an API it does not implement: 400/405).
    async fn get_index(
        &self,
        up: &Upstream,
        repo: &str,
        what: &str,
        accept: &str,
    ) -> Result<Option<Bytes>, ServiceError> {
        let req = UpRequest {
            method: Method::GET,
            repo,
            what,
            accept: Some(accept),
            range_from: None,
            range_to: None,
            primary_only: false,
        };
        let mut resp = self.upstream(up, "referrers", req).await?;
        let status = resp.status();
        if matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED
        ) {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(super::status_error(
                up,
                repo,
                status,
                ServiceError::ManifestUnknown(what.into()),
            ));
        }
        let bytes = resp
            .body()
            .limit(MAX_MANIFEST_SIZE)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("upstream {}: {e}", up.name)))?;
        let is_index =
            serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| v["manifests"].is_array());
        let json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.contains("json"));
        if !is_index || !json {
            return Ok(None);
        }
        Ok(Some(bytes))
    }
}

/// The digests of `subject`'s referrers of `artifact_type` in an upstream repository
/// (a policy looking for cosign's OCI 1.1 signatures), read as clients read them.
pub(super) async fn of_type(
    svc: &Services,
    up: &Arc<Upstream>,
    repo: &str,
    subject: &Digest,
    artifact_type: &str,
    caller: &Caller,
) -> Result<Vec<Digest>, ServiceError> {
    let index = svc
        .upstream_referrers(up, repo, subject, Some(artifact_type), caller)
        .await?;
    Ok(index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["digest"].as_str()?.parse().ok())
        .collect())
}

fn empty_index() -> Value {
    json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
}

/// `index` with only the descriptors of `artifact_type` (all when `None`); an unreadable
/// index counts as empty.
fn filtered(index: &[u8], artifact_type: Option<&str>) -> Value {
    let mut v: Value = serde_json::from_slice(index).unwrap_or_else(|_| empty_index());
    if let (Some(t), Some(list)) = (artifact_type, v["manifests"].as_array_mut()) {
        list.retain(|m| m["artifactType"] == t);
    }
    v["mediaType"] = json!(OCI_INDEX);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_by_artifact_type() {
        let index = json!({"schemaVersion": 2, "manifests": [
            {"digest": "sha256:a", "artifactType": "application/x-sig"},
            {"digest": "sha256:b", "artifactType": "application/x-sbom"},
        ]})
        .to_string();
        let v = filtered(index.as_bytes(), Some("application/x-sig"));
        assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["mediaType"], OCI_INDEX);
        assert_eq!(
            filtered(index.as_bytes(), None)["manifests"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        assert_eq!(filtered(b"junk", None), empty_index());
    }
}
