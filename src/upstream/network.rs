//! Where a redirect may take an upstream request. Registries redirect all the time
//! (Docker Hub's blobs go to a CDN, registry.k8s.io sends every request to Artifact
//! Registry or S3), but a redirect must not turn the mirror into a way to reach its own
//! network: a target that resolves to a loopback, link-local (cloud metadata at
//! 169.254.169.254) or private address is refused unless the upstream itself lives at an
//! address of that kind (an internal registry). The resolved address is checked, and the
//! connection then goes to exactly that address, so a name cannot resolve differently
//! between the check and the connect.

use std::io;
use std::net::{IpAddr, SocketAddr};

use futures_util::future::BoxFuture;

use super::configured::Upstream;
use super::error::{connect_msg, protocol, UpstreamError};
use crate::egress::Proxies;

/// What kind of network an address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrKind {
    Loopback,
    LinkLocal,
    Private,
    Public,
}

/// The kind of `ip` (IPv4-mapped IPv6 counts as its IPv4 address; unspecified addresses
/// reach this host, so they count as loopback).
pub fn kind_of(ip: IpAddr) -> AddrKind {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() || v4.is_unspecified() {
                AddrKind::Loopback
            } else if v4.is_link_local() {
                AddrKind::LinkLocal
            } else if v4.is_private()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || v4.is_broadcast()
                || v4.is_multicast()
            {
                AddrKind::Private
            } else {
                AddrKind::Public
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return kind_of(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() || v6.is_unspecified() {
                AddrKind::Loopback
            } else if first & 0xffc0 == 0xfe80 {
                AddrKind::LinkLocal
            } else if first & 0xfe00 == 0xfc00 || v6.is_multicast() {
                AddrKind::Private
            } else {
                AddrKind::Public
            }
        }
    }
}

/// Whether a redirect to an address of kind `target` may be followed for an upstream
/// whose own addresses are of the kinds `own`.
pub fn allowed(target: AddrKind, own: &[AddrKind]) -> bool {
    target == AddrKind::Public || own.contains(&target)
}

/// Name resolution and address classification, injectable so tests can map a name to
/// an address of any kind without ever connecting outside loopback.
pub trait Network: Send + Sync {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;

    fn kind(&self, ip: IpAddr) -> AddrKind {
        kind_of(ip)
    }
}

/// The system resolver and the real address classes.
pub struct SystemNetwork;

impl Network for SystemNetwork {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// The addresses of `url`'s host (an IP literal as is).
pub async fn addresses(net: &dyn Network, url: &url::Url) -> io::Result<Vec<SocketAddr>> {
    let port = url.port_or_known_default().unwrap_or(80);
    match url.host() {
        Some(url::Host::Ipv4(ip)) => Ok(vec![SocketAddr::new(IpAddr::V4(ip), port)]),
        Some(url::Host::Ipv6(ip)) => Ok(vec![SocketAddr::new(IpAddr::V6(ip), port)]),
        Some(url::Host::Domain(d)) => net.resolve(d, port).await,
        None => Err(io::Error::other(format!("{url} has no host"))),
    }
}

/// Whether `url` goes through an egress proxy.
fn proxied(proxies: &Proxies, url: &url::Url) -> bool {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(h), Some(p)) => proxies.route(url.scheme(), h, p).is_some(),
        _ => false,
    }
}

/// The kinds of network the upstream's own URL lives on. Behind a proxy the mirror may
/// not resolve the name at all; the upstream then counts as public (the strictest for
/// where its redirects may lead).
pub(super) async fn kinds(
    net: &dyn Network,
    proxies: &Proxies,
    up: &Upstream,
    base: &url::Url,
) -> Result<Vec<AddrKind>, UpstreamError> {
    match addresses(net, base).await {
        Ok(addrs) => Ok(addrs.iter().map(|a| net.kind(a.ip())).collect()),
        Err(_) if proxied(proxies, base) => Ok(vec![AddrKind::Public]),
        Err(e) => Err(connect_msg(
            up,
            format!("cannot resolve the host of {base}: {e}; check its url and this machine's DNS"),
        )),
    }
}

/// The address to connect to for `what` (a redirect, a token realm) at `url`: every
/// address the name has must be allowed (else one answer of a rotating name could
/// reach the inside). Through a proxy (`None`: the proxy connects, by name): the
/// addresses this machine resolves are checked all the same; a name it cannot resolve
/// is checked by its form only (`localhost` is loopback), as the proxy resolves it.
pub(super) async fn checked_addr(
    net: &dyn Network,
    proxies: &Proxies,
    up: &Upstream,
    what: &str,
    url: &url::Url,
    own: &[AddrKind],
) -> Result<Option<std::net::SocketAddr>, UpstreamError> {
    let via_proxy = proxied(proxies, url);
    let addrs = match addresses(net, url).await {
        Ok(a) => a,
        Err(_) if via_proxy => {
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            if host == "localhost" || host.ends_with(".localhost") {
                refuse(up, what, url, "localhost", AddrKind::Loopback, own)?;
            }
            return Ok(None);
        }
        Err(e) => {
            return Err(connect_msg(
                up,
                format!("cannot resolve the host of {url}: {e}"),
            ))
        }
    };
    if let Some(bad) = addrs.iter().find(|a| !allowed(net.kind(a.ip()), own)) {
        refuse(
            up,
            what,
            url,
            &bad.ip().to_string(),
            net.kind(bad.ip()),
            own,
        )?;
    }
    if via_proxy {
        return Ok(None);
    }
    addrs
        .first()
        .copied()
        .map(Some)
        .ok_or_else(|| connect_msg(up, format!("{url}: no address")))
}

