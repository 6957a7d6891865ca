//! The clients users run besides containerd: podman (containers/image, as CRI-O) and
//! Docker Engine, each with its own storage under a temp dir, as root, no network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tempfile::TempDir;

use super::{wait_until, Proc};

/// What a client command printed, as one string for assertion messages.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a client command: Ok(stdout) or Err(everything it printed).
fn outcome(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{cmd:?} failed: {}", text(&out)))
    }
}

const REPO_DIGESTS: &str = "{{range .RepoDigests}}{{println .}}{{end}}";

/// The digests an image is known by in the repository of `reference` (`[host/]repo:tag`),
/// from its repo digests (`repo@sha256:..`): podman lists both the index and the
/// platform's manifest of a multi-arch pull, Docker the one it resolved the tag to.
fn repo_digests(reference: &str, digests: &str) -> Result<Vec<String>, String> {
    let repo = match reference.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => reference,
    };
    let found: Vec<String> = digests
        .lines()
        .filter_map(|l| l.trim().split_once('@'))
        .filter(|(r, _)| *r == repo || r.ends_with(&format!("/{repo}")))
        .map(|(_, d)| d.to_string())
        .collect();
    if found.is_empty() {
        return Err(format!("no repo digest for {reference} in {digests:?}"));
    }
    Ok(found)
}

/// podman with its own root, runroot, tmpdir, registries.conf and authfile.
pub struct Podman {
    dir: TempDir,
    /// Whether TLS settings come from registries.conf alone (no `--tls-verify=false`).
    strict: bool,
}

impl Podman {
    pub fn new() -> Podman {
        let dir = TempDir::new().expect("tempdir");
        let d = dir.path();
        std::fs::write(
            d.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .expect("registries.conf");
        std::fs::write(d.join("auth.json"), "{\"auths\":{}}").expect("authfile");
        Podman { dir, strict: false }
    }

    /// podman with `conf` as its registries.conf, trusted as written: no
    /// `--tls-verify=false` is added, so plain-http registries must be `insecure` there.
    pub fn with_registries_conf(conf: &str) -> Podman {
        let p = Podman::new();
        let conf = format!("unqualified-search-registries = []\n{conf}");
        std::fs::write(p.dir.path().join("registries.conf"), conf).expect("registries.conf");
        Podman { strict: true, ..p }
    }

    fn cmd(&self, verb: &str) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                verb,
            ]);
        if matches!(verb, "pull" | "push" | "login") {
            if !self.strict {
                cmd.arg("--tls-verify=false");
            }
            cmd.arg("--authfile").arg(d.join("auth.json"));
        }
        cmd
    }

    /// Pulls `reference`; Ok(the digests podman records for it) or Err(its output).
    pub fn pull(&self, reference: &str) -> Result<Vec<String>, String> {
        outcome(self.cmd("pull").arg("-q").arg(reference))?;
        let digests =
            outcome(
                self.cmd("image")
                    .args(["inspect", "--format", REPO_DIGESTS, reference]),
            )?;
        repo_digests(reference, &digests)
    }

    pub fn login(&self, host: &str, user: &str, pass: &str) -> Result<String, String> {
        outcome(self.cmd("login").args(["-u", user, "-p", pass, host]))
    }

    pub fn tag(&self, from: &str, to: &str) -> Result<String, String> {
        outcome(self.cmd("tag").args([from, to]))
    }

    pub fn push(&self, reference: &str) -> Result<String, String> {
        outcome(self.cmd("push").arg(reference))
    }

    pub fn remove(&self, reference: &str) -> Result<String, String> {
        outcome(self.cmd("rmi").args(["-f", reference]))
    }
}

/// Docker Engine (`dockerd` with vfs, no bridge, no iptables) with `mirror` as its
/// `registry-mirrors` entry and an insecure registry; client config of its own.
pub struct Dockerd {
    dir: TempDir,
    sock: PathBuf,
    proc: Option<Proc>,
}

impl Dockerd {
    pub fn start(mirror_host: &str) -> Dockerd {
        let dir = TempDir::new().expect("tempdir");
        let d = dir.path();
        let sock = d.join("docker.sock");
        std::fs::write(d.join("daemon.json"), "{}").expect("daemon.json");
        std::fs::create_dir_all(d.join("client")).expect("client dir");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(d.join("daemon.json"))
            .args(["--storage-driver", "vfs", "--data-root"])
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(["--iptables=false", "--ip-masq=false", "--bridge=none"])
            .arg("--registry-mirror")
            .arg(format!("http://{mirror_host}"))
            .arg("--insecure-registry")
            .arg(mirror_host);
        let proc = Proc::spawn("dockerd", cmd, &d.join("dockerd.log"));
        let docker = Dockerd {
            dir,
            sock,
            proc: Some(proc),
        };
        wait_until("dockerd answers", Duration::from_secs(60), || {
            docker.run(&["version"]).is_ok()
        });
        docker
    }

    /// `/usr/bin/docker` (the Debian client; another may be first in PATH) on this daemon.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        outcome(
            Command::new("/usr/bin/docker")
                .env("DOCKER_CONFIG", self.dir.path().join("client"))
                .arg("-H")
                .arg(format!("unix://{}", self.sock.display()))
                .args(args),
        )
    }

    /// Pulls `reference` and returns its repo digests (`docker.io/library/x` images are
    /// listed as `x@sha256:...`).
    pub fn pull(&self, reference: &str) -> Result<Vec<String>, String> {
        self.run(&["pull", "-q", reference])?;
        let digests = self.run(&["image", "inspect", "--format", REPO_DIGESTS, reference])?;
        repo_digests(reference, &digests)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    pub fn data_root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Dockerd {
    /// SIGTERM and a wait: dockerd unmounts its data root on the way out.
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let pid = p.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = p.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            p.kill();
        }
    }
}
