//! Configuration: `upstreams.toml` (or built-in defaults) overridden by `ENTREPOT_` env vars.
//!
//! The config is read once at start-up and turned into read-only values; nothing here is
//! mutated while serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Default tag TTL: short enough that a re-pushed tag is seen soon, long enough that a CI
/// farm pulling the same tag hundreds of times a minute asks the upstream only once.
const DEFAULT_TAG_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// figment's message (rendered once, without figment's `default.` profile prefix).
    #[error("config: {0}")]
    Parse(String),
    #[error("config file {0}")]
    File(String),
    #[error("upstream {name:?}: {msg}")]
    Upstream { name: String, msg: String },
    #[error("server: {0}")]
    Server(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// A read-write registry under its own prefix; absent: no hosted repositories.
    #[serde(default)]
    pub hosted: Option<HostedConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Replicas that share one bucket and cooperate (one upstream fetch per blob).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// `[[policy]]`: repositories served only when a cosign signature verifies.
    #[serde(default)]
    pub policy: Vec<PolicyConfig>,
    /// The file this was read from; `None`: the built-in defaults (and the environment).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `[cluster]`: how this replica reaches its peers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// How peers reach this replica, e.g. `http://10.0.0.5:5000`.
    #[serde(rename = "self")]
    pub self_url: String,
    /// Every replica's URL, this one included.
    #[serde(default)]
    pub peers: Vec<String>,
    /// `host:port` whose A records are the replicas (re-resolved periodically).
    pub peers_dns: Option<String>,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
}

/// The shortest cluster secret accepted (bytes).
pub const MIN_CLUSTER_SECRET: usize = 16;

impl ClusterConfig {
    /// The shared secret from `secret`, `secret_file` or `secret_env`, at least
    /// [`MIN_CLUSTER_SECRET`] bytes: an empty or short one would let anyone who can reach
    /// a replica call the peer routes.
    pub fn resolve_secret(&self) -> Result<String, ConfigError> {
        let s = self.read_secret()?;
        if s.trim().len() < MIN_CLUSTER_SECRET {
            return Err(ConfigError::Server(format!(
                "cluster secret is {} bytes; give at least {MIN_CLUSTER_SECRET} (e.g. `openssl rand -hex 32`)",
                s.trim().len()
            )));
        }
        Ok(s)
    }

    fn read_secret(&self) -> Result<String, ConfigError> {
        let err = |m: String| ConfigError::Server(format!("cluster.{m}"));
        if let Some(s) = &self.secret {
            return Ok(s.clone());
        }
        if let Some(f) = &self.secret_file {
            let s = std::fs::read_to_string(f)
                .map_err(|e| err(format!("secret_file {}: {e}", f.display())))?;
            return Ok(s.trim_end_matches(['\r', '\n']).to_string());
        }
        if let Some(v) = &self.secret_env {
            return std::env::var(v).map_err(|_| err(format!("secret_env {v} is not set")));
        }
        Err(err(
            "secret: give secret, secret_file or secret_env (peer requests need it)".into(),
        ))
    }

    fn validate(&self, has_s3: bool) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError::Server(format!("cluster: {m}")));
        if !has_s3 {
            return err("replicas share content through a bucket: [cluster] needs [server.s3]");
        }
        let sources = self.secret.is_some() as u8
            + self.secret_file.is_some() as u8
            + self.secret_env.is_some() as u8;
        if sources != 1 {
            return err("give exactly one of secret, secret_file and secret_env");
        }
        if self.read_secret().is_ok() {
            // A short secret is refused now; one that cannot be read yet, when `serve`
            // reads it.
            self.resolve_secret()?;
        }
        match (self.peers.is_empty(), &self.peers_dns) {
            (true, None) => return err("give peers (a list including self) or peers_dns"),
            (false, Some(_)) => return err("give peers or peers_dns, not both"),
            _ => {}
        }
        for u in std::iter::once(&self.self_url).chain(&self.peers) {
            match url::Url::parse(u) {
                Ok(p) if matches!(p.scheme(), "http" | "https") => {}
                _ => return err(&format!("{u:?} is not an http:// or https:// URL")),
            }
        }
        let me = self.self_url.trim_end_matches('/');
        if !self.peers.is_empty() && !self.peers.iter().any(|p| p.trim_end_matches('/') == me) {
            return err("peers must include self");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostedConfig {
    /// `/v2/<prefix>/<repo>/...` is a normal read-write registry.
    pub prefix: String,
    /// Uploads untouched for this long are dropped with their bytes.
    #[serde(default = "default_upload_ttl", with = "humantime_serde")]
    pub upload_ttl: Duration,
    /// Upload sessions open at once on this replica (each holds stored bytes): more get
    /// `429`.
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
    /// Upload sessions one user may have in use at once (a shared CI account pushes from
    /// many jobs at once; idle sessions give way to new ones).
    #[serde(default = "default_max_uploads_per_user")]
    pub max_uploads_per_user: usize,
    /// A request body (upload chunk) that sends nothing for this long is abandoned.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
}

fn default_upload_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_uploads() -> usize {
    256
}

fn default_max_uploads_per_user() -> usize {
    128
}

fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}

