//! Long-running peers: Distribution upstreams, the mirror under test, containerd.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::token::TokenIssuer;
use super::{free_port, get, run, wait_port, wait_until, Proc};

/// How a Distribution upstream authenticates clients.
pub enum Auth {
    Anonymous,
    /// htpasswd Basic auth with one user.
    Basic(&'static str, &'static str),
    /// Docker Hub style Bearer tokens from an issuer in test code; the issuer demands
    /// these Basic credentials when given.
    Token(Option<(&'static str, &'static str)>),
    /// Anonymous tokens from a realm named by this host (e.g. a name only a proxy can
    /// resolve) instead of 127.0.0.1.
    TokenAt(&'static str),
}

/// A CNCF Distribution registry (`docker-registry serve`) on a loopback port.
pub struct Registry {
    pub port: u16,
    dir: TempDir,
    log: PathBuf,
    proc: Option<Proc>,
    pub token: Option<TokenIssuer>,
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        Registry::start_with(auth, "")
    }

    /// An anonymous registry serving HTTPS with this certificate and key.
    pub fn start_tls(cert: &Path, key: &Path) -> Registry {
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
        Registry::start_with(Auth::Anonymous, &tls)
    }

    /// `http_extra` is appended under the config's `http:` section.
    fn start_with(auth: Auth, http_extra: &str) -> Registry {
        let dir = TempDir::new().expect("tempdir");
        let port = free_port();
        let root = dir.path().join("storage");
        let mut auth_yaml = String::new();
        let mut token = None;
        match auth {
            Auth::Anonymous => {}
            Auth::Basic(user, pass) => {
                let line = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, line.trim()).expect("write htpasswd");
                auth_yaml = format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    file.display()
                );
            }
            Auth::Token(creds) => {
                let issuer = TokenIssuer::start(dir.path(), creds);
                auth_yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: test-registry\n    issuer: test-issuer\n    rootcertbundle: {}\n",
                    issuer.realm(),
                    issuer.cert.display()
                );
                token = Some(issuer);
            }
            Auth::TokenAt(host) => {
                let issuer = TokenIssuer::start(dir.path(), None);
                auth_yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: test-registry\n    issuer: test-issuer\n    rootcertbundle: {}\n",
                    issuer.realm().replace("127.0.0.1", host),
                    issuer.cert.display()
                );
                token = Some(issuer);
            }
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{http_extra}{auth_yaml}",
            root.display()
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("write config");
        let log = dir.path().join("access.log");
        let mut r = Registry {
            port,
            dir,
            log,
            proc: None,
            token,
        };
        r.restart();
        r
    }

    /// A Distribution registry in proxy (pull-through) mode in front of `remote`, the
    /// stock single-upstream cache entrepot is compared with.
    pub fn start_proxy(remote: &str) -> Registry {
        Registry::start_proxy_on(remote, None)
    }

    /// `start_proxy` with `storage` (YAML under `storage:`, e.g. an `s3:` section)
    /// instead of a local directory.
    pub fn start_proxy_on(remote: &str, storage: Option<&str>) -> Registry {
        let dir = TempDir::new().expect("tempdir");
        let port = free_port();
        let storage = storage.map_or_else(
            || {
                format!(
                    "  filesystem:\n    rootdirectory: {}\n",
                    dir.path().join("storage").display()
                )
            },
            str::to_string,
        );
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n{storage}http:\n  addr: 127.0.0.1:{port}\nproxy:\n  remoteurl: {remote}\n"
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("write config");
        let log = dir.path().join("access.log");
        let mut r = Registry {
            port,
            dir,
            log,
            proc: None,
            token: None,
        };
        r.restart();
        r
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(self.dir.path().join("config.yml"));
        self.proc = Some(Proc::spawn("docker-registry", cmd, &self.log));
        wait_port(self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Requests in the access log for `method` whose path contains `path_part`,
    /// not counting the 401s of the auth handshake.
    pub fn count(&self, method: &str, path_part: &str) -> usize {
        let needle = format!("\"{method} ");
        self.log()
            .lines()
            .filter(|l| {
                let Some(i) = l.find(&needle) else {
                    return false;
                };
                let req = &l[i..];
                let path_ok = req.split(' ').nth(1).is_some_and(|p| p.contains(path_part));
                let status = req
                    .split_once("\" ")
                    .map(|x| x.1)
                    .and_then(|s| s.split(' ').next());
                path_ok && status != Some("401")
            })
            .count()
    }

    /// Where Distribution keeps a blob's bytes (to tamper with them).
    pub fn blob_data(&self, hex: &str) -> PathBuf {
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes raw bytes as a blob of `repo` (monolithic upload; anonymous registries).
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = format!("sha256:{}", super::sha256_hex(bytes));
        let agent = super::agent();
        let start = agent
            .post(&format!("{}/v2/{repo}/blobs/uploads/", self.url()))
            .call()
            .expect("start upload");
        let loc = start.header("Location").expect("Location").to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.url())
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        agent
            .put(&format!("{loc}{sep}digest={digest}"))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(bytes)
            .expect("finish upload");
        digest
    }
}

