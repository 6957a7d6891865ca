//! The operator's first hour (issue 26): air-gap bundles into a fresh host, one server
//! per store, export into an earlier export, image lists with comments and typos, names
//! no upstream can have, and errors that name the URL, the key and what to do.

mod common;

use std::process::Command;

use common::*;
use tempfile::TempDir;

fn upstream_toml(key: &str, url: &str) -> String {
    format!("[upstreams.\"{key}\"]\nurl = \"{url}\"\n")
}

/// (success, stdout + stderr) of `entrepot ARGS --config FILE`.
fn cli_at(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run entrepot");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("entrepot {args:?}:\n{text}");
    (out.status.success(), text)
}

fn index_refs(layout: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(layout.join("index.json")).expect("index.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut refs: Vec<String> = doc["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(String::from)
        .collect();
    refs.sort();
    refs
}

/// Export adds to an earlier export (and says hard links keep their space), import
/// creates the store of a host where `serve` never ran, read-only commands still refuse
/// a missing store, and the import summary counts what was really imported.
#[test]
fn a_fresh_host_imports_a_bundle_before_serve_ever_ran() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let hello = layout.build("hello", &[("h", &noise(150_000, 261))]);
    let two = layout.build("two", &[("t", &noise(120_000, 262))]);
    layout.push("hello", &format!("{}/library/hello:1", up.host()), None);
    layout.push("two", &format!("{}/tools/two:1", up.host()), None);
    let online = Mirror::start("", &upstream_toml("docker.io", &up.url()));
    let out = tmp.path().join("bundle");
    let out_s = out.display().to_string();

    let (ok, text) = online.cli(&["export", "--out", &out_s, "docker.io/library/hello:1"]);
    assert!(
        ok && text.contains("1 references added, 0 replaced, 0 kept"),
        "{text}"
    );
    assert!(text.contains("hard links"), "{text}");
    let (ok, text) = online.cli(&["export", "--out", &out_s, "docker.io/tools/two:1"]);
    assert!(
        ok && text.contains("1 references added, 0 replaced, 1 kept"),
        "{text}"
    );
    let (ok, text) = online.cli(&[
        "export",
        "--copy",
        "--out",
        &out_s,
        "docker.io/library/hello:1",
    ]);
    assert!(
        ok && text.contains("0 references added, 1 replaced, 1 kept"),
        "{text}"
    );
    assert_eq!(
        index_refs(&out),
        ["docker.io/library/hello:1", "docker.io/tools/two:1"]
    );
    // A directory that is neither empty nor a layout: refused before any network.
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("notes.txt"), "mine").unwrap();
    let asked = up.count("GET", "/manifests/");
    let (ok, text) = online.cli(&[
        "export",
        "--out",
        &home.display().to_string(),
        "docker.io/library/hello:1",
    ]);
    assert!(!ok, "{text}");
    assert_eq!(up.count("GET", "/manifests/"), asked, "no upstream request");
    assert!(!home.join("blobs").exists() && !home.join("index.json").exists());

    // The fresh host: a config whose store does not exist, a relative path.
    let host = tmp.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    let cfg = format!(
        "[server]\nstorage = \"data\"\nlisten = \"127.0.0.1:{}\"\n{}",
        free_port(),
        upstream_toml("docker.io", "http://127.0.0.1:9")
    );
    let abs = host.join("data").display().to_string();
    for args in [&["verify"][..], &["gc", "--dry-run"]] {
        let (ok, text) = entrepot_cli(&host, Some(&cfg), args);
        assert!(
            !ok && text.contains(&format!("no store at {abs}")),
            "{text}"
        );
        assert!(!host.join("data").exists(), "{args:?} created no store");
    }
    let (ok, text) = entrepot_cli(&host, Some(&cfg), &["import", &out_s]);
    assert!(ok && text.contains("imported 2 of 2 references"), "{text}");
    let served = Mirror::start_with_store(
        Some(host.join("data")),
        "",
        &upstream_toml("docker.io", "http://127.0.0.1:9"),
    );
    for (repo, digest) in [("library/hello", &hello), ("tools/two", &two)] {
        let r = http(
            "GET",
            &format!("{}/v2/docker.io/{repo}/manifests/1", served.url()),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        );
        assert_eq!(r.status, 200, "{repo}");
        assert_eq!(format!("sha256:{}", sha256_hex(&r.body)), *digest);
    }

    // A bundle with one tampered layer: the summary says what was not imported.
    let bad = tmp.path().join("bad");
    run(Command::new("cp").arg("-r").arg(&out).arg(&bad));
    let victim = layout.layers(&two)[0][7..].to_string();
    std::fs::write(bad.join("blobs/sha256").join(&victim), b"tampered").unwrap();
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (ok, text) = entrepot_cli(&other, Some(&cfg), &["import", &bad.display().to_string()]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("imported 1 of 2 references")
            && text.contains("1 NOT imported because 1 of their objects were refused"),
        "{text}"
    );
}