/// Client authentication and authorisation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// htpasswd file with bcrypt entries (`htpasswd -B`); read at start.
    pub htpasswd: Option<PathBuf>,
    /// false: every request needs the credentials of an htpasswd user.
    pub anonymous_pull: bool,
    /// htpasswd users allowed to push and delete under the hosted prefix.
    pub push: Vec<String>,
    /// Secret that signs the mirror's own bearer tokens (and seals client credentials held
    /// in them). Replicas that share it accept each other's tokens; none: a random secret
    /// per process (clients fetch a new token after a restart).
    pub token_key: Option<String>,
    /// File holding `token_key` (trailing newline ignored).
    pub token_key_file: Option<PathBuf>,
    /// How long an issued token is valid.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            htpasswd: None,
            anonymous_pull: true,
            push: Vec::new(),
            token_key: None,
            token_key_file: None,
            token_ttl: Duration::from_secs(300),
        }
    }
}

impl AuthConfig {
    /// The token signing secret from `token_key` or `token_key_file`, if configured.
    pub fn token_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let key = match (&self.token_key, &self.token_key_file) {
            (Some(k), _) => k.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| ConfigError::Server(format!("token_key_file {}: {e}", f.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            (None, None) => return Ok(None),
        };
        if key.len() < 16 {
            return Err(ConfigError::Server(
                "auth.token_key must be at least 16 characters".into(),
            ));
        }
        Ok(Some(key.into_bytes()))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the registry API listens on.
    pub listen: SocketAddr,
    /// Root directory of the content-addressed store.
    pub storage: PathBuf,
    /// Upstream key used for paths without a prefix and without `?ns=` (Docker's
    /// `registry-mirrors`). The built-in defaults set `docker.io`; a config file must
    /// name it.
    pub default_upstream: Option<String>,
    /// How long to wait for an upstream's response headers.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Hot manifests, tag records and manifest links kept in memory (0: none). What
    /// another process adds (`entrepot import`) is seen at once, what it changes or
    /// removes (`entrepot gc`) within a second.
    pub memory_cache: bytesize::ByteSize,
    /// Cap on upstream-cached content (hosted content never counts); none: unbounded.
    pub max_cache_size: Option<bytesize::ByteSize>,
    /// Cached content not pulled for this long is dropped; none: kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// How often eviction runs while serving.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Serve `/metrics` on this address only (not on `listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2) on `listen` with this certificate.
    pub tls: Option<TlsConfig>,
    /// The URL clients reach the mirror at (e.g. behind a load balancer): the token realm
    /// is built from it. None: from the request (`Host`, `X-Forwarded-Proto`/`-Host`).
    pub external_url: Option<String>,
    /// Reverse proxies (CIDRs or addresses) whose `X-Forwarded-For`/`-Host`/`-Proto` and
    /// `Forwarded` headers are believed: the client address for login throttling and logs,
    /// and the host of the token realm. From any other peer they are ignored.
    pub trusted_proxies: Vec<String>,
    /// Keep blobs and metadata in an S3-API bucket shared by replicas; `storage` is then
    /// this replica's local disk tier.
    pub s3: Option<S3Config>,
}

/// `[server.s3]`: the shared object store (AWS S3, MinIO, Ceph RGW, Garage).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `http(s)://host:port`; none for AWS. When set, requests are path-style.
    pub endpoint: Option<String>,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// None: `AWS_ACCESS_KEY_ID` (and the secret from `AWS_SECRET_ACCESS_KEY`).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
    pub secret_access_key_env: Option<String>,
    /// Key prefix inside the bucket (e.g. `mirror/`).
    #[serde(default)]
    pub prefix: String,
    /// Cap on the local disk tier (least recently used blobs leave it first).
    #[serde(default = "default_local_cache")]
    pub local_cache_size: bytesize::ByteSize,
    /// Whether this process runs eviction on the bucket (one replica at a time).
    #[serde(default = "default_true")]
    pub gc: bool,
    /// Whole-request timeout of one S3 request (a part or a small object).
    #[serde(default = "default_s3_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_local_cache() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(10)
}

fn default_true() -> bool {
    true
}

fn default_s3_timeout() -> Duration {
    Duration::from_secs(300)
}

impl S3Config {
    /// The secret from `secret_access_key`, `_file` or `_env`; none: the AWS env vars.
    pub fn resolve_secret(&self) -> Result<Option<String>, ConfigError> {
        let err = |m: String| ConfigError::Server(format!("server.s3.{m}"));
        if let Some(s) = &self.secret_access_key {
            return Ok(Some(s.clone()));
        }
        if let Some(f) = &self.secret_access_key_file {
            let s = std::fs::read_to_string(f)
                .map_err(|e| err(format!("secret_access_key_file {}: {e}", f.display())))?;
            return Ok(Some(s.trim_end_matches(['\r', '\n']).to_string()));
        }
        if let Some(v) = &self.secret_access_key_env {
            let s = std::env::var(v)
                .map_err(|_| err(format!("secret_access_key_env {v} is not set")))?;
            return Ok(Some(s));
        }
        Ok(None)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError::Server(format!("server.s3: {m}")));
        let sources = self.secret_access_key.is_some() as u8
            + self.secret_access_key_file.is_some() as u8
            + self.secret_access_key_env.is_some() as u8;
        if sources > 1 {
            return err(
                "give one of secret_access_key, secret_access_key_file and secret_access_key_env",
            );
        }
        if self.bucket.is_empty() {
            return err("bucket is empty");
        }
        if let Some(e) = &self.endpoint {
            match url::Url::parse(e) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return err(&format!(
                        "endpoint {e:?} must be an http:// or https:// URL"
                    ))
                }
            }
        }
        if !self.prefix.is_empty() && !self.prefix.ends_with('/') {
            return err("prefix must end with '/'");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl ServerConfig {
    /// `trusted_proxies` parsed: `10.0.0.0/8`, `fd00::/8`, or one address.
    pub fn trusted_proxies(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::Server(format!(
                            "trusted_proxies: {p:?} is not a CIDR (10.0.0.0/8) or an address"
                        ))
                    })
            })
            .collect()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            storage: PathBuf::from("./data"),
            default_upstream: None,
            upstream_timeout: Duration::from_secs(30),
            memory_cache: bytesize::ByteSize::mib(32),
            max_cache_size: None,
            max_age: None,
            gc_interval: Duration::from_secs(600),
            metrics_listen: None,
            tls: None,
            external_url: None,
            trusted_proxies: Vec::new(),
            s3: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the upstream registry, e.g. `https://registry-1.docker.io`.
    pub url: String,
    /// Tried in order when `url` fails or rate-limits (e.g. `https://mirror.gcr.io`);
    /// never sent the credentials.
    #[serde(default)]
    pub fallback_urls: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// How long a tag -> digest answer is trusted before it is revalidated upstream.
    #[serde(default, with = "humantime_serde")]
    pub tag_ttl: Option<Duration>,
    /// Whether a client's own Basic credentials (not an htpasswd user's) are forwarded to
    /// this upstream when the mirror's are refused (private upstream images). Default:
    /// true only for upstreams without credentials of their own.
    pub client_credentials: Option<bool>,
    /// Extra CA certificates (PEM) trusted for this upstream, besides the public roots: for
    /// private registries behind an internal CA.
    pub ca_file: Option<PathBuf>,
    /// Glob patterns on the repository name; when set, only matching repositories are
    /// fetched or served.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Glob patterns on the repository name that are never fetched or served (wins over
    /// `allow`).
    #[serde(default)]
    pub deny: Vec<String>,
    /// The egress proxy for this upstream, its token realms and redirect targets, instead
    /// of the environment's (`HTTPS_PROXY`...): `http://[user@]proxy.corp:3128`, or
    /// `none` to connect directly. `NO_PROXY` still applies.
    pub proxy: Option<String>,
    /// The proxy user's password, kept out of the URL (never logged).
    pub proxy_password_file: Option<PathBuf>,
    pub proxy_password_env: Option<String>,
    /// `after` (default): a range of a cold blob the fill has not reached is fetched from
    /// the upstream at once and checked against the blob once the fill verified it;
    /// `before`: it waits for the verified fill.
    pub verify_ranges: Option<String>,
    /// Whether a range of a cold blob starts the fill of the whole blob (default true: the
    /// next full pull is warm); false: ranges are served from the upstream alone.
    pub range_fill: Option<bool>,
}

