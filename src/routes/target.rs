//! Picks the upstream for a request: path prefix, then `?ns=`, then the default upstream.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::upstream::Upstream;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("no upstream is configured for namespace {0:?}")]
    UnknownNamespace(String),
    #[error("repository {0:?} names no configured upstream and there is no default upstream")]
    NoUpstream(String),
}

/// The upstream map, built once at start-up and read-only afterwards.
pub struct Router {
    upstreams: BTreeMap<String, Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
}

/// Where a request goes: an upstream and the repository name as that upstream knows it.
#[derive(Debug)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub repo: String,
}

impl Router {
    pub fn new(upstreams: Vec<Arc<Upstream>>, default: Option<&str>) -> Router {
        let upstreams: BTreeMap<_, _> =
            upstreams.into_iter().map(|u| (u.name.clone(), u)).collect();
        let default = default.and_then(|d| upstreams.get(d).cloned());
        Router { upstreams, default }
    }

    /// Resolves a validated repository name. The path prefix wins over `ns` (containerd
    /// sends both for `override_path` mirrors). `ns` is only ever a key into the
    /// configured upstreams, so an unknown one connects nowhere.
    pub fn resolve(&self, name: &str, ns: Option<&str>) -> Result<Target, RouteError> {
        if let Some((first, rest)) = name.split_once('/') {
            if let Some(up) = self.upstreams.get(first) {
                return Ok(target(up, rest));
            }
        }
        if let Some(ns) = ns {
            return match self.upstreams.get(ns) {
                Some(up) => Ok(target(up, name)),
                None => Err(RouteError::UnknownNamespace(ns.to_string())),
            };
        }
        match &self.default {
            Some(up) => Ok(target(up, name)),
            None => Err(RouteError::NoUpstream(name.to_string())),
        }
    }
}

fn target(up: &Arc<Upstream>, repo: &str) -> Target {
    let repo = if up.library_prefix && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo.to_string()
    };
    Target {
        upstream: up.clone(),
        repo,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str) -> Arc<Upstream> {
        Arc::new(Upstream {
            name: name.into(),
            base: url::Url::parse("http://127.0.0.1:9").expect("url"),
            credentials: None,
            tag_ttl: std::time::Duration::from_secs(1),
            library_prefix: name == "docker.io",
        })
    }

    fn resolve(r: &Router, name: &str, ns: Option<&str>) -> Result<(String, String), RouteError> {
        r.resolve(name, ns)
            .map(|t| (t.upstream.name.clone(), t.repo))
    }

    #[test]
    fn prefix_ns_default() {
        let r = Router::new(vec![up("docker.io"), up("quay.io")], Some("docker.io"));
        let pair = |a: &str, b: &str| Ok((a.to_string(), b.to_string()));
        assert_eq!(resolve(&r, "quay.io/a/b", None), pair("quay.io", "a/b"));
        assert_eq!(
            resolve(&r, "docker.io/alpine", Some("quay.io")),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(resolve(&r, "a/b", Some("quay.io")), pair("quay.io", "a/b"));
        assert_eq!(
            resolve(&r, "alpine", None),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(
            resolve(&r, "x", Some("evil.example.com")),
            Err(RouteError::UnknownNamespace("evil.example.com".into()))
        );
        let r = Router::new(vec![up("quay.io")], None);
        assert!(matches!(
            resolve(&r, "a/b", None),
            Err(RouteError::NoUpstream(_))
        ));
    }
}
