//! Test harness: real peers (Distribution, containerd, skopeo, umoci) on loopback.
//!
//! Every process is started on a free port under its own temp dir and killed on drop.
//! Tests that need a peer call [`require`]: under `CI=true` a missing tool fails the test,
//! elsewhere the test is skipped with a printed reason.
#![allow(dead_code, unused_imports)]

pub mod bench;
pub mod clients;
pub mod fake;
pub mod garage;
pub mod image;
pub mod passthrough;
pub mod peers;
pub mod proxy;
pub mod throttle;
pub mod token;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub use bench::*;
pub use clients::*;
pub use image::*;
pub use peers::*;

/// The peers the end-to-end tests run (all installed by `.ci/run`).
pub const PEERS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "umoci",
    "containerd",
    "ctr",
    "htpasswd",
    "openssl",
    "curl",
];

/// Whether every tool in `tools` is installed; panics under `CI=true` if one is not.
pub fn require(tools: &[&str]) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| which(t).is_none())
        .map(|t| t.to_string())
        .collect();
    // containerd, dockerd, podman's storage (and mounting a tmpfs) need root.
    let rooted = ["containerd", "mount", "dockerd", "podman"];
    if tools.iter().any(|t| rooted.contains(t)) && !is_root() {
        missing.push("root (containerd/dockerd/podman/mount)".into());
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true and required tools are missing: {missing:?} (see .ci/run)");
    }
    eprintln!("SKIP: missing tools {missing:?}; install them (see .ci/run) to run this test");
    false
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A free loopback port (bound and released), never one this test process handed out
/// before: the tests of one binary run as threads of one process, and a port handed to
/// one of them stays unbound until its server starts (a Garage node, hundreds of ms
/// later). The kernel could give the same port to another test meanwhile, whose server
/// then answered in its place (seen as a Garage handshake cut short, and as an S3
/// endpoint dropping connections). The test's own servers (token issuer, throttle, fakes)
/// take their ports here too, so the kernel cannot give them one handed out already.
pub fn free_port() -> u16 {
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        let mut handed = HANDED.lock().unwrap_or_else(|e| e.into_inner());
        if !handed.contains(&port) {
            handed.push(port);
            return port;
        }
    }
    panic!("no loopback port left that this process did not hand out already");
}

/// A listener of the test's own on `ip`, on a port from [`free_port`]: one that another
/// process took between the two (a registry or proxy of a test running at the same time)
/// is skipped for the next.
pub fn bind_free(ip: &str) -> TcpListener {
    let mut last = None;
    for _ in 0..20 {
        match TcpListener::bind((ip, free_port())) {
            Ok(l) => return l,
            Err(e) => last = Some(e),
        }
    }
    panic!("no free port on {ip}: {last:?}");
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Spawns `cmd` with stdout+stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let err = out.try_clone().expect("clone log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child,
            name: name.into(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 50 ms until it holds or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16) {
    wait_until(&format!("port {port}"), Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// Runs a command to completion, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes an htpasswd file (bcrypt, `htpasswd -B`) with `users` into `dir`; its path.
pub fn htpasswd(dir: &Path, users: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text = String::new();
    for (u, p) in users {
        text.push_str(run(Command::new("htpasswd").args(["-Bbn", u, p])).trim());
        text.push('\n');
    }
    let file = dir.join("htpasswd");
    std::fs::write(&file, text).expect("write htpasswd");
    file
}

/// An `Authorization: Basic` value.
pub fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An HTTP agent that does not treat 4xx/5xx as errors of its own.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// A response's status, headers of interest and body, whatever the status.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The first OCI error code of the body.
    pub fn oci_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Sends a request; the body is read fully (tests only fetch what they compare).
pub fn http(method: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
    send(url, method, &[], headers)
}

/// Sends a request with a body.
pub fn send(url: &str, method: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let sent = if body.is_empty() && matches!(method, "GET" | "HEAD" | "DELETE") {
        req.call()
    } else {
        req.send_bytes(body)
    };
    let resp = match sent {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|k| resp.header(&k).map(|v| (k.clone(), v.to_string())))
        .collect();
    let mut body = Vec::new();
    let _ = resp.into_reader().take(1 << 31).read_to_end(&mut body);
    Reply {
        status,
        headers,
        body,
    }
}

pub fn get(url: &str) -> Reply {
    http("GET", url, &[])
}

/// Sends `method path` byte for byte (no URL normalisation, unlike HTTP clients, which
/// resolve `..` before sending) and reads the whole reply.
pub fn raw(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: buf.get(split + 4..).unwrap_or_default().to_vec(),
    }
}

/// A test CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key).
pub fn make_tls(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    let s = |p: std::path::PathBuf| p.display().to_string();
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=entrepot test CA",
        "-keyout",
        &s(p("ca.key")),
        "-out",
        &s(p("ca.pem")),
    ]));
    run(Command::new("openssl").args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &s(p("server.key")),
        "-out",
        &s(p("server.csr")),
    ]));
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext");
    run(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &s(p("server.csr")),
        "-CA",
        &s(p("ca.pem")),
        "-CAkey",
        &s(p("ca.key")),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(p("ext.cnf")),
        "-out",
        &s(p("server.pem")),
    ]));
    (p("ca.pem"), p("server.pem"), p("server.key"))
}

/// Runs `entrepot ARGS` with `config` (written to a file) and returns (success, output).
pub fn entrepot_cli(dir: &Path, config: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_entrepot"));
    cmd.current_dir(dir).env_remove("RUST_LOG");
    if let Some(c) = config {
        let f = dir.join("cfg.toml");
        std::fs::write(&f, c).unwrap();
        cmd.arg("--config").arg(&f);
    }
    let out = cmd.args(args).output().expect("run entrepot");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A config with its store under `dir`, a free port, and `extra` lines after `[server]`.
pub fn store_config(dir: &Path, extra: &str) -> String {
    format!(
        "[server]\nstorage = \"{}\"\nlisten = \"127.0.0.1:{}\"\n{extra}",
        dir.join("store").display(),
        free_port()
    )
}

/// The digest of the manifest `skopeo inspect --raw` gets for `reference` (plain HTTP).
pub fn skopeo_raw_digest(reference: &str) -> String {
    let raw = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    format!("sha256:{}", sha256_hex(raw.as_bytes()))
}