/// A second `serve` on a store in use is refused, naming the first one's pid, and the
/// first one's temp files are left alone.
#[test]
fn a_second_server_on_the_same_store_is_refused() {
    let first = Mirror::start("", "");
    let pending = first.store.join("tmp/in-flight.part");
    std::fs::write(&pending, b"a fill in progress").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .arg("serve")
        .arg("--config")
        .arg(first.config_path())
        .env(
            "ENTREPOT_SERVER__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    let pid = first.pid().expect("pid");
    assert!(
        text.contains(&format!("pid {pid}")) && text.contains(&first.store.display().to_string()),
        "{text}"
    );
    assert!(pending.exists(), "the refused server removed nothing");
    assert_eq!(get(&format!("{}/healthz", first.url())).status, 200);
}

/// `--file` lists: comments and blank lines are skipped; every line is checked before
/// any network, and a bad one refuses the list naming the line; `--platform` is checked.
#[test]
fn image_lists_and_platforms_are_checked_before_anything_is_done() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    layout.build("one", &[("o", &noise(50_000, 263))]);
    layout.push("one", &format!("{}/library/one:1", up.host()), None);
    let m = Mirror::start("", &upstream_toml("docker.io", &up.url()));
    let list = tmp.path().join("images.txt");
    std::fs::write(
        &list,
        "# what the site needs\n\ndocker.io/library/one:1   # the greeting\n",
    )
    .unwrap();
    let out = tmp.path().join("o1").display().to_string();
    let (ok, text) = m.cli(&[
        "export",
        "--out",
        &out,
        "--file",
        &list.display().to_string(),
    ]);
    assert!(ok, "{text}");
    assert!(!up.log().contains("%20"), "the comment never went upstream");

    let asked = up.count("GET", "/manifests/");
    std::fs::write(
        &list,
        "docker.io/library/one:1\ndocker.io/Bad Name:1\nfoo.io/x/y:1\n",
    )
    .unwrap();
    let out2 = tmp.path().join("o2");
    let (ok, text) = cli_at(
        &m.config_path(),
        &[
            "export",
            "--out",
            &out2.display().to_string(),
            "--file",
            &list.display().to_string(),
        ],
    );
    let list_s = list.display().to_string();
    assert!(!ok, "{text}");
    assert!(
        text.contains("2 of 3 references are not valid; nothing was fetched or written")
            && text.contains(&format!("{list_s}:2"))
            && text.contains(&format!("{list_s}:3"))
            && text.contains("foo.io is not a configured upstream"),
        "{text}"
    );
    assert_eq!(up.count("GET", "/manifests/"), asked, "no upstream request");
    assert!(!out2.join("index.json").exists());

    for (platform, says) in [
        ("linux-amd64", "must be os/arch[/variant]"),
        ("linux/s390x", "not linux/s390x"),
    ] {
        let out3 = tmp.path().join(format!("o-{}", platform.replace('/', "-")));
        let (ok, text) = cli_at(
            &m.config_path(),
            &[
                "export",
                "--out",
                &out3.display().to_string(),
                "--platform",
                platform,
                "docker.io/library/one:1",
            ],
        );
        assert!(!ok && text.contains(says), "{platform}: {text}");
        assert!(!out3.join("index.json").exists(), "{platform}");
    }
}

