//! Signed-only pulls: `[[policy]]` entries name repositories (globs over
//! `<upstream key or hosted prefix>/<repository>`) whose images are served only when a
//! cosign signature of the manifest's digest verifies with one of the policy's keys.
//!
//! This module is the pure part, unit-tested without a network: keys (`keys.rs`), the
//! cosign format (`cosign.rs`) and the verdict ([`judge`]). Fetching signatures through
//! the mirror's cache, caching verdicts and admitting an index's children and an
//! image's blobs are `services/policy.rs`.
//!
//! Keyless signatures (a Fulcio certificate and a Rekor bundle instead of a key) would
//! add, per policy, the trusted roots (Fulcio CA and Rekor public key, from a TUF
//! snapshot copied to the host: checked offline) and the identities allowed (issuer and
//! subject); the verdict would verify the certificate chain at the bundle's signed time,
//! the Rekor inclusion promise, and then the signature with the certificate's key, in
//! place of [`keys::PublicKey::verifies`]. Not built yet.

pub mod cosign;
pub mod keys;

use std::fmt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::config::{PolicyConfig, PolicyIdentity, PolicyMode};
use keys::PublicKey;

/// A compiled `[[policy]]`.
pub struct Policy {
    pub name: String,
    matcher: GlobSet,
    pub keys: Vec<PublicKey>,
    pub mode: PolicyMode,
    pub identity: PolicyIdentity,
}

/// Every policy, first match wins.
#[derive(Default)]
pub struct Policies(Vec<Policy>);

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "policy {name:?}: match pattern {pattern:?}: {err}; write globs like \"docker.io/myorg/*\""
    )]
    Pattern {
        name: String,
        pattern: String,
        err: String,
    },
    #[error("policy {0:?}: no keys; list PEM public keys in keys = [\"/etc/entrepot/keys/release.pub\"]")]
    NoKeys(String),
    #[error("policy {0:?}: require = {1:?} is not supported; use require = \"sigstore\"")]
    Require(String, String),
    #[error(
        "policy {0:?}: no match patterns; list repositories in match = [\"docker.io/myorg/*\"]"
    )]
    NoMatch(String),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
}

impl Policies {
    /// Compiles the policies and reads their keys (at start: a bad key stops it).
    pub fn load(cfg: &[PolicyConfig]) -> Result<Policies, PolicyError> {
        cfg.iter()
            .map(Policy::load)
            .collect::<Result<_, _>>()
            .map(Policies)
    }

    /// The policy `<ns>/<repo>` falls under.
    pub fn find(&self, ns: &str, repo: &str) -> Option<&Policy> {
        // Asked on every manifest and blob request: nothing allocated without policies.
        if self.0.is_empty() {
            return None;
        }
        let path = format!("{ns}/{repo}");
        self.0.iter().find(|p| p.matcher.is_match(&path))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|p| p.name.as_str())
    }
}

impl Policy {
    fn load(c: &PolicyConfig) -> Result<Policy, PolicyError> {
        if c.require != "sigstore" {
            return Err(PolicyError::Require(c.name.clone(), c.require.clone()));
        }
        if c.matches.is_empty() {
            return Err(PolicyError::NoMatch(c.name.clone()));
        }
        if c.keys.is_empty() {
            return Err(PolicyError::NoKeys(c.name.clone()));
        }
        let mut b = GlobSetBuilder::new();
        for p in &c.matches {
            let g = GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| PolicyError::Pattern {
                    name: c.name.clone(),
                    pattern: p.clone(),
                    err: e.to_string(),
                })?;
            b.add(g);
        }
        let matcher = b.build().map_err(|e| PolicyError::Pattern {
            name: c.name.clone(),
            pattern: c.matches.join(", "),
            err: e.to_string(),
        })?;
        let keys = c
            .keys
            .iter()
            .map(|k| PublicKey::read(k))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            name: c.name.clone(),
            matcher,
            keys,
            mode: c.mode,
            identity: c.identity,
        })
    }
}

/// Why an image was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    NoSignature,
    UnknownKey,
    OtherDigest,
    IdentityMismatch,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoSignature => "no signature found",
            Reason::UnknownKey => "signed by an unknown key",
            Reason::OtherDigest => "payload names another digest",
            Reason::IdentityMismatch => "identity mismatch",
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::NoSignature => "no_signature",
            Reason::UnknownKey => "unknown_key",
            Reason::OtherDigest => "other_digest",
            Reason::IdentityMismatch => "identity_mismatch",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One signature to judge: the payload's bytes and the signature over them.
pub struct Signed<'a> {
    pub payload: &'a [u8],
    pub signature: &'a [u8],
}

/// Whether one of `sigs` admits `digest`: signed by one of `keys`, over a payload that
/// names `digest` and (when `repositories` is given) one of those repositories. The
/// signature is checked before anything in the payload is believed. On refusal, the
/// most specific reason among the signatures.
pub fn judge<'k>(
    keys: &'k [PublicKey],
    digest: &str,
    repositories: Option<&[String]>,
    sigs: &[Signed<'_>],
) -> Result<&'k PublicKey, Reason> {
    let mut why = Reason::NoSignature;
    for s in sigs {
        let Some(key) = keys.iter().find(|k| k.verifies(s.payload, s.signature)) else {
            why = why.max(Reason::UnknownKey);
            continue;
        };
        let Ok(claims) = cosign::claims(s.payload) else {
            why = why.max(Reason::OtherDigest);
            continue;
        };
        if claims.digest != digest {
            why = why.max(Reason::OtherDigest);
            continue;
        }
        if let Some(repos) = repositories {
            let named = cosign::repository_of(&claims.reference);
            if !repos.iter().any(|r| names(r, named)) {
                why = why.max(Reason::IdentityMismatch);
                continue;
            }
        }
        return Ok(key);
    }
    Err(why)
}

/// Whether an accepted repository name matches the one a signature names; `*/path`
/// accepts `path` at any host.
fn names(accepted: &str, named: &str) -> bool {
    match accepted.strip_prefix("*/") {
        Some(path) => named
            .split_once('/')
            .is_some_and(|(host, rest)| !host.is_empty() && rest == path),
        None => accepted == named,
    }
}

#[cfg(test)]
mod tests;