/// Refuses `url` whose address (or name) is of kind `kind`, unless allowed.
fn refuse(
    up: &Upstream,
    what: &str,
    url: &url::Url,
    address: &str,
    kind: AddrKind,
    own: &[AddrKind],
) -> Result<(), UpstreamError> {
    if allowed(kind, own) {
        return Ok(());
    }
    tracing::warn!(upstream = %up.name, what, target = %url.origin().ascii_serialization(), address, "refused a host in a network the upstream is not on");
    Err(protocol(
        up,
        format!(
            "{what} {} refused: it resolves to {address} ({kind:?}), a network the upstream is not on",
            url.origin().ascii_serialization(),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> AddrKind {
        kind_of(s.parse().expect("ip"))
    }

    #[test]
    fn address_kinds() {
        assert_eq!(k("127.0.0.1"), AddrKind::Loopback);
        assert_eq!(k("0.0.0.0"), AddrKind::Loopback);
        assert_eq!(k("::1"), AddrKind::Loopback);
        assert_eq!(k("169.254.169.254"), AddrKind::LinkLocal);
        assert_eq!(k("fe80::1"), AddrKind::LinkLocal);
        for p in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert_eq!(k(p), AddrKind::Private, "{p}");
        }
        assert_eq!(k("::ffff:169.254.169.254"), AddrKind::LinkLocal);
        assert_eq!(k("34.120.1.1"), AddrKind::Public);
        assert_eq!(k("2600:1900::1"), AddrKind::Public);
    }

    #[test]
    fn policy() {
        let public = [AddrKind::Public];
        assert!(allowed(AddrKind::Public, &public));
        assert!(!allowed(AddrKind::LinkLocal, &public));
        assert!(!allowed(AddrKind::Loopback, &public));
        assert!(!allowed(AddrKind::Private, &public));
        // An internal registry may redirect within its own kind of network.
        assert!(allowed(AddrKind::Private, &[AddrKind::Private]));
        assert!(!allowed(AddrKind::LinkLocal, &[AddrKind::Private]));
        assert!(allowed(AddrKind::Loopback, &[AddrKind::Loopback]));
    }

    /// A resolver that knows `cdn.example` (public) and `inside.example` (private) only.
    struct Offline;

    impl Network for Offline {
        fn resolve<'a>(
            &'a self,
            host: &'a str,
            port: u16,
        ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
            let ip: Option<IpAddr> = match host {
                "cdn.example" => Some([34, 1, 1, 1].into()),
                "inside.example" => Some([10, 0, 0, 5].into()),
                _ => None,
            };
            Box::pin(async move {
                ip.map(|ip| vec![SocketAddr::new(ip, port)])
                    .ok_or_else(|| io::Error::other("no such host"))
            })
        }
    }

    fn hub() -> Upstream {
        Upstream::for_tests("hub", "https://registry.corp.test")
    }

    /// Behind a proxy the mirror may not resolve names: what it cannot resolve is checked
    /// by its form (and the proxy connects by name); what it resolves is checked as ever.
    #[tokio::test]
    async fn through_a_proxy_names_the_mirror_cannot_resolve_are_checked_by_form() {
        let up = hub();
        let proxies = crate::egress::Proxies::single("http://proxy.corp:3128").expect("proxy");
        let direct = crate::egress::Proxies::none();
        let url = |s: &str| url::Url::parse(s).expect("url");
        let own = kinds(&Offline, &proxies, &up, &up.base)
            .await
            .expect("own kinds");
        assert_eq!(
            own,
            vec![AddrKind::Public],
            "unresolvable upstream counts as public"
        );
        assert!(kinds(&Offline, &direct, &up, &up.base).await.is_err());
        let check = |p: &'static crate::egress::Proxies, u: &'static str| {
            let (up, own) = (hub(), own.clone());
            async move { checked_addr(&Offline, p, &up, "redirect to", &url(u), &own).await }
        };
        let p: &'static crate::egress::Proxies = Box::leak(Box::new(
            crate::egress::Proxies::single("http://proxy.corp:3128").expect("proxy"),
        ));
        let d: &'static crate::egress::Proxies = Box::leak(Box::new(
            crate::egress::Proxies::single("none").expect("none"),
        ));
        assert_eq!(
            check(p, "https://unknown.cdn.test/x")
                .await
                .expect("by name"),
            None
        );
        assert!(check(p, "https://metadata.localhost/x").await.is_err());
        assert!(check(p, "http://169.254.169.254/latest").await.is_err());
        assert!(
            check(p, "https://inside.example/x").await.is_err(),
            "a private address it resolves"
        );
        assert_eq!(
            check(p, "https://cdn.example/x").await.expect("public"),
            None
        );
        assert!(
            check(d, "https://unknown.cdn.test/x").await.is_err(),
            "direct needs an address"
        );
        assert!(check(d, "https://cdn.example/x")
            .await
            .expect("public")
            .is_some());
    }
}