/// A name that begins with a registry host no upstream is configured for gets 404
/// NAME_UNKNOWN naming the configured prefixes, through curl, skopeo, containerd, podman
/// and Docker,
/// with no request to the default upstream (Docker Hub has no such namespace).
#[test]
fn an_unconfigured_registry_host_is_named_not_sent_to_docker_hub() {
    if !require(PEERS) || !require(&["podman", "dockerd"]) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let m = Mirror::start(
        "default_upstream = \"docker.io\"",
        &format!(
            "{}{}",
            upstream_toml("docker.io", &up.url()),
            upstream_toml("quay.io", &up.url())
        ),
    );
    let r = get(&format!("{}/v2/foo.io/bar/manifests/latest", m.url()));
    assert_eq!((r.status, r.oci_code().as_str()), (404, "NAME_UNKNOWN"));
    let msg = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        msg.contains("foo.io") && msg.contains("docker.io, quay.io"),
        "{msg}"
    );
    let skopeo = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://127.0.0.1:{}/foo.io/bar:latest", m.port))
        .output()
        .expect("skopeo");
    let said = String::from_utf8_lossy(&skopeo.stderr);
    assert!(
        !skopeo.status.success() && said.contains("not a configured upstream"),
        "{said}"
    );
    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", "foo.io", &m.url(), Style::Prefix);
    let pulled = ctr.pull("x", &hosts, "foo.io/bar:latest");
    assert!(pulled.is_err(), "{pulled:?}");
    // podman and Docker name the mirror's reason too.
    let host = format!("127.0.0.1:{}", m.port);
    let said = Podman::new()
        .pull(&format!("{host}/foo.io/bar:latest"))
        .expect_err("podman pull");
    assert!(said.contains("not a configured upstream"), "{said}");
    let docker = Dockerd::start(&host);
    let said = docker
        .pull(&format!("{host}/foo.io/bar:latest"))
        .expect_err("docker pull");
    assert!(said.contains("not a configured upstream"), "{said}");
    assert!(
        !up.log().contains("foo.io"),
        "nothing went to the default upstream"
    );
    assert!(m
        .log()
        .contains("path=/v2/foo.io/bar/manifests/latest status=404"));
}

/// Upstream failures name the URL asked and, for a stalled upstream, the timeout key;
/// the start line names the config file and every upstream's URL.
#[test]
fn upstream_errors_name_the_url_and_the_timeout() {
    // Accepts connections and never answers.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stalled_url = format!("http://{}", stalled.local_addr().unwrap());
    let refused = format!("http://127.0.0.1:{}", free_port());
    let m = Mirror::start(
        "upstream_timeout = \"1s\"\ndefault_upstream = \"slow\"",
        &format!(
            "{}{}",
            upstream_toml("slow", &stalled_url),
            upstream_toml("gone", &refused)
        ),
    );
    let log = m.log();
    let start = log
        .lines()
        .find(|l| l.contains("entrepot serving"))
        .expect("start line");
    assert!(
        start.contains(&format!("config={}", m.config_path().display()))
            && start.contains(&format!("slow={stalled_url}/"))
            && start.contains(&format!("gone={refused}/"))
            && start.contains("default_upstream=slow"),
        "{start}"
    );
    let r = get(&format!("{}/v2/slow/app/manifests/1", m.url()));
    let msg = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        r.status >= 500
            && msg.contains(&format!("{stalled_url}/v2/app/manifests/1"))
            && msg.contains("server.upstream_timeout (1s)"),
        "{} {msg}",
        r.status
    );
    let r = get(&format!("{}/v2/gone/app/manifests/1", m.url()));
    let msg = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        r.status >= 500 && msg.contains(&format!("cannot connect to {refused}/v2/app/manifests/1")),
        "{} {msg}",
        r.status
    );
    drop(stalled);
}

