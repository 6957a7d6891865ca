//! An egress proxy from Debian: squid on a loopback port with its own config, access log
//! and hosts file (names only the proxy can resolve), optionally demanding Basic auth.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::{free_port, run, wait_port, wait_until, Proc};

pub struct Squid {
    pub port: u16,
    dir: TempDir,
    proc: Option<Proc>,
}

impl Squid {
    /// Squid resolving each `(name, ip)` of `hosts` itself; with `auth`, every request
    /// must carry that user's password (`Proxy-Authorization: Basic`).
    pub fn start(hosts: &[(&str, &str)], auth: Option<(&str, &str)>) -> Squid {
        let dir = TempDir::new().expect("tempdir");
        let d = dir.path();
        // squid drops to user `proxy`: its files must be reachable and writable by it.
        run(Command::new("chmod").arg("755").arg(d));
        let port = free_port();
        let hosts_file = d.join("hosts");
        let mut text = String::new();
        for (name, ip) in hosts {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(&hosts_file, text).expect("hosts");
        let mut access = String::from("http_access allow localhost\n");
        if let Some((user, pass)) = auth {
            let line = run(Command::new("htpasswd").args(["-bnm", user, pass]));
            let file = d.join("passwd");
            std::fs::write(&file, line.trim()).expect("passwd");
            access = format!(
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
                 auth_param basic realm corp\nacl authed proxy_auth REQUIRED\n\
                 http_access allow authed\n",
                file.display()
            );
        }
        let conf = format!(
            "http_port 127.0.0.1:{port}\n{access}http_access deny all\n\
             access_log stdio:{log}\ncache_log {cache}\npid_filename {pid}\n\
             hosts_file {hosts}\ncache deny all\nshutdown_lifetime 1 seconds\n\
             dns_nameservers 127.0.0.1\ncoredump_dir {d}\n",
            log = d.join("access.log").display(),
            cache = d.join("cache.log").display(),
            pid = d.join("squid.pid").display(),
            hosts = hosts_file.display(),
            d = d.display(),
        );
        std::fs::write(d.join("squid.conf"), conf).expect("conf");
        for f in ["access.log", "cache.log"] {
            std::fs::write(d.join(f), "").expect("log");
        }
        run(Command::new("chown").arg("-R").arg("proxy").arg(d));
        let mut cmd = Command::new("squid");
        cmd.arg("-N").arg("-f").arg(d.join("squid.conf"));
        let proc = Proc::spawn("squid", cmd, &d.join("squid.out"));
        wait_port(port);
        Squid {
            port,
            dir,
            proc: Some(proc),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// squid's access log (`... TCP_MISS/200 1234 GET http://host/path ...`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Waits (bounded) until the access log has a line containing `needle`: squid writes
    /// a line when a request or tunnel ends.
    pub fn wait_logged(&self, needle: &str) {
        wait_until(
            &format!("squid logs {needle:?}"),
            Duration::from_secs(15),
            || self.log().contains(needle),
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A file holding `text`, readable by the mirror.
pub fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, text).expect("secret");
    f
}
