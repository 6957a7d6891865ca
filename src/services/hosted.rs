//! Hosted repositories: a read-write registry under one prefix, in the same store as the
//! cache (a pushed layer equal to a cached one is stored once).

use bytes::Bytes;
use serde_json::json;

use super::blob_reply::{BlobReply, ByteRange};
use super::manifest_fetch::MAX_MANIFEST_SIZE;
use super::manifest_refs::parse_manifest;
use super::manifests::{negotiate, ManifestReply};
use super::page::{paginate, Page};
use super::uploads::{UploadLimits, Uploads};
use super::{ServiceError, Services, Source};
use crate::media::{Accepted, OCI_INDEX};
use crate::names::{Digest, Reference};
use crate::services::{fill, manifests, policy};
use crate::store::{ManifestLink, TagRecord};

/// The hosted prefix and its upload sessions.
pub struct Hosted {
    pub prefix: String,
    pub uploads: Uploads,
}

impl Hosted {
    pub fn new(cfg: &crate::config::HostedConfig) -> Hosted {
        Hosted {
            prefix: cfg.prefix.clone(),
            uploads: Uploads::new(UploadLimits {
                ttl: cfg.upload_ttl,
                max_total: cfg.max_uploads,
                max_per_user: cfg.max_uploads_per_user,
                body_timeout: cfg.body_timeout,
            }),
        }
    }
}

impl Services {
    pub async fn hosted_manifest(
        &self,
        repo: &str,
        reference: &Reference,
        accepted: Accepted,
        head: bool,
    ) -> Result<ManifestReply, ServiceError> {
        let ns = &self.hosted()?.prefix;
        let found = match reference {
            Reference::Digest(d) => manifests::cached_by_digest(self, ns, repo, d, head).await?,
            Reference::Tag(t) => match self.store().get_tag(ns, repo, t).await? {
                Some(rec) => {
                    manifests::stored_reply(
                        self,
                        &rec.digest()?,
                        &rec.media_type,
                        head,
                        Source::Cache,
                    )
                    .await?
                }
                None => None,
            },
        };
        let r = found.ok_or_else(|| ServiceError::ManifestUnknown(reference.to_string()))?;
        let origin = policy::Origin::Hosted;
        policy::check_manifest(self, origin, repo, reference, &r).await?;
        if let Reference::Tag(_) = reference {
            self.mirror.inventory.count_pull(ns, repo);
        }
        negotiate(r, reference, accepted)
    }

