//! Every real client pulls: podman (containers/image, as CRI-O), skopeo, Docker Engine
//! (`registry-mirrors`, login, push) and curl, each sending `Accept` its own way, through
//! the mirror only, with and without `[auth]` (the mirror's Bearer token flow).

mod common;

use std::process::Command;

use common::*;
use tempfile::TempDir;

/// What `.ci/run` installs for these tests besides the common peers.
const CLIENTS: &[&str] = &["podman", "dockerd"];

fn require_clients() -> bool {
    require(PEERS) && require(CLIENTS)
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// containers/image (podman, skopeo, CRI-O): one line per type, OCI manifest first.
const CONTAINERS_IMAGE_ACCEPT: &[&str] = &[
    OCI_MANIFEST,
    DOCKER_V2,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    DOCKER_LIST,
    OCI_INDEX,
];

/// Docker 20.10: six lines (shuffled on every request), schema1 and JSON included.
const DOCKER_ACCEPT: &[&str] = &[
    "application/json",
    DOCKER_LIST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    OCI_INDEX,
    DOCKER_V2,
    OCI_MANIFEST,
];

/// Images on an anonymous upstream: a multi-arch OCI index, an OCI image and a Docker v2
/// schema 2 image, each under `library/`.
struct Images {
    up: Registry,
    _tmp: TempDir,
    /// (index, amd64 manifest) of `library/multi:1`.
    multi: (String, String),
    /// `library/demo:1.0` (OCI image manifest).
    demo: String,
    /// `library/v2img:1` as the upstream stores it (Docker schema 2).
    v2img: String,
}

impl Images {
    fn push() -> Images {
        let up = Registry::start(Auth::Anonymous);
        let tmp = TempDir::new().unwrap();
        let layout = Layout::new(tmp.path());
        let multi = layout.multiarch(200_000, 71);
        layout.push("multi", &format!("{}/library/multi:1", up.host()), None);
        let demo = layout.build("demo", &[("demo.txt", &noise(120_000, 72))]);
        layout.push("demo", &format!("{}/library/demo:1.0", up.host()), None);
        layout.build("v2", &[("v2.txt", &noise(110_000, 73))]);
        layout.push_as("v2", &format!("{}/library/v2img:1", up.host()), "v2s2");
        let r = http(
            "HEAD",
            &format!("{}/v2/library/v2img/manifests/1", up.url()),
            &[("Accept", DOCKER_V2)],
        );
        assert_eq!(r.header("content-type"), Some(DOCKER_V2));
        let v2img = r.header("docker-content-digest").unwrap().to_string();
        Images {
            up,
            _tmp: tmp,
            multi,
            demo,
            v2img,
        }
    }
}

/// htpasswd with alice (may push) and bob; returns the `[auth]`+`[hosted]` config lines.
fn auth_config(tmp: &TempDir) -> String {
    let file = htpasswd(tmp.path(), &[("alice", "alice-pw"), ("bob", "bob-pw")]);
    format!(
        "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\nanonymous_pull = true\npush = [\"alice\"]\n",
        file.display()
    )
}

fn upstream_config(key: &str, url: &str) -> String {
    format!("[upstreams.\"{key}\"]\nurl = \"{url}\"\ntag_ttl = \"1h\"\n")
}

/// `curl` with one `-H Accept:` per line (curl sends them as separate header lines).
fn curl_manifest(url: &str, accept: &[&str]) -> (u16, Option<String>, Vec<u8>) {
    let dir = TempDir::new().unwrap();
    let (headers, body) = (dir.path().join("h"), dir.path().join("b"));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o"]).arg(&body).arg("-D").arg(&headers);
    for a in accept {
        cmd.args(["-H", &format!("Accept: {a}")]);
    }
    run(cmd.arg(url));
    let head = std::fs::read_to_string(&headers).unwrap();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let digest = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("docker-content-digest")
            .then(|| v.trim().to_string())
    });
    (status, digest, std::fs::read(&body).unwrap())
}

