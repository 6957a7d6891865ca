//! What a hostile client, a broken upstream or a careless operator does: each test here
//! failed before its fix.

mod common;

use std::collections::BTreeMap;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn anonymous_upstream_mirror(up: &Registry, extra: &str) -> Mirror {
    Mirror::start(
        "",
        &format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n{extra}", up.url()),
    )
}

/// A mirror of `up` as docker.io with a hosted prefix `local` that alice (password `pw`)
/// may push to; `server` lines go in `[server]`.
fn alice_mirror(tmp: &tempfile::TempDir, up: &Registry, server: &str) -> Mirror {
    let file = htpasswd(tmp.path(), &[("alice", "pw")]);
    Mirror::start(
        server,
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\npush = [\"alice\"]\n\
             [upstreams.\"docker.io\"]\nurl = \"{}\"\n",
            file.display(),
            up.url()
        ),
    )
}

/// Reads an HTTP response's head from a raw socket: (status, Content-Length).
fn read_head(s: &mut TcpStream) -> (u16, u64, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    loop {
        let n = s.read(&mut byte).expect("read head");
        assert!(n > 0, "connection closed before the head");
        buf.extend_from_slice(&byte[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_string();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            return (status, len, buf[i + 4..].to_vec());
        }
    }
}

/// Item 1: a stored blob cut short under a slow reader neither kills the process nor is
/// served as complete; `verify` reports it and the next GET fetches it again, whole.
#[test]
fn a_blob_file_cut_short_is_never_served_as_complete() {
    if !require(&["docker-registry"]) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let blob = noise(32 << 20, 101);
    let d = up.push_blob("library/big", &blob);
    let mirror = anonymous_upstream_mirror(&up, "");
    let url = format!("{}/v2/docker.io/library/big/blobs/{d}", mirror.url());
    assert_eq!(get(&url).body.len(), blob.len());
    mirror.settle();
    let file = mirror.store_files(&d[7..])[0].clone();

    // A slow reader: 256 KiB, then the file is truncated, then it reads on.
    let mut s = TcpStream::connect(("127.0.0.1", mirror.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let path = format!("/v2/docker.io/library/big/blobs/{d}");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let (status, len, mut got) = read_head(&mut s);
    assert_eq!((status, len), (200, blob.len() as u64));
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < 256 * 1024 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        got.len() < blob.len(),
        "the reader of the moment gets an aborted transfer, not the whole blob"
    );
    assert_eq!(got[..256 * 1024], blob[..256 * 1024]);

    // The process is alive; verify reports the file.
    assert_eq!(get(&format!("{}/healthz", mirror.url())).status, 200);
    let (ok, out) = mirror.cli(&["verify"]);
    assert!(!ok && out.contains(&format!("BAD {d}")), "{out}");
    // The next GET is whole and verified: the short file was quarantined and refetched.
    let before = up.count("GET", &format!("/blobs/{d}"));
    let r = get(&url);
    assert_eq!(r.status, 200);
    assert_eq!(sha256_hex(&r.body), d[7..]);
    assert_eq!(up.count("GET", &format!("/blobs/{d}")), before + 1);
    assert!(mirror.log().contains("quarantined"));
}

/// A private upstream image (htpasswd Distribution) behind a pass-through, pulled once
/// with the owner's credentials.
struct PrivateImage {
    _up: Registry,
    pt: common::passthrough::Passthrough,
    _tmp: tempfile::TempDir,
    manifest: String,
    layer: String,
}

impl PrivateImage {
    fn push() -> PrivateImage {
        let up = Registry::start(Auth::Basic("owner", "s3cret"));
        let tmp = tempfile::TempDir::new().unwrap();
        let layout = Layout::new(tmp.path());
        let manifest = layout.build("s", &[("secret", &noise(50_000, 102))]);
        layout.push(
            "s",
            &format!("{}/team/secret:1", up.host()),
            Some("owner:s3cret"),
        );
        let layer = layout.layers(&manifest)[0].clone();
        let pt = common::passthrough::Passthrough::start(&up.url());
        PrivateImage {
            _up: up,
            pt,
            _tmp: tmp,
            manifest,
            layer,
        }
    }
}

/// Item 3: when the upstream answers the anonymous re-check of a private repository with
/// 404 (deleted, renamed, hidden), the content stays private.
#[test]
fn private_content_fails_closed_when_the_upstream_says_404() {
    if !require(&["docker-registry", "skopeo", "umoci", "htpasswd"]) {
        return;
    }
    let img = PrivateImage::push();
    let mirror = Mirror::start(
        "",
        &format!("[upstreams.\"quay.io\"]\nurl = \"{}\"\n", img.pt.url()),
    );
    let m = |what: &str| format!("{}/v2/quay.io/team/secret/{what}", mirror.url());
    let owner = basic("owner", "s3cret");
    let r = http("GET", &m("manifests/1"), &[("Authorization", &owner)]);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.manifest.as_str())
    );
    assert_eq!(get(&m("manifests/1")).status, 401);
    img.pt.set(common::passthrough::Mode::HideFromAnonymous);
    for what in [
        "manifests/1".to_string(),
        format!("manifests/{}", img.manifest),
        format!("blobs/{}", img.layer),
    ] {
        let r = get(&m(&what));
        assert_eq!(
            (r.status, r.oci_code().as_str()),
            (401, "UNAUTHORIZED"),
            "{what} stays private"
        );
    }
    let r = http("GET", &m("manifests/1"), &[("Authorization", &owner)]);
    assert_eq!(r.status, 200, "the owner still reads it");
}

