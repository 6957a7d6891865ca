//! The TCP step of awc's connector, proxy-aware: a direct connection, a `CONNECT` tunnel
//! (for `https://` targets; awc then does TLS over it), or a connection to the proxy
//! that rewrites each request to absolute form (for `http://` targets).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_rt::net::{ActixStream, Ready, TcpStream};
use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection};
use awc::http::Uri;
use futures_util::future::LocalBoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::absolute::AbsoluteForm;
use super::{Proxies, Route};

/// Longest answer to a `CONNECT` read (status line and headers).
const MAX_CONNECT_ANSWER: usize = 16 * 1024;

/// Why a proxy did not carry a request: carried inside the `io::Error` of a failed
/// connect, so the upstream client can tell a proxy's refusal from an upstream's.
#[derive(Debug)]
pub struct ProxyFailure {
    /// The proxy, without credentials.
    pub proxy: String,
    /// What it said or what failed: `407 Proxy Authentication Required`, `connection refused`.
    pub answer: String,
    /// The target it was asked for (`host:port`).
    pub target: String,
}

impl std::fmt::Display for ProxyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "egress proxy {} did not carry the request to {}: {}",
            self.proxy, self.target, self.answer
        )
    }
}

impl std::error::Error for ProxyFailure {}

fn failure(route: &Route, target: &str, answer: String) -> ConnectError {
    ConnectError::Io(io::Error::other(ProxyFailure {
        proxy: route.shown.clone(),
        answer,
        target: target.to_string(),
    }))
}

/// A connection made by [`ProxyConnector`].
pub enum ProxyStream {
    /// Directly to the target, or a tunnel through the proxy.
    Plain(TcpStream),
    /// To the proxy, with requests rewritten to absolute form.
    Absolute(AbsoluteForm<TcpStream>),
}

impl std::fmt::Debug for ProxyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyStream::Plain(_) => "ProxyStream::Plain",
            ProxyStream::Absolute(_) => "ProxyStream::Absolute",
        })
    }
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ProxyStream::Absolute(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ProxyStream::Plain(s) => Pin::new(s).poll_write(cx, b),
            ProxyStream::Absolute(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ProxyStream::Absolute(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ProxyStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ProxyStream::Absolute(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl ActixStream for ProxyStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        match self {
            ProxyStream::Plain(s) => ActixStream::poll_read_ready(s, cx),
            ProxyStream::Absolute(s) => ActixStream::poll_read_ready(s.inner(), cx),
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        match self {
            ProxyStream::Plain(s) => ActixStream::poll_write_ready(s, cx),
            ProxyStream::Absolute(s) => ActixStream::poll_write_ready(s.inner(), cx),
        }
    }
}

/// awc's TCP connector with [`Proxies`] in front of it.
#[derive(Clone)]
pub struct ProxyConnector<S> {
    direct: S,
    proxies: Arc<Proxies>,
}

impl<S> Service<ConnectInfo<Uri>> for ProxyConnector<S>
where
    S: Service<ConnectInfo<Uri>, Response = Connection<Uri, TcpStream>, Error = ConnectError>
        + Clone
        + 'static,
{
    type Response = Connection<Uri, ProxyStream>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, ConnectError>>;

    actix_service::forward_ready!(direct);

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let scheme = req.request().scheme_str().unwrap_or("http").to_string();
        let (host, port) = (req.hostname().to_string(), req.port());
        let Some(route) = self.proxies.route(&scheme, &host, port) else {
            let direct = self.direct.call(req);
            return Box::pin(async move {
                let c = direct.await?;
                let (io, uri) = c.into_parts();
                Ok(Connection::new(uri, ProxyStream::Plain(io)))
            });
        };
        let uri = req.request().clone();
        Box::pin(async move {
            let target = format!("{host}:{port}");
            let mut tcp = TcpStream::connect((route.host.as_str(), route.port))
                .await
                .map_err(|e| {
                    failure(&route, &target, format!("cannot connect to the proxy: {e}"))
                })?;
            let _ = tcp.set_nodelay(true);
            let io = if scheme == "https" {
                tunnel(&mut tcp, &route, &target).await?;
                ProxyStream::Plain(tcp)
            } else {
                let origin = if port == 80 {
                    format!("http://{host}")
                } else {
                    format!("http://{target}")
                };
                ProxyStream::Absolute(AbsoluteForm::new(tcp, origin, route.auth.clone()))
            };
            Ok(Connection::new(uri, io))
        })
    }
}

/// Asks the proxy for a tunnel to `target` and reads its answer (2xx: the tunnel is up).
async fn tunnel(tcp: &mut TcpStream, route: &Route, target: &str) -> Result<(), ConnectError> {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = &route.auth {
        req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| failure(route, target, format!("CONNECT not sent: {e}")))?;
    let mut answer = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past the blank line may be consumed (it belongs to TLS).
    while !answer.ends_with(b"\r\n\r\n") {
        let n = tcp
            .read(&mut byte)
            .await
            .map_err(|e| failure(route, target, format!("no answer to CONNECT: {e}")))?;
        if n == 0 {
            return Err(failure(
                route,
                target,
                "closed the connection after CONNECT".into(),
            ));
        }
        answer.push(byte[0]);
        if answer.len() > MAX_CONNECT_ANSWER {
            return Err(failure(route, target, "answer to CONNECT too long".into()));
        }
    }
    let status_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if code.starts_with('2') {
        return Ok(());
    }
    let reason = status_line
        .split_once(' ')
        .map(|x| x.1)
        .unwrap_or(&status_line)
        .trim();
    let hint = if code == "407" {
        "; check the proxy user and password (HTTPS_PROXY, or the upstream's proxy and proxy_password_file)"
    } else {
        ""
    };
    Err(failure(
        route,
        target,
        format!("answered {reason} to CONNECT{hint}"),
    ))
}

/// awc's connector with its TCP step made proxy-aware, ready for `.timeout()`,
/// TLS and the client builder.
pub fn client_connector(
    proxies: Arc<Proxies>,
) -> awc::Connector<
    impl Service<ConnectInfo<Uri>, Response = Connection<Uri, ProxyStream>, Error = ConnectError>
        + Clone,
> {
    let direct = actix_tls::connect::ConnectorService::default();
    awc::Connector::new().connector(ProxyConnector { direct, proxies })
}

/// A plain awc client (no redirects followed) through `proxies`, for the mirror's own
/// requests to its peers.
pub fn plain_client(proxies: Arc<Proxies>, timeout: std::time::Duration) -> awc::Client {
    awc::Client::builder()
        .timeout(timeout)
        .disable_redirects()
        .connector(client_connector(proxies).timeout(timeout))
        .finish()
}