/// A user outside `auth.push` hears "may not push" through a token client (skopeo) as
/// through Basic; the start warns about push users the htpasswd file lacks.
#[test]
fn push_refusals_say_why_through_tokens_too() {
    if !require(PEERS) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let file = htpasswd(tmp.path(), &[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let m = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\npush = [\"alice\", \"carol\"]\n",
            file.display()
        ),
    );
    assert!(
        m.log()
            .contains("auth.push names users the htpasswd file does not have")
            && m.log().contains("carol"),
        "{}",
        m.log()
    );
    let layout = Layout::new(tmp.path());
    layout.build("app", &[("a", &noise(10_000, 264))]);
    let push = |creds: &str| {
        Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false", "--dest-creds", creds])
            .arg(format!("oci:{}:app", layout.dir.display()))
            .arg(format!("docker://127.0.0.1:{}/local/team/app:1", m.port))
            .output()
            .expect("skopeo")
    };
    let bob = push("bob:bob-pw");
    let said = String::from_utf8_lossy(&bob.stderr);
    assert!(
        !bob.status.success() && said.contains("may not push") && said.contains("bob"),
        "{said}"
    );
    let alice = push("alice:alice-pw");
    assert!(
        alice.status.success(),
        "{}",
        String::from_utf8_lossy(&alice.stderr)
    );
    assert!(m.log().contains("user=bob") && m.log().contains("user=alice"));
}

/// A tag containerd only ever HEADed (it had the manifest) still resolves from its record
/// while the upstream is down.
#[test]
fn a_tag_only_ever_headed_is_served_stale() {
    if !require(PEERS) {
        return;
    }
    let mut up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("app", &[("a", &noise(20_000, 265))]);
    layout.push("app", &format!("{}/library/app:1", up.host()), None);
    let m = Mirror::start(
        "",
        &format!(
            "{}tag_ttl = \"1s\"\n",
            upstream_toml("docker.io", &up.url())
        ),
    );
    let url = format!("{}/v2/docker.io/library/app/manifests/1", m.url());
    let accept = [("Accept", "application/vnd.oci.image.manifest.v1+json")];
    let r = http("HEAD", &url, &accept);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    up.stop();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let r = http("HEAD", &url, &accept);
    assert_eq!(r.status, 200, "served from the tag record");
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert!(r.header("content-length").is_some_and(|l| l != "0"));
    assert_eq!(
        m.metric("entrepot_stale_serves_total", &[("upstream", "docker.io")]),
        1.0
    );
}

/// Eviction names the images that lost content (CLI and server log), and a repository
/// left without any leaves `_catalog`.
#[test]
fn eviction_names_the_images_it_emptied_and_the_catalog_forgets_them() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("app", &[("a", &noise(30_000, 266))]);
    layout.push("app", &format!("{}/library/app:1", up.host()), None);
    let layers = layout.layers(&digest);
    let pull = |m: &Mirror| pull_checked(&m.url(), "docker.io/library/app", "1", &layers, None);
    // The CLI names the image a gc would empty.
    let m = Mirror::start("", &upstream_toml("docker.io", &up.url()));
    pull(&m);
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(["gc", "--dry-run", "--config"])
        .arg(m.config_path())
        .env("ENTREPOT_SERVER__MAX_CACHE_SIZE", "1B")
        .output()
        .expect("gc");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("would lose docker.io/library/app:1"),
        "{text}"
    );
    // A server evicting everything: its catalog forgets the repository.
    let evicting = Mirror::start(
        "max_cache_size = \"1B\"\ngc_interval = \"1s\"",
        &upstream_toml("docker.io", &up.url()),
    );
    pull(&evicting);
    let catalog = || get(&format!("{}/v2/_catalog", evicting.url())).json();
    wait_until(
        "the catalog forgets the evicted repository",
        std::time::Duration::from_secs(15),
        || {
            evicting.log().contains("images=docker.io/library/app:1")
                && catalog()["repositories"]
                    .as_array()
                    .is_some_and(|r| r.is_empty())
        },
    );
}