/// Item 9: a client's Basic credentials go to an upstream only where its configuration
/// allows (default: only upstreams without credentials of their own).
#[test]
fn client_credentials_go_only_where_allowed() {
    if !require(&["docker-registry", "skopeo", "umoci", "htpasswd"]) {
        return;
    }
    let img = PrivateImage::push();
    let url = img.pt.url();
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"corp\"]\nurl = \"{url}\"\nusername = \"mirror\"\npassword = \"refused\"\n\
             [upstreams.\"open\"]\nurl = \"{url}\"\nusername = \"mirror\"\npassword = \"refused\"\nclient_credentials = true\n"
        ),
    );
    let owner = basic("owner", "s3cret");
    let get_as = |prefix: &str| {
        http(
            "GET",
            &format!("{}/v2/{prefix}/team/secret/manifests/1", mirror.url()),
            &[("Authorization", &owner)],
        )
    };
    let r = get_as("corp");
    assert_eq!(
        r.status, 401,
        "not forwarded to an upstream with its own credentials"
    );
    assert!(
        img.pt
            .requests()
            .iter()
            .all(|r| r.header("authorization") != Some(owner.as_str())),
        "the owner's credentials never reached the upstream"
    );
    let r = get_as("open");
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.manifest.as_str())
    );
}