/// The entrepot binary of this build.
/// This build's binary, or `BENCH_BIN` (another build, to run a bench against it).
fn this_build() -> PathBuf {
    std::env::var_os("BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_entrepot")))
}

/// The mirror under test (`entrepot serve`), with its own store and config.
pub struct Mirror {
    pub port: u16,
    dir: TempDir,
    pub store: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    /// The binary run: this build's, or another one for A/B benches.
    bin: PathBuf,
    /// Extra environment of the server process (e.g. `HTTPS_PROXY`).
    env: Vec<(String, String)>,
}

impl Mirror {
    /// `start` running the binary `bin` (a build of another revision, for A/B benches).
    pub fn start_bin(bin: PathBuf, server_extra: &str, rest: &str) -> Mirror {
        Mirror::start_full(None, free_port(), server_extra, rest, bin)
    }

    /// Starts a mirror whose config is `[server]` with `server_extra` lines, plus `rest`
    /// (upstream tables).
    pub fn start(server_extra: &str, rest: &str) -> Mirror {
        Mirror::start_with_store(None, server_extra, rest)
    }

    /// `start` with the store at `store` (e.g. a small tmpfs) instead of a temp dir.
    pub fn start_with_store(store: Option<PathBuf>, server_extra: &str, rest: &str) -> Mirror {
        Mirror::start_full(store, free_port(), server_extra, rest, this_build())
    }

    /// `start` on a port chosen beforehand (replicas of a cluster name each other).
    pub fn start_at(port: u16, server_extra: &str, rest: &str) -> Mirror {
        Mirror::start_full(None, port, server_extra, rest, this_build())
    }

    /// `start` with `env` in the server's environment (e.g. `HTTPS_PROXY`).
    pub fn start_env(server_extra: &str, rest: &str, env: &[(&str, &str)]) -> Mirror {
        Mirror::start_full_env(None, free_port(), server_extra, rest, this_build(), env)
    }

    fn start_full(
        store: Option<PathBuf>,
        port: u16,
        server_extra: &str,
        rest: &str,
        bin: PathBuf,
    ) -> Mirror {
        Mirror::start_full_env(store, port, server_extra, rest, bin, &[])
    }

    fn start_full_env(
        store: Option<PathBuf>,
        port: u16,
        server_extra: &str,
        rest: &str,
        bin: PathBuf,
        env: &[(&str, &str)],
    ) -> Mirror {
        let dir = TempDir::new().expect("tempdir");
        let store = store.unwrap_or_else(|| dir.path().join("store"));
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstorage = \"{}\"\n{server_extra}\n{rest}",
            store.display()
        );
        std::fs::write(dir.path().join("upstreams.toml"), config).expect("write config");
        let log = dir.path().join("mirror.log");
        let mut m = Mirror {
            port,
            dir,
            store,
            log,
            proc: None,
            bin,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        m.restart();
        m
    }

    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("upstreams.toml"))
            .env("RUST_LOG", "info")
            .env_remove("ENTREPOT_SERVER__LISTEN")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.proc = Some(Proc::spawn("entrepot", cmd, &self.log));
        // Fail with the mirror's own words if it exits or never listens.
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .proc
                .as_mut()
                .and_then(|p| p.child.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "entrepot did not start listening on {} ({exited:?}):\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Restarts the server with `env` added to its environment.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("upstreams.toml")
    }

    /// Runs `entrepot <args> --config <this mirror's config>`: (success, stdout).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .expect("run entrepot");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "entrepot {args:?}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), stdout)
    }

    /// Bytes of committed content in the store.
    pub fn store_bytes(&self) -> u64 {
        dir_bytes(&self.store.join("blobs"))
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sum of the samples of `metric` whose label set contains every `labels` pair.
    pub fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let text =
            String::from_utf8(get(&format!("{}/metrics", self.url())).body).unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
            .filter(|l| {
                l[metric.len()..].starts_with(['{', ' '])
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Every file in the store's content area named `hex`.
    pub fn store_files(&self, hex: &str) -> Vec<PathBuf> {
        find_files(&self.store.join("blobs"), hex)
    }

    /// Waits until no write is in progress: a fill's client gets its last byte once the
    /// bytes are verified, and the fsync and rename into the store follow.
    pub fn settle(&self) {
        wait_until("fills committed", Duration::from_secs(20), || {
            self.tmp_files() == 0
        });
    }

    /// Temp files of fills and of upload sessions.
    pub fn tmp_files(&self) -> usize {
        ["tmp", "uploads"]
            .iter()
            .map(|d| std::fs::read_dir(self.store.join(d)).map_or(0, |d| d.count()))
            .sum()
    }
}

impl Drop for Mirror {
    /// A failing test shows the end of the mirror's log.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<_> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- mirror log (last 40 lines) ---\n{tail}");
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_files(&p, name));
        } else if e.file_name().to_string_lossy() == name {
            out.push(p);
        }
    }
    out
}