/// Upstream requests are counted by the class of their answer; bucket and cluster series
/// appear only when configured; the access line is written when the body ends, with the
/// bytes really sent, or says the client left early.
#[test]
fn metrics_and_the_access_log_say_what_happened() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let blob = noise(24 << 20, 267);
    let d = up.push_blob("library/big", &blob);
    let m = Mirror::start("", &upstream_toml("docker.io", &up.url()));
    let url = format!("{}/v2/docker.io/library/big/blobs/{d}", m.url());
    let r = get(&url);
    assert_eq!(format!("sha256:{}", sha256_hex(&r.body)), d);
    let r = get(&format!(
        "{}/v2/docker.io/library/none/manifests/1",
        m.url()
    ));
    assert_eq!(r.status, 404);
    let count = |status: &str| {
        m.metric(
            "entrepot_upstream_requests_total",
            &[("upstream", "docker.io"), ("status", status)],
        )
    };
    assert!(
        count("2xx") >= 1.0 && count("4xx") >= 1.0,
        "{}",
        count("4xx")
    );
    let text = String::from_utf8(get(&format!("{}/metrics", m.url())).body).unwrap();
    assert!(
        !text.contains("entrepot_s3_") && !text.contains("entrepot_peer_"),
        "no bucket or cluster series without a bucket or cluster"
    );
    // A client that reads the headers and a little, then leaves.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", m.port)).unwrap();
        let path = format!("/v2/docker.io/library/big/blobs/{d}");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).unwrap();
    }
    let size = blob.len().to_string();
    wait_until(
        "both access lines",
        std::time::Duration::from_secs(10),
        || {
            let log = m.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("entrepot::access") && l.contains("/library/big/blobs/"))
                .collect();
            lines.len() == 2
                && lines[0].contains(&format!("bytes={size} complete=true"))
                && lines[1].contains("complete=false")
                && !lines[1].contains(&format!("bytes={size} "))
                && lines
                    .iter()
                    .all(|l| l.contains("headers_ms=") && l.contains(" ms="))
        },
    );
}

/// `prefetch` says what it downloaded and what was cached already, its progress lines
/// name the image; `verify` that finds damage says how to repair it.
#[test]
fn prefetch_and_verify_say_what_they_did_and_what_to_do() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("one", &[("o", &noise(40_000, 268))]);
    layout.push("one", &format!("{}/library/one:1", up.host()), None);
    let m = Mirror::start("", &upstream_toml("docker.io", &up.url()));
    let (ok, text) = cli_at(&m.config_path(), &["prefetch", "docker.io/library/one:1"]);
    assert!(
        ok && text.contains("prefetched 1 images: 3 objects downloaded")
            && text.contains("0 already cached"),
        "{text}"
    );
    assert!(
        text.contains("image=\"docker.io/library/one:1\""),
        "progress names the image: {text}"
    );
    let (ok, text) = cli_at(&m.config_path(), &["prefetch", "docker.io/library/one:1"]);
    assert!(
        ok && text.contains("0 objects downloaded (0 B), 3 already cached"),
        "{text}"
    );
    let layer = layout.layers(&digest)[0][7..].to_string();
    let file = m.store_files(&layer).pop().expect("stored layer");
    std::fs::write(&file, b"bit rot").unwrap();
    let (ok, text) = cli_at(&m.config_path(), &["verify"]);
    assert!(
        !ok && text.contains("1 bad") && text.contains("entrepot verify --repair"),
        "{text}"
    );
}

/// `--help` lists every key's environment form; completions come from clap's generator;
/// `kind-config` warns about a loopback mirror and says what it wrote; `hosts --ca` with
/// an http:// mirror is refused.
#[test]
fn the_cli_explains_itself() {
    let tmp = TempDir::new().unwrap();
    let d = tmp.path();
    let (ok, text) = entrepot_cli(d, None, &["--help"]);
    assert!(
        ok && text.contains("ENTREPOT_SERVER__LISTEN")
            && text.contains("ENTREPOT_UPSTREAMS__<KEY>__URL")
            && text.contains("ENTREPOT_SERVER__S3__BUCKET"),
        "{text}"
    );
    for (shell, says) in [
        ("bash", "_entrepot()"),
        ("zsh", "#compdef entrepot"),
        ("fish", "complete -c entrepot"),
    ] {
        let (ok, text) = entrepot_cli(d, None, &["completions", shell]);
        assert!(
            ok && text.contains(says) && text.contains("prefetch"),
            "{shell}: {text}"
        );
    }
    let hosts = d.join("kind-hosts").display().to_string();
    let (ok, text) = entrepot_cli(
        d,
        None,
        &[
            "kind-config",
            "--mirror",
            "http://localhost:5000",
            "--hosts-dir",
            &hosts,
        ],
    );
    assert!(
        ok && text.contains("names this machine")
            && text.contains(&format!("wrote containerd hosts files under {hosts}"))
            && text.contains("kind: Cluster"),
        "{text}"
    );
    let ca = d.join("ca.pem");
    std::fs::write(&ca, "x").unwrap();
    let (ok, text) = entrepot_cli(
        d,
        None,
        &[
            "hosts",
            "--mirror",
            "http://mirror:5000",
            "--out",
            &d.join("h").display().to_string(),
            "--ca",
            &ca.display().to_string(),
        ],
    );
    assert!(
        !ok && text.contains("--ca is for an https:// mirror"),
        "{text}"
    );
}