/// Built-in upstreams used when no config file exists.
fn default_upstreams() -> BTreeMap<String, UpstreamConfig> {
    [
        ("docker.io", "https://registry-1.docker.io"),
        ("quay.io", "https://quay.io"),
        ("ghcr.io", "https://ghcr.io"),
        ("registry.k8s.io", "https://registry.k8s.io"),
        ("gcr.io", "https://gcr.io"),
    ]
    .into_iter()
    .map(|(k, url)| {
        let cfg = UpstreamConfig {
            url: url.into(),
            ..Default::default()
        };
        (k.to_string(), cfg)
    })
    .collect()
}

impl Config {
    /// Loads `path` if given (it must exist), else `./upstreams.toml` if present, else the
    /// built-in defaults; then applies `ENTREPOT_*` env overrides (`__` separates levels).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) if !p.exists() => {
                return Err(ConfigError::File(format!("{} does not exist", p.display())))
            }
            Some(p) if p.is_dir() => {
                return Err(ConfigError::File(format!(
                    "{} is a directory; give the TOML file (e.g. {}/upstreams.toml)",
                    p.display(),
                    p.display()
                )))
            }
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from("upstreams.toml")).filter(|p| p.exists()),
        };
        let mut fig = Figment::from(Serialized::defaults(Config {
            server: ServerConfig::default(),
            upstreams: BTreeMap::new(),
            hosted: None,
            auth: AuthConfig::default(),
            cluster: None,
            policy: Vec::new(),
            file: None,
        }));
        fig = match &file {
            Some(f) => fig.merge(Toml::file(f)),
            None => fig
                .merge(Serialized::default("upstreams", default_upstreams()))
                .merge(Serialized::default("server.default_upstream", "docker.io")),
        };
        fig = fig.merge(Env::prefixed("ENTREPOT_").split("__"));
        let mut cfg: Config = fig.extract().map_err(|e| ConfigError::Parse(explain(e)))?;
        cfg.validate()?;
        // Every message names the store by its absolute path, whatever the working
        // directory the command ran in.
        if let Ok(abs) = std::path::absolute(&cfg.server.storage) {
            cfg.server.storage = abs;
        }
        cfg.file = file.map(|f| std::path::absolute(&f).unwrap_or(f));
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, up) in &self.upstreams {
            let err = |msg: &str| ConfigError::Upstream {
                name: name.clone(),
                msg: msg.into(),
            };
            if !crate::names::is_valid_component(name) {
                return Err(err(
                    "key must be a valid lowercase repository path component",
                ));
            }
            if up.password.is_some() as u8
                + up.password_file.is_some() as u8
                + up.password_env.is_some() as u8
                > 1
            {
                return Err(err(
                    "give one of password, password_file and password_env, not several",
                ));
            }
            let has_password =
                up.password.is_some() || up.password_file.is_some() || up.password_env.is_some();
            if has_password && up.username.is_none() {
                return Err(err("a password is set but no username"));
            }
            if let Some(v) = &up.verify_ranges {
                if v != "after" && v != "before" {
                    return Err(err(&format!(
                        "verify_ranges {v:?} must be \"after\" (serve ahead of the fill, check later) or \"before\" (wait for the verified fill)"
                    )));
                }
            }
            for u in std::iter::once(&up.url).chain(&up.fallback_urls) {
                let scheme = || {
                    format!("url {u:?} must be an absolute http:// or https:// URL, e.g. \"https://{}\"", u.trim_start_matches("//"))
                };
                let url = url::Url::parse(u).map_err(|e| err(&format!("{} ({e})", scheme())))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(err(&scheme()));
                }
            }
        }
        if let Some(h) = &self.hosted {
            if !crate::names::is_valid_component(&h.prefix)
                || self.upstreams.contains_key(&h.prefix)
            {
                return Err(ConfigError::Server(format!(
                    "hosted prefix {:?} must be a valid path component and not an upstream key",
                    h.prefix
                )));
            }
        }
        if !self.auth.push.is_empty() && self.auth.htpasswd.is_none() {
            return Err(ConfigError::Server(
                "auth.push names users but auth.htpasswd is not set".into(),
            ));
        }
        if let Some(u) = &self.server.external_url {
            let url = url::Url::parse(u)
                .map_err(|e| ConfigError::Server(format!("external_url: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ConfigError::Server(
                    "external_url must be http:// or https://".into(),
                ));
            }
        }
        self.server.trusted_proxies()?;
        if let Some(s3) = &self.server.s3 {
            s3.validate()?;
        }
        if let Some(c) = &self.cluster {
            c.validate(self.server.s3.is_some())?;
        }
        if let Some(d) = &self.server.default_upstream {
            if !self.upstreams.contains_key(d) {
                return Err(ConfigError::Server(format!(
                    "default_upstream {d:?} is not a configured upstream"
                )));
            }
        }
        Ok(())
    }
}

