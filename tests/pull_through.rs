//! The pull-through core against real peers: Distribution upstreams (anonymous, Basic,
//! token), containerd and skopeo as clients, images built with umoci.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

fn upstream_toml(key: &str, url: &str, extra: &str) -> String {
    format!("[upstreams.\"{key}\"]\nurl = \"{url}\"\n{extra}\n")
}

/// A one-layer image in a fresh layout, pushed to `dest`; returns (layout, manifest digest).
fn pushed_image(tmp: &TempDir, dest: &str, files: &[(&str, &[u8])]) -> (Layout, String) {
    let layout = Layout::new(tmp.path());
    let digest = layout.build("t", files);
    layout.push("t", dest, None);
    (layout, digest)
}

#[test]
fn containerd_pulls_a_multiarch_index_through_ns_and_prefix_styles() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let (index, amd) = layout.multiarch(300_000, 1);
    layout.push("multi", &format!("{}/library/multi:1", up.host()), None);

    let mirror = Mirror::start(
        "default_upstream = \"docker.io\"",
        &upstream_toml("docker.io", &up.url(), ""),
    );
    let ctr = Containerd::start();
    let ns_hosts = ctr.hosts_dir("ns", "docker.io", &mirror.url(), Style::Ns);
    let prefix_hosts = ctr.hosts_dir("prefix", "docker.io", &mirror.url(), Style::Prefix);

    let a = ctr
        .pull("pull-ns", &ns_hosts, "docker.io/library/multi:1")
        .expect("ns-style pull");
    let b = ctr
        .pull("pull-prefix", &prefix_hosts, "docker.io/library/multi:1")
        .expect("prefix-style pull");
    assert_eq!(a, index, "ns style resolves to the pushed index");
    assert_eq!(b, index, "prefix style resolves to the same index");

    // Both pulls downloaded every amd64 blob; the upstream served each exactly once.
    let layer = &layout.layers(&amd)[0];
    assert_eq!(
        up.count("GET", &format!("/blobs/{layer}")),
        1,
        "layer fetched upstream once"
    );
    assert_eq!(
        up.count("GET", &format!("/manifests/{amd}")),
        1,
        "platform manifest fetched once"
    );
    mirror.settle();
    assert_eq!(
        mirror
            .store_files(layer.trim_start_matches("sha256:"))
            .len(),
        1
    );
    let log = mirror.log();
    assert!(log.contains("ns=docker.io"), "containerd sent ?ns=");
    assert!(
        log.contains("/v2/docker.io/library/multi/manifests/1"),
        "prefix style path"
    );
    assert!(
        mirror.metric(
            "entrepot_cache_requests_total",
            &[("kind", "blob"), ("result", "hit")]
        ) >= 2.0
    );
}

#[test]
fn shared_layer_is_stored_once_and_skopeo_pulls_through_a_basic_auth_upstream() {
    if !require(PEERS) {
        return;
    }
    let anon = Registry::start(Auth::Anonymous);
    let basic = Registry::start(Auth::Basic("mirror", "s3cret"));
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("t", &[("shared.bin", &noise(500_000, 3))]);
    layout.push("t", &format!("{}/library/app:1", anon.host()), None);
    layout.push(
        "t",
        &format!("{}/team/app:1", basic.host()),
        Some("mirror:s3cret"),
    );
    let layer = layout.layers(&digest)[0].clone();

    let pw = tmp.path().join("quay-password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let upstreams = upstream_toml("docker.io", &anon.url(), "")
        + &upstream_toml(
            "quay.io",
            &basic.url(),
            &format!(
                "username = \"mirror\"\npassword_file = \"{}\"",
                pw.display()
            ),
        );
    let mirror = Mirror::start("", &upstreams);

    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", "docker.io", &mirror.url(), Style::Ns);
    assert_eq!(
        ctr.pull("one", &hosts, "docker.io/library/app:1")
            .expect("pull"),
        digest
    );

    let out = tmp.path().join("out");
    run(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!(
            "docker://127.0.0.1:{}/quay.io/team/app:1",
            mirror.port
        ))
        .arg(format!("dir:{}", out.display())));
    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&manifest)), digest);
    let layer_hex = layer.trim_start_matches("sha256:");
    assert_eq!(
        sha256_hex(&std::fs::read(out.join(layer_hex)).unwrap()),
        layer_hex
    );

    mirror.settle();
    assert_eq!(
        mirror.store_files(layer_hex).len(),
        1,
        "one file for the layer both upstreams serve"
    );
    assert_eq!(
        basic.count("GET", &format!("/blobs/{layer}")),
        0,
        "second upstream never sent the layer"
    );
    assert!(
        basic.count("HEAD", &format!("/blobs/{layer}")) >= 1,
        "but confirmed it holds it"
    );
    assert!(!mirror.log().contains("s3cret"), "credentials never logged");
}