/// Item 2: requests for a digest through a repository that does not hold it, racing
/// real pulls through the one that does, never make the real pulls fail.
#[test]
fn a_wrong_repository_cannot_poison_the_singleflight() {
    if !require(&["docker-registry"]) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let pt = common::passthrough::Passthrough::start(&up.url());
    pt.set_delay(Duration::from_millis(500));
    let mirror = Mirror::start(
        "",
        &format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n", pt.url()),
    );
    for round in 0..3u64 {
        let blob = noise(2 << 20, 110 + round);
        let d = up.push_blob("library/real", &blob);
        let url = |repo: &str| format!("{}/v2/docker.io/library/{repo}/blobs/{d}", mirror.url());
        let wrong: Vec<_> = (0..4)
            .map(|_| {
                let u = url("nothere");
                std::thread::spawn(move || get(&u).status)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let real: Vec<_> = (0..6)
            .map(|_| {
                let u = url("real");
                std::thread::spawn(move || get(&u))
            })
            .collect();
        for h in wrong {
            assert_eq!(
                h.join().unwrap(),
                404,
                "round {round}: the wrong repository gets 404"
            );
        }
        for h in real {
            let r = h.join().unwrap();
            assert_eq!(r.status, 200, "round {round}: a real pull failed");
            assert_eq!(sha256_hex(&r.body), d[7..]);
        }
        assert_eq!(
            up.count("GET", &format!("/v2/library/real/blobs/{d}")),
            1,
            "round {round}: one fill for the real repository"
        );
    }
}

/// Item 4: blobs mounted into hosted repositories while eviction runs (in the server and
/// from the command line at once) are never evicted.
#[test]
fn hosted_blobs_survive_eviction_running_during_mounts() {
    if !require(&["docker-registry", "htpasswd"]) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = alice_mirror(&tmp, &up, "max_cache_size = \"1KiB\"\ngc_interval = \"1s\"");
    let m = mirror.url();
    let auth = basic("alice", "pw");
    // Per round: 30 blobs to mount, each cached just before, and 10 never mounted.
    let blobs: Vec<Vec<String>> = (0..3u64)
        .map(|round| {
            (0..40)
                .map(|i| up.push_blob("library/src", &noise(20_000, 300 + round * 100 + i)))
                .collect()
        })
        .collect();
    // CLI gc in a loop beside the server's own passes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cli = {
        let (stop, config) = (stop.clone(), mirror.config_path());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(60)
            {
                let _ = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"))
                    .args(["gc", "--config"])
                    .arg(&config)
                    .output();
            }
        })
    };
    let mut mounted = Vec::new();
    for (round, ds) in blobs.iter().enumerate() {
        for (i, d) in ds.iter().enumerate() {
            // Cached through the upstream (eviction's prey), then mounted into a hosted repo.
            let _ = get(&format!("{m}/v2/docker.io/library/src/blobs/{d}"));
            if i >= 30 {
                continue;
            }
            let r = http(
                "POST",
                &format!(
                    "{m}/v2/local/r{round}/blobs/uploads/?mount={d}&from=docker.io/library/src"
                ),
                &[("Authorization", &auth)],
            );
            if r.status == 201 {
                mounted.push((format!("local/r{round}"), d.clone()));
            }
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    cli.join().unwrap();
    assert!(
        mounted.len() > 45,
        "most mounts succeeded: {}",
        mounted.len()
    );
    let prey_left = blobs
        .iter()
        .flat_map(|ds| &ds[30..])
        .filter(|d| !mirror.store_files(&d[7..]).is_empty())
        .count();
    assert_eq!(
        prey_left, 0,
        "eviction ran meanwhile and took every unmounted blob"
    );
    for (repo, d) in &mounted {
        let r = http(
            "GET",
            &format!("{m}/v2/{repo}/blobs/{d}"),
            &[("Authorization", &auth)],
        );
        assert_eq!(r.status, 200, "{repo}@{d} was evicted");
        assert_eq!(sha256_hex(&r.body), d[7..]);
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Items 10 and 14: failed, abandoned and stalled uploads are capped (`429`) and leak no
/// file: the server's descriptors come back to where they were.
#[test]
fn upload_sessions_are_capped_and_never_leak() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let file = htpasswd(tmp.path(), &[("alice", "pw"), ("bob", "pw")]);
    let mirror = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\nupload_ttl = \"2s\"\nmax_uploads = 30\nmax_uploads_per_user = 20\nbody_timeout = \"3s\"\n\
             [auth]\nhtpasswd = \"{}\"\npush = [\"alice\", \"bob\"]\n",
            file.display()
        ),
    );
    let (m, pid) = (mirror.url(), mirror.pid().unwrap());
    let alice = basic("alice", "pw");
    let bob = basic("bob", "pw");
    let _ = http("GET", &format!("{m}/v2/"), &[("Authorization", &alice)]);
    let before = open_fds(pid);
    let start = format!("{m}/v2/local/app/blobs/uploads/");
    let missing = format!("sha256:{}", "0".repeat(64));
    let mut statuses = std::collections::BTreeMap::new();
    let mut stalled = Vec::new();
    for i in 0..300 {
        let who = if i % 3 == 0 { &bob } else { &alice };
        let auth = [("Authorization", who.as_str())];
        let r = match i % 5 {
            0 => http("POST", &format!("{start}?digest=sha256:nothex"), &auth),
            1 => http(
                "POST",
                &format!("{start}?mount={missing}&from=local/other"),
                &auth,
            ),
            2 => send(
                &format!("{start}?digest={missing}"),
                "POST",
                b"not those bytes",
                &auth,
            ),
            3 if stalled.len() < 8 => {
                // A PATCH whose body stalls after 10 of 1000 bytes.
                let r = http("POST", &start, &auth);
                if r.status == 202 {
                    let loc = r.header("location").unwrap().to_string();
                    let mut s = TcpStream::connect(("127.0.0.1", mirror.port)).unwrap();
                    write!(
                        s,
                        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nAuthorization: {who}\r\nContent-Length: 1000\r\n\r\n0123456789"
                    )
                    .unwrap();
                    stalled.push(s);
                }
                r
            }
            _ => http("POST", &start, &auth),
        };
        *statuses.entry(r.status).or_insert(0) += 1;
    }
    let during = open_fds(pid);
    assert!(
        statuses.get(&429).is_some_and(|n| *n > 0),
        "caps answered 429: {statuses:?}"
    );
    assert!(
        during <= before + 30 + stalled.len() + 8,
        "descriptors bounded by the caps: {before} -> {during} ({statuses:?})"
    );
    // Stalled bodies time out; abandoned sessions expire with upload_ttl: every session
    // file goes, and the descriptors come back (the stalled clients' sockets aside).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ok = false;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        if mirror.tmp_files() == 0 && open_fds(pid) <= before + stalled.len() + 2 {
            ok = true;
            break;
        }
    }
    assert!(
        ok,
        "descriptors back: {before} -> {}, {} session files left",
        open_fds(pid),
        mirror.tmp_files()
    );
    drop(stalled);
    // And the server still takes uploads.
    let blob = b"after the flood";
    let d = format!("sha256:{}", sha256_hex(blob));
    let r = send(
        &format!("{start}?digest={d}"),
        "POST",
        blob,
        &[("Authorization", &alice)],
    );
    assert_eq!(r.status, 201);
    assert_eq!(mirror.tmp_files(), 0, "no temp file left behind");
}