impl UpstreamConfig {
    pub fn tag_ttl(&self) -> Duration {
        self.tag_ttl.unwrap_or(DEFAULT_TAG_TTL)
    }

    /// Resolves the password from `password`, `password_file` or `password_env`.
    /// The `proxy` URL with its password from `proxy_password_file`/`_env`, if any.
    pub fn resolve_proxy(&self, name: &str) -> Result<Option<String>, ConfigError> {
        let err = |msg: String| ConfigError::Upstream {
            name: name.into(),
            msg,
        };
        let Some(url) = &self.proxy else {
            if self.proxy_password_file.is_some() || self.proxy_password_env.is_some() {
                return Err(err(
                    "proxy_password_file/_env is set but proxy is not".into()
                ));
            }
            return Ok(None);
        };
        let password = match (&self.proxy_password_file, &self.proxy_password_env) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "give one of proxy_password_file and proxy_password_env, not both".into(),
                ))
            }
            (Some(f), None) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| err(format!("proxy_password_file {}: {e}", f.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            (None, Some(v)) => Some(
                std::env::var(v).map_err(|_| err(format!("proxy_password_env {v} is not set")))?,
            ),
            (None, None) => None,
        };
        match password {
            Some(p) if !url.eq_ignore_ascii_case("none") => crate::egress::with_password(url, &p)
                .map(Some)
                .map_err(|e| err(format!("proxy {e}"))),
            _ => Ok(Some(url.clone())),
        }
    }

    pub fn resolve_password(&self, name: &str) -> Result<Option<String>, ConfigError> {
        let err = |msg: String| ConfigError::Upstream {
            name: name.into(),
            msg,
        };
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(f) = &self.password_file {
            let s = std::fs::read_to_string(f)
                .map_err(|e| err(format!("password_file {}: {e}", f.display())))?;
            return Ok(Some(s.trim_end_matches(['\r', '\n']).to_string()));
        }
        if let Some(v) = &self.password_env {
            let s = std::env::var(v).map_err(|_| err(format!("password_env {v} is not set")))?;
            return Ok(Some(s));
        }
        Ok(None)
    }
}