    pub async fn hosted_blob(
        &self,
        repo: &str,
        d: &Digest,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<BlobReply, ServiceError> {
        let ns = &self.hosted()?.prefix;
        if !head {
            policy::check_blob(self, ns, repo, d)?;
        }
        match self.store().stat(d).await? {
            Some(size) if self.store().blob_linked(ns, repo, d).await? => {
                fill::stored(self, d, size, range, head).await
            }
            _ => Err(ServiceError::BlobUnknown(d.to_string())),
        }
    }

    pub async fn hosted_tags(
        &self,
        repo: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Page, ServiceError> {
        let ns = &self.hosted()?.prefix;
        let tags = self.store().list_tags(ns, repo).await?;
        if tags.is_empty() && !self.store().repo_exists(ns, repo).await? {
            return Err(ServiceError::NameUnknown(repo.into()));
        }
        Ok(paginate(&tags, n, last))
    }

    /// Stores a pushed manifest after checking that everything it references is in the
    /// repository; returns its digest and the subject it refers to, if any.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(Digest, Option<Digest>), ServiceError> {
        let ns = self.hosted()?.prefix.clone();
        if body.len() > MAX_MANIFEST_SIZE {
            return Err(ServiceError::ManifestTooLarge);
        }
        let digest = Digest::of(&body);
        if let Reference::Digest(d) = reference {
            if *d != digest {
                return Err(ServiceError::DigestInvalid(format!(
                    "body hashes to {digest}, not {d}"
                )));
            }
        }
        let parsed = parse_manifest(content_type, &body)?;
        for b in &parsed.blobs {
            if !self.store().blob_linked(&ns, repo, b).await?
                || self.store().stat(b).await?.is_none()
            {
                return Err(ServiceError::ManifestBlobUnknown(b.to_string()));
            }
        }
        for m in &parsed.manifests {
            if self
                .store()
                .get_manifest_link(&ns, repo, m)
                .await?
                .is_none()
            {
                return Err(ServiceError::ManifestBlobUnknown(m.to_string()));
            }
        }
        let desc = json!({
            "mediaType": parsed.media_type, "digest": digest.to_string(), "size": body.len(),
            "artifactType": parsed.artifact_type, "annotations": parsed.annotations,
        });
        let listed = repo.to_string();
        let (repo, d, subject) = (repo.to_string(), digest, parsed.subject);
        let tag = match reference {
            Reference::Tag(t) => Some(t.clone()),
            Reference::Digest(_) => None,
        };
        let s = self.mirror.store.clone();
        super::offload(async move {
            let _lock = s.lock_linking().await?;
            if s.stat(&d).await?.is_none() {
                s.put_small(&d, &body).await?;
            }
            let link = ManifestLink {
                media_type: parsed.media_type.clone(),
            };
            s.put_manifest_link(&ns, &repo, &d, &link).await?;
            if let Some(t) = tag {
                let rec = TagRecord {
                    digest: d.to_string(),
                    media_type: parsed.media_type,
                    size: body.len() as u64,
                    checked_at: crate::store::now_secs(),
                };
                s.put_tag(&ns, &repo, &t, &rec).await?;
            }
            if let Some(subject) = &parsed.subject {
                s.put_referrer(&ns, &repo, subject, &d, &desc).await?;
            }
            Ok::<_, ServiceError>(())
        })
        .await?;
        // A signature pushed here (cosign's tag, or a referrer) counts at once.
        if let Some(s) = &subject {
            policy::signature_added(self, &listed, s);
        }
        if let Reference::Tag(t) = reference {
            if let Some(signed) = crate::policy::cosign::signed_by_tag(t) {
                policy::signature_added(self, &listed, &signed);
            }
        }
        self.mirror.catalog.add(&self.hosted()?.prefix, &listed);
        self.metrics().store_bytes.set(self.store().size() as i64);
        Ok((digest, subject))
    }

    /// Deletes a tag, or a manifest with every tag that points to it.
    pub async fn delete_manifest(
        &self,
        repo: &str,
        reference: &Reference,
    ) -> Result<(), ServiceError> {
        let ns = self.hosted()?.prefix.clone();
        let store = self.store();
        let found = match reference {
            Reference::Tag(t) => store.delete_tag(&ns, repo, t).await?,
            Reference::Digest(d) => {
                let Some(link) = store.get_manifest_link(&ns, repo, d).await? else {
                    return Err(ServiceError::ManifestUnknown(d.to_string()));
                };
                for t in store.list_tags(&ns, repo).await? {
                    if store
                        .get_tag(&ns, repo, &t)
                        .await?
                        .is_some_and(|r| r.digest == d.to_string())
                    {
                        store.delete_tag(&ns, repo, &t).await?;
                    }
                }
                if let Some(bytes) = store.read_small(d).await? {
                    if let Some(subject) = parse_manifest(Some(&link.media_type), &bytes)
                        .ok()
                        .and_then(|p| p.subject)
                    {
                        store.delete_referrer(&ns, repo, &subject, d).await?;
                    }
                }
                store.delete_manifest_link(&ns, repo, d).await?
            }
        };
        if !found {
            return Err(ServiceError::ManifestUnknown(reference.to_string()));
        }
        Ok(())
    }

    pub async fn delete_blob(&self, repo: &str, d: &Digest) -> Result<(), ServiceError> {
        let ns = &self.hosted()?.prefix;
        if !self.store().unlink_blob(ns, repo, d).await? {
            return Err(ServiceError::BlobUnknown(d.to_string()));
        }
        Ok(())
    }

    /// The OCI referrers API: an image index of the manifests whose subject is `d`.
    pub async fn referrers(
        &self,
        repo: &str,
        d: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<serde_json::Value, ServiceError> {
        let ns = &self.hosted()?.prefix;
        let all = self.store().list_referrers(ns, repo, d).await?;
        let manifests: Vec<_> = all
            .into_iter()
            .filter(|m| artifact_type.is_none_or(|t| m["artifactType"] == t))
            .map(|mut m| {
                if let Some(o) = m.as_object_mut() {
                    o.retain(|_, v| !v.is_null());
                }
                m
            })
            .collect();
        Ok(json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        }))
    }

    /// Mounts a blob another repository holds (`from_ns`/`from_repo`, hosted or cached)
    /// into a hosted repository; false if it cannot (the client then uploads).
    pub async fn mount_blob(
        &self,
        repo: &str,
        d: &Digest,
        from_ns: &str,
        from_repo: &str,
    ) -> Result<bool, ServiceError> {
        // A blob still being filled (its client may already have all bytes) is mounted
        // once it is in the store.
        if let Some(mut rx) = self.mirror.blob_flights.follow(d) {
            let done = rx.wait_for(|f| f.ended());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), done).await;
        }
        let ns = self.hosted()?.prefix.clone();
        let (prefix, repo_name) = (ns.clone(), repo);
        let (repo, d, from_ns, from_repo) = (
            repo.to_string(),
            *d,
            from_ns.to_string(),
            from_repo.to_string(),
        );
        let store = self.mirror.store.clone();
        super::offload(async move {
            let _lock = store.lock_linking().await?;
            if store.stat(&d).await?.is_none()
                || !store.blob_linked(&from_ns, &from_repo, &d).await?
                || store.is_private(&from_ns, &from_repo).await?
            {
                return Ok::<_, ServiceError>(false);
            }
            store.link_blob(&ns, &repo, &d).await?;
            Ok(true)
        })
        .await
        .inspect(|linked| {
            if *linked {
                self.mirror.catalog.add(&prefix, repo_name);
            }
        })
    }
}
