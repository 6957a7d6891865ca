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

/// The kinds of network the upstream's own URL lives on.
pub(super) async fn kinds(
    net: &dyn Network,
    up: &Upstream,
    base: &url::Url,
) -> Result<Vec<AddrKind>, UpstreamError> {
    let addrs = addresses(net, base).await.map_err(|e| {
        connect_msg(
            up,
            format!("cannot resolve the host of {base}: {e}; check its url and this machine's DNS"),
        )
    })?;
    Ok(addrs.iter().map(|a| net.kind(a.ip())).collect())
}

/// The address to connect to for `what` (a redirect, a token realm) at `url`: every
/// address the name has must be allowed (else one answer of a rotating name could
/// reach the inside).
pub(super) async fn checked_addr(
    net: &dyn Network,
    up: &Upstream,
    what: &str,
    url: &url::Url,
    own: &[AddrKind],
) -> Result<std::net::SocketAddr, UpstreamError> {
    let addrs = addresses(net, url)
        .await
        .map_err(|e| connect_msg(up, format!("cannot resolve the host of {url}: {e}")))?;
    if let Some(bad) = addrs.iter().find(|a| !allowed(net.kind(a.ip()), own)) {
        tracing::warn!(upstream = %up.name, what, target = %url.origin().ascii_serialization(), address = %bad.ip(), "refused a host in a network the upstream is not on");
        return Err(protocol(
            up,
            format!(
                "{what} {} refused: it resolves to {} ({:?}), a network the upstream is not on",
                url.origin().ascii_serialization(),
                bad.ip(),
                net.kind(bad.ip())
            ),
        ));
    }
    addrs
        .first()
        .copied()
        .ok_or_else(|| connect_msg(up, format!("{url}: no address")))
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
}
