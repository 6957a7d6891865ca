//! Picks the upstream for a request: path prefix, then `?ns=`, then the default upstream.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::upstream::Upstream;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("no upstream is configured for namespace {0:?}")]
    UnknownNamespace(String),
    #[error("repository {name:?} names no configured upstream and there is no default upstream (server.default_upstream); use one of the prefixes {configured} (/v2/<prefix>/<repository>), or set server.default_upstream")]
    NoUpstream { name: String, configured: String },
    /// A name on Docker Hub whose first component is a host name: Hub has no namespace
    /// with a dot or a colon, so the client meant a registry that is not configured.
    #[error("{host:?} is not a configured upstream (Docker Hub has no such namespace); configured prefixes: {configured}; add [upstreams.\"{host}\"] to the config to mirror it")]
    UnconfiguredRegistry { host: String, configured: String },
    /// The name the upstream would get (`library/` added) is longer than names may be.
    #[error("repository name {0:?} is longer than 255 characters")]
    NameTooLong(String),
}

/// The upstream map, built once at start-up and read-only afterwards.
pub struct Router {
    upstreams: BTreeMap<String, Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
    hosted: Option<String>,
}

/// Where a request goes.
#[derive(Debug)]
pub enum Target {
    /// An upstream, with the repository name as that upstream knows it.
    Upstream {
        upstream: Arc<Upstream>,
        repo: String,
    },
    /// A hosted repository (name without the prefix).
    Hosted { repo: String },
}

impl Target {
    /// The store namespace: the upstream key or the hosted prefix.
    pub fn namespace<'a>(&'a self, hosted_prefix: &'a str) -> &'a str {
        match self {
            Target::Upstream { upstream, .. } => &upstream.name,
            Target::Hosted { .. } => hosted_prefix,
        }
    }

    pub fn repo(&self) -> &str {
        match self {
            Target::Upstream { repo, .. } | Target::Hosted { repo } => repo,
        }
    }
}

impl Router {
    pub fn new(
        upstreams: Vec<Arc<Upstream>>,
        default: Option<&str>,
        hosted: Option<&str>,
    ) -> Router {
        let upstreams: BTreeMap<_, _> =
            upstreams.into_iter().map(|u| (u.name.clone(), u)).collect();
        let default = default.and_then(|d| upstreams.get(d).cloned());
        Router {
            upstreams,
            default,
            hosted: hosted.map(str::to_string),
        }
    }

    /// Resolves a validated repository name. The path prefix wins over `ns` (containerd
    /// sends both for `override_path` mirrors). `ns` is only ever a key into the
    /// configured upstreams, so an unknown one connects nowhere.
    pub fn resolve(&self, name: &str, ns: Option<&str>) -> Result<Target, RouteError> {
        if let Some((first, rest)) = name.split_once('/') {
            if self.hosted.as_deref() == Some(first) {
                return Ok(Target::Hosted {
                    repo: rest.to_string(),
                });
            }
            if let Some(up) = self.upstreams.get(first) {
                return self.checked(up, rest);
            }
        }
        if let Some(ns) = ns {
            return match self.upstreams.get(ns) {
                Some(up) => self.checked(up, name),
                None => Err(RouteError::UnknownNamespace(ns.to_string())),
            };
        }
        match &self.default {
            Some(up) => self.checked(up, name),
            None => Err(RouteError::NoUpstream {
                name: name.to_string(),
                configured: self.prefixes(),
            }),
        }
    }

    /// Every configured upstream, by name.
    pub fn upstreams(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.upstreams.values()
    }

    /// [`target`], refusing a name whose first component is a host name when the
    /// upstream is Docker Hub (`/v2/foo.io/bar/...` with `foo.io` not configured): no
    /// request goes out for a repository that cannot exist there.
    fn checked(&self, up: &Arc<Upstream>, name: &str) -> Result<Target, RouteError> {
        if let Some((first, _)) = name.split_once('/') {
            if up.library_prefix && (first.contains('.') || first.contains(':')) {
                return Err(RouteError::UnconfiguredRegistry {
                    host: first.to_string(),
                    configured: self.prefixes(),
                });
            }
        }
        target(up, name)
    }

    /// The configured prefixes, for messages: `docker.io, quay.io, local (hosted)`.
    fn prefixes(&self) -> String {
        let mut all: Vec<String> = self.upstreams.keys().cloned().collect();
        all.extend(self.hosted.iter().map(|h| format!("{h} (hosted)")));
        if all.is_empty() {
            return "(none)".into();
        }
        all.join(", ")
    }
}

/// Names are checked again after normalisation: a 252-character name on docker.io is
/// 260 once `library/` is added, which no registry accepts.
fn target(up: &Arc<Upstream>, repo: &str) -> Result<Target, RouteError> {
    let repo = if up.library_prefix && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo.to_string()
    };
    if repo.len() > crate::routes::path::MAX_NAME {
        return Err(RouteError::NameTooLong(repo));
    }
    Ok(Target::Upstream {
        upstream: up.clone(),
        repo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str) -> Arc<Upstream> {
        Arc::new(Upstream {
            client_credentials: true,
            library_prefix: name == "docker.io",
            ..Upstream::for_tests(name, "http://127.0.0.1:9")
        })
    }

    fn resolve(r: &Router, name: &str, ns: Option<&str>) -> Result<(String, String), RouteError> {
        r.resolve(name, ns).map(|t| match t {
            Target::Upstream { upstream, repo } => (upstream.name.clone(), repo),
            Target::Hosted { repo } => ("hosted".into(), repo),
        })
    }

    #[test]
    fn prefix_ns_default() {
        let r = Router::new(
            vec![up("docker.io"), up("quay.io")],
            Some("docker.io"),
            Some("local"),
        );
        let pair = |a: &str, b: &str| Ok((a.to_string(), b.to_string()));
        assert_eq!(resolve(&r, "quay.io/a/b", None), pair("quay.io", "a/b"));
        assert_eq!(
            resolve(&r, "docker.io/alpine", Some("quay.io")),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(resolve(&r, "a/b", Some("quay.io")), pair("quay.io", "a/b"));
        assert_eq!(
            resolve(&r, "local/team/app", Some("quay.io")),
            pair("hosted", "team/app")
        );
        assert_eq!(
            resolve(&r, "alpine", None),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(
            resolve(&r, "x", Some("evil.example.com")),
            Err(RouteError::UnknownNamespace("evil.example.com".into()))
        );
        // A registry host that is not configured never reaches Docker Hub.
        match resolve(&r, "foo.io/bar", None) {
            Err(e @ RouteError::UnconfiguredRegistry { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("\"foo.io\"")
                        && text.contains("docker.io, quay.io, local (hosted)"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            resolve(&r, "localhost:5000/bar", None),
            Err(RouteError::UnconfiguredRegistry { .. })
        ));
        assert_eq!(
            resolve(&r, "my-org/app.v2", None),
            pair("docker.io", "my-org/app.v2")
        );
        let r = Router::new(vec![up("quay.io")], None, None);
        match resolve(&r, "a/b", None) {
            Err(e @ RouteError::NoUpstream { .. }) => {
                assert!(e.to_string().contains("server.default_upstream"), "{e}");
                assert!(e.to_string().contains("quay.io"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // Another default upstream may have dotted namespaces.
        let r = Router::new(vec![up("quay.io")], Some("quay.io"), None);
        assert_eq!(
            resolve(&r, "foo.io/bar", None),
            pair("quay.io", "foo.io/bar")
        );
    }
}
