//! Signed-only pulls at the mirror (`[[policy]]`, see `src/policy/`): a manifest of a
//! repository under a policy is served only when a cosign signature of its digest
//! verifies; an admitted index admits its child manifests, an admitted image manifest
//! its config and layers, and a blob is served only when an admitted manifest of that
//! repository references it.
//!
//! Signatures are read through the mirror's own cache (the `sha256-<hex>.sig` tag and
//! its payload blobs), so they share the tag TTL, stale serving and back-off. Verdicts
//! are kept per (policy, image) until the signature tag's TTL passes; admitted
//! references per repository. Both are bounded caches (a client choosing digests cannot
//! grow them past their capacity).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::Method;
use futures_util::StreamExt;
use quick_cache::sync::Cache;

use super::{blobs, manifest_refs, manifests, referrers, ManifestReply, ServiceError, Services};
use crate::auth::Caller;
use crate::config::{PolicyIdentity, PolicyMode};
use crate::names::{Digest, Reference};
use crate::policy::{cosign, judge, Policies, Policy, Reason, Signed};
use crate::upstream::Upstream;

/// Verdicts remembered (policy and image: about 250 bytes each).
const VERDICTS: usize = 16 * 1024;
/// References admitted (repository and digest: about 150 bytes each).
const ADMITTED: usize = 128 * 1024;

type Verdict = Result<(), Reason>;

/// The policies and what they decided.
pub struct Gate {
    policies: Policies,
    /// By policy and `<ns>/<repo>@<digest>`: signatures live in the image's repository.
    verdicts: Cache<(String, String), (Verdict, Instant)>,
    admitted: Cache<String, ()>,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new(Policies::default())
    }
}

impl Gate {
    pub fn new(policies: Policies) -> Gate {
        Gate {
            policies,
            verdicts: Cache::new(VERDICTS),
            admitted: Cache::new(ADMITTED),
        }
    }

    pub fn find(&self, ns: &str, repo: &str) -> Option<&Policy> {
        self.policies.find(ns, repo)
    }
}

/// A signature for `d` was pushed to hosted `repo`: the verdicts on it are asked again.
pub(super) fn signature_added(svc: &Services, repo: &str, d: &Digest) {
    let gate = &svc.mirror.gate;
    let key = admitted_key(Origin::Hosted.ns(svc), repo, d);
    for name in gate.policies.names() {
        gate.verdicts.remove(&(name.to_string(), key.clone()));
    }
}

fn admitted_key(ns: &str, repo: &str, d: &Digest) -> String {
    format!("{ns}/{repo}@{}", d.hex())
}

/// Where a repository's manifests and signatures come from.
pub(super) enum Origin<'a> {
    /// An upstream, read through the cache on behalf of `caller`.
    Upstream {
        up: &'a Arc<Upstream>,
        caller: &'a Caller,
    },
    /// The hosted prefix: read from the store.
    Hosted,
}

impl Origin<'_> {
    fn ns<'b>(&'b self, svc: &'b Services) -> &'b str {
        match self {
            Origin::Upstream { up, .. } => &up.name,
            Origin::Hosted => svc.mirror.hosted.as_ref().map_or("", |h| h.prefix.as_str()),
        }
    }

    /// How long a verdict holds: the upstream's tag TTL (the signature tag's), and for
    /// hosted repositories [`HOSTED_TTL`].
    fn ttl(&self) -> Duration {
        match self {
            Origin::Upstream { up, .. } => up.tag_ttl,
            Origin::Hosted => HOSTED_TTL,
        }
    }
}

/// How long a verdict on a hosted image holds (a signature pushed later is seen after it).
const HOSTED_TTL: Duration = Duration::from_secs(30);

/// Checks a manifest (`body`: its bytes for a GET, to admit what it references) of a
/// repository under a policy, asked for as `reference`.
pub(super) async fn check_manifest(
    svc: &Services,
    origin: Origin<'_>,
    repo: &str,
    reference: &Reference,
    r: &ManifestReply,
) -> Result<(), ServiceError> {
    let Some(policy) = svc.mirror.gate.find(origin.ns(svc), repo) else {
        return Ok(());
    };
    // Boxed: the judgement's future is kilobytes, which every manifest request moved
    // around even when no policy covers it.
    Box::pin(check_covered(svc, policy, origin, repo, reference, r)).await
}