/// Item 12: `verify --repair` beside a live server leaves an idle upload session alone.
#[test]
fn verify_never_touches_live_upload_sessions() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let file = htpasswd(tmp.path(), &[("alice", "pw")]);
    let mirror = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\npush = [\"alice\"]\n",
            file.display()
        ),
    );
    let alice = basic("alice", "pw");
    let auth = [("Authorization", alice.as_str())];
    let r = http(
        "POST",
        &format!("{}/v2/local/a/blobs/uploads/", mirror.url()),
        &auth,
    );
    let loc = format!("{}{}", mirror.url(), r.header("location").unwrap());
    let (a, b) = (noise(30_000, 120), noise(20_000, 121));
    assert_eq!(send(&loc, "PATCH", &a, &auth).status, 202);
    // The session's file looks 15 minutes idle (well within upload_ttl = 1h).
    let uploads = mirror.store.join("uploads");
    for e in std::fs::read_dir(&uploads).unwrap() {
        let f = std::fs::File::options()
            .append(true)
            .open(e.unwrap().path())
            .unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(900))
            .unwrap();
    }
    let (ok, out) = mirror.cli(&["verify"]);
    assert!(ok && out.contains("0 temp leftovers"), "{out}");
    let (ok, out) = mirror.cli(&["verify", "--repair"]);
    assert!(ok, "{out}");
    let whole: Vec<u8> = [a, b.clone()].concat();
    let d = format!("sha256:{}", sha256_hex(&whole));
    let r = send(&format!("{loc}?digest={d}"), "PUT", &b, &auth);
    assert_eq!(r.status, 201, "the session survived verify --repair");
}

/// Item 13: requests pipelined after a HEAD (one that waits on the upstream) are all
/// answered, in order. Fails today: actix-http's HTTP/1 codec keeps one "this is a HEAD"
/// flag per connection, set by the last request decoded, so a pipelined request decoded
/// while a HEAD waits on the upstream changes how the HEAD's answer is framed (no fix
/// possible above the codec; see the closing note of the hardening issue).
#[test]
#[ignore = "actix-http h1 codec: HEAD flag is per connection, not per request"]
fn pipelined_requests_after_a_head_are_answered() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = tempfile::TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("p", &[("p", &noise(5_000, 130))]);
    layout.push("p", &format!("{}/library/p:1", up.host()), None);
    let mirror = anonymous_upstream_mirror(&up, "tag_ttl = \"1s\"\n");
    let tag = "/v2/docker.io/library/p/manifests/1";
    assert_eq!(
        http("GET", &format!("{}{tag}", mirror.url()), &[]).status,
        200
    );
    std::thread::sleep(Duration::from_millis(1100));
    for round in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", mirror.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!(
            "HEAD {tag} HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\nHEAD {tag} HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        let text = String::from_utf8_lossy(&all);
        let statuses: Vec<&str> = text.matches("HTTP/1.1 200").collect();
        assert_eq!(
            statuses.len(),
            4,
            "round {round}: every pipelined request answered:\n{text}"
        );
        assert_eq!(text.matches("docker-content-digest: ").count(), 2, "{text}");
        assert!(text.contains(&digest));
        assert!(
            text.ends_with("ok\n"),
            "the last answer is the healthz body:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(1100));
    }
}

/// Item 8: a registry.k8s.io-style front that answers every request with a 307 to a
/// second registry, which wants its own (anonymous) Bearer token: pulls work, and the
/// upstream's credentials never reach the second registry.
#[test]
fn redirecting_front_to_a_token_registry() {
    if !require(PEERS) {
        return;
    }
    let backend = Registry::start(Auth::Token(None));
    let tmp = tempfile::TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("k", &[("k", &noise(80_000, 140))]);
    // Push straight to the token registry with skopeo (it fetches its own token).
    layout.push("k", &format!("{}/pause:3.10", backend.host()), None);
    let target = backend.url();
    let front = common::fake::FakeServer::start(move |req| {
        let loc = format!("{target}{}", req.path);
        common::fake::Response::new(307, &[("Location", loc.as_str())], vec![])
    });
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"registry.k8s.io\"]\nurl = \"{}\"\nusername = \"front-user\"\npassword = \"front-secret\"\n",
            front.url()
        ),
    );
    let host = format!("127.0.0.1:{}", mirror.port);
    let out = tmp.path().join("out");
    run(std::process::Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{host}/registry.k8s.io/pause:3.10"))
        .arg(format!("oci:{}:x", out.display())));
    let r = http(
        "GET",
        &format!("{}/v2/registry.k8s.io/pause/manifests/3.10", mirror.url()),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    let layer = layout.layers(&digest)[0].clone();
    let r = get(&format!(
        "{}/v2/registry.k8s.io/pause/blobs/{layer}",
        mirror.url()
    ));
    assert_eq!(sha256_hex(&r.body), layer[7..]);
    let r = get(&format!(
        "{}/v2/registry.k8s.io/pause/tags/list",
        mirror.url()
    ));
    assert_eq!(r.json()["tags"], serde_json::json!(["3.10"]));
    // Every request went to the front first, and was redirected.
    let paths: Vec<String> = front.requests().iter().map(|r| r.path.clone()).collect();
    assert!(paths.iter().any(|p| p.contains("/manifests/")));
    assert!(paths.iter().any(|p| p.contains("/blobs/")));
    assert!(paths.iter().any(|p| p.contains("/tags/list")));
    assert!(
        backend.token.as_ref().unwrap().issued() >= 1,
        "the backend's own token"
    );
    assert!(!mirror.log().contains("front-secret"));
}

