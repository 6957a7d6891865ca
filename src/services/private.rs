//! Private-image isolation: content fetched with a client's own upstream credentials is
//! served only to callers who have shown the upstream that they may read that repository.
//!
//! A repository is marked private in the store when the mirror's own credentials were
//! refused and a client's were accepted. For a private repository every caller is
//! re-checked upstream (a HEAD with its credentials, or the mirror's for an anonymous
//! caller); a success is remembered per credential and repository for [`PROOF_TTL`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::{Method, StatusCode};

use super::{ServiceError, Services};
use crate::auth::Caller;
use crate::upstream::{Creds, UpRequest, Upstream};

/// How long a successful upstream re-check is trusted for one credential.
const PROOF_TTL: Duration = Duration::from_secs(60);

/// What an upstream said to a probe.
enum Probe {
    /// A 2xx: the only answer that proves access.
    Allowed,
    /// 401/403.
    Refused,
    /// Anything else (404 for a deleted, renamed or hidden repository, ...): no proof.
    Unproven,
}

impl Services {
    fn proven(&self, id: &str, up: &Upstream, repo: &str) -> bool {
        self.mirror
            .proofs
            .get(&proof_key(id, up, repo))
            .is_some_and(|t| t.elapsed() < PROOF_TTL)
    }

    async fn probe(&self, up: &Upstream, repo: &str, what: &str) -> Result<Probe, ServiceError> {
        let method = if what.starts_with("tags/") {
            Method::GET
        } else {
            Method::HEAD
        };
        let req = UpRequest {
            method,
            repo,
            what,
            accept: Some(crate::media::UPSTREAM_ACCEPT),
            range_from: None,
            range_to: None,
            primary_only: true,
        };
        let resp = self.upstream(up, "auth-check", req).await?;
        Ok(match resp.status() {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Probe::Refused,
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                return Err(ServiceError::Unavailable(format!(
                    "upstream {} answered {s}",
                    up.name
                )))
            }
            s if s.is_success() => Probe::Allowed,
            _ => Probe::Unproven,
        })
    }
}

fn proof_key(id: &str, up: &Upstream, repo: &str) -> String {
    format!("{id}\n{}\n{repo}", up.name)
}

fn denied(up: &Upstream, repo: &str) -> ServiceError {
    ServiceError::Unauthorized(format!(
        "{}/{repo} needs upstream credentials that can read it (send them with Basic auth)",
        up.name
    ))
}

/// The endpoint a probe asks (`manifests/<reference>`), written out only when a probe is
/// sent: most requests need none, and the text cost an allocation each.
pub(super) struct ProbePath<'a>(pub &'static str, pub &'a (dyn std::fmt::Display + Sync));

impl std::fmt::Display for ProbePath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.0, self.1)
    }
}

/// The caller's own upstream credentials, where the upstream's configuration lets them
/// through: then what the caller may read depends on who it is upstream.
pub(super) fn own_credentials<'a>(up: &Upstream, caller: &'a Caller) -> Option<(&'a str, &'a str)> {
    match caller {
        Caller::Foreign { user, pass } if up.client_credentials => Some((user, pass)),
        _ => None,
    }
}

/// Whether `caller` is served like every caller whose own upstream credentials do not
/// come into play (anonymous, the mirror's users), that is from the served memory. The
/// repository filter is checked first for them, so that no served entry outlives it.
pub(super) fn served_alike(
    up: &Upstream,
    repo: &str,
    caller: &Caller,
) -> Result<bool, ServiceError> {
    if own_credentials(up, caller).is_some() {
        return Ok(false);
    }
    up.filter.check(repo).map_err(ServiceError::Denied)?;
    Ok(true)
}

/// The upstream (with the right credentials) to use for `repo` on behalf of `caller`:
/// `Denied` if the upstream's allow/deny filters exclude the repository (nothing is
/// asked upstream), `Unauthorized` if the caller may not read it. `probe` is the
/// request's own endpoint (e.g. `manifests/1`), asked with HEAD.
pub(super) async fn upstream_for(
    svc: &Services,
    up: &Arc<Upstream>,
    repo: &str,
    caller: &Caller,
    probe: ProbePath<'_>,
) -> Result<Arc<Upstream>, ServiceError> {
    up.filter.check(repo).map_err(ServiceError::Denied)?;
    let client = own_credentials(up, caller).map(|(user, pass)| Creds {
        user: user.to_string(),
        pass: pass.to_string(),
    });
    let private = svc.store().is_private(&up.name, repo).await?;
    // Public content, or a caller with nothing to offer for unknown content. (Whether
    // the repository is known is only asked when the answer matters: not for anonymous
    // callers, which are most requests.)
    if !private && (client.is_none() || svc.store().repo_exists(&up.name, repo).await?) {
        return Ok(up.clone());
    }
    if let Some(c) = &client {
        if svc.proven(&c.id(), up, repo) {
            return Ok(up.with_client_creds(c));
        }
    }
    if !private || client.is_none() {
        match Box::pin(svc.probe(up, repo, &probe.to_string())).await? {
            Probe::Allowed => {
                if private {
                    // The upstream now lets the mirror read it: it is public.
                    svc.store().set_private(&up.name, repo, false).await?;
                    svc.mirror.catalog.add(&up.name, repo);
                }
                return Ok(up.clone());
            }
            // Not private and not refused (e.g. 404): the request itself will say.
            Probe::Unproven if !private => return Ok(up.clone()),
            // Private content fails closed: only a 2xx proves access.
            _ if private && client.is_none() => return Err(denied(up, repo)),
            _ => {}
        }
    }
    let Some(c) = client else {
        return Ok(up.clone());
    };
    let mine = up.with_client_creds(&c);
    match Box::pin(svc.probe(&mine, repo, &probe.to_string())).await? {
        Probe::Allowed => {
            svc.store().set_private(&up.name, repo, true).await?;
            svc.mirror.catalog.remove(&up.name, repo);
            svc.mirror
                .proofs
                .insert(proof_key(&c.id(), up, repo), Instant::now());
            Ok(mine)
        }
        Probe::Refused | Probe::Unproven => Err(denied(up, repo)),
    }
}
