//! A minimal HTTP/1.1 server for upstream behaviour that Distribution on a filesystem never
//! shows (Docker Hub's 307 to a CDN, lying digests, oversize manifests). One request per
//! connection; every request is recorded.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIFETIME: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Answer as HTTP/1.0, or as HTTP/1.1 without `Connection: close` (both: the connection
    /// closes after it, unannounced for HTTP/1.1, as some proxies and appliances do).
    pub http10: bool,
    pub silent_close: bool,
}

impl Response {
    pub fn new(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body,
            http10: false,
            silent_close: false,
        }
    }

    /// HTTP/1.1 without `Connection: close`, and the connection closed anyway.
    pub fn silent_close(mut self) -> Response {
        self.silent_close = true;
        self
    }

    /// The same answer in HTTP/1.0 (as some proxies and appliances send).
    pub fn http10(mut self) -> Response {
        self.http10 = true;
        self
    }
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync;

pub struct FakeServer {
    ip: &'static str,
    pub port: u16,
    pub requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl FakeServer {
    pub fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> FakeServer {
        FakeServer::start_on("127.0.0.1", handler)
    }

    /// Like [`start`](Self::start), on another loopback address (`127.0.0.2`: "another
    /// host" whose origin differs from a server on 127.0.0.1).
    pub fn start_on(
        ip: &'static str,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> FakeServer {
        let l = super::bind_free(ip);
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, stop2) = (requests.clone(), stop.clone());
        let handler: Arc<Handler> = Arc::new(handler);
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop2.load(Ordering::Relaxed) && start.elapsed() < LIFETIME {
                let Ok((s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let (reqs, handler) = (reqs.clone(), handler.clone());
                std::thread::spawn(move || serve(s, &*handler, &reqs));
            }
        });
        FakeServer {
            ip,
            port,
            requests,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(s: TcpStream, handler: &Handler, reqs: &Mutex<Vec<Request>>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&s);
    let mut lines = Vec::new();
    for _ in 0..100 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        lines.push(line.trim_end().to_string());
    }
    let mut first = lines.first().map(|l| l.split(' ')).into_iter().flatten();
    let req = Request {
        method: first.next().unwrap_or("").to_string(),
        path: first.next().unwrap_or("").to_string(),
        headers: lines
            .iter()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    };
    if let Ok(mut r) = reqs.lock() {
        r.push(req.clone());
    }
    let resp = handler(&req);
    let mut head = if resp.http10 {
        format!("HTTP/1.0 {} X\r\n", resp.status)
    } else if resp.silent_close {
        format!("HTTP/1.1 {} X\r\n", resp.status)
    } else {
        format!("HTTP/1.1 {} X\r\nConnection: close\r\n", resp.status)
    };
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    // A HEAD answer may announce the length of the body it does not send.
    if !resp
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    head.push_str("\r\n");
    let mut w = &s;
    let _ = w.write_all(head.as_bytes());
    if req.method != "HEAD" {
        let _ = w.write_all(&resp.body);
    }
}