/// A mirror whose htpasswd (bcrypt cost 10) has alice and bob, reads for users only.
fn login_mirror(tmp: &tempfile::TempDir, anonymous_pull: bool) -> Mirror {
    login_mirror_with(tmp, anonymous_pull, "")
}

/// [`login_mirror`] with `server` lines (e.g. `trusted_proxies`).
fn login_mirror_with(tmp: &tempfile::TempDir, anonymous_pull: bool, server: &str) -> Mirror {
    let file = tmp.path().join("htpasswd");
    let mut users = String::new();
    for u in ["alice", "bob"] {
        users.push_str(&run(
            std::process::Command::new("htpasswd").args(["-Bbn", "-C", "10", u, "right"])
        ));
    }
    std::fs::write(&file, users).unwrap();
    Mirror::start(
        server,
        &format!(
            "[auth]\nhtpasswd = \"{}\"\nanonymous_pull = {anonymous_pull}\n",
            file.display()
        ),
    )
}

/// `curl` from a chosen loopback source address: (status, Retry-After).
fn curl_as(from: &str, url: &str, user: &str, pass: &str) -> (u16, Option<String>) {
    let out = run(std::process::Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "--interface",
        from,
        "-u",
        &format!("{user}:{pass}"),
        url,
    ]));
    let status = out
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let retry = out.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().to_string())
    });
    (status, retry)
}

/// Item 6: repeated wrong passwords from one address for one user get 429 with
/// Retry-After (counted); the same user from another address, or already verified, is
/// not locked out.
#[test]
fn failed_logins_are_throttled_per_address_and_user() {
    if !require(&["htpasswd", "curl"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = login_mirror(&tmp, false);
    let ping = format!("{}/v2/", mirror.url());
    assert_eq!(curl_as("127.0.0.1", &ping, "alice", "right").0, 200);
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(curl_as("127.0.0.1", &ping, "alice", &format!("wrong{i}")));
    }
    assert_eq!(
        statuses[..5].iter().map(|s| s.0).collect::<Vec<_>>(),
        [401; 5]
    );
    for (status, retry) in &statuses[5..] {
        assert_eq!(*status, 429);
        let secs: u64 = retry.as_deref().unwrap_or("0").parse().unwrap();
        assert!((1..=60).contains(&secs));
    }
    // alice's verified password still works from that address (it costs nothing).
    assert_eq!(curl_as("127.0.0.1", &ping, "alice", "right").0, 200);
    // bob, failing from 127.0.0.1, is not locked out from another address.
    for i in 0..6 {
        curl_as("127.0.0.1", &ping, "bob", &format!("wrong{i}"));
    }
    assert_eq!(curl_as("127.0.0.1", &ping, "bob", "right").0, 429);
    assert_eq!(curl_as("127.0.0.2", &ping, "bob", "right").0, 200);
    assert!(mirror.metric("entrepot_auth_throttled_total", &[]) >= 4.0);
}

/// Item 7: an unknown user and a known user with a wrong password look the same, in
/// status and in time (both pay one bcrypt).
#[test]
fn user_names_cannot_be_enumerated() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = login_mirror(&tmp, false);
    let ping = format!("{}/v2/", mirror.url());
    let timed = |user: &str, pass: &str| {
        let start = Instant::now();
        let r = http("GET", &ping, &[("Authorization", &basic(user, pass))]);
        (r.status, start.elapsed())
    };
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..3 {
        let (s, t) = timed("alice", &format!("nope{i}"));
        assert_eq!(s, 401);
        known.push(t);
        let (s, t) = timed(&format!("nobody{i}"), "nope");
        assert_eq!(s, 401, "an unknown user gets what a wrong password gets");
        unknown.push(t);
    }
    known.sort();
    unknown.sort();
    // Same order of magnitude (without the dummy hash: 0.3 ms against 3+ ms).
    assert!(
        unknown[1] * 3 >= known[1],
        "unknown {:?} vs known {:?}",
        unknown,
        known
    );
}