#[test]
fn podman_skopeo_and_curl_pull_every_manifest_kind() {
    if !require_clients() {
        return;
    }
    let img = Images::push();
    let tmp = TempDir::new().unwrap();
    let mirror = Mirror::start(
        "",
        &format!(
            "{}{}",
            auth_config(&tmp),
            upstream_config("docker.io", &img.up.url())
        ),
    );
    let host = format!("127.0.0.1:{}", mirror.port);
    let podman = Podman::new();

    // podman, anonymous through the Bearer challenge: an index, an OCI image and a v2s2
    // image by tag, each with the upstream's digest.
    let got = podman
        .pull(&format!("{host}/docker.io/library/multi:1"))
        .expect("podman pulls a multi-arch index");
    assert!(got.contains(&img.multi.0), "{got:?}");
    let got = podman
        .pull(&format!("{host}/docker.io/library/demo:1.0"))
        .expect("podman pulls an OCI image");
    assert!(got.contains(&img.demo), "{got:?}");
    let got = podman
        .pull(&format!("{host}/docker.io/library/v2img:1"))
        .expect("podman pulls a Docker v2s2 image");
    assert!(got.contains(&img.v2img), "{got:?}");

    // skopeo inspects the index by tag: the exact bytes.
    assert_eq!(
        skopeo_raw_digest(&format!("{host}/docker.io/library/multi:1")),
        img.multi.0
    );

    // curl with several Accept lines, in containers/image's and Docker's orders, on the
    // cached tags; a list without the stored type is 404; no Accept admits everything.
    let url =
        |repo: &str, r: &str| format!("{}/v2/docker.io/library/{repo}/manifests/{r}", mirror.url());
    for accept in [CONTAINERS_IMAGE_ACCEPT, DOCKER_ACCEPT] {
        let (status, digest, body) = curl_manifest(&url("multi", "1"), accept);
        assert_eq!(
            (status, digest.as_deref()),
            (200, Some(img.multi.0.as_str()))
        );
        assert_eq!(format!("sha256:{}", sha256_hex(&body)), img.multi.0);
        let (status, digest, _) = curl_manifest(&url("v2img", "1"), accept);
        assert_eq!((status, digest.as_deref()), (200, Some(img.v2img.as_str())));
    }
    let (status, _, body) = curl_manifest(&url("multi", "1"), &[OCI_MANIFEST, DOCKER_V2]);
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("MANIFEST_UNKNOWN"));
    let (status, digest, _) = curl_manifest(&url("v2img", "1"), &[""]);
    assert_eq!((status, digest.as_deref()), (200, Some(img.v2img.as_str())));
    // A cold tag asked with only the index type still fetches every type upstream, and
    // the next client with another list is served from the cache.
    let (status, _, _) = curl_manifest(&url("v2img", "1"), &[OCI_INDEX]);
    assert_eq!(status, 404);

    // The upstream was asked for each manifest by the mirror, once per tag.
    for repo in ["multi", "demo", "v2img"] {
        let gets = img
            .up
            .count("GET", &format!("/v2/library/{repo}/manifests/"));
        assert!(gets >= 1, "{repo}: the mirror fetched it upstream");
    }
    // podman resolved the tag with a HEAD; every later client was served the cached tag.
    let tag = "/v2/library/multi/manifests/1";
    assert_eq!(
        img.up.count("HEAD", tag) + img.up.count("GET", tag),
        1,
        "one upstream request for the index tag, whatever each client accepts"
    );

    // podman login + push + pull on the hosted prefix.
    podman
        .login(&host, "alice", "alice-pw")
        .expect("podman login");
    let hosted = format!("{host}/local/team/demo:1");
    podman
        .tag(&format!("{host}/docker.io/library/demo:1.0"), &hosted)
        .expect("tag");
    podman
        .push(&hosted)
        .expect("podman pushes to the hosted prefix");
    podman.remove(&hosted).expect("rmi");
    let pulled = podman.pull(&hosted).expect("podman pulls the pushed image");
    let r = http(
        "HEAD",
        &format!("{}/v2/local/team/demo/manifests/1", mirror.url()),
        &[("Authorization", &basic("alice", "alice-pw"))],
    );
    let head = r.header("docker-content-digest").unwrap().to_string();
    assert!(pulled.contains(&head), "{pulled:?} {head}");
}