/// [`check_manifest`] for a manifest that `policy` covers.
async fn check_covered(
    svc: &Services,
    policy: &Policy,
    origin: Origin<'_>,
    repo: &str,
    reference: &Reference,
    r: &ManifestReply,
) -> Result<(), ServiceError> {
    let (d, body) = (&r.digest, r.body.as_deref());
    let gate = &svc.mirror.gate;
    let ns = origin.ns(svc).to_string();
    // Signatures themselves are served (cosign verify, podman's sigstore attachments
    // and admission controllers read them through the mirror), with their payloads and
    // nothing else: a manifest only passes as one when it is made of simple-signing
    // layers alone (a tag named like a signature proves nothing).
    match body {
        Some(b) => {
            if let Some(payloads) = cosign::payloads_only(b) {
                for p in payloads {
                    gate.admitted.insert(admitted_key(&ns, repo, &p), ());
                }
                return Ok(());
            }
        }
        // A HEAD of a signature tag tells a digest and admits nothing.
        None if matches!(reference, Reference::Tag(t) if cosign::signed_by_tag(t).is_some()) => {
            return Ok(());
        }
        None => {}
    }
    // Admitted through an admitted index (a platform manifest has no signature of its
    // own); a manifest's own admission is not remembered here, so its signature is
    // checked again once the verdict's time is up (a removed signature is noticed).
    let verdict = if gate.admitted.get(&admitted_key(&ns, repo, d)).is_some() {
        Ok(())
    } else {
        verdict(svc, policy, &origin, repo, d).await?
    };
    if verdict.is_ok() {
        if let Some(b) = body {
            admit_references(gate, &ns, repo, &r.media_type, b);
        }
    }
    decide(svc, policy, &format!("{ns}/{repo}@{d}"), verdict.err())
}

/// Checks a blob of a repository (of namespace `ns`) under a policy: an admitted
/// manifest of it must reference the blob.
pub(super) fn check_blob(
    svc: &Services,
    ns: &str,
    repo: &str,
    d: &Digest,
) -> Result<(), ServiceError> {
    let gate = &svc.mirror.gate;
    let Some(policy) = gate.find(ns, repo) else {
        return Ok(());
    };
    if gate.admitted.get(&admitted_key(ns, repo, d)).is_some() {
        return Ok(());
    }
    let what = format!("{ns}/{repo}@{d}");
    let why = "no admitted manifest of this repository references this blob (pull the image by tag or digest first)";
    refuse(svc, policy, &what, why, "no_admitted_manifest")
}

/// The verdict for `d` under `policy`, from memory while the signature tag is fresh.
async fn verdict(
    svc: &Services,
    policy: &Policy,
    origin: &Origin<'_>,
    repo: &str,
    d: &Digest,
) -> Result<Verdict, ServiceError> {
    let gate = &svc.mirror.gate;
    let vkey = (policy.name.clone(), admitted_key(origin.ns(svc), repo, d));
    if let Some((v, at)) = gate.verdicts.get(&vkey) {
        if at.elapsed() < origin.ttl() {
            return Ok(v);
        }
    }
    let sigs = match origin {
        Origin::Upstream { up, caller } => upstream_signatures(svc, up, repo, d, caller).await?,
        Origin::Hosted => hosted_signatures(svc, repo, d).await?,
    };
    let signed: Vec<Signed> = sigs
        .iter()
        .map(|(p, s)| Signed {
            payload: p,
            signature: s,
        })
        .collect();
    let repos = (policy.identity == PolicyIdentity::Repository).then(|| match origin {
        Origin::Upstream { up, .. } => identities(up, repo),
        // The mirror's own address is whatever clients call it: any host, this path.
        Origin::Hosted => vec![format!("*/{}/{repo}", origin.ns(svc))],
    });
    let v = judge(&policy.keys, &d.to_string(), repos.as_deref(), &signed).map(|key| {
        tracing::debug!(policy = %policy.name, digest = %d, key = %key.file.display(), "signature verified");
    });
    gate.verdicts.insert(vkey, (v, Instant::now()));
    Ok(v)
}

