//! What a manifest refers to (its platform manifests, config and layers, subject), read
//! with oci-spec: the checks of a hosted push, gc's walk of hosted images and the
//! blobs a signed-only policy admits all read a manifest this one way.

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::ServiceError;
use crate::media::{IMAGE_TYPES, INDEX_TYPES};
use crate::names::Digest;

/// What a stored manifest refers to, for validation and the referrers API.
pub(super) struct Parsed {
    pub(super) media_type: String,
    pub(super) blobs: Vec<Digest>,
    pub(super) manifests: Vec<Digest>,
    pub(super) subject: Option<Digest>,
    pub(super) artifact_type: Option<String>,
    pub(super) annotations: Option<std::collections::HashMap<String, String>>,
}

fn digest_of(d: &Descriptor) -> Result<Digest, ServiceError> {
    d.digest()
        .to_string()
        .parse()
        .map_err(|e| ServiceError::ManifestInvalid(format!("descriptor digest: {e}")))
}

pub(super) fn parse_manifest(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Parsed, ServiceError> {
    let invalid = |e: String| ServiceError::ManifestInvalid(e);
    let probe: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    let media_type = probe["mediaType"]
        .as_str()
        .or(content_type.map(|c| c.split(';').next().unwrap_or("").trim()))
        .unwrap_or("")
        .to_string();
    let media_type = if media_type.is_empty() && probe.get("manifests").is_some() {
        INDEX_TYPES[0].to_string()
    } else if media_type.is_empty() {
        IMAGE_TYPES[0].to_string()
    } else {
        media_type
    };
    if INDEX_TYPES.contains(&media_type.as_str()) {
        let idx = ImageIndex::from_reader(body).map_err(|e| invalid(e.to_string()))?;
        return Ok(Parsed {
            manifests: idx
                .manifests()
                .iter()
                .map(digest_of)
                .collect::<Result<_, _>>()?,
            blobs: Vec::new(),
            subject: idx.subject().as_ref().map(digest_of).transpose()?,
            artifact_type: idx.artifact_type().as_ref().map(|t| t.to_string()),
            annotations: idx.annotations().clone(),
            media_type,
        });
    }
    if !IMAGE_TYPES.contains(&media_type.as_str()) {
        return Err(invalid(format!(
            "unsupported manifest media type {media_type:?}"
        )));
    }
    let m = ImageManifest::from_reader(body).map_err(|e| invalid(e.to_string()))?;
    let mut blobs = vec![digest_of(m.config())?];
    for l in m.layers() {
        blobs.push(digest_of(l)?);
    }
    let artifact_type = m
        .artifact_type()
        .as_ref()
        .map(|t| t.to_string())
        .or_else(|| Some(m.config().media_type().to_string()));
    Ok(Parsed {
        manifests: Vec::new(),
        blobs,
        subject: m.subject().as_ref().map(digest_of).transpose()?,
        artifact_type,
        annotations: m.annotations().clone(),
        media_type,
    })
}
