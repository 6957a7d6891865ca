//! Requests to an `http://` target through a proxy: the proxy wants the request line in
//! absolute form (`GET http://registry.corp:5000/v2/ HTTP/1.1`), with `Proxy-Authorization`
//! when it asks for a login, while awc writes origin form (`GET /v2/ HTTP/1.1`). This
//! stream rewrites each request's head as it is written; everything read passes as is.
//!
//! Upstream requests carry no body (GET and HEAD only), so requests on a kept-alive
//! connection are heads back to back; a head announcing a body has its `Content-Length`
//! bytes passed through, and a chunked one is refused.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest request head accepted for rewriting.
const MAX_HEAD: usize = 64 * 1024;

/// Where the writer is in the request stream.
enum Phase {
    /// Collecting a request head (until the blank line).
    Head,
    /// Passing a body of this many more bytes.
    Body(u64),
}

pub struct AbsoluteForm<S> {
    inner: S,
    /// `http://host[:port]`, put before each request's path.
    origin: String,
    /// `Proxy-Authorization` value, added to each request.
    auth: Option<String>,
    phase: Phase,
    head: Vec<u8>,
    /// Rewritten bytes not yet written to `inner`.
    out: Vec<u8>,
}

impl<S> AbsoluteForm<S> {
    pub fn new(inner: S, origin: String, auth: Option<String>) -> AbsoluteForm<S> {
        AbsoluteForm {
            inner,
            origin,
            auth,
            phase: Phase::Head,
            head: Vec::new(),
            out: Vec::new(),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Takes `buf` into the state machine; returns how much was taken.
    fn take(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.phase {
            Phase::Body(left) => {
                let n = (left as usize).min(buf.len());
                self.out.extend_from_slice(&buf[..n]);
                self.phase = if left == n as u64 {
                    Phase::Head
                } else {
                    Phase::Body(left - n as u64)
                };
                Ok(n)
            }
            Phase::Head => {
                let before = self.head.len();
                self.head.extend_from_slice(buf);
                let Some(end) = find(&self.head, b"\r\n\r\n") else {
                    if self.head.len() > MAX_HEAD {
                        return Err(io::Error::other("request head too long for the proxy"));
                    }
                    return Ok(buf.len());
                };
                let head_len = end + 4;
                let taken = head_len - before;
                let head: Vec<u8> = self.head.drain(..).take(head_len).collect();
                self.head.clear();
                let body = self.rewrite(&head)?;
                self.phase = if body > 0 {
                    Phase::Body(body)
                } else {
                    Phase::Head
                };
                Ok(taken)
            }
        }
    }

    /// Appends the head in absolute form to `out`; the body length it announces.
    fn rewrite(&mut self, head: &[u8]) -> io::Result<u64> {
        let text =
            std::str::from_utf8(head).map_err(|_| io::Error::other("request head is not UTF-8"))?;
        let (line, rest) = text.split_once("\r\n").unwrap_or((text, ""));
        let mut parts = line.splitn(3, ' ');
        let (Some(method), Some(target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(io::Error::other(format!("not a request line: {line:?}")));
        };
        let absolute = if target.starts_with('/') {
            format!("{}{target}", self.origin)
        } else {
            target.to_string()
        };
        self.out
            .extend_from_slice(format!("{method} {absolute} {version}\r\n").as_bytes());
        if let Some(a) = &self.auth {
            self.out
                .extend_from_slice(format!("Proxy-Authorization: {a}\r\n").as_bytes());
        }
        let mut body = 0;
        for h in rest.split("\r\n") {
            let Some((name, value)) = h.split_once(':') else {
                continue;
            };
            if name.eq_ignore_ascii_case("content-length") {
                body = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(io::Error::other(
                    "chunked request bodies are not sent through a proxy",
                ));
            }
        }
        self.out.extend_from_slice(rest.as_bytes());
        Ok(body)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl<S: AsyncWrite + Unpin> AbsoluteForm<S> {
    /// Writes what is pending to `inner`; ready once nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AbsoluteForm<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AbsoluteForm<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Bounded: what one call hands over is written before the next is taken.
        std::task::ready!(this.drain(cx))?;
        let taken = this.take(buf)?;
        // Start writing now; what does not go yet is written by the next call or flush.
        if let Poll::Ready(Err(e)) = this.drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn written(chunks: &[&[u8]], auth: Option<&str>) -> io::Result<String> {
        let mut w = AbsoluteForm::new(
            Vec::new(),
            "http://registry.corp:5000".into(),
            auth.map(String::from),
        );
        for c in chunks {
            w.write_all(c).await?;
        }
        w.flush().await?;
        Ok(String::from_utf8(w.inner).expect("utf8"))
    }

    #[tokio::test]
    async fn heads_are_rewritten_however_they_are_cut() {
        let two = b"GET /v2/a/manifests/1 HTTP/1.1\r\nhost: registry.corp:5000\r\n\r\nHEAD /v2/ HTTP/1.1\r\n\r\n";
        let expect = "GET http://registry.corp:5000/v2/a/manifests/1 HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\nhost: registry.corp:5000\r\n\r\nHEAD http://registry.corp:5000/v2/ HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\n\r\n";
        assert_eq!(
            written(&[two], Some("Basic eDp5"))
                .await
                .expect("one write"),
            expect
        );
        let cut: Vec<&[u8]> = two.chunks(7).collect();
        assert_eq!(
            written(&cut, Some("Basic eDp5")).await.expect("cut"),
            expect
        );
    }

    #[tokio::test]
    async fn bodies_pass_and_chunked_ones_are_refused() {
        let with_body = b"POST /x HTTP/1.1\r\ncontent-length: 4\r\n\r\nabcdGET /y HTTP/1.1\r\n\r\n";
        let got = written(&[with_body], None).await.expect("body");
        assert_eq!(
            got,
            "POST http://registry.corp:5000/x HTTP/1.1\r\ncontent-length: 4\r\n\r\nabcdGET http://registry.corp:5000/y HTTP/1.1\r\n\r\n"
        );
        let chunked = b"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(written(&[chunked], None).await.is_err());
        assert!(written(&[&[b'a'; MAX_HEAD + 10]], None).await.is_err());
    }
}