/// With hosted repositories, the generated registries.conf and hosts files cover the
/// mirror's own name: podman logs in and pushes, and containerd pulls the pushed image,
/// with no --tls-verify=false or --plain-http, the upstream pulls going through the
/// mirror as before.
#[test]
fn generated_client_configs_reach_hosted_repositories_too() {
    if !require(PEERS) || !require(&["podman"]) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("one", &[("o", &noise(30_000, 269))]);
    layout.push("one", &format!("{}/library/one:1", up.host()), None);
    let file = htpasswd(tmp.path(), &[("alice", "alice-pw")]);
    let m = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\npush = [\"alice\"]\n{}",
            file.display(),
            upstream_toml("docker.io", &up.url())
        ),
    );
    let host = format!("127.0.0.1:{}", m.port);
    let (ok, conf) = cli_at(&m.config_path(), &["registries-conf", "--mirror", &m.url()]);
    assert!(
        ok && conf.contains(&format!("location = \"{host}\"\ninsecure = true")),
        "{conf}"
    );
    let conf: String = conf
        .lines()
        .filter(|l| !l.contains(" INFO ") && !l.contains(" WARN "))
        .map(|l| format!("{l}\n"))
        .collect();
    let podman = Podman::with_registries_conf(&conf);
    podman
        .pull("docker.io/library/one:1")
        .expect("pull through the mirror entry");
    assert!(up.count("GET", "/v2/library/one/manifests/1") >= 1);
    podman
        .login(&host, "alice", "alice-pw")
        .expect("login without --tls-verify=false");
    let pushed = format!("{host}/local/team/one:1");
    podman.tag("docker.io/library/one:1", &pushed).expect("tag");
    podman
        .push(&pushed)
        .expect("push without --tls-verify=false");

    let dir = tmp.path().join("certs.d");
    let (ok, text) = cli_at(
        &m.config_path(),
        &[
            "hosts",
            "--mirror",
            &m.url(),
            "--out",
            &dir.display().to_string(),
        ],
    );
    assert!(ok && text.contains(&format!("{host}/hosts.toml")), "{text}");
    let ctr = Containerd::start();
    let got = ctr
        .pull("h", &dir, &pushed)
        .expect("containerd pulls the hosted image");
    // podman may convert what it pushes: the pulled digest is what the mirror holds.
    let held = http(
        "HEAD",
        &format!("{}/v2/local/team/one/manifests/1", m.url()),
        &[(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )],
    );
    assert_eq!(Some(got.as_str()), held.header("docker-content-digest"));
    assert!(!digest.is_empty());
}