/// Item 11: a PATCH whose Content-Range does not match its body is 416; a name too long
/// once `library/` is added is 400; a HEAD of an unknown digest asks the upstream once
/// per few seconds.
#[test]
fn small_items_content_range_long_names_negative_heads() {
    if !require(&["docker-registry", "htpasswd"]) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = alice_mirror(&tmp, &up, "");
    let m = mirror.url();
    let alice = basic("alice", "pw");
    let auth = [("Authorization", alice.as_str())];
    let r = http("POST", &format!("{m}/v2/local/a/blobs/uploads/"), &auth);
    let loc = format!("{m}{}", r.header("location").unwrap());
    let r = send(
        &loc,
        "PATCH",
        &[7u8; 100],
        &[
            ("Authorization", alice.as_str()),
            ("Content-Range", "0-199"),
        ],
    );
    assert_eq!(
        (r.status, r.oci_code().as_str()),
        (416, "BLOB_UPLOAD_INVALID")
    );

    let long = "a".repeat(252);
    let r = get(&format!("{m}/v2/docker.io/{long}/manifests/latest"));
    assert_eq!((r.status, r.oci_code().as_str()), (400, "NAME_INVALID"));
    assert_eq!(
        up.count("GET", "/manifests/latest") + up.count("HEAD", "/manifests/latest"),
        0
    );

    let random = format!("sha256:{}", "9".repeat(64));
    for _ in 0..5 {
        let r = http(
            "HEAD",
            &format!("{m}/v2/docker.io/library/x/blobs/{random}"),
            &[],
        );
        assert_eq!(r.status, 404);
    }
    assert_eq!(
        up.count("HEAD", &format!("/blobs/{random}")),
        1,
        "negative answer cached"
    );
}

/// Statuses of `n` logins sent at once, the i-th as `creds(i)` with `headers`.
fn burst(
    url: &str,
    n: usize,
    creds: impl Fn(usize) -> (String, String),
    headers: &[(&str, &str)],
) -> BTreeMap<u16, usize> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (u, p) = creds(i);
            let auth = basic(&u, &p);
            let url = url.to_string();
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let b = barrier.clone();
            std::thread::spawn(move || {
                let mut h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                h.push(("Authorization", &auth));
                b.wait();
                http("GET", &url, &h).status
            })
        })
        .collect();
    let mut out = BTreeMap::new();
    for h in handles {
        *out.entry(h.join().unwrap()).or_insert(0) += 1;
    }
    out
}

/// Issue 24 item 3: 40 wrong passwords for one user from one address, sent at once, get
/// no more bcrypt checks than the limit (5 answered 401, the rest 429); the attempt is
/// counted before its check.
#[test]
fn a_burst_of_wrong_passwords_gets_at_most_the_limit_checked() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = login_mirror(&tmp, false);
    let ping = format!("{}/v2/", mirror.url());
    let got = burst(&ping, 40, |i| ("alice".into(), format!("wrong{i}")), &[]);
    assert_eq!(got.get(&401).copied().unwrap_or(0), 5, "{got:?}");
    assert_eq!(got.get(&429).copied().unwrap_or(0), 35, "{got:?}");
    // 30 distinct unknown names at once (anonymous_pull: they may be a caller's own
    // upstream credentials, each costs a bcrypt): at most 10 checked.
    let tmp2 = tempfile::TempDir::new().unwrap();
    let open = login_mirror(&tmp2, true);
    let ping2 = format!("{}/v2/", open.url());
    let got = burst(&ping2, 30, |i| (format!("stranger{i}"), "pw".into()), &[]);
    let checked: usize = got.iter().filter(|(s, _)| **s != 429).map(|(_, n)| n).sum();
    assert!(checked <= 10, "at most 10 checked: {got:?}");
    // A real user from another address is not held up by them.
    let start = Instant::now();
    assert_eq!(curl_as("127.0.0.2", &ping2, "bob", "right").0, 200);
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// Issue 24 item 3: failed logins with huge user names are refused before anything is
/// hashed or kept: memory stays flat.
#[test]
fn failed_logins_with_long_names_keep_no_memory() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = login_mirror(&tmp, false);
    let ping = format!("{}/v2/", mirror.url());
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", mirror.pid().unwrap()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Warm up the connection handling first.
    for i in 0..20 {
        http(
            "GET",
            &ping,
            &[("Authorization", &basic(&format!("u{i}"), "x"))],
        );
    }
    let before = rss();
    for i in 0..400 {
        let name = format!("{i}{}", "n".repeat(70_000));
        let r = http("GET", &ping, &[("Authorization", &basic(&name, "x"))]);
        assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    }
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 4096,
        "RSS grew by {grown} kB over 400 long-named failures"
    );
}