#[test]
fn token_auth_upstream_with_cached_tokens() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Token(Some(("robot", "t0ken-pass"))));
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let d1 = layout.build("a", &[("x", b"one".as_slice())]);
    let d2 = layout.build("b", &[("y", b"two".as_slice())]);
    layout.push(
        "a",
        &format!("{}/org/tool:1", up.host()),
        Some("robot:t0ken-pass"),
    );
    layout.push(
        "b",
        &format!("{}/org/tool:2", up.host()),
        Some("robot:t0ken-pass"),
    );

    let mirror = Mirror::start(
        "",
        &upstream_toml(
            "ghcr.io",
            &up.url(),
            "username = \"robot\"\npassword = \"t0ken-pass\"",
        ),
    );
    let issuer = up.token.as_ref().unwrap();
    let before = issuer.issued();
    let layer = &layout.layers(&d2)[0];
    let pushed_gets = up.count("GET", &format!("/blobs/{layer}"));
    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", "ghcr.io", &mirror.url(), Style::Ns);
    assert_eq!(
        ctr.pull("p1", &hosts, "ghcr.io/org/tool:1")
            .expect("pull 1"),
        d1
    );
    assert_eq!(
        ctr.pull("p2", &hosts, "ghcr.io/org/tool:2")
            .expect("pull 2"),
        d2
    );
    assert_eq!(
        issuer.issued() - before,
        1,
        "one token for the repository scope, reused"
    );
    assert_eq!(
        up.count("GET", &format!("/blobs/{layer}")) - pushed_gets,
        1,
        "one fill through the token flow"
    );
}

#[test]
fn concurrent_cold_requests_make_one_upstream_fetch() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let blob = noise(64 << 20, 7);
    let digest = up.push_blob("big/blob", &blob);
    drop(blob);
    let mirror = Mirror::start("", &upstream_toml("docker.io", &up.url(), ""));
    let url = Arc::new(format!(
        "{}/v2/docker.io/big/blob/blobs/{digest}",
        mirror.url()
    ));
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let r = get(&url);
                (r.status, r.body.len(), sha256_hex(&r.body))
            })
        })
        .collect();
    let hex = digest.trim_start_matches("sha256:").to_string();
    for t in threads {
        let (status, len, got) = t.join().unwrap();
        assert_eq!((status, len), (200, 64 << 20));
        assert_eq!(got, hex, "every body verifies");
    }
    assert_eq!(
        up.count("GET", &format!("/blobs/{digest}")),
        1,
        "exactly one upstream GET"
    );
    let coalesced = mirror.metric("entrepot_coalesced_requests_total", &[("kind", "blob")]);
    let hits = mirror.metric(
        "entrepot_cache_requests_total",
        &[("kind", "blob"), ("result", "hit")],
    );
    // A request that looked just before the commit and joined just after the flight ended
    // leads a no-op fill (it finds the blob stored): not counted as either, so allow one.
    assert!(
        (30.0..=31.0).contains(&(coalesced + hits)),
        "the other 31 joined the fill or read the result: {coalesced} + {hits}"
    );
    assert_eq!(
        mirror.metric(
            "entrepot_upstream_requests_total",
            &[("kind", "blob"), ("method", "GET")]
        ),
        1.0,
        "the mirror sent one blob GET"
    );
    mirror.settle();
    assert_eq!(mirror.store_files(&hex).len(), 1);
    assert_eq!(mirror.tmp_files(), 0);

    // A range on another cold blob is answered from the fill.
    let small = noise(100_000, 8);
    let d2 = up.push_blob("big/blob", &small);
    let r = http(
        "GET",
        &format!("{}/v2/docker.io/big/blob/blobs/{d2}", mirror.url()),
        &[("Range", "bytes=1000-1999")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &small[1000..2000]);
    assert_eq!(r.header("content-range"), Some("bytes 1000-1999/100000"));
}