/// `GET /` shows each upstream (URL, state, pull limit, hit ratio), what the cache saved,
/// fills, the largest and most pulled images, never a private repository; it follows
/// `_catalog`'s access rule (Basic for browsers); a real headless Chromium renders it.
#[test]
fn the_status_page_shows_what_the_mirror_holds_and_hides_what_is_private() {
    if !require(PEERS) || !require(&["chromium"]) {
        return;
    }
    let public = Registry::start(Auth::Anonymous);
    let hub = common::passthrough::Passthrough::start(&public.url());
    let private = Registry::start(Auth::Basic("owner", "s3cret"));
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let app = layout.build("app", &[("a", &noise(200_000, 270))]);
    layout.push("app", &format!("{}/library/app:1", public.host()), None);
    let secret = layout.build("secret", &[("s", &noise(20_000, 271))]);
    layout.push(
        "secret",
        &format!("{}/team/secret:1", private.host()),
        Some("owner:s3cret"),
    );
    let m = Mirror::start(
        "",
        &format!(
            "{}{}",
            upstream_toml("docker.io", &hub.url()),
            upstream_toml("priv.io", &private.url())
        ),
    );
    let pull = |repo: &str, digest: &str, auth: Option<&str>| {
        pull_checked(&m.url(), repo, "1", &layout.layers(digest), auth)
    };
    pull("docker.io/library/app", &app, None);
    pull("docker.io/library/app", &app, None);
    pull(
        "priv.io/team/secret",
        &secret,
        Some(&basic("owner", "s3cret")),
    );
    let page = || get(&format!("{}/", m.url()));
    wait_until(
        "the inventory is counted",
        std::time::Duration::from_secs(10),
        || String::from_utf8_lossy(&page().body).contains("Largest images"),
    );
    let r = page();
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    let html = String::from_utf8_lossy(&r.body).into_owned();
    for says in [
        "<code>docker.io</code>",
        &hub.url(),
        "answering",
        "left</td>",
        "docker.io/library/app",
        "Fills in progress: 0",
        "from the cache",
    ] {
        assert!(html.contains(says), "page lacks {says:?}:\n{html}");
    }
    assert!(
        !html.contains("team/secret"),
        "a private repository is never shown:\n{html}"
    );
    assert!(html.contains("Most pulled since start"));
    let most = &html[html.find("Most pulled").unwrap()..];
    assert!(
        most.contains("docker.io/library/app") && most.contains("<td class=num>2</td>"),
        "{most}"
    );

    // A real browser renders it.
    let shot = std::env::var("STATUS_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().join("status.png"));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,900",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("{}/", m.url()))
        .output()
        .expect("chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    let dom = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("{}/", m.url()))
        .output()
        .expect("chromium");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("Upstreams") && dom.contains("docker.io/library/app"),
        "{dom}"
    );

    // Without anonymous pulls, the page asks a browser for a login (Basic) and shows
    // itself to an htpasswd user.
    let file = htpasswd(tmp.path(), &[("alice", "alice-pw")]);
    let closed = Mirror::start(
        "",
        &format!(
            "[auth]\nhtpasswd = \"{}\"\nanonymous_pull = false\n{}",
            file.display(),
            upstream_toml("docker.io", &hub.url())
        ),
    );
    let r = get(&format!("{}/", closed.url()));
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Basic")));
    let r = http(
        "GET",
        &format!("{}/", closed.url()),
        &[("Authorization", &basic("alice", "alice-pw"))],
    );
    assert_eq!(r.status, 200);
}

/// `entrepot ls [PREFIX]` lists repositories with tags, size and last pull, hosted ones
/// marked, private ones left out, and refuses a missing store.
#[test]
fn ls_lists_what_the_store_holds() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("app", &[("a", &noise(100_000, 272))]);
    layout.push("app", &format!("{}/library/app:1", up.host()), None);
    layout.push("app", &format!("{}/tools/other:2", up.host()), None);
    let m = Mirror::start("", &upstream_toml("docker.io", &up.url()));
    let (ok, text) = cli_at(
        &m.config_path(),
        &[
            "prefetch",
            "docker.io/library/app:1",
            "docker.io/tools/other:2",
        ],
    );
    assert!(ok, "{text}");
    let (ok, text) = cli_at(&m.config_path(), &["ls"]);
    assert!(ok, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("docker.io/library/app "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("cached") && line.contains(" 1") && line.contains("KiB"),
        "{line}"
    );
    assert!(text.contains("2 repositories"), "{text}");
    let (ok, text) = cli_at(&m.config_path(), &["ls", "docker.io/tools"]);
    assert!(
        ok && text.contains("docker.io/tools/other") && !text.contains("library/app"),
        "{text}"
    );
    assert!(!digest.is_empty());
}