/// How a containerd hosts.toml points at the mirror.
#[derive(Clone, Copy, Debug)]
pub enum Style {
    /// `[host."http://mirror"]`: containerd sends `?ns=<host>`.
    Ns,
    /// `[host."http://mirror/v2/<host>"]` with `override_path = true`.
    Prefix,
}

/// A containerd daemon with its own root, state and socket.
pub struct Containerd {
    dir: TempDir,
    sock: PathBuf,
    _proc: Proc,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = TempDir::new().expect("tempdir");
        let d = dir.path();
        let sock = d.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{}\"\n[plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n",
            d.join("root").display(),
            d.join("state").display(),
            sock.display()
        );
        std::fs::write(d.join("config.toml"), config).expect("write containerd config");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(d.join("config.toml"));
        let proc = Proc::spawn("containerd", cmd, &d.join("containerd.log"));
        wait_until("containerd socket", Duration::from_secs(30), || {
            sock.exists()
        });
        Containerd {
            dir,
            sock,
            _proc: proc,
        }
    }

    /// Writes `<name>/<host>/hosts.toml` pointing `host` at the mirror; `server` is a closed
    /// port so that nothing can be fetched around the mirror.
    pub fn hosts_dir(&self, name: &str, host: &str, mirror: &str, style: Style) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(dir.join(host)).expect("mkdir hosts");
        let entry = match style {
            Style::Ns => format!("[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
            Style::Prefix => format!(
                "[host.\"{mirror}/v2/{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n"
            ),
        };
        let toml = format!("server = \"http://127.0.0.1:9\"\n\n{entry}");
        std::fs::write(dir.join(host).join("hosts.toml"), toml).expect("write hosts.toml");
        dir
    }

    /// `ctr images pull` into a fresh namespace; Ok(image digest) or Err(output).
    pub fn pull(&self, namespace: &str, hosts: &Path, reference: &str) -> Result<String, String> {
        self.pull_as(namespace, hosts, reference, None)
    }

    /// `ctr images pull --all-platforms`: every platform manifest of an index and every
    /// layer of each (fetched, then unpacked for none).
    pub fn pull_all_platforms(
        &self,
        namespace: &str,
        hosts: &Path,
        reference: &str,
    ) -> Result<(), String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args([
                "-n",
                namespace,
                "images",
                "pull",
                "--all-platforms",
                "--hosts-dir",
            ])
            .arg(hosts)
            .arg(reference)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// `pull` with `--user user:pass` (sent after a 401 Basic challenge).
    pub fn pull_as(
        &self,
        namespace: &str,
        hosts: &Path,
        reference: &str,
        user: Option<&str>,
    ) -> Result<String, String> {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.sock)
            .args(["-n", namespace, "images", "pull", "--hosts-dir"])
            .arg(hosts);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        let out = cmd.arg(reference).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let list = run(Command::new("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(["-n", namespace, "images", "ls"]));
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(reference))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
            .ok_or_else(|| format!("{reference} not listed after pull:\n{list}"))
    }
}
