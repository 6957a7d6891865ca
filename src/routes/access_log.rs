//! The access log: one line per request, written when its body has been sent (or the
//! client went away), so it holds the bytes really sent and the whole duration, not the
//! time to the headers of a blob that then streams for a minute.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::web::Bytes;

/// What the line says about the request, known once the handler answered.
pub struct Line {
    pub method: actix_web::http::Method,
    pub path: String,
    pub status: u16,
    /// `None`: no upstream (`-`).
    pub upstream: Option<String>,
    pub cache: &'static str,
    pub client: Option<std::net::IpAddr>,
    /// `None`: anonymous (`-`).
    pub user: Option<String>,
    pub start: Instant,
    /// Time to the response headers, in ms.
    pub headers_ms: f64,
}

/// A response body that counts what it sends and logs [`Line`] when dropped: after its
/// last byte, or early when the client disconnects (`complete=false`).
pub struct Logged {
    inner: BoxBody,
    line: Line,
    sent: u64,
    complete: bool,
}

impl Logged {
    pub fn wrap(inner: BoxBody, line: Line) -> BoxBody {
        // A HEAD's body is never sent (its size only sets Content-Length).
        let complete = line.method == actix_web::http::Method::HEAD
            || matches!(inner.size(), BodySize::None | BodySize::Sized(0));
        BoxBody::new(Logged {
            inner,
            line,
            sent: 0,
            complete,
        })
    }
}

impl MessageBody for Logged {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let next = Pin::new(&mut self.inner).poll_next(cx);
        match &next {
            Poll::Ready(Some(Ok(b))) => self.sent += b.len() as u64,
            Poll::Ready(None) => self.complete = true,
            _ => {}
        }
        next
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let l = &self.line;
        let client: &dyn std::fmt::Display = match &l.client {
            Some(ip) => ip,
            None => &"-",
        };
        tracing::info!(
            target: "entrepot::access",
            method = %l.method, path = %l.path, status = l.status,
            upstream = %l.upstream.as_deref().unwrap_or("-"),
            cache = l.cache, bytes = self.sent, complete = self.complete,
            client = %client, user = %l.user.as_deref().unwrap_or("-"),
            headers_ms = l.headers_ms,
            ms = (l.start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        );
    }
}