/// Issue 24 items 3 and 6: behind a trusted reverse proxy, `X-Forwarded-For` is the
/// client's address for throttling (one client's failures do not lock out another's
/// correct password); from an untrusted peer it is ignored. The realm of a challenge is a
/// valid quoted string built from a checked host, and 401 answers are never cached.
#[test]
fn forwarded_headers_count_only_from_trusted_proxies() {
    if !require(&["htpasswd", "curl"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = login_mirror_with(&tmp, false, "trusted_proxies = [\"127.0.0.1/32\"]\n");
    let ping = format!("{}/v2/", mirror.url());
    let as_client = |client: &str, pass: &str| {
        http(
            "GET",
            &ping,
            &[
                ("Authorization", &basic("bob", pass)),
                ("X-Forwarded-For", client),
            ],
        )
        .status
    };
    for i in 0..6 {
        as_client("10.9.9.1", &format!("wrong{i}"));
    }
    assert_eq!(
        as_client("10.9.9.1", "right"),
        429,
        "the failing client is held"
    );
    assert_eq!(
        as_client("10.9.9.2", "right"),
        200,
        "another client behind the proxy is not"
    );
    // From 127.0.0.2 (not a trusted proxy) the header is the client's own word: ignored.
    let via = |xff: &str, pass: &str| {
        let out = run(std::process::Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--interface",
            "127.0.0.2",
            "-H",
            &format!("X-Forwarded-For: {xff}"),
            "-u",
            &format!("alice:{pass}"),
            &ping,
        ]));
        out.trim().parse::<u16>().unwrap_or(0)
    };
    for i in 0..6 {
        via(&format!("10.0.0.{i}"), &format!("wrong{i}"));
    }
    assert_eq!(
        via("10.0.0.99", "right"),
        429,
        "a new X-Forwarded-For does not escape"
    );
    assert!(
        mirror.log().contains("client=10.9.9.1"),
        "the access log names the client"
    );
    assert!(
        mirror.log().contains("client=10.9.9.2 user=bob"),
        "and the user once authenticated"
    );

    // A forwarded host with a quote (even from the trusted proxy) cannot break the
    // realm out of its quotes.
    let r = http(
        "GET",
        &ping,
        &[
            ("X-Forwarded-Host", "a.test/x\"/token"),
            ("Forwarded", "host=\"b.test\"\""),
        ],
    );
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap_or("").to_string();
    let realm = challenge
        .strip_prefix("Bearer realm=\"")
        .and_then(|rest| rest.split_once('"'))
        .map(|(realm, _)| realm.to_string())
        .unwrap_or_default();
    assert!(
        realm.ends_with("/token") && !realm.contains("a.test"),
        "{challenge}"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
}

/// A hosted mirror with alice and bob as push users and `hosted` lines.
fn push_mirror(tmp: &tempfile::TempDir, hosted: &str) -> Mirror {
    let file = htpasswd(tmp.path(), &[("alice", "pw"), ("bob", "pw")]);
    Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n{hosted}\n\
             [auth]\nhtpasswd = \"{}\"\npush = [\"alice\", \"bob\"]\n",
            file.display()
        ),
    )
}

/// Opens an upload session as `auth`: its Location.
fn open_session(m: &Mirror, auth: &str) -> Result<String, u16> {
    let r = http(
        "POST",
        &format!("{}/v2/local/app/blobs/uploads/", m.url()),
        &[("Authorization", auth)],
    );
    match r.status {
        202 => Ok(r.header("location").unwrap_or("").to_string()),
        s => Err(s),
    }
}

/// Pushes `bytes` as one blob (monolithic POST) as `auth`: the status.
fn push_blob_as(m: &Mirror, auth: &str, bytes: &[u8]) -> u16 {
    let d = format!("sha256:{}", sha256_hex(bytes));
    send(
        &format!("{}/v2/local/app/blobs/uploads/?digest={d}", m.url()),
        "POST",
        bytes,
        &[("Authorization", auth)],
    )
    .status
}