#[test]
fn tampered_upstream_blob_is_rejected_and_not_cached() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let (layout, digest) = pushed_image(
        &tmp,
        &format!("{}/library/evil:1", up.host()),
        &[("f", &noise(400_000, 4))],
    );
    let layer = layout.layers(&digest)[0].clone();
    let hex = layer.trim_start_matches("sha256:").to_string();
    let data = up.blob_data(&hex);
    let mut bytes = std::fs::read(&data).unwrap();
    let size = bytes.len();
    bytes[size / 2] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let mirror = Mirror::start("", &upstream_toml("docker.io", &up.url(), ""));
    let url = format!("{}/v2/docker.io/library/evil/blobs/{layer}", mirror.url());
    for attempt in 1..=2 {
        let r = get(&url);
        assert!(
            r.body.len() < size,
            "attempt {attempt}: the corrupt body is never delivered whole"
        );
        assert_ne!(sha256_hex(&r.body), hex);
        // The mismatch is remembered for a minute: the second request is a 502 at once,
        // without downloading the corrupt blob again.
        assert_eq!(up.count("GET", &format!("/blobs/{layer}")), 1);
    }
    let r = get(&url);
    assert_eq!((r.status, r.oci_code().as_str()), (502, "UNAVAILABLE"));
    assert!(
        mirror.store_files(&hex).is_empty(),
        "corrupt blob not stored"
    );
    assert_eq!(mirror.tmp_files(), 0, "temp file removed");
    assert_eq!(
        mirror.metric(
            "entrepot_digest_mismatches_total",
            &[("upstream", "docker.io")]
        ),
        3.0
    );
    assert!(mirror.log().contains("upstream sent a corrupt blob"));
}

#[test]
fn upstream_down_serves_cached_tags_and_restart_keeps_the_cache() {
    if !require(PEERS) {
        return;
    }
    let mut up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let cached = layout.build("c", &[("c", &noise(200_000, 5))]);
    layout.build("u", &[("u", &noise(1000, 6))]);
    layout.push("c", &format!("{}/library/cached:1", up.host()), None);
    layout.push("u", &format!("{}/library/uncached:1", up.host()), None);

    let mut mirror = Mirror::start(
        "default_upstream = \"docker.io\"",
        &upstream_toml("docker.io", &up.url(), "tag_ttl = \"1s\""),
    );
    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", "docker.io", &mirror.url(), Style::Ns);
    assert_eq!(
        ctr.pull("warm", &hosts, "docker.io/library/cached:1")
            .unwrap(),
        cached
    );

    // Past tag_ttl with the upstream up: one HEAD revalidates, nothing is downloaded.
    std::thread::sleep(Duration::from_millis(1100));
    let (heads, gets) = (
        up.count("HEAD", "/manifests/1"),
        up.count("GET", "/manifests/"),
    );
    let r = get(&format!("{}/v2/library/cached/manifests/1", mirror.url()));
    assert_eq!(
        format!("sha256:{}", sha256_hex(&r.body)),
        cached,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        up.count("HEAD", "/manifests/1"),
        heads + 1,
        "revalidated with a HEAD"
    );
    assert_eq!(
        up.count("GET", "/manifests/"),
        gets,
        "and not downloaded again"
    );

    up.stop();
    mirror.restart();
    std::thread::sleep(Duration::from_millis(1100)); // past tag_ttl: revalidation fails
    assert_eq!(
        ctr.pull("cold", &hosts, "docker.io/library/cached:1")
            .expect("cached tag pulls with upstream down"),
        cached
    );
    assert!(mirror.metric("entrepot_stale_serves_total", &[("upstream", "docker.io")]) >= 1.0);

    let tags = get(&format!("{}/v2/library/cached/tags/list", mirror.url())).json();
    assert_eq!(
        tags["tags"],
        serde_json::json!(["1"]),
        "cached tags listed while down"
    );
    let r = get(&format!("{}/v2/library/uncached/manifests/1", mirror.url()));
    assert_eq!((r.status, r.oci_code().as_str()), (503, "UNAVAILABLE"));
    assert!(ctr
        .pull("missing", &hosts, "docker.io/library/uncached:1")
        .is_err());
}

