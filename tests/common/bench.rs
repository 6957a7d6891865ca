//! Helpers the benches share: curl measurements, environment knobs, wrk, and large
//! stores written directly in the store's layout.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{sha256_hex, Mirror};

/// A mirror whose store holds `blobs` objects in `repos` repositories, written
/// directly in the store's layout; returns it and one manifest digest to ask for.
pub fn scale_store(blobs: usize, repos: usize, upstream: &str) -> (Mirror, String) {
    let dir = TempDir::new().expect("tmp").keep();
    let store = dir.join("store");
    eprintln!("scale store (remove when done): {}", dir.display());
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;
    let md = sha256_hex(manifest);
    for i in 0..blobs {
        let bytes = format!("blob {i}");
        let hex = sha256_hex(bytes.as_bytes());
        let d = store.join("blobs/sha256").join(&hex[..2]);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join(&hex), bytes).expect("write");
        let repo = store.join(format!("repos/docker.io/r{}/app/_blobs", i % repos));
        std::fs::create_dir_all(&repo).expect("mkdir");
        std::fs::write(repo.join(&hex), b"").expect("link");
    }
    let d = store.join("blobs/sha256").join(&md[..2]);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join(&md), manifest).expect("write");
    let links = store.join("repos/docker.io/r0/app/_manifests");
    std::fs::create_dir_all(&links).expect("mkdir");
    std::fs::write(
        links.join(&md),
        br#"{"media_type":"application/vnd.oci.image.manifest.v1+json"}"#,
    )
    .expect("link");
    let m = Mirror::start_with_store(
        Some(store),
        "",
        &format!("[upstreams.\"docker.io\"]\nurl = \"{upstream}\"\n"),
    );
    (m, format!("sha256:{md}"))
}

/// wrk at 64 connections: (requests/s, p99 ms).
pub fn wrk(url: &str, method: &str, accept: Option<&str>, secs: u32) -> (f64, f64) {
    let dir = TempDir::new().expect("tmp");
    let script = dir.path().join("s.lua");
    let mut lua = format!("wrk.method = \"{method}\"\n");
    if let Some(a) = accept {
        lua.push_str(&format!("wrk.headers[\"Accept\"] = \"{a}\"\n"));
    }
    std::fs::write(&script, lua).expect("lua");
    let out = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{secs}s"), "--latency", "-s"])
        .arg(&script)
        .arg(url)
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let p99 = text
        .lines()
        .find(|l| l.trim_start().starts_with("99%"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(parse_ms)
        .unwrap_or(0.0);
    (rps, p99)
}

pub fn parse_ms(v: &str) -> f64 {
    let num: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let n: f64 = num.parse().unwrap_or(0.0);
    match &v[num.len()..] {
        "us" => n / 1000.0,
        "s" => n * 1000.0,
        _ => n,
    }
}

/// One curl GET: (time to first byte, total time, bytes).
pub fn curl(url: &str, extra: &[&str]) -> (f64, f64, u64) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{time_starttransfer} %{time_total} %{size_download}",
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap_or(0.0));
    (
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0) as u64,
    )
}

/// The work of a cold fill done by stock tools, as a peer to measure against: curl
/// receives `url`, `tee` writes the bytes to a file in `dir` (through the page cache, no
/// fsync) and hands them on through a pipe to `openssl dgst -sha256` (SHA-NI, like
/// entrepot's hash). Returns (wall seconds, bytes, the sha256 hex it printed).
pub fn pipeline(url: &str, dir: &std::path::Path) -> (f64, u64, String) {
    let file = dir.join("pipeline.out");
    let start = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg("curl -s \"$1\" | tee \"$2\" | openssl dgst -sha256 -r")
        .args(["pipeline", url])
        .arg(&file)
        .output()
        .expect("sh");
    let wall = start.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_file(&file);
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    (wall, bytes, hex)
}

/// `n` concurrent curl GETs, client i on `urls[i % urls.len()]`: (wall seconds, slowest
/// client seconds, total bytes).
pub fn concurrent(n: usize, urls: &[impl AsRef<str>]) -> (f64, f64, u64) {
    let start = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|i| {
            Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{time_total} %{size_download}",
                ])
                .arg(urls[i % urls.len()].as_ref())
                .stdout(Stdio::piped())
                .spawn()
                .expect("curl")
        })
        .collect();
    let mut slowest = 0f64;
    let mut bytes = 0u64;
    for c in children {
        let out = c.wait_with_output().expect("curl");
        let s = String::from_utf8_lossy(&out.stdout);
        let mut it = s
            .split_whitespace()
            .map(|x| x.parse::<f64>().unwrap_or(0.0));
        slowest = slowest.max(it.next().unwrap_or(0.0));
        bytes += it.next().unwrap_or(0.0) as u64;
    }
    (start.elapsed().as_secs_f64(), slowest, bytes)
}

/// Writes the page cache's dirty data out (`sync`), so a measurement does not inherit
/// the previous one's writeback.
pub fn sync() {
    Command::new("sync").status().expect("sync");
}

/// A numeric knob from the environment (e.g. `BENCH_MIB`), else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds the whole machine spent busy so far (all cores, all processes, the
/// kernel included): over a measurement, busy / wall says how many cores were in use.
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or("");
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: f64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / 100.0
}