/// Issue 24 item 4: a user's abandoned sessions (a CI job that crashed mid-push) stop
/// counting once idle for `body_timeout`: the oldest gives way to a new one. Refusals are
/// counted. With the default caps, 32 abandoned sessions do not stop a push at all.
#[test]
fn abandoned_upload_sessions_give_way_to_new_ones() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = push_mirror(&tmp, "max_uploads_per_user = 4\nbody_timeout = \"1s\"");
    let alice = basic("alice", "pw");
    let abandoned: Vec<String> = (0..4)
        .map(|_| open_session(&mirror, &alice).expect("open"))
        .collect();
    // In use (touched within body_timeout): the cap holds.
    assert_eq!(open_session(&mirror, &alice), Err(429));
    assert_eq!(
        mirror.metric("entrepot_upload_refusals_total", &[("cap", "per_user")]),
        1.0
    );
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(push_blob_as(&mirror, &alice, b"alice pushes again"), 201);
    assert_eq!(
        mirror.metric("entrepot_upload_sessions_reclaimed_total", &[]),
        1.0
    );
    // The oldest abandoned session was the one reclaimed.
    let r = http(
        "GET",
        &format!("{}{}", mirror.url(), abandoned[0]),
        &[("Authorization", &alice)],
    );
    assert_eq!(
        (r.status, r.oci_code().as_str()),
        (404, "BLOB_UPLOAD_UNKNOWN")
    );
    let r = http(
        "GET",
        &format!("{}{}", mirror.url(), abandoned[3]),
        &[("Authorization", &alice)],
    );
    assert_eq!(r.status, 204);

    // Default caps: 32 abandoned sessions, and the same user pushes at once.
    let tmp2 = tempfile::TempDir::new().unwrap();
    let fresh = push_mirror(&tmp2, "");
    for _ in 0..32 {
        open_session(&fresh, &alice).expect("open");
    }
    assert_eq!(push_blob_as(&fresh, &alice, b"a CI job pushes"), 201);
}

/// Issue 24 item 6: an upload session is usable only by the user who opened it; to
/// anyone else it does not exist (404 BLOB_UPLOAD_UNKNOWN): status, chunk, finish, cancel.
#[test]
fn another_users_upload_session_does_not_exist() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let mirror = push_mirror(&tmp, "");
    let (alice, bob) = (basic("alice", "pw"), basic("bob", "pw"));
    let loc = open_session(&mirror, &alice).expect("open");
    let url = format!("{}{loc}", mirror.url());
    let mine = b"alice's bytes";
    let r = send(
        &url,
        "PATCH",
        mine,
        &[("Authorization", &alice), ("Content-Range", "0-12")],
    );
    assert_eq!(r.status, 202);
    let theirs = b"bob's bytes";
    let bob_digest = format!("sha256:{}", sha256_hex(theirs));
    let sep = if url.contains('?') { '&' } else { '?' };
    for (method, target, body) in [
        ("GET", url.clone(), &b""[..]),
        ("PATCH", url.clone(), &theirs[..]),
        ("PUT", format!("{url}{sep}digest={bob_digest}"), &theirs[..]),
        ("DELETE", url.clone(), &b""[..]),
    ] {
        let r = send(&target, method, body, &[("Authorization", &bob)]);
        assert_eq!(
            (r.status, r.oci_code().as_str()),
            (404, "BLOB_UPLOAD_UNKNOWN"),
            "{method} by bob"
        );
    }
    // alice's session is untouched and finishes with her bytes.
    let digest = format!("sha256:{}", sha256_hex(mine));
    let r = send(
        &format!("{url}{sep}digest={digest}"),
        "PUT",
        b"",
        &[("Authorization", &alice)],
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = http(
        "GET",
        &format!("{}/v2/local/app/blobs/{digest}", mirror.url()),
        &[("Authorization", &alice)],
    );
    assert_eq!(r.body, mine);
}

/// Issue 24 item 6: corrupt bytes sent under one repository are remembered for that
/// repository only: the same layer through another repository is fetched and served.
#[test]
fn corrupt_bytes_under_one_repository_do_not_fail_another() {
    let good = noise(200_000, 241);
    let digest = format!("sha256:{}", sha256_hex(&good));
    let mut bad = good.clone();
    bad[100_000] ^= 0xff;
    let (g, b) = (good.clone(), bad);
    let up = common::fake::FakeServer::start(move |req| {
        let body = if req.path.starts_with("/v2/corrupt/x/blobs/") {
            b.clone()
        } else if req.path.starts_with("/v2/library/demo/blobs/") {
            g.clone()
        } else {
            return common::fake::Response::new(404, &[], vec![]);
        };
        common::fake::Response::new(200, &[], body)
    });
    let mirror = Mirror::start(
        "",
        &format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n", up.url()),
    );
    let url = |repo: &str| format!("{}/v2/docker.io/{repo}/blobs/{digest}", mirror.url());
    let r = get(&url("corrupt/x"));
    assert!(
        r.body.len() < good.len(),
        "the corrupt body is never delivered whole"
    );
    let r = get(&url("corrupt/x"));
    assert_eq!(r.status, 502, "remembered for that repository");
    let r = get(&url("library/demo"));
    assert_eq!(r.status, 200);
    assert_eq!(sha256_hex(&r.body), sha256_hex(&good));
}