#[test]
fn heads_download_nothing_and_tags_within_ttl_stay_local() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let (layout, digest) = pushed_image(
        &tmp,
        &format!("{}/library/h:1", up.host()),
        &[("f", &noise(50_000, 9))],
    );
    let layer = layout.layers(&digest)[0].clone();
    let mirror = Mirror::start(
        "",
        &upstream_toml("docker.io", &up.url(), "tag_ttl = \"1h\""),
    );
    let base = format!("{}/v2/docker.io/library/h", mirror.url());

    let blob_path = format!("/blobs/{layer}");
    let pushed_heads = up.count("HEAD", &blob_path);
    let r = http("HEAD", &format!("{base}/blobs/{layer}"), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length").map(String::from),
        Some(layout.blob(&layer).len().to_string())
    );
    assert_eq!(
        (
            up.count("HEAD", &blob_path) - pushed_heads,
            up.count("GET", &blob_path)
        ),
        (1, 0),
        "one upstream HEAD and no GET"
    );
    assert!(mirror
        .store_files(layer.trim_start_matches("sha256:"))
        .is_empty());

    let oci = "application/vnd.oci.image.manifest.v1+json";
    let pushed_manifest_heads = up.count("HEAD", "/manifests/1");
    let r = http("HEAD", &format!("{base}/manifests/1"), &[("Accept", oci)]);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        up.count("GET", "/manifests/"),
        0,
        "HEAD manifest downloads nothing"
    );

    for _ in 0..3 {
        let r = http("GET", &format!("{base}/manifests/1"), &[("Accept", oci)]);
        assert_eq!(r.status, 200);
        assert_eq!(format!("sha256:{}", sha256_hex(&r.body)), digest);
        assert_eq!(r.header("content-type"), Some(oci));
    }
    assert_eq!(
        up.count("GET", "/manifests/1"),
        1,
        "one upstream GET, then served within TTL"
    );
    assert_eq!(
        up.count("HEAD", "/manifests/1") - pushed_manifest_heads,
        1,
        "only the first HEAD went upstream"
    );
    let r = get(&format!("{base}/manifests/{digest}"));
    assert_eq!(r.status, 200);
    assert_eq!(
        up.count("GET", &format!("/manifests/{digest}")),
        0,
        "by digest never goes upstream once cached"
    );

    let tags = get(&format!("{base}/tags/list")).json();
    assert_eq!(
        tags,
        serde_json::json!({"name": "docker.io/library/h", "tags": ["1"]})
    );

    // A Docker schema 2 manifest keeps its media type through the mirror.
    layout.push_as("t", &format!("{}/library/h:v2s2", up.host()), "v2s2");
    let docker = "application/vnd.docker.distribution.manifest.v2+json";
    let r = http(
        "GET",
        &format!("{base}/manifests/v2s2"),
        &[("Accept", docker)],
    );
    assert_eq!((r.status, r.header("content-type")), (200, Some(docker)));
    assert_eq!(r.json()["mediaType"], docker);
    assert_eq!(
        r.header("docker-content-digest").map(String::from),
        Some(format!("sha256:{}", sha256_hex(&r.body)))
    );
}