#[test]
fn docker_pulls_through_registry_mirrors_with_and_without_auth() {
    if !require_clients() {
        return;
    }
    let img = Images::push();
    let tmp = TempDir::new().unwrap();
    let private = Registry::start(Auth::Basic("owner", "s3cret"));
    let layout = Layout::new(tmp.path());
    let secret = layout.build("secret", &[("secret.txt", &noise(90_000, 74))]);
    layout.push(
        "secret",
        &format!("{}/team/secret:1", private.host()),
        Some("owner:s3cret"),
    );
    let upstreams = format!(
        "{}{}",
        upstream_config("docker.io", &img.up.url()),
        upstream_config("quay.io", &private.url())
    );
    let open = Mirror::start("default_upstream = \"docker.io\"", &upstreams);
    let guarded = Mirror::start(
        "default_upstream = \"docker.io\"",
        &format!("{}{upstreams}", auth_config(&tmp)),
    );

    for mirror in [&open, &guarded] {
        let host = format!("127.0.0.1:{}", mirror.port);
        let docker = Dockerd::start(&host);
        // Docker shuffles its Accept lines on every request: repeat each pull.
        for round in 0..3 {
            for (name, want) in [("demo:1.0", &img.demo), ("v2img:1", &img.v2img)] {
                let got = docker
                    .pull(name)
                    .unwrap_or_else(|e| panic!("round {round} {name}: {e}\n{}", docker.log()));
                assert_eq!(got, std::slice::from_ref(want), "round {round} {name}");
                docker.run(&["rmi", name]).expect("rmi");
            }
        }
        let served = |repo: &str| {
            mirror
                .log()
                .lines()
                .filter(|l| l.contains(&format!("path=/v2/library/{repo}/manifests/")))
                .filter(|l| l.contains("status=200"))
                .count()
        };
        assert!(
            served("demo") >= 3 && served("v2img") >= 3,
            "every pull went to the mirror"
        );

        // A multi-arch image: Docker gets the amd64 one.
        let got = docker
            .pull("multi:1")
            .expect("docker pulls a multi-arch image");
        assert!(got.contains(&img.multi.0), "{got:?}");
        let arch = docker
            .run(&[
                "image",
                "inspect",
                "--format",
                "{{.Architecture}}",
                "multi:1",
            ])
            .unwrap();
        assert_eq!(arch, "amd64");
        let layer = amd64_layer(&img);
        assert!(
            mirror.log().contains(&layer),
            "amd64 layer came through the mirror"
        );

        if std::ptr::eq(mirror, &guarded) {
            // docker login + push + pull on the hosted prefix.
            docker
                .run(&["login", &host, "-u", "alice", "-p", "alice-pw"])
                .expect("docker login");
            let hosted = format!("{host}/local/team/demo:1");
            docker.run(&["tag", "multi:1", &hosted]).unwrap();
            docker.run(&["push", &hosted]).expect("docker push");
            docker.run(&["rmi", &hosted]).unwrap();
            let pushed = docker.pull(&hosted).expect("docker pulls the pushed image");
            let r = http(
                "HEAD",
                &format!("{}/v2/local/team/demo/manifests/1", mirror.url()),
                &[("Authorization", &basic("alice", "alice-pw"))],
            );
            let head = r.header("docker-content-digest").unwrap().to_string();
            assert_eq!(pushed, [head]);
        }

        // A private upstream image: refused anonymously, pulled after `docker login` with
        // the upstream's own credentials.
        let secret_ref = format!("{host}/quay.io/team/secret:1");
        let _ = docker.run(&["logout", &host]);
        assert!(docker.pull(&secret_ref).is_err(), "anonymous pull refused");
        docker
            .run(&["login", &host, "-u", "owner", "-p", "s3cret"])
            .expect("docker login with upstream credentials");
        let got = docker
            .pull(&secret_ref)
            .expect("private upstream image pulled");
        assert_eq!(got, std::slice::from_ref(&secret));
        assert!(!mirror.log().contains("s3cret"), "password never logged");
    }
    assert!(img.up.count("GET", "/v2/library/demo/manifests/") >= 1);
    assert!(img.up.count("GET", "/v2/library/v2img/manifests/") >= 1);
}

/// The amd64 layer of `library/multi:1`, read from the upstream's manifest.
fn amd64_layer(img: &Images) -> String {
    let r = http(
        "GET",
        &format!(
            "{}/v2/library/multi/manifests/{}",
            img.up.url(),
            img.multi.1
        ),
        &[("Accept", OCI_MANIFEST)],
    );
    r.json()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}
