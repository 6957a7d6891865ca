//! The cosign signature format: for an image manifest `sha256:<hex>`, the tag
//! `sha256-<hex>.sig` in the same repository names an OCI manifest whose layers are
//! "simple signing" payloads (`application/vnd.dev.cosign.simplesigning.v1+json`), each
//! with its base64 signature in the annotation `dev.cosignproject.cosign/signature`.
//! Read with serde into the few fields a verdict needs; anything else is ignored.

use base64::Engine as _;
use serde::Deserialize;

use crate::names::Digest;

pub const PAYLOAD_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of a cosign signature stored as an OCI 1.1 referrer.
pub const ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// Signatures read from one signature manifest (a bound: its layers are client input).
pub const MAX_SIGNATURES: usize = 16;
/// Largest payload read (cosign's are a few hundred bytes).
pub const MAX_PAYLOAD: u64 = 64 << 10;

/// The tag cosign stores `d`'s signatures under.
pub fn signature_tag(d: &Digest) -> String {
    format!("sha256-{}.sig", d.hex())
}

/// The digest a signature tag (`sha256-<hex>.sig`) is for: [`signature_tag`] read back.
pub fn signed_by_tag(tag: &str) -> Option<Digest> {
    let hex = tag.strip_prefix("sha256-")?.strip_suffix(".sig")?;
    format!("sha256:{hex}").parse().ok()
}

/// One signature layer: the payload blob's digest and the signature bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub payload: Digest,
    pub size: u64,
    pub signature: Vec<u8>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: Option<u64>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// The signature layers of a signature manifest (at most [`MAX_SIGNATURES`]); layers
/// of another type, without a signature or with a bad digest are skipped.
pub fn layers(manifest: &[u8]) -> Result<Vec<Layer>, String> {
    let m: Manifest =
        serde_json::from_slice(manifest).map_err(|e| format!("signature manifest: {e}"))?;
    Ok(m.layers
        .into_iter()
        .filter(|l| l.media_type == PAYLOAD_TYPE && l.size.unwrap_or(0) <= MAX_PAYLOAD)
        .filter_map(|l| {
            let sig = l.annotations.get(SIGNATURE_ANNOTATION)?;
            let signature = base64::engine::general_purpose::STANDARD
                .decode(sig.trim())
                .ok()?;
            Some(Layer {
                payload: l.digest.parse().ok()?,
                size: l.size.unwrap_or(0),
                signature,
            })
        })
        .take(MAX_SIGNATURES)
        .collect())
}

/// The payload digests of a signature manifest made of simple-signing layers alone,
/// each of a stated size of at most [`MAX_PAYLOAD`]; `None` for any other manifest
/// (one other layer is enough).
pub fn payloads_only(manifest: &[u8]) -> Option<Vec<Digest>> {
    let m: Manifest = serde_json::from_slice(manifest).ok()?;
    if m.layers.is_empty() {
        return None;
    }
    m.layers
        .iter()
        .map(|l| {
            let small = l.size.is_some_and(|n| n <= MAX_PAYLOAD);
            (l.media_type == PAYLOAD_TYPE && small)
                .then(|| l.digest.parse().ok())
                .flatten()
        })
        .collect()
}

/// What a simple-signing payload claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub digest: String,
    pub reference: String,
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
}

#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference", default)]
    docker_reference: String,
}

#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

pub fn claims(payload: &[u8]) -> Result<Claims, String> {
    let p: Payload = serde_json::from_slice(payload).map_err(|e| format!("payload: {e}"))?;
    Ok(Claims {
        digest: p.critical.image.docker_manifest_digest,
        reference: p.critical.identity.docker_reference,
    })
}

/// The repository a docker reference names (`host/path` without `:tag` or `@digest`).
pub fn repository_of(reference: &str) -> &str {
    let no_digest = reference.split('@').next().unwrap_or(reference);
    match no_digest.rsplit_once(':') {
        // A colon after the last slash is a tag; before it, a port.
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => no_digest,
    }
}
