//! Under load (the "fast under load" issue): small blobs on a kept-alive connection, the
//! catalog at 25k repositories and what it costs other requests, and RSS over a long mixed
//! load. Run by hand:
//!
//! ```sh
//! cargo bench --bench load                 # BENCH_MINUTES=60 for the hour-long RSS run
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// A kept-alive HTTP/1.1 connection that sends GETs and reads whole answers.
struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Conn {
            r: BufReader::new(s),
        }
    }

    /// One GET; returns (status, seconds).
    fn get(&mut self, path: &str) -> (u16, f64) {
        let start = Instant::now();
        // One write (a `write!` to the socket would be several small ones, and Nagle on
        // this side would then wait for the server's delayed ACK).
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        self.r.get_mut().write_all(req.as_bytes()).expect("send");
        let mut line = String::new();
        self.r.read_line(&mut line).expect("status");
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body).expect("body");
        (status, start.elapsed().as_secs_f64())
    }
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    if !require(&["docker-registry", "skopeo", "umoci", "htpasswd"]) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = tempfile::TempDir::new().expect("tmp");
    let layout = Layout::new(tmp.path());
    let manifest = layout.build("app", &[("a", &noise(300_000, 1))]);
    layout.push("app", &format!("{}/library/app:1", up.host()), None);
    let small = up.push_blob("library/app", &noise(191, 2));

    // The catalog at 25k repositories, written into the store layout directly.
    let store = tmp.path().join("store");
    for i in 0..25_000 {
        std::fs::create_dir_all(store.join(format!("repos/local/team{}/app{i}/_tags", i % 50)))
            .expect("repo dir");
    }
    let mirror = Mirror::start_with_store(
        Some(store),
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[upstreams.\"docker.io\"]\nurl = \"{}\"\ntag_ttl = \"1h\"\n",
            up.url()
        ),
    );
    let pid = mirror.pid().expect("pid");
    let man = format!("/v2/docker.io/library/app/manifests/{manifest}");
    let blob = format!("/v2/docker.io/library/app/blobs/{small}");
    let mut c = Conn::open(mirror.port);
    c.get(&man);
    c.get(&blob);

    // 1. Small blobs vs manifests, sequential on one connection.
    let (mut tb, mut tm) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        tb.push(c.get(&blob).1);
        tm.push(c.get(&man).1);
    }
    println!(
        "| 191-byte blob GET, one kept-alive connection (p50 / p99) | {:.2} / {:.2} ms | manifest GET {:.2} / {:.2} ms |",
        pct(tb.clone(), 0.5) * 1e3,
        pct(tb, 0.99) * 1e3,
        pct(tm.clone(), 0.5) * 1e3,
        pct(tm, 0.99) * 1e3
    );

    // 2. _catalog?n=100 at 25k repositories, and cached-manifest p99 with two loopers.
    let mut tc = Vec::new();
    for i in 0..100 {
        tc.push(
            c.get(&format!(
                "/v2/_catalog?n=100&last=local/team7/app{}",
                i * 200
            ))
            .1,
        );
    }
    println!(
        "| _catalog?n=100 at 25k repositories (p50 / p99) | {:.2} / {:.2} ms |",
        pct(tc.clone(), 0.5) * 1e3,
        pct(tc, 0.99) * 1e3
    );
    let manifest_p99 = |c: &mut Conn| {
        let v: Vec<f64> = (0..2000).map(|_| c.get(&man).1).collect();
        pct(v, 0.99) * 1e3
    };
    let quiet = manifest_p99(&mut c);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loopers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, port) = (stop.clone(), mirror.port);
            std::thread::spawn(move || {
                let mut c = Conn::open(port);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.get("/v2/_catalog?n=100");
                }
            })
        })
        .collect();
    let busy = manifest_p99(&mut c);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loopers {
        let _ = l.join();
    }
    println!(
        "| cached-manifest p99, alone / with two _catalog loopers | {quiet:.2} / {busy:.2} ms ({:.2}x) |",
        busy / quiet
    );

    // 3. Anonymous pulls during a flood of wrong passwords (bcrypt cost 10, a new user
    //    name each time so no throttle or cache helps the server).
    let auth_dir = tempfile::TempDir::new().expect("tmp");
    let file = {
        let out = std::process::Command::new("htpasswd")
            .args(["-Bbn", "-C", "10", "alice", "right"])
            .output()
            .expect("htpasswd");
        let f = auth_dir.path().join("htpasswd");
        std::fs::write(&f, out.stdout).expect("write");
        f
    };
    let guarded = Mirror::start(
        "",
        &format!(
            "[auth]\nhtpasswd = \"{}\"\n[upstreams.\"docker.io\"]\nurl = \"{}\"\ntag_ttl = \"1h\"\n",
            file.display(),
            up.url()
        ),
    );
    let mut g = Conn::open(guarded.port);
    g.get(&man);
    let calm = manifest_p99(&mut g);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..16)
        .map(|t| {
            let (stop, port) = (stop.clone(), guarded.port);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let auth = basic(&format!("user{t}x{n}"), "wrong");
                    let _ = http(
                        "GET",
                        &format!("http://127.0.0.1:{port}/v2/"),
                        &[("Authorization", &auth)],
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let flooded = manifest_p99(&mut g);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts: u64 = flooders.into_iter().map(|f| f.join().unwrap_or(0)).sum();
    println!(
        "| anonymous cached-manifest p99, calm / during a wrong-password flood ({attempts} attempts) | {calm:.2} / {flooded:.2} ms |"
    );

    // 4. RSS over a mixed load (8 clients: manifests, small blobs, the layer, 404s, catalog).
    let minutes: u64 = std::env::var("BENCH_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3);
    let layer = layout.layers(&manifest)[0].clone();
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let port = mirror.port;
            let paths = [
                man.clone(),
                blob.clone(),
                format!("/v2/docker.io/library/app/blobs/{layer}"),
                format!("/v2/docker.io/library/nothere{w}/manifests/x"),
                "/v2/_catalog?n=50".to_string(),
            ];
            std::thread::spawn(move || {
                let mut c = Conn::open(port);
                let mut n = 0u64;
                while Instant::now() < end {
                    let p = &paths[(n as usize + w) % paths.len()];
                    if c.get(p).0 == 0 {
                        c = Conn::open(port);
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let start = Instant::now();
    print!("| RSS (MiB) every 30 s over {minutes} min of mixed load |");
    while Instant::now() < end {
        print!(" {:.0}", rss_mib(pid));
        let _ = std::io::stdout().flush();
        std::thread::sleep(
            Duration::from_secs(30).min(end.saturating_duration_since(Instant::now())),
        );
    }
    let requests: u64 = workers.into_iter().map(|w| w.join().unwrap_or(0)).sum();
    std::thread::sleep(Duration::from_secs(5));
    println!(
        " | idle after: {:.0} MiB | {requests} requests in {:.0} s |",
        rss_mib(pid),
        start.elapsed().as_secs_f64()
    );
}
