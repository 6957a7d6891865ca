//! Outbound connections through a corporate egress proxy.
//!
//! The standard environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, upper
//! or lower case) is read with hyper-util's matcher, the one reqwest uses, so the upstream
//! client (awc), the cluster's peer client and the S3 client (object_store, on reqwest)
//! decide alike which hosts go through the proxy. An upstream may override it with its
//! own `proxy = "http://user@proxy:3128"` or `"none"`. `NO_PROXY` entries may carry a port
//! (`registry.corp:5000`), which the matcher itself does not know.
//!
//! `https://` targets go through the proxy with `CONNECT` (TLS end to end: the proxy sees
//! the host name only); `http://` ones as absolute-URI requests (see [`absolute`]).

mod absolute;
mod connector;

use std::fmt;
use std::sync::Arc;

use hyper_util::client::proxy::matcher::Matcher;

pub use connector::{client_connector, plain_client, ProxyFailure};

/// Where requests for a target go.
#[derive(Clone)]
pub struct Route {
    /// `host:port` of the proxy.
    pub host: String,
    pub port: u16,
    /// `Proxy-Authorization` value (Basic), when the proxy URL had a user.
    pub auth: Option<String>,
    /// The proxy as logs and errors name it: `http://proxy.corp:3128`, never a password.
    pub shown: String,
    /// The proxy's URL with its credentials, for another client (the S3 client) to use.
    /// Never printed.
    pub url: String,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Which targets go through which proxy.
pub struct Proxies {
    /// The proxies, with the `NO_PROXY` entries that have no port.
    matcher: Option<Matcher>,
    /// What was configured, as the start line shows it (passwords redacted).
    shown: String,
    /// `NO_PROXY` entries with a port: (port, a matcher that bypasses that host).
    bypass_ported: Vec<(u16, Matcher)>,
}

impl fmt::Debug for Proxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.matcher.is_some() {
            "Proxies(configured)"
        } else {
            "Proxies(direct)"
        })
    }
}

fn env_first(names: &[&str]) -> String {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_default()
}

impl Proxies {
    /// Direct connections for everything.
    pub fn none() -> Arc<Proxies> {
        Arc::new(Proxies {
            matcher: None,
            shown: "direct".into(),
            bypass_ported: Vec::new(),
        })
    }

    /// The process environment's proxies.
    pub fn from_env() -> Result<Arc<Proxies>, String> {
        let http = env_first(&["HTTP_PROXY", "http_proxy"]);
        let https = env_first(&["HTTPS_PROXY", "https_proxy"]);
        let all = env_first(&["ALL_PROXY", "all_proxy"]);
        for (name, v) in [
            ("HTTP_PROXY", &http),
            ("HTTPS_PROXY", &https),
            ("ALL_PROXY", &all),
        ] {
            if !v.is_empty() {
                check_url(v).map_err(|e| format!("{name}: {e}"))?;
            }
        }
        let no = env_first(&["NO_PROXY", "no_proxy"]);
        Ok(Arc::new(Proxies::build(&http, &https, &all, &no)))
    }

    /// One proxy for every target of an upstream (`proxy = "..."`), except what the
    /// environment's `NO_PROXY` lists; `"none"`: direct.
    pub fn single(url: &str) -> Result<Arc<Proxies>, String> {
        if url.eq_ignore_ascii_case("none") {
            return Ok(Proxies::none());
        }
        check_url(url)?;
        let no = env_first(&["NO_PROXY", "no_proxy"]);
        Ok(Arc::new(Proxies::build(url, url, "", &no)))
    }

    fn build(http: &str, https: &str, all: &str, no: &str) -> Proxies {
        let (ported, plain): (Vec<&str>, Vec<&str>) = no
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .partition(|e| port_of(e).is_some());
        // hyper-util's matcher knows no ports in NO_PROXY: an entry with one gets a
        // matcher of its own (a placeholder proxy it bypasses for that host).
        let bypass_ported = ported
            .iter()
            .filter_map(|e| {
                let (host, port) = port_of(e)?;
                let m = Matcher::builder()
                    .all("http://bypass.invalid".to_string())
                    .no(host.to_string())
                    .build();
                Some((port, m))
            })
            .collect();
        let any = [http, https, all].iter().any(|v| !v.is_empty());
        let matcher = any.then(|| {
            Matcher::builder()
                .http(http.to_string())
                .https(https.to_string())
                .all(all.to_string())
                .no(plain.join(","))
                .build()
        });
        let mut shown: Vec<String> = [("https", https), ("http", http), ("all", all)]
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}={}", redact(v)))
            .collect();
        if !no.trim().is_empty() {
            shown.push(format!("no_proxy={}", no.trim()));
        }
        Proxies {
            matcher,
            shown: if any {
                shown.join(" ")
            } else {
                "direct".into()
            },
            bypass_ported,
        }
    }

    /// What this routes through, for the start line: `https=http://proxy:3128/
    /// no_proxy=.svc,...` (passwords redacted), or `direct`.
    pub fn describe(&self) -> &str {
        &self.shown
    }

    /// Whether any target goes through a proxy.
    pub fn any(&self) -> bool {
        self.matcher.is_some()
    }

    /// The proxy for `scheme://host:port`, or `None` to connect directly.
    pub fn route(&self, scheme: &str, host: &str, port: u16) -> Option<Route> {
        let matcher = self.matcher.as_ref()?;
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let dst: http::Uri = format!("{scheme}://{bracketed}:{port}/").parse().ok()?;
        if self
            .bypass_ported
            .iter()
            .any(|(p, m)| *p == port && m.intercept(&dst).is_none())
        {
            return None;
        }
        let hit = matcher.intercept(&dst)?;
        let uri = hit.uri();
        let url = match hit.raw_auth() {
            Some((user, pass)) => {
                let mut u = url::Url::parse(&uri.to_string()).ok()?;
                let _ = u.set_username(user);
                let _ = u.set_password(Some(pass));
                u.to_string()
            }
            None => uri.to_string(),
        };
        let proxy_host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let proxy_port = uri.port_u16().unwrap_or(80);
        let auth = hit
            .basic_auth()
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        Some(Route {
            host: proxy_host.to_string(),
            port: proxy_port,
            auth,
            shown: format!("http://{}:{proxy_port}", uri.host()?),
            url,
        })
    }
}