/// figment's errors, each with the key as written (no `default.` profile prefix) and, for
/// the value kinds people get wrong (durations, sizes, addresses), an example of the form.
fn explain(errors: figment::Error) -> String {
    errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let text = e.to_string().replace("\"default.", "\"");
            match hint(&key, &e.kind.to_string()) {
                Some(h) => format!("{text}; {h}"),
                None => text,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn hint(key: &str, kind: &str) -> Option<String> {
    let last = key.rsplit('.').next().unwrap_or(key);
    let example = if kind.contains("duration")
        || last.ends_with("timeout")
        || last.ends_with("ttl")
        || last == "max_age"
    {
        "a duration in quotes, e.g. \"30s\", \"5m\", \"2h\" or \"7d\""
    } else if last.ends_with("_size") {
        "a size in quotes, e.g. \"500MB\", \"20GiB\" or \"1TB\""
    } else if last.contains("listen") || kind.contains("socket address") {
        "an address and port in quotes, e.g. \"0.0.0.0:5000\" or \"127.0.0.1:9090\""
    } else if kind.contains("path") {
        "a path in quotes, e.g. \"/var/lib/entrepot\""
    } else {
        return None;
    };
    Some(format!("write {example}"))
}

/// `--help`'s list of every config key with its environment form
/// (`server.listen` -> `ENTREPOT_SERVER__LISTEN`), from the built-in defaults' structure,
/// so it never misses a key the config has.
pub fn env_help() -> String {
    use serde_json::json;
    let defaults = Config {
        server: ServerConfig::default(),
        upstreams: BTreeMap::from([("<key>".to_string(), UpstreamConfig::default())]),
        hosted: None,
        auth: AuthConfig::default(),
        cluster: None,
        policy: Vec::new(),
        file: None,
    };
    let mut keys = Vec::new();
    if let Ok(mut v) = serde_json::to_value(&defaults) {
        // The optional sections, filled so that their keys show too.
        let section =
            |doc: serde_json::Value, parse: fn(serde_json::Value) -> Option<serde_json::Value>| {
                parse(doc).unwrap_or_default()
            };
        v["hosted"] = section(json!({"prefix": "local"}), |d| {
            serde_json::from_value::<HostedConfig>(d)
                .ok()
                .and_then(|c| serde_json::to_value(c).ok())
        });
        v["cluster"] = section(json!({"self": ""}), |d| {
            serde_json::from_value::<ClusterConfig>(d)
                .ok()
                .and_then(|c| serde_json::to_value(c).ok())
        });
        v["server"]["s3"] = section(json!({"bucket": ""}), |d| {
            serde_json::from_value::<S3Config>(d)
                .ok()
                .and_then(|c| serde_json::to_value(c).ok())
        });
        v["server"]["tls"] = json!({"cert": "", "key": ""});
        collect_keys(&v, "", &mut keys);
    }
    let mut out = String::from(
        "Configuration: a TOML file (--config, default ./upstreams.toml), each key also settable \
         from the environment, which wins over the file (nested keys joined by `__`):\n\n",
    );
    for k in keys {
        let env = format!("ENTREPOT_{}", k.replace('.', "__").to_uppercase());
        out.push_str(&format!("  {k:<40} {env}\n"));
    }
    out
}

fn collect_keys(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_keys(v, &key, out);
            }
        }
        _ if !prefix.is_empty() => out.push(prefix.to_string()),
        _ => {}
    }
}

/// `[[policy]]`: signed-only pulls for the repositories it matches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Named in refusals, logs and `entrepot_policy_decisions_total{policy}`.
    pub name: String,
    /// Globs over `<upstream key or hosted prefix>/<repository>` (`*` stays within one
    /// path component): `["docker.io/myorg/*", "local/prod/*"]`.
    #[serde(rename = "match")]
    pub matches: Vec<String>,
    /// The signature kind: `"sigstore"` (cosign-compatible).
    #[serde(default = "sigstore")]
    pub require: String,
    /// PEM public keys (`cosign.pub`); a signature by any one admits.
    pub keys: Vec<PathBuf>,
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default)]
    pub identity: PolicyIdentity,
}

fn sigstore() -> String {
    "sigstore".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Refuse what does not verify (403 DENIED).
    #[default]
    Enforce,
    /// Serve it, and log and count what would have been refused.
    Audit,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyIdentity {
    /// Any repository named in the payload.
    #[default]
    Any,
    /// The payload's `docker-reference` must name this repository (at its upstream's
    /// host, or the mirror's own address for hosted ones).
    Repository,
}
