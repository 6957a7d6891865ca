//! What a newcomer trips on: every mistake gets a message that names the thing and the
//! fix, and a non-zero exit for commands; logs stay bounded; metrics exist from the start.

mod common;

use common::*;
use tempfile::TempDir;

#[test]
fn config_mistakes_name_the_file_or_key() {
    let tmp = TempDir::new().unwrap();
    let d = tmp.path();
    // A directory given as the config file.
    let (ok, out) = entrepot_cli(d, None, &["--config", d.to_str().unwrap(), "serve"]);
    assert!(!ok && out.contains("is a directory"), "{out}");
    assert!(out.contains(&d.display().to_string()), "{out}");
    // A missing config file.
    let (ok, out) = entrepot_cli(d, None, &["--config", "nope.toml", "verify"]);
    assert!(
        !ok && out.contains("config file nope.toml does not exist"),
        "{out}"
    );
    // A type error: reported once, with the key as written.
    let (ok, out) = entrepot_cli(d, Some("[server]\nlisten = 5\n"), &["verify"]);
    assert!(!ok && out.contains("server.listen"), "{out}");
    assert!(!out.contains("default."), "{out}");
    assert_eq!(out.matches("server.listen").count(), 1, "{out}");
    // Passwords: one source only, and never without a username.
    let both = "[upstreams.hub]\nurl = \"http://127.0.0.1:9\"\nusername = \"u\"\npassword = \"p\"\npassword_env = \"X\"\n";
    let (ok, out) = entrepot_cli(d, Some(both), &["verify"]);
    assert!(
        !ok && out.contains("upstream \"hub\"") && out.contains("not several"),
        "{out}"
    );
    let lonely = "[upstreams.hub]\nurl = \"http://127.0.0.1:9\"\npassword = \"p\"\n";
    let (ok, out) = entrepot_cli(d, Some(lonely), &["verify"]);
    assert!(!ok && out.contains("no username"), "{out}");
    // `verify --repair` is explained.
    let (ok, out) = entrepot_cli(d, None, &["verify", "--help"]);
    assert!(
        ok && out.contains("--repair") && out.contains("upload_ttl"),
        "{out}"
    );
}

#[test]
fn store_mistakes_are_errors_not_empty_stores() {
    let tmp = TempDir::new().unwrap();
    let d = tmp.path();
    let typo = d.join("stroe");
    let cfg = format!("[server]\nstorage = \"{}\"\n", typo.display());
    let (ok, out) = entrepot_cli(d, Some(&cfg), &["verify"]);
    assert!(!ok && out.contains(&typo.display().to_string()), "{out}");
    assert!(!typo.exists(), "no store created by verify");
    // Storage that is a file: serve says which path and what is wrong.
    let file = d.join("afile");
    std::fs::write(&file, "x").unwrap();
    let cfg = format!("[server]\nstorage = \"{}\"\n", file.display());
    let (ok, out) = entrepot_cli(d, Some(&cfg), &["serve"]);
    assert!(
        !ok && out.contains("server.storage") && out.contains("afile"),
        "{out}"
    );
    // import of a missing directory.
    let cfg = store_config(d, "");
    std::fs::create_dir_all(d.join("store/blobs")).unwrap();
    let (ok, out) = entrepot_cli(d, Some(&cfg), &["import", "/nonexistent/layout"]);
    assert!(!ok && out.contains("no such directory"), "{out}");
}

#[test]
fn a_busy_port_names_the_address() {
    let tmp = TempDir::new().unwrap();
    let d = tmp.path();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cfg = format!(
        "[server]\nstorage = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n",
        d.join("store").display()
    );
    let (ok, out) = entrepot_cli(d, Some(&cfg), &["serve"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("server.listen 127.0.0.1:{port}")),
        "{out}"
    );
    assert!(
        !out.contains("entrepot serving"),
        "no success line before the failure: {out}"
    );
}

#[test]
fn hosts_ca_must_be_an_absolute_existing_file() {
    let tmp = TempDir::new().unwrap();
    let d = tmp.path();
    let args = |ca: &str| {
        vec![
            "hosts".to_string(),
            "--mirror".into(),
            "https://mirror:5000".into(),
            "--out".into(),
            d.join("h").display().to_string(),
            "--ca".into(),
            ca.to_string(),
        ]
    };
    for ca in ["relative/ca.pem", "/nonexistent/ca.pem"] {
        let a = args(ca);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (ok, out) = entrepot_cli(d, None, &a);
        assert!(!ok && out.contains(ca), "{ca}: {out}");
    }
}

