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
    /// Written at the end (a clone shares the request's bytes: no copy per request).
    pub uri: actix_web::http::Uri,
    pub status: u16,
    /// `None`: no upstream (`-`).
    pub upstream: Option<String>,
    pub cache: &'static str,
    pub client: Option<std::net::IpAddr>,
    /// `None`: anonymous (`-`).
    pub user: Option<String>,
    pub start: Instant,
    /// Time to the response headers, in microseconds (written as ms).
    pub headers_us: u64,
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
    pub fn new(inner: BoxBody, line: Line) -> Logged {
        // A HEAD's body is never sent (its size only sets Content-Length).
        let complete = line.method == actix_web::http::Method::HEAD
            || matches!(inner.size(), BodySize::None | BodySize::Sized(0));
        Logged {
            inner,
            line,
            sent: 0,
            complete,
        }
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
        out.push_str(text);
        out.push('.');
        push_padded(out, since.subsec_micros(), 6);
        out.push('Z');
    });
}

/// `n` in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut String, n: u32, width: usize) {
    let mut b = itoa::Buffer::new();
    let digits = b.format(n);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// Microseconds as milliseconds, written as `f64`'s `Display` writes `us / 1000` (the
/// shortest form: `12`, `0.25`, `1.234`), without float formatting.
fn push_ms(out: &mut String, us: u64) {
    out.push_str(itoa::Buffer::new().format(us / 1000));
    let mut frac = (us % 1000) as u32;
    if frac == 0 {
        return;
    }
    let mut width = 3;
    while frac.is_multiple_of(10) {
        frac /= 10;
        width -= 1;
    }
    out.push('.');
    push_padded(out, frac, width);
}

impl Logged {
    /// The line's `key=value` fields, written into one string: as separate tracing fields
    /// each went through the subscriber's visitor and escaping, about 10% of the CPU of a
    /// small request; numbers go through `itoa`, not `fmt` (5% more). The text is the
    /// same as tracing's own (`cache` quoted, the rest bare).
    fn render(&self) -> String {
        let mut out = String::with_capacity(160 + MAX_LOGGED_PATH);
        self.render_into(&mut out);
        out
    }

    fn render_into(&self, out: &mut String) {
        let l = &self.line;
        let mut n = itoa::Buffer::new();
        out.push_str("method=");
        out.push_str(l.method.as_str());
        out.push_str(" path=");
        push_path(out, &l.uri);
        out.push_str(" status=");
        out.push_str(n.format(l.status));
        out.push_str(" upstream=");
        out.push_str(l.upstream.as_deref().unwrap_or("-"));
        // `cache` is one of the handlers' fixed words: quoted as `{:?}` would, with
        // nothing to escape.
        out.push_str(" cache=\"");
        out.push_str(l.cache);
        out.push_str("\" bytes=");
        out.push_str(n.format(self.sent));
        out.push_str(if self.complete {
            " complete=true client="
        } else {
            " complete=false client="
        });
        push_ip(out, l.client);
        out.push_str(" user=");
        out.push_str(l.user.as_deref().unwrap_or("-"));
        out.push_str(" headers_ms=");
        push_ms(out, l.headers_us);
        out.push_str(" ms=");
        push_ms(out, micros(l.start.elapsed()));
    }
}

/// Longest path (with query) written to the log: anything longer is cut, with a marker.
const MAX_LOGGED_PATH: usize = 512;

/// The path and query as the client sent them (h2 gives the full URL: the same shape as
/// h1 is logged), cut at [`MAX_LOGGED_PATH`] bytes.
fn push_path(out: &mut String, uri: &actix_web::http::Uri) {
    let p = uri
        .path_and_query()
        .map_or_else(|| uri.path(), |p| p.as_str());
    if p.len() <= MAX_LOGGED_PATH {
        out.push_str(p);
        return;
    }
    let mut cut = MAX_LOGGED_PATH;
    while !p.is_char_boundary(cut) {
        cut -= 1;
    }
    out.push_str(&p[..cut]);
    out.push_str("...[");
    out.push_str(itoa::Buffer::new().format(p.len() - cut));
    out.push_str(" more bytes]");
}

/// A duration in whole microseconds, rounded to the nearest.
pub fn micros(d: std::time::Duration) -> u64 {
    (d.as_nanos() + 500) as u64 / 1000
}

fn push_ip(out: &mut String, ip: Option<std::net::IpAddr>) {
    match ip {
        Some(std::net::IpAddr::V4(v4)) => {
            let mut n = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(n.format(octet));
            }
        }
        Some(ip) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{ip}");
        }
        None => out.push('-'),
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
    fn milliseconds_read_as_float_display_wrote_them() {
        for us in [
            0, 1, 7, 10, 250, 999, 1000, 1001, 1234, 12000, 12340, 99999, 123456789,
        ] {
            let mut out = String::new();
            push_ms(&mut out, us);
            assert_eq!(out, format!("{}", us as f64 / 1e3), "{us} us");
        }
        let mut out = String::new();
        push_padded(&mut out, 42, 6);
        assert_eq!(out, "000042");
    }

    #[test]
    fn the_line_reads_as_tracing_fields_did() {
        let l = Logged {
            inner: BoxBody::new(()),
            line: Line {
                method: actix_web::http::Method::GET,
                uri: "/v2/docker.io/library/alpine/manifests/3"
                    .parse()
                    .expect("uri"),
                status: 200,
                upstream: Some("docker.io".into()),
                cache: "hit",
                client: Some([127, 0, 0, 1].into()),
                user: None,
                start: Instant::now(),
                headers_us: 250,
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