/// With a slow upstream, clients get headers and bytes while the fill is still running,
/// and a client that hangs up does not abort the fill the cache depends on.
#[test]
fn fills_stream_while_downloading_and_survive_client_disconnects() {
    if !require(PEERS) {
        return;
    }
    use std::io::Read;
    let up = Registry::start(Auth::Anonymous);
    let blob = noise(8 << 20, 11);
    let digest = up.push_blob("slow/blob", &blob);
    let slow = throttle::Throttle::start(up.port, 4 << 20); // ~2 s for the blob
    let mirror = Mirror::start(
        "",
        &upstream_toml("docker.io", &format!("http://127.0.0.1:{}", slow.port), ""),
    );
    let url = format!("{}/v2/docker.io/slow/blob/blobs/{digest}", mirror.url());

    // First client: reads 64 KiB, checks the fill is still running, then hangs up.
    let resp = agent()
        .get(&url)
        .call()
        .expect("headers arrive before the body");
    assert_eq!(resp.header("content-length"), Some("8388608"));
    let mut first = vec![0u8; 64 * 1024];
    resp.into_reader()
        .read_exact(&mut first)
        .expect("first bytes");
    assert_eq!(first, &blob[..64 * 1024]);
    assert_eq!(
        mirror.metric("entrepot_fills_in_flight", &[]),
        1.0,
        "bytes reached the client while the download was still in progress"
    );
    // Second client joins mid-fill and gets the whole verified blob.
    let second = get(&url);
    assert_eq!(
        sha256_hex(&second.body),
        digest.trim_start_matches("sha256:")
    );

    let hex = digest.trim_start_matches("sha256:").to_string();
    wait_until("fill committed", Duration::from_secs(60), || {
        mirror.store_files(&hex).len() == 1
    });
    assert_eq!(up.count("GET", &format!("/blobs/{digest}")), 1);
    assert_eq!(
        mirror.metric("entrepot_coalesced_requests_total", &[("kind", "blob")]),
        1.0
    );
}

