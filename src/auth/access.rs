//! Client authentication (htpasswd Basic, or the mirror's own bearer tokens) and
//! authorisation (pull, push, delete, catalog).
//!
//! Password checks themselves (bcrypt, bounded and throttled) are in [`super::passwords`],
//! the mirror's own bearer tokens in [`super::tokens`].

use std::collections::{HashMap, HashSet};
use std::path::Path;

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;

use super::caller::{AccessError, Caller};
use super::passwords::{self, Passwords, Verdict};
use super::tokens::{Grant, Issued, Tokens};
use crate::config::{AuthConfig, ConfigError};
use crate::metrics::Metrics;

/// Who is calling, and what a bearer token limits it to (`None`: not a token; the ACL
/// alone decides).
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub caller: Caller,
    pub grants: Option<Vec<Grant>>,
}

/// What a request needs, with the repository name as the client wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// `GET /v2/`.
    Ping,
    Catalog,
    Pull(&'a str),
    Push(&'a str),
    Delete(&'a str),
}

impl Need<'_> {
    /// The token scope that covers this need (`type:name:actions`), as sent in challenges.
    pub fn scope(&self) -> Option<String> {
        match self {
            Need::Ping => None,
            Need::Catalog => Some("registry:catalog:*".into()),
            Need::Pull(n) => Some(format!("repository:{n}:pull")),
            Need::Push(n) => Some(format!("repository:{n}:pull,push")),
            Need::Delete(n) => Some(format!("repository:{n}:delete")),
        }
    }

    /// (type, name, action) a token grant must cover.
    fn grant_key(&self) -> Option<(&str, &str, &str)> {
        match *self {
            Need::Ping => None,
            Need::Catalog => Some(("registry", "catalog", "*")),
            Need::Pull(n) => Some(("repository", n, "pull")),
            Need::Push(n) => Some(("repository", n, "push")),
            Need::Delete(n) => Some(("repository", n, "delete")),
        }
    }
}

/// A scope asked of the token endpoint: `repository:<name>:<actions>` or
/// `registry:catalog:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Scope {
    /// Parses one scope; `None` for a malformed one (ignored, as token servers do).
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Scope {
            kind: kind.to_string(),
            name: name.to_string(),
            actions: actions.split(',').map(str::to_string).collect(),
        })
    }
}

pub struct Access {
    passwords: Passwords,
    anonymous_pull: bool,
    push: HashSet<String>,
    tokens: Tokens,
}

impl Access {
    /// Reads the htpasswd file (bcrypt entries only, as Distribution accepts).
    pub fn load(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<Access, ConfigError> {
        let users = match &cfg.htpasswd {
            Some(p) => read_htpasswd(p)?,
            None => HashMap::new(),
        };
        let missing: Vec<&String> = cfg
            .push
            .iter()
            .filter(|u| !users.contains_key(*u))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(users = ?missing, htpasswd = ?cfg.htpasswd, "auth.push names users the htpasswd file does not have: they cannot log in, so they cannot push; add them with `htpasswd -B FILE USER`");
        }
        Ok(Access {
            passwords: Passwords::new(users, cfg.anonymous_pull, metrics),
            anonymous_pull: cfg.anonymous_pull,
            push: cfg.push.iter().cloned().collect(),
            tokens: Tokens::load(cfg)?,
        })
    }