/// CPU seconds (user + system, all threads) a process has used so far; 0 when unknown.
pub fn cpu_secs(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    let tick = 100.0; // USER_HZ on Linux
    f.iter().sum::<f64>() / tick
}

/// Run time so far of each thread of a process, in seconds by thread name (summed over
/// threads of the same name), from the scheduler's own accounting (`schedstat`, exact).
pub fn thread_secs(pid: Option<u32>) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Some(pid) = pid else { return out };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let ns: f64 = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0);
        *out.entry(name.trim().to_string()).or_insert(0.0) += ns / 1e9;
    }
    out
}

/// The `fill pumped` lines of a mirror's log, each cut to its source, its time and its
/// waits by cause (`waited_for_*_ms`): where each fill's time went.
pub fn fill_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("fill pumped"))
        .map(|l| {
            // The source is quoted and may hold a space ("upstream docker.io").
            let source = l
                .split("source=\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            let times = l
                .split_whitespace()
                .filter(|f| f.starts_with("ms=") || f.starts_with("waited_"));
            source
                .map(|s| format!("source=\"{s}\""))
                .into_iter()
                .chain(times.map(str::to_string))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The threads of `pid` that ran at least 5 ms since `before` (a [`thread_secs`] taken
/// earlier), as "name seconds" joined by commas.
pub fn threads_since(pid: Option<u32>, before: &std::collections::BTreeMap<String, f64>) -> String {
    thread_secs(pid)
        .into_iter()
        .map(|(k, v)| (v - before.get(&k).copied().unwrap_or(0.0), k))
        .filter(|(v, _)| *v >= 0.005)
        .map(|(v, k)| format!("{k} {v:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits (at most `limit`) until a process used less than 5 ms of CPU in 100 ms: work a
/// server does after its client finished (Distribution's proxy downloads and stores the
/// blob a second time in the background) is then not charged to the next measurement.
pub fn quiesce(pid: Option<u32>, limit: std::time::Duration) {
    // `schedstat` (ns), not `/proc/<pid>/stat`, whose 10 ms ticks cannot tell 5 ms.
    let run = || thread_secs(pid).values().sum::<f64>();
    let start = Instant::now();
    let mut last = run();
    while start.elapsed() < limit {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = run();
        if now - last < 0.005 {
            return;
        }
        last = now;
    }
}

/// An nginx of the benches' own (a peer to measure against), on a free loopback port.
/// Stopped with SIGTERM on drop: a killed master would leave its workers running.
pub struct Nginx {
    pub port: u16,
    pub dir: TempDir,
    proc: super::Proc,
}

impl Nginx {
    /// Serves `file` at `/blob` with sendfile.
    pub fn sendfile(file: &std::path::Path) -> Nginx {
        Nginx::start(|_, port| {
            format!(
                "server {{ listen 127.0.0.1:{port}; sendfile on; tcp_nopush on; location = /blob {{ alias {}; default_type application/octet-stream; }} }}",
                file.display()
            )
        })
    }

    /// Starts nginx with 2 workers and the `server` block made by `server(dir, port)`.
    pub fn start(server: impl Fn(&std::path::Path, u16) -> String) -> Nginx {
        let dir = TempDir::new().expect("tmp");
        let port = super::free_port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nworker_processes 2;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d};\n proxy_temp_path {d};\n fastcgi_temp_path {d};\n uwsgi_temp_path {d};\n scgi_temp_path {d};\n{}\n}}\n",
            server(dir.path(), port)
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("conf");
        let mut cmd = Command::new("nginx");
        cmd.arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(dir.path());
        let proc = super::Proc::spawn("nginx", cmd, &dir.path().join("out.log"));
        super::wait_port(port);
        Nginx { port, dir, proc }
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let m = self.proc.child.id();
        let kids =
            std::fs::read_to_string(format!("/proc/{m}/task/{m}/children")).unwrap_or_default();
        std::iter::once(m)
            .chain(kids.split_whitespace().filter_map(|k| k.parse().ok()))
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown, which stops the workers too.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.proc.child.id().to_string())
            .status();
        let limit = Instant::now() + std::time::Duration::from_secs(5);
        while Instant::now() < limit {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A small keep-alive load generator for HEAD, which wrk cannot measure (it waits for a
/// body after a HEAD response's Content-Length): 64 connections, (requests/s, p99 ms).
/// A connection the server closes (nginx does after 1000 requests, as wrk sees too) is
/// opened again.
pub fn head_load(port: u16, path: &str, secs: u32) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(secs as u64);
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let req = format!("HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while Instant::now() < deadline && head_conn(port, &req, deadline, &mut lat) {}
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .collect();
    all.sort();
    let p99 = all
        .get(all.len() * 99 / 100)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    (all.len() as f64 / secs as f64, p99)
}

/// HEAD requests on one connection until `deadline` or the server closes it; false when
/// the connection could not be made.
fn head_conn(port: u16, req: &str, deadline: Instant, lat: &mut Vec<Duration>) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    while Instant::now() < deadline {
        let t = Instant::now();
        if (&s).write_all(req.as_bytes()).is_err() {
            return true;
        }
        let mut close = false;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return true,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => close |= line.eq_ignore_ascii_case("connection: close\r\n"),
            }
        }
        lat.push(t.elapsed());
        if close {
            return true;
        }
    }
    true
}
