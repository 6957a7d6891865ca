//! Who is on the other end of a request, and the URL it reached the mirror at.
//!
//! Forwarded headers (`X-Forwarded-For`, `X-Forwarded-Host`/`-Proto`, `Forwarded`) are
//! believed only from a peer in `server.trusted_proxies`: from anyone else they are the
//! client's own words, and would let it pick the address its failed logins are counted
//! under, or put any text into the token realm other clients are sent to.

use std::net::IpAddr;

use actix_web::http::header;
use actix_web::HttpRequest;

pub struct Frontend {
    /// `server.external_url`, without a trailing `/`.
    external_url: Option<String>,
    proxies: Vec<ipnet::IpNet>,
}

impl Frontend {
    pub fn new(external_url: Option<&str>, proxies: Vec<ipnet::IpNet>) -> Frontend {
        Frontend {
            external_url: external_url.map(|u| u.trim_end_matches('/').to_string()),
            proxies,
        }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.proxies.iter().any(|n| n.contains(&ip))
    }

    fn peer_trusted(&self, req: &HttpRequest) -> bool {
        req.peer_addr().is_some_and(|a| self.trusts(a.ip()))
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy (the ones to
    /// its left were written by the client and prove nothing).
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr().map(|a| a.ip());
        if !self.peer_trusted(req) {
            return peer;
        }
        let forwarded = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in forwarded.iter().rev() {
            let Ok(ip) = hop.parse::<IpAddr>() else {
                return peer;
            };
            if !self.trusts(ip) {
                return Some(ip);
            }
        }
        peer
    }

    /// Where clients reach the mirror (`scheme://host[:port]`): `external_url`, or the
    /// scheme and host of the request (forwarded ones from a trusted proxy only), checked
    /// to be a plain origin. Anything else falls back to the address the request came in
    /// on, so the realm built from it is always a valid quoted string.
    pub fn public_base(&self, req: &HttpRequest) -> String {
        if let Some(u) = &self.external_url {
            return u.clone();
        }
        let (scheme, host) = if self.peer_trusted(req) {
            let info = req.connection_info();
            (info.scheme().to_string(), info.host().to_string())
        } else {
            let scheme = if req.app_config().secure() {
                "https"
            } else {
                "http"
            };
            let host = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            (scheme.to_string(), host)
        };
        origin(&scheme, &host).unwrap_or_else(|| {
            let scheme = if req.app_config().secure() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", req.app_config().local_addr())
        })
    }
}

/// `scheme://host` as an origin, if it is one: an http(s) scheme and a host (with an
/// optional port) and nothing else.
fn origin(scheme: &str, host: &str) -> Option<String> {
    if !matches!(scheme, "http" | "https") || host.is_empty() {
        return None;
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
    {
        return None;
    }
    let url = url::Url::parse(&format!("{scheme}://{host}")).ok()?;
    let plain = url.path() == "/" && url.query().is_none() && url.username().is_empty();
    plain.then(|| url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn front(proxies: &[&str]) -> Frontend {
        Frontend::new(
            None,
            proxies.iter().map(|p| p.parse().expect("cidr")).collect(),
        )
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let req = TestRequest::default()
            .peer_addr("10.0.0.5:1234".parse().expect("addr"))
            .insert_header(("X-Forwarded-For", "1.2.3.4, 5.6.7.8"))
            .to_http_request();
        assert_eq!(
            front(&[]).client_ip(&req),
            Some("10.0.0.5".parse().expect("ip"))
        );
        assert_eq!(
            front(&["10.0.0.0/8"]).client_ip(&req),
            Some("5.6.7.8".parse().expect("ip")),
            "the right-most hop the proxy saw, not the client's own claim"
        );
        assert_eq!(
            front(&["10.0.0.0/8", "5.6.7.8/32"]).client_ip(&req),
            Some("1.2.3.4".parse().expect("ip"))
        );
        let junk = TestRequest::default()
            .peer_addr("10.0.0.5:1234".parse().expect("addr"))
            .insert_header(("X-Forwarded-For", "not-an-ip"))
            .to_http_request();
        assert_eq!(
            front(&["10.0.0.0/8"]).client_ip(&junk),
            Some("10.0.0.5".parse().expect("ip"))
        );
    }

    #[test]
    fn the_realm_base_is_a_plain_origin() {
        let req = |host: &str| {
            TestRequest::default()
                .peer_addr("127.0.0.1:1234".parse().expect("addr"))
                .insert_header(("Host", host))
                .insert_header(("X-Forwarded-Host", "evil.test"))
                .to_http_request()
        };
        assert_eq!(
            front(&[]).public_base(&req("mirror.example:5000")),
            "http://mirror.example:5000"
        );
        // A forwarded host from an untrusted peer is ignored; from a trusted one, used.
        assert_eq!(
            front(&["127.0.0.1/32"]).public_base(&req("mirror.example")),
            "http://evil.test"
        );
        for bad in ["a.test/x\"/token", "a.test\"", "a b", "u@a.test"] {
            let base = front(&[]).public_base(&req(bad));
            assert!(
                !base.contains('"') && !base.contains("a.test"),
                "{bad}: {base}"
            );
        }
    }

    #[test]
    fn origins() {
        assert_eq!(
            origin("https", "r.example:443").as_deref(),
            Some("https://r.example")
        );
        assert_eq!(
            origin("http", "[::1]:5000").as_deref(),
            Some("http://[::1]:5000")
        );
        assert_eq!(origin("ftp", "r.example"), None);
        assert_eq!(origin("http", ""), None);
        assert_eq!(origin("http", "r.example/path"), None);
    }
}