    /// Identifies the caller from an `Authorization` header: a bearer token of this
    /// mirror's, Basic credentials, or nothing.
    pub async fn identify(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Identity, AccessError> {
        if let Some(token) = authorization.and_then(bearer) {
            let (caller, grants) = self.tokens.verify(token)?;
            return Ok(Identity {
                caller,
                grants: Some(grants),
            });
        }
        Ok(Identity {
            caller: self.identify_basic(authorization, peer).await?,
            grants: None,
        })
    }

    /// Whether the caller may do what the request needs. A token must grant it; without
    /// one the ACL decides.
    pub fn authorize(&self, id: &Identity, need: Need<'_>) -> Result<(), AccessError> {
        if let Some(grants) = &id.grants {
            let Some((kind, name, action)) = need.grant_key() else {
                return Ok(());
            };
            if grants.iter().any(|g| g.allows(kind, name, action)) {
                return Ok(());
            }
            // Say why, as the Basic path does: a user the ACL refuses gets the same
            // "user may not push" whatever the client's way of sending credentials.
            return match self.acl(&id.caller, need) {
                Err(e @ AccessError::Denied(_)) => Err(e),
                _ => Err(AccessError::InsufficientScope(
                    need.scope().unwrap_or_default(),
                )),
            };
        }
        match need {
            Need::Ping => self.ping(&id.caller),
            _ => self.acl(&id.caller, need),
        }
    }

    /// What the ACL allows `c` for `need` (a ping needs nothing).
    fn acl(&self, c: &Caller, need: Need<'_>) -> Result<(), AccessError> {
        match need {
            Need::Ping => Ok(()),
            Need::Catalog | Need::Pull(_) => self.may_pull(c),
            Need::Push(_) | Need::Delete(_) => self.may_push(c),
        }
    }

    /// The token endpoint: authenticates Basic credentials (if any) and signs a token for
    /// the asked scopes, each cut down to the actions the ACL allows this caller.
    pub async fn token(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
        scopes: &[Scope],
    ) -> Result<Issued, AccessError> {
        let caller = self.identify_basic(authorization, peer).await?;
        let grants = scopes
            .iter()
            .filter_map(|s| self.grant(&caller, s))
            .collect();
        self.tokens.issue(&caller, grants)
    }

    fn grant(&self, caller: &Caller, s: &Scope) -> Option<Grant> {
        let pull = self.may_pull(caller).is_ok();
        let push = self.may_push(caller).is_ok();
        let actions: Vec<String> = match s.kind.as_str() {
            "repository" => s
                .actions
                .iter()
                .filter(|a| match a.as_str() {
                    "pull" => pull,
                    "push" | "delete" => push,
                    _ => false,
                })
                .cloned()
                .collect(),
            "registry" if s.name == "catalog" && pull => vec!["*".into()],
            _ => Vec::new(),
        };
        (!actions.is_empty()).then(|| Grant {
            kind: s.kind.clone(),
            name: s.name.clone(),
            actions,
        })
    }

    async fn identify_basic(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Caller, AccessError> {
        let Some(value) = authorization else {
            return Ok(Caller::Anonymous);
        };
        let (user, pass) = parse_basic(value).ok_or(AccessError::BadCredentials)?;
        match self.passwords.check(&user, &pass, peer).await? {
            Verdict::User => Ok(Caller::User(user)),
            Verdict::NotAUser => Ok(Caller::Foreign { user, pass }),
        }
    }

    /// `GET /v2/`. An anonymous caller is always challenged, as Docker Hub and
    /// Distribution with auth do: Docker, podman and skopeo take their challenges from
    /// this ping only, so without it they never send credentials (a private upstream image
    /// after `docker login` could not be pulled) and never fetch a token. Anonymous pulls
    /// still work afterwards when `anonymous_pull` is on, with or without a token.
    fn ping(&self, c: &Caller) -> Result<(), AccessError> {
        match c {
            Caller::Anonymous => Err(AccessError::Unauthenticated),
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

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// `Basic` credentials, refused unread when longer than the longest user name and
/// password taken ([`passwords::MAX_USER_LEN`], [`passwords::MAX_PASS_LEN`]).
fn parse_basic(value: &str) -> Option<(String, String)> {
    const MAX_B64: usize = (passwords::MAX_USER_LEN + passwords::MAX_PASS_LEN + 1).div_ceil(3) * 4;
    let (scheme, b64) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || b64.trim().len() > MAX_B64 {
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

    /// Access with htpasswd users alice and bob (password `pw`), alice in `auth.push`.
    fn alice_and_bob(dir: &tempfile::TempDir, anonymous_pull: bool) -> Access {
        let file = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).expect("hash");
        std::fs::write(&file, format!("alice:{hash}\nbob:{hash}\n")).expect("write");
        Access::load(
            &AuthConfig {
                htpasswd: Some(file),
                anonymous_pull,
                push: vec!["alice".into()],
                ..Default::default()
            },
            test_metrics(),
        )
        .expect("load")
    }

    #[tokio::test]
    async fn users_foreign_and_push_rights() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = alice_and_bob(&dir, false);
        let alice = a
            .identify_basic(Some(&basic("alice", "pw")), None)
            .await
            .expect("alice");
        assert_eq!(alice, Caller::User("alice".into()));
        // Second time from the cache, same answer; a wrong password still fails.
        assert_eq!(
            a.identify_basic(Some(&basic("alice", "pw")), None).await,
            Ok(alice.clone())
        );
        assert_eq!(
            a.identify_basic(Some(&basic("alice", "nope")), None).await,
            Err(AccessError::BadCredentials)
        );
        let bob = a
            .identify_basic(Some(&basic("bob", "pw")), None)
            .await
            .expect("bob");
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
        // Only users may log in here (anonymous_pull = false): an unknown user is a
        // failed login, like a wrong password.
        assert_eq!(
            a.identify_basic(Some(&basic("hub-user", "tok")), None)
                .await,
            Err(AccessError::BadCredentials)
        );
    }

    fn test_metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(prometheus::Registry::new()).expect("metrics"))
    }

    #[tokio::test]
    async fn tokens_carry_only_what_the_acl_allows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = alice_and_bob(&dir, AuthConfig::default().anonymous_pull);
        let scopes: Vec<Scope> = ["repository:local/app:pull,push", "registry:catalog:*"]
            .into_iter()
            .filter_map(Scope::parse)
            .collect();
        let anon = a.token(None, None, &scopes).await.expect("anonymous token");
        let id = a
            .identify(Some(&format!("Bearer {}", anon.token)), None)
            .await
            .expect("verify");
        assert_eq!(id.caller, Caller::Anonymous);
        assert!(a.authorize(&id, Need::Pull("local/app")).is_ok());
        assert!(a.authorize(&id, Need::Catalog).is_ok());
        assert_eq!(
            a.authorize(&id, Need::Push("local/app")),
            Err(AccessError::InsufficientScope(
                "repository:local/app:pull,push".into()
            ))
        );
        assert!(a.authorize(&id, Need::Pull("local/other")).is_err());
        let alice = a
            .token(Some(&basic("alice", "pw")), None, &scopes)
            .await
            .expect("alice token");
        let id = a
            .identify(Some(&format!("Bearer {}", alice.token)), None)
            .await
            .expect("verify");
        assert!(a.authorize(&id, Need::Push("local/app")).is_ok());
        // A user outside auth.push hears why, as over Basic, not "the token does not grant".
        let bob = a
            .token(Some(&basic("bob", "pw")), None, &scopes)
            .await
            .expect("bob token");
        let id = a
            .identify(Some(&format!("Bearer {}", bob.token)), None)
            .await
            .expect("verify");
        assert_eq!(
            a.authorize(&id, Need::Push("local/app")),
            Err(AccessError::Denied("user \"bob\" may not push".into()))
        );
        assert_eq!(
            a.token(Some(&basic("alice", "bad")), None, &scopes)
                .await
                .err(),
            Some(AccessError::BadCredentials)
        );
    }
}