#[test]
fn prefetch_reports_each_failure_and_fails_at_the_end() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    layout.build("one", &[("a", &noise(10_000, 150))]);
    layout.push("one", &format!("{}/library/one:1", up.host()), None);
    let (index, _) = layout.multiarch(20_000, 151);
    layout.push("multi", &format!("{}/library/multi:1", up.host()), None);
    let d = tmp.path();
    std::fs::create_dir_all(d.join("store/blobs")).unwrap();
    let cfg = store_config(
        d,
        &format!(
            "default_upstream = \"docker.io\"\n[upstreams.\"docker.io\"]\nurl = \"{}/v2/\"\n",
            up.url()
        ),
    );
    // An unknown registry is refused before anything is fetched (issue 26: every
    // reference is checked first, and the message says nothing was done).
    let (ok, out) = entrepot_cli(
        d,
        Some(&cfg),
        &["prefetch", "ghcr.io/org/app:1", "docker.io/library/one:1"],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("registry ghcr.io is not a configured upstream")
            && out.contains("nothing was fetched or written"),
        "{out}"
    );
    assert_eq!(up.count("GET", "/v2/library/one/manifests/1"), 0, "{out}");
    // A missing image and a good one: the good one is fetched (the upstream URL given
    // with its /v2/ still works), the other is reported.
    let (ok, out) = entrepot_cli(
        d,
        Some(&cfg),
        &[
            "prefetch",
            "docker.io/library/nothere:1",
            "docker.io/library/one:1",
        ],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("FAILED docker.io/library/nothere:1"), "{out}");
    assert!(out.contains("1 of 2 images failed"), "{out}");
    assert_eq!(up.count("GET", "/v2/library/one/manifests/1"), 1, "{out}");
    // A platform the index lacks is an error, not a silent index-only fetch.
    let (ok, out) = entrepot_cli(
        d,
        Some(&cfg),
        &[
            "prefetch",
            "--platform",
            "linux/s390x",
            "docker.io/library/multi:1",
        ],
    );
    assert!(!ok && out.contains("linux/s390x"), "{out}");
    let (ok, out) = entrepot_cli(d, Some(&cfg), &["prefetch", "docker.io/library/multi:1"]);
    assert!(ok && out.contains(&index), "{out}");
}

#[test]
fn logs_are_bounded_and_metrics_exist_from_the_start() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let file = htpasswd(tmp.path(), &[("a", "a")]);
    let mirror = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\n\
             [upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:9\"\n",
            file.display()
        ),
    );
    let m = mirror.url();
    // A hosted prefix nobody may push to is pointed out at start.
    assert!(
        mirror.log().contains("auth.push names no user"),
        "{}",
        mirror.log()
    );
    // Every known series is there at 0 before any request.
    let up = [
        ("upstream", "docker.io"),
        ("kind", "blob"),
        ("result", "miss"),
    ];
    assert_eq!(mirror.metric("entrepot_cache_requests_total", &up), 0.0);
    assert!(mirror
        .log()
        .lines()
        .any(|l| l.contains("entrepot serving") && l.contains("tls=false")));
    // A 10k-character path is logged cut, with a marker.
    let long = format!("/v2/local/{}/tags/list", "a".repeat(10_000));
    let _ = raw(mirror.port, "GET", &long, &[]);
    // Malformed requests from anyone: no ERROR line each.
    for _ in 0..20 {
        let _ = raw(mirror.port, "GET", "/v2/", &[("Bad Header", "x")]);
    }
    // A 405 is labelled with its endpoint, not "other".
    let r = http("HEAD", &format!("{m}/v2/local/a/tags/list"), &[]);
    assert_eq!(r.status, 405);
    let r = get(&format!("{m}/v2/local/a/tags/list?n=-1"));
    assert_eq!(
        (r.status, r.oci_code().as_str()),
        (400, "PAGINATION_NUMBER_INVALID")
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = mirror.log();
    assert!(
        log.lines().all(|l| l.len() < 1500),
        "no log line past 1500 bytes"
    );
    assert!(log.contains("more bytes]"), "a cut path says so");
    assert!(!log.contains("ERROR"), "{log}");
    let labels = [("upstream", "-"), ("endpoint", "tags"), ("status", "405")];
    assert_eq!(mirror.metric("entrepot_http_requests_total", &labels), 1.0);
}