/// A manifest pushed to `up` as `repo:tag` (config blob and manifest, no layers); its
/// digest.
fn pushed_manifest(up: &Registry, repo: &str, tag: &str, config: &[u8]) -> (String, String) {
    let c = up.push_blob(repo, config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    let url = format!("{}/v2/{repo}/manifests/{tag}", up.url());
    let oci = ("Content-Type", "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(send(&url, "PUT", manifest.as_bytes(), &[oci]).status, 201);
    (format!("sha256:{}", sha256_hex(manifest.as_bytes())), c)
}

/// A worker answers a repeated anonymous manifest GET from a copy of its last answer
/// (routes/prepared.rs): every answer must still be the one the usual path would give.
#[test]
fn repeated_manifest_gets_answer_as_the_usual_path_would() {
    if !require(&["docker-registry", "htpasswd"]) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let (first, config) = pushed_manifest(&up, "t/app", "1", br#"{"n":1}"#);
    let tmp = TempDir::new().unwrap();
    let users = htpasswd(tmp.path(), &[("alice", "pw")]);
    let mirror = Mirror::start(
        "",
        &format!(
            "[auth]\nhtpasswd = \"{}\"\n{}",
            users.display(),
            upstream_toml("docker.io", &up.url(), "tag_ttl = \"1s\"")
        ),
    );
    let url = format!("{}/v2/docker.io/t/app/manifests/1", mirror.url());
    let oci = ("Accept", "application/vnd.oci.image.manifest.v1+json");
    let served = |headers: &[(&str, &str)]| {
        let r = send(&url, "GET", b"", headers);
        let digest = format!("sha256:{}", sha256_hex(&r.body));
        (
            r.status,
            digest,
            r.header("docker-content-digest").map(String::from),
        )
    };
    let hits = |kind: &str| {
        mirror.metric(
            "entrepot_cache_requests_total",
            &[("kind", kind), ("result", "hit")],
        )
    };
    // The same answer every time, each one counted and logged.
    for _ in 0..6 {
        assert_eq!(served(&[oci]), (200, first.clone(), Some(first.clone())));
    }
    assert_eq!(hits("manifest"), 5.0, "one miss, then hits");
    mirror.settle();
    let lines = mirror
        .log()
        .matches("path=/v2/docker.io/t/app/manifests/1 status=200")
        .count();
    assert_eq!(lines, 6, "one access line per request");
    // By digest (a tag's answer is kept only within its TTL, here a second, conservative
    // to the second): a served answer is kept by the worker that gives it, the next
    // identical requests get copies (at least two, with two workers taking turns).
    let copies = |kind: &str| mirror.metric("entrepot_prepared_answers_total", &[("kind", kind)]);
    let by_digest = format!("{}/v2/docker.io/t/app/manifests/{first}", mirror.url());
    for _ in 0..6 {
        let r = send(&by_digest, "GET", b"", &[oci]);
        assert_eq!(
            (r.status, format!("sha256:{}", sha256_hex(&r.body))),
            (200, first.clone())
        );
    }
    assert!(copies("manifest") >= 2.0, "{}", copies("manifest"));
    // Blob HEADs: their size and digest every time, each counted and logged once, until
    // one is answered from a copy (the first ones may race the GET's fill commit and the
    // first recorded use, each a change that a served answer must not outlive).
    let blob = format!("{}/v2/docker.io/t/app/blobs/{config}", mirror.url());
    assert_eq!(get(&blob).body, br#"{"n":1}"#);
    let mut heads = 0.0;
    wait_until(
        "a blob HEAD answered from a copy",
        Duration::from_secs(10),
        || {
            let r = http("HEAD", &blob, &[]);
            assert_eq!(r.status, 200);
            assert_eq!(r.header("content-length"), Some("7"));
            assert_eq!(r.header("docker-content-digest"), Some(config.as_str()));
            heads += 1.0;
            copies("blob") >= 1.0
        },
    );
    let all = mirror.metric("entrepot_cache_requests_total", &[("kind", "blob")]);
    assert_eq!(
        all,
        1.0 + heads,
        "the GET and every HEAD, each counted once"
    );
    mirror.settle();
    let blob_lines = mirror
        .log()
        .matches(&format!(
            "method=HEAD path=/v2/docker.io/t/app/blobs/{config} status=200"
        ))
        .count();
    assert_eq!(blob_lines as f64, heads);
    // Another Accept is negotiated again: an index-only client is not given the image.
    let index = ("Accept", "application/vnd.oci.image.index.v1+json");
    assert_eq!(served(&[index]).0, 404);
    // Credentials are checked again: a wrong password is refused, alice is served.
    let wrong = basic("alice", "nope");
    assert_eq!(served(&[oci, ("Authorization", &wrong)]).0, 401);
    let right = basic("alice", "pw");
    assert_eq!(served(&[oci, ("Authorization", &right)]).1, first);
    // A tag moved upstream is seen once its TTL ends, however often it was asked.
    let (moved, _) = pushed_manifest(&up, "t/app", "1", br#"{"n":2}"#);
    let mut seen = first.clone();
    wait_until("the moved tag is served", Duration::from_secs(10), || {
        seen = served(&[oci]).1;
        seen == moved
    });
    assert_eq!(served(&[oci]), (200, moved.clone(), Some(moved)));
}