/// The (payload, signature) pairs stored for `d` where cosign puts them: under its
/// `sha256-<hex>.sig` tag, and as OCI 1.1 referrers of cosign's signature artifact type
/// (`--registry-referrers-mode=oci-1-1`), all read through the mirror's cache.
async fn upstream_signatures(
    svc: &Services,
    up: &Arc<Upstream>,
    repo: &str,
    d: &Digest,
    caller: &Caller,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ServiceError> {
    let mut manifests = Vec::new();
    let tag = Reference::Tag(cosign::signature_tag(d));
    if let Some(m) = signature_manifest(svc, up, repo, &tag, caller).await? {
        manifests.push(m);
    }
    // Best effort once the tag gave a signature manifest: a registry whose referrers
    // answer fails must not refuse an image signed under the tag.
    let referrers = match referrers::of_type(svc, up, repo, d, cosign::ARTIFACT_TYPE, caller).await
    {
        Ok(r) => r,
        Err(e) if !manifests.is_empty() => {
            tracing::debug!(error = %e, digest = %d, "referrers of a signed image not read");
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    for r in referrers.into_iter().take(cosign::MAX_SIGNATURES) {
        if let Some(m) = signature_manifest(svc, up, repo, &Reference::Digest(r), caller).await? {
            manifests.push(m);
        }
    }
    let mut out = Vec::new();
    for m in manifests {
        out.extend(payloads(svc, up, repo, &m, caller).await?);
        if out.len() >= cosign::MAX_SIGNATURES {
            break;
        }
    }
    Ok(out)
}

/// A signature manifest's bytes; `None` when there is none at `reference`.
async fn signature_manifest(
    svc: &Services,
    up: &Arc<Upstream>,
    repo: &str,
    reference: &Reference,
    caller: &Caller,
) -> Result<Option<bytes::Bytes>, ServiceError> {
    match manifests::ungated(svc, up, repo, reference, &Method::GET, caller).await {
        Ok(m) => Ok(m.body),
        Err(e) if matches!(e.root(), ServiceError::ManifestUnknown(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The (payload, signature) pairs of one signature manifest, payloads read through the
/// cache (at most [`cosign::MAX_PAYLOAD`] bytes each).
async fn payloads(
    svc: &Services,
    up: &Arc<Upstream>,
    repo: &str,
    manifest: &[u8],
    caller: &Caller,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ServiceError> {
    let layers = cosign::layers(manifest).unwrap_or_default();
    let mut out = Vec::new();
    for l in layers {
        let reply = blobs::ungated(svc, up, repo, &l.payload, None, &Method::GET, caller).await?;
        let Some(mut body) = reply.body else { continue };
        let mut payload = Vec::new();
        while let Some(chunk) = body.next().await {
            payload.extend_from_slice(&chunk?);
            if payload.len() as u64 > cosign::MAX_PAYLOAD {
                break;
            }
        }
        if payload.len() as u64 <= cosign::MAX_PAYLOAD {
            out.push((payload, l.signature));
        }
    }
    Ok(out)
}

/// The same for a hosted repository, from the store (the tag, and referrers pushed
/// with a `subject`).
async fn hosted_signatures(
    svc: &Services,
    repo: &str,
    d: &Digest,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ServiceError> {
    let store = &svc.mirror.store;
    let ns = Origin::Hosted.ns(svc).to_string();
    let mut manifests: Vec<Digest> = Vec::new();
    if let Some(rec) = store.get_tag(&ns, repo, &cosign::signature_tag(d)).await? {
        manifests.push(rec.digest()?);
    }
    let referrers = store.list_referrers(&ns, repo, d).await?;
    manifests.extend(
        referrers
            .iter()
            .filter(|r| r["artifactType"] == cosign::ARTIFACT_TYPE)
            .filter_map(|r| r["digest"].as_str()?.parse::<Digest>().ok())
            .take(cosign::MAX_SIGNATURES),
    );
    let mut out = Vec::new();
    for m in manifests {
        let Some(bytes) = store.read_small(&m).await? else {
            continue;
        };
        for l in cosign::layers(&bytes).unwrap_or_default() {
            let small = store
                .stat(&l.payload)
                .await?
                .is_some_and(|n| n <= cosign::MAX_PAYLOAD);
            if !small || !store.blob_linked(&ns, repo, &l.payload).await? {
                continue;
            }
            if let Some(p) = store.read_small(&l.payload).await? {
                out.push((p.to_vec(), l.signature));
            }
        }
    }
    out.truncate(cosign::MAX_SIGNATURES);
    Ok(out)
}

/// The names a signature's `docker-reference` may give this repository: at the
/// upstream's host and under its key (for Docker Hub, also its other names).
fn identities(up: &Upstream, repo: &str) -> Vec<String> {
    let mut hosts = vec![up.name.clone()];
    if let Some(h) = up.base.host_str() {
        hosts.push(match up.base.port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_string(),
        });
    }
    if up.name == "docker.io" {
        hosts.extend(["index.docker.io".into(), "registry-1.docker.io".into()]);
    }
    hosts.into_iter().map(|h| format!("{h}/{repo}")).collect()
}

/// Admits the digests a manifest references (an index's manifests, an image's config
/// and layers) in its repository, read as a push of it is read.
fn admit_references(gate: &Gate, ns: &str, repo: &str, media_type: &str, manifest: &[u8]) {
    let Ok(parsed) = manifest_refs::parse_manifest(Some(media_type), manifest) else {
        return;
    };
    for d in parsed.manifests.iter().chain(&parsed.blobs) {
        gate.admitted.insert(admitted_key(ns, repo, d), ());
    }
}

/// Counts and logs a verdict; a refusal in enforce mode is the request's error.
fn decide(
    svc: &Services,
    policy: &Policy,
    what: &str,
    refused: Option<Reason>,
) -> Result<(), ServiceError> {
    let Some(reason) = refused else {
        count(svc, policy, "admitted");
        return Ok(());
    };
    refuse(svc, policy, what, reason.as_str(), reason.label())
}

fn refuse(
    svc: &Services,
    policy: &Policy,
    what: &str,
    why: &str,
    label: &str,
) -> Result<(), ServiceError> {
    match policy.mode {
        PolicyMode::Enforce => {
            count(svc, policy, "denied");
            tracing::warn!(policy = %policy.name, image = %what, reason = label, "refused by policy: {why}");
            Err(ServiceError::Denied(format!(
                "policy {:?} refuses {what}: {why}",
                policy.name
            )))
        }
        PolicyMode::Audit => {
            count(svc, policy, "audit_denied");
            tracing::warn!(policy = %policy.name, image = %what, reason = label, "policy (audit mode) would refuse: {why}; served");
            Ok(())
        }
    }
}

fn count(svc: &Services, policy: &Policy, result: &str) {
    svc.mirror
        .metrics
        .policy_decisions
        .with_label_values(&[&policy.name, result])
        .inc();
}
