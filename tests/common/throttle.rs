//! A TCP proxy that slows the server-to-client direction, to watch a fill in progress.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The proxy gives up on everything after this long.
const LIFETIME: Duration = Duration::from_secs(300);

pub struct Throttle {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl Throttle {
    /// Proxies `127.0.0.1:port` -> `127.0.0.1:target`, sending at most `bytes_per_sec`
    /// back to each client.
    pub fn start(target: u16, bytes_per_sec: usize) -> Throttle {
        // A blocking accept (a polling one added up to its poll interval to every new
        // connection); `Drop` wakes it with a connection of its own.
        let l = super::bind_free("127.0.0.1");
        let port = l.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < LIFETIME {
                let Ok((client, _)) = l.accept() else {
                    continue;
                };
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || pump(c2, s2, usize::MAX));
                std::thread::spawn(move || pump(server, client, bytes_per_sec));
            }
        });
        Throttle { port, stop }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` to `to` at most `rate` bytes per second: each read is sent, then the
/// pump sleeps until those bytes are due at `rate`. Time spent waiting for data earns
/// no credit (a kept-alive connection idle between requests still paces its next
/// response), so a short burst cannot pass unpaced.
fn pump(mut from: TcpStream, mut to: TcpStream, rate: usize) {
    let slice = (rate / 100).clamp(1, 64 * 1024);
    let mut buf = vec![0u8; slice];
    let start = Instant::now();
    let mut free_at = Instant::now();
    while start.elapsed() < LIFETIME {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if rate != usize::MAX {
            free_at = free_at.max(Instant::now()) + Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(wait) = free_at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