/// `(host, port)` of a `NO_PROXY` entry that names a port (`host:5000`, `[::1]:5000`).
fn port_of(entry: &str) -> Option<(&str, u16)> {
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        return Some((host, tail.strip_prefix(':')?.parse().ok()?));
    }
    let (host, port) = entry.rsplit_once(':')?;
    if host.contains(':') {
        return None; // a bare IPv6 address
    }
    Some((host, port.parse().ok()?))
}

/// A proxy URL this client can use: `http://[user[:password]@]host[:port]` (a missing
/// scheme means http://).
fn check_url(url: &str) -> Result<(), String> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let u = url::Url::parse(&with_scheme).map_err(|e| format!("{}: {e}", redact(url)))?;
    if u.scheme() != "http" {
        return Err(format!(
            "{}: only http:// proxies are supported (CONNECT carries TLS end to end)",
            redact(url)
        ));
    }
    if u.host_str().is_none() {
        return Err(format!("{}: no host", redact(url)));
    }
    Ok(())
}

/// The proxy URL with `password` set (percent-encoded), for a password kept apart from
/// the URL (`proxy_password_file`, `proxy_password_env`).
pub fn with_password(url: &str, password: &str) -> Result<String, String> {
    let mut u = url::Url::parse(url).map_err(|e| format!("{}: {e}", redact(url)))?;
    if u.username().is_empty() {
        return Err(format!(
            "{}: a proxy password is set but the URL names no user (http://USER@host:port)",
            redact(url)
        ));
    }
    u.set_password(Some(password))
        .map_err(|()| format!("{}: cannot hold a password", redact(url)))?;
    Ok(u.to_string())
}

/// A proxy URL as logs and messages may show it: any password replaced by `***`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(no: &str) -> Proxies {
        Proxies::build(
            "http://proxy.corp:3128",
            "http://u:p%40ss@proxy.corp:3129",
            "",
            no,
        )
    }

    #[test]
    fn schemes_pick_their_proxy_and_auth_never_shows() {
        let p = proxies("");
        let r = p.route("http", "registry.corp", 80).expect("proxied");
        assert_eq!(
            (r.host.as_str(), r.port, r.auth.is_none()),
            ("proxy.corp", 3128, true)
        );
        let r = p
            .route("https", "registry-1.docker.io", 443)
            .expect("proxied");
        assert_eq!(r.port, 3129);
        // Basic base64("u:p@ss")
        assert_eq!(r.auth.as_deref(), Some("Basic dTpwQHNz"));
        assert_eq!(r.shown, "http://proxy.corp:3129");
        assert!(!format!("{r:?}").contains("p%40ss"));
    }

    #[test]
    fn no_proxy_forms() {
        let p = proxies(
            "internal.corp, .svc, 10.0.0.0/8, 192.168.1.5, registry.lan:5000, [fd00::1]:443",
        );
        let direct = |s: &str, h: &str, port: u16| p.route(s, h, port).is_none();
        assert!(direct("https", "internal.corp", 443));
        assert!(direct("https", "a.internal.corp", 443));
        assert!(!direct("https", "notinternal.corp", 443));
        assert!(direct("http", "entrepot.ns.svc", 5000));
        assert!(direct("http", "10.1.2.3", 5000));
        assert!(!direct("http", "11.1.2.3", 5000));
        assert!(direct("http", "192.168.1.5", 80));
        assert!(direct("http", "registry.lan", 5000));
        assert!(!direct("http", "registry.lan", 5001), "the port must match");
        assert!(direct("https", "fd00::1", 443));
        assert!(!direct("https", "quay.io", 443));
        let all = proxies("*");
        assert!(all.route("https", "quay.io", 443).is_none());
    }

    #[test]
    fn urls_are_checked_and_redacted() {
        assert!(check_url("proxy.corp:3128").is_ok());
        assert!(check_url("socks5://proxy.corp:1080").is_err());
        let err = check_url("https://u:secret@proxy.corp").expect_err("https proxy");
        assert!(!err.contains("secret"), "{err}");
        assert_eq!(
            redact("http://u:secret@proxy:3128"),
            "http://u:***@proxy:3128/"
        );
        let with = with_password("http://corp@proxy:3128", "p@ss:w").expect("password");
        assert_eq!(with, "http://corp:p%40ss%3Aw@proxy:3128/");
        assert!(with_password("http://proxy:3128", "x").is_err());
        assert!(Proxies::single("none")
            .expect("none")
            .route("https", "quay.io", 443)
            .is_none());
    }
}
