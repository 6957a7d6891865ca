//! Client authentication (htpasswd Basic) and authorisation (pull, push).
//!
//! bcrypt is slow on purpose; a verified password is remembered as its SHA-256 per user and
//! later requests are compared against that in constant time, so a busy server does not
//! spend its CPU on bcrypt. Only successes are remembered (at most one entry per user).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use base64::Engine as _;
use dashmap::DashMap;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, ConfigError};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    /// An htpasswd user whose password checked out.
    User(String),
    /// Basic credentials that are not an htpasswd user's: taken as the caller's own
    /// credentials for upstream registries.
    Foreign {
        user: String,
        pass: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AccessError {
    #[error("authentication required")]
    Unauthenticated,
    #[error("invalid username or password")]
    BadCredentials,
    #[error("{0}")]
    Denied(String),
}

pub struct Access {
    users: HashMap<String, String>,
    verified: DashMap<String, [u8; 32]>,
    anonymous_pull: bool,
    push: HashSet<String>,
    /// Answer an anonymous `GET /v2/` with a challenge (when an htpasswd is configured).
    challenge_anonymous: bool,
}

impl Access {
    /// Reads the htpasswd file (bcrypt entries only, as Distribution accepts).
    pub fn load(cfg: &AuthConfig) -> Result<Access, ConfigError> {
        let users = match &cfg.htpasswd {
            Some(p) => read_htpasswd(p)?,
            None => HashMap::new(),
        };
        Ok(Access {
            users,
            verified: DashMap::new(),
            anonymous_pull: cfg.anonymous_pull,
            push: cfg.push.iter().cloned().collect(),
            challenge_anonymous: cfg.htpasswd.is_some(),
        })
    }

    /// Identifies the caller from an `Authorization` header.
    pub async fn identify(&self, authorization: Option<&str>) -> Result<Caller, AccessError> {
        let Some(value) = authorization else {
            return Ok(Caller::Anonymous);
        };
        let (user, pass) = parse_basic(value).ok_or(AccessError::BadCredentials)?;
        let Some(hash) = self.users.get(&user) else {
            return Ok(Caller::Foreign { user, pass });
        };
        let digest: [u8; 32] = Sha256::digest(pass.as_bytes()).into();
        if let Some(known) = self.verified.get(&user) {
            if bool::from(known.ct_eq(&digest)) {
                return Ok(Caller::User(user));
            }
        }
        let hash = hash.clone();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(pass, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        if !ok {
            return Err(AccessError::BadCredentials);
        }
        self.verified.insert(user.clone(), digest);
        Ok(Caller::User(user))
    }

    /// `GET /v2/`. With an htpasswd configured an anonymous caller is challenged, as
    /// Distribution with auth and Docker Hub do: clients such as skopeo, podman and
    /// `docker login` send credentials only to a registry whose ping asked for them.
    /// Anonymous pulls still work afterwards when `anonymous_pull` is on.
    pub fn ping(&self, c: &Caller) -> Result<(), AccessError> {
        match c {
            Caller::Anonymous if self.challenge_anonymous => Err(AccessError::Unauthenticated),
            _ => Ok(()),
        }
    }

    pub fn may_pull(&self, c: &Caller) -> Result<(), AccessError> {
        match c {
            Caller::User(_) => Ok(()),
            _ if self.anonymous_pull => Ok(()),
            _ => Err(AccessError::Unauthenticated),
        }
    }

    pub fn may_push(&self, c: &Caller) -> Result<(), AccessError> {
        match c {
            Caller::User(u) if self.push.contains(u) => Ok(()),
            Caller::User(u) => Err(AccessError::Denied(format!("user {u:?} may not push"))),
            _ => Err(AccessError::Unauthenticated),
        }
    }
}

fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, b64) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn read_htpasswd(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Server(format!("htpasswd {}: {e}", path.display())))?;
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| ConfigError::Server(format!("htpasswd line {}: no ':'", n + 1)))?;
        if !hash.starts_with("$2") {
            return Err(ConfigError::Server(format!(
                "htpasswd user {user:?}: only bcrypt entries are accepted (htpasswd -B)"
            )));
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    #[tokio::test]
    async fn users_foreign_and_push_rights() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).expect("hash");
        std::fs::write(&file, format!("alice:{hash}\nbob:{hash}\n")).expect("write");
        let a = Access::load(&AuthConfig {
            htpasswd: Some(file),
            anonymous_pull: false,
            push: vec!["alice".into()],
        })
        .expect("load");
        let alice = a
            .identify(Some(&basic("alice", "pw")))
            .await
            .expect("alice");
        assert_eq!(alice, Caller::User("alice".into()));
        // Second time from the cache, same answer; a wrong password still fails.
        assert_eq!(
            a.identify(Some(&basic("alice", "pw"))).await,
            Ok(alice.clone())
        );
        assert_eq!(
            a.identify(Some(&basic("alice", "nope"))).await,
            Err(AccessError::BadCredentials)
        );
        let bob = a.identify(Some(&basic("bob", "pw"))).await.expect("bob");
        assert!(a.may_push(&alice).is_ok());
        assert!(matches!(a.may_push(&bob), Err(AccessError::Denied(_))));
        assert_eq!(
            a.may_push(&Caller::Anonymous),
            Err(AccessError::Unauthenticated)
        );
        assert_eq!(
            a.may_pull(&Caller::Anonymous),
            Err(AccessError::Unauthenticated)
        );
        let foreign = a
            .identify(Some(&basic("hub-user", "tok")))
            .await
            .expect("foreign");
        assert!(matches!(foreign, Caller::Foreign { .. }));
        assert_eq!(a.may_pull(&foreign), Err(AccessError::Unauthenticated));
    }
}
