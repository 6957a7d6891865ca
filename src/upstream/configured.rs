//! The upstreams as configured: built once at start-up from `[upstreams.*]` (URLs,
//! credentials resolved now, TLS roots, filters) and never changed; a per-request copy
//! carries a client's own credentials instead of the configured ones.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use super::filter::RepoFilter;
use crate::config::{Config, ConfigError};

/// One configured upstream registry (read-only after start-up).
pub struct Upstream {
    /// The key: path prefix and `?ns=` host.
    pub name: String,
    pub base: url::Url,
    /// Tried in order when `base` fails or is in back-off; never sent credentials.
    pub fallbacks: Vec<url::Url>,
    pub credentials: Option<(String, String)>,
    /// Clients' own credentials may be forwarded here (`client_credentials`).
    pub client_credentials: bool,
    pub tag_ttl: Duration,
    /// Docker Hub's convention: a one-part name means `library/<name>`.
    pub library_prefix: bool,
    /// Which repositories may be fetched and served.
    pub filter: Arc<RepoFilter>,
    /// Set on a per-request copy that carries a client's own credentials instead of the
    /// configured ones: the identity of those credentials (see [`Creds::id`]).
    pub client: Option<String>,
    /// TLS settings when the upstream has its own CA (`ca_file`); none: public roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Its own egress proxy (`proxy`); none: the environment's.
    pub proxy: Option<Arc<crate::egress::Proxies>>,
    /// Ranges of cold blobs may be fetched ahead of the fill (`verify_ranges = "after"`,
    /// the default); false: they wait for the verified fill.
    pub ranges_ahead: bool,
    /// A range of a cold blob starts the blob's fill (`range_fill`, default true).
    pub range_fill: bool,
}

/// Never prints the password.
impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base", &self.base.as_str())
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds every upstream from the config, resolving secrets now so that a missing
    /// password file fails at start-up, not on the first pull.
    pub fn all_from(cfg: &Config) -> Result<Vec<Arc<Upstream>>, ConfigError> {
        let mut out = Vec::new();
        for (name, up) in &cfg.upstreams {
            // A URL copied with its API path (`https://r.example/v2/`) would send every
            // request to `/v2/v2/`: the base is what comes before `/v2`.
            let parse = |u: &str| {
                let trimmed = u.trim_end_matches('/');
                let trimmed = trimmed.strip_suffix("/v2").unwrap_or(trimmed);
                url::Url::parse(trimmed).map_err(|e| ConfigError::Upstream {
                    name: name.clone(),
                    msg: format!("{u}: {e}"),
                })
            };
            let base = parse(&up.url)?;
            let fallbacks = up
                .fallback_urls
                .iter()
                .map(|u| parse(u))
                .collect::<Result<_, _>>()?;
            let password = up.resolve_password(name)?;
            let filter =
                RepoFilter::new(&up.allow, &up.deny).map_err(|e| ConfigError::Upstream {
                    name: name.clone(),
                    msg: format!("allow/deny: {e}"),
                })?;
            let credentials = up
                .username
                .clone()
                .map(|u| (u, password.unwrap_or_default()));
            out.push(Arc::new(Upstream {
                library_prefix: name == "docker.io"
                    || base.host_str() == Some("registry-1.docker.io"),
                name: name.clone(),
                base,
                fallbacks,
                client_credentials: up.client_credentials.unwrap_or(credentials.is_none()),
                credentials,
                tag_ttl: up.tag_ttl(),
                filter: Arc::new(filter),
                client: None,
                tls: up
                    .ca_file
                    .as_deref()
                    .map(|f| tls_with_ca(name, f))
                    .transpose()?,
                ranges_ahead: up.verify_ranges.as_deref() != Some("before"),
                range_fill: up.range_fill.unwrap_or(true),
                proxy: up
                    .resolve_proxy(name)?
                    .map(|p| crate::egress::Proxies::single(&p))
                    .transpose()
                    .map_err(|msg| ConfigError::Upstream {
                        name: name.clone(),
                        msg: format!("proxy {msg}"),
                    })?,
            }));
        }
        Ok(out)
    }

    /// A copy that authenticates upstream with a client's own credentials.
    pub fn with_client_creds(&self, c: &Creds) -> Arc<Upstream> {
        Arc::new(Upstream {
            name: self.name.clone(),
            base: self.base.clone(),
            fallbacks: self.fallbacks.clone(),
            credentials: Some((c.user.clone(), c.pass.clone())),
            client_credentials: true,
            tag_ttl: self.tag_ttl,
            library_prefix: self.library_prefix,
            filter: self.filter.clone(),
            client: Some(c.id()),
            tls: self.tls.clone(),
            proxy: self.proxy.clone(),
            ranges_ahead: self.ranges_ahead,
            range_fill: self.range_fill,
        })
    }

    /// An upstream for unit tests: `name` at `base`, no credentials, nothing special;
    /// tests change what they need with struct update syntax.
    #[cfg(test)]
    pub fn for_tests(name: &str, base: &str) -> Upstream {
        Upstream {
            name: name.into(),
            base: url::Url::parse(base).expect("test url"),
            fallbacks: Vec::new(),
            credentials: None,
            client_credentials: false,
            tag_ttl: Duration::from_secs(1),
            library_prefix: false,
            filter: Arc::default(),
            client: None,
            tls: None,
            proxy: None,
            ranges_ahead: true,
            range_fill: true,
        }
    }

    pub(super) fn basic_header(&self) -> Option<String> {
        self.credentials.as_ref().map(|(u, p)| basic(u, p))
    }
}

/// Public roots plus the CA certificates in `ca_file`, offering h2 and http/1.1.
fn tls_with_ca(
    name: &str,
    ca_file: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let err = |msg: String| ConfigError::Upstream {
        name: name.to_string(),
        msg,
    };
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(format!("ca_file {}: {e}", ca_file.display())))?;
    if certs.is_empty() {
        return Err(err(format!(
            "ca_file {} holds no certificate",
            ca_file.display()
        )));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| err(format!("ca_file {}: {e}", ca_file.display())))?;
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn basic(user: &str, pass: &str) -> String {
    let raw = format!("{user}:{pass}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A client's own credentials for an upstream, forwarded instead of the mirror's.
#[derive(Clone, PartialEq, Eq)]
pub struct Creds {
    pub user: String,
    pub pass: String,
}

impl Creds {
    /// A stable identity that does not reveal the password (token cache and proof keys).
    pub fn id(&self) -> String {
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(format!("{}:{}", self.user, self.pass));
        hex::encode(&h[..12])
    }
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds({}, ***)", self.user)
    }
}
