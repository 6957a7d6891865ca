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
        if !tracing::enabled!(target: "entrepot::access", tracing::Level::INFO) {
            return;
        }
        if !self.write_line() {
            let line = self.render();
            tracing::info!(target: "entrepot::access", "{line}");
        }
    }
}

/// Where access lines go when they skip tracing (see [`write_direct`]): a duplicate of
/// stderr's descriptor, written without `Stderr`'s process-wide lock.
static DIRECT: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Writes access lines to stderr in tracing's own text format (`<RFC 3339 time>  INFO
/// entrepot::access: <fields>`), skipping the subscriber's per-event work (span lookup,
/// field visitor, escaping writer): about 8% of a small request's CPU. Not with colours
/// (a terminal): those lines go through tracing. If stderr cannot be duplicated, lines
/// go through tracing as well.
pub fn write_direct() {
    use std::os::fd::AsFd as _;
    if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
        let _ = DIRECT.set(std::fs::File::from(fd));
    }
}

/// A worker's lines past this many bytes are written at once, not at the end of its turn.
const MAX_PENDING: usize = 64 * 1024;

/// A worker thread's access lines within one turn of its event loop. The turn's first
/// line is written at once (a client that reads the log after its response finds it);
/// the lines of the requests that worker completes in the same turn are written
/// together by a task queued behind them ([`end_turn`]), microseconds later and before
/// the worker waits for new work. Under load a turn completes several requests: a
/// `write(2)` per line cost 1 us of CPU per request and, with two workers, a file lock
/// taken in turn (a context switch every few requests), measured with perf on 2 cores.
#[derive(Default)]
struct Turn {
    /// Lines held until the turn ends.
    buf: String,
    /// A line was written in this turn and [`end_turn`] is queued.
    open: bool,
}

impl Turn {
    fn flush(&mut self) {
        if !self.buf.is_empty() {
            write_out(self.buf.as_bytes());
            self.buf.clear();
        }
    }
}

impl Drop for Turn {
    /// A worker thread that ends writes what it still holds.
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static TURN: std::cell::RefCell<Turn> = std::cell::RefCell::new(Turn::default());
}

/// One `write(2)`: the kernel does not interleave another thread's write into it (a
/// file's position lock; a pipe's atomic writes), so lines stay whole.
fn write_out(bytes: &[u8]) {
    use std::io::Write as _;
    if let Some(mut out) = DIRECT.get() {
        let _ = out.write_all(bytes);
    }
}

/// Runs after the tasks already queued on this worker, then writes their lines.
async fn end_turn() {
    tokio::task::yield_now().await;
    TURN.with_borrow_mut(|t| {
        t.open = false;
        t.flush();
    });
}

impl Logged {
    /// Writes the line (or holds it to the end of the worker's turn, see [`Turn`]) if
    /// [`write_direct`] was asked; false to leave it to tracing. The line is written
    /// straight into the turn's buffer.
    fn write_line(&self) -> bool {
        if DIRECT.get().is_none() {
            return false;
        }
        // Outside a worker no task can end the turn: written at once.
        let on_worker = actix_rt::Arbiter::try_current().is_some();
        TURN.with_borrow_mut(|t| {
            timestamp(&mut t.buf);
            t.buf.push_str("  INFO entrepot::access: ");
            self.render_into(&mut t.buf);
            t.buf.push('\n');
            if !t.open || !on_worker || t.buf.len() >= MAX_PENDING {
                t.flush();
            }
            if !t.open && on_worker {
                t.open = true;
                actix_rt::spawn(end_turn());
            }
        });
        true
    }
}

thread_local! {
    /// The current second as tracing writes it (`2026-12-06T12:28:53`), formatted once
    /// per second per thread rather than for every line.
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

/// Appends the time in tracing's format (RFC 3339, microseconds, UTC).
fn timestamp(out: &mut String) {
    use std::fmt::Write as _;
    let now = std::time::SystemTime::now();
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with_borrow_mut(|(secs, text)| {
        if *secs != since.as_secs() {
            *secs = since.as_secs();
            let whole = now - std::time::Duration::from_nanos(since.subsec_nanos().into());
            *text = humantime::format_rfc3339_seconds(whole).to_string();
            text.pop(); // the `Z`, written after the fraction
        }
        let _ = write!(out, "{text}.{:06}Z", since.subsec_micros());
    });
}

impl Logged {
    /// The line's `key=value` fields, written into one string: as separate tracing fields
    /// each went through the subscriber's visitor and escaping, about 10% of the CPU of a
    /// small request. The text is the same as tracing's own (`cache` quoted, the rest
    /// bare).
    fn render(&self) -> String {
        let mut out = String::with_capacity(160 + self.line.path.len());
        self.render_into(&mut out);
        out
    }

    fn render_into(&self, out: &mut String) {
        use std::fmt::Write as _;
        let l = &self.line;
        let _ = write!(
            out,
            "method={} path={} status={} upstream={} cache={:?} bytes={} complete={} client=",
            l.method,
            l.path,
            l.status,
            l.upstream.as_deref().unwrap_or("-"),
            l.cache,
            self.sent,
            self.complete,
        );
        let _ = match &l.client {
            Some(ip) => write!(out, "{ip}"),
            None => write!(out, "-"),
        };
        let ms = (l.start.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let _ = write!(
            out,
            " user={} headers_ms={} ms={ms}",
            l.user.as_deref().unwrap_or("-"),
            l.headers_ms,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_reads_as_tracing_writes_it() {
        let mut out = String::new();
        timestamp(&mut out);
        timestamp(&mut out);
        let (a, b) = out.split_at(out.len() / 2);
        for t in [a, b] {
            assert_eq!(t.len(), "2026-12-06T12:28:53.123456Z".len(), "{t}");
            assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
            let whole = humantime::parse_rfc3339(t).expect("RFC 3339");
            let age = std::time::SystemTime::now()
                .duration_since(whole)
                .expect("past");
            assert!(age < std::time::Duration::from_secs(5), "{t}");
        }
    }

    #[test]
    fn the_line_reads_as_tracing_fields_did() {
        let l = Logged {
            inner: BoxBody::new(()),
            line: Line {
                method: actix_web::http::Method::GET,
                path: "/v2/docker.io/library/alpine/manifests/3".into(),
                status: 200,
                upstream: Some("docker.io".into()),
                cache: "hit",
                client: Some([127, 0, 0, 1].into()),
                user: None,
                start: Instant::now(),
                headers_ms: 0.25,
            },
            sent: 512,
            complete: true,
        };
        let r = l.render();
        assert!(
            r.starts_with("method=GET path=/v2/docker.io/library/alpine/manifests/3 status=200 upstream=docker.io cache=\"hit\" bytes=512 complete=true client=127.0.0.1 user=- headers_ms=0.25 ms="),
            "{r}"
        );
    }
}
