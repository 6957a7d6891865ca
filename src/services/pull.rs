//! Manifests and blobs of upstream repositories as clients pull them: through the
//! cache (`manifests.rs`, `blobs.rs`), then the signed-only gate (`policy.rs`), which
//! itself reads signatures through the same cache. Kept apart so that the gate can use
//! the cache without the cache knowing the gate.

use std::sync::Arc;

use actix_web::http::Method;

use super::blob_reply::{BlobReply, ByteRange};
use super::manifests::{self, negotiate, ManifestReply};
use super::{blobs, policy, ServiceError, Services};
use crate::auth::Caller;
use crate::media::Accepted;
use crate::names::{Digest, Reference};
use crate::upstream::Upstream;

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
        let r = manifests::ungated(self, up, repo, reference, method, caller).await?;
        let origin = policy::Origin::Upstream { up, caller };
        policy::check_manifest(self, origin, repo, reference, &r).await?;
        if let Reference::Tag(_) = reference {
            self.mirror.inventory.count_pull(&up.name, repo);
        }
        negotiate(r, reference, accepted)
    }

    pub async fn blob(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        d: &Digest,
        range: Option<ByteRange>,
        method: &Method,
        caller: &Caller,
    ) -> Result<BlobReply, ServiceError> {
        // A HEAD tells existence and size, nothing of the content (push clients ask it).
        if method == Method::GET {
            policy::check_blob(self, &up.name, repo, d)?;
        }
        blobs::ungated(self, up, repo, d, range, method, caller).await
    }
}
