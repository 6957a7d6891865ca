//! Signed-only pulls (`[[policy]]`): real cosign-format signatures made with the sigstore
//! project's own Rust library (and, as a second signer the product shares nothing with,
//! `openssl dgst -sign`), pushed to a real Distribution; pulled through the mirror by
//! containerd, podman, skopeo, Docker and curl.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use common::*;
use sigstore::crypto::{SigStoreSigner, SigningScheme};
use tempfile::TempDir;

const CLIENTS: &[&str] = &["podman", "dockerd"];
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A cosign key pair from the sigstore crate; its public key written to `dir/name.pub`.
fn key_pair(dir: &Path, name: &str) -> (SigStoreSigner, PathBuf) {
    let signer = SigningScheme::ECDSA_P256_SHA256_ASN1
        .create_signer()
        .expect("sigstore signer");
    let pem = signer
        .to_sigstore_keypair()
        .and_then(|k| k.public_key_to_pem())
        .expect("public key pem");
    let path = dir.join(format!("{name}.pub"));
    std::fs::write(&path, pem).expect("write key");
    (signer, path)
}

/// cosign's simple-signing payload for `digest` named `reference`.
fn payload(digest: &str, reference: &str) -> Vec<u8> {
    serde_json::json!({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature"
        },
        "optional": null
    })
    .to_string()
    .into_bytes()
}

/// Stores `payload` signed with `signature` as cosign does: tag `sha256-<hex>.sig` of
/// `repo` on `up`, an OCI manifest with the payload as its one layer.
fn push_signature(up: &Registry, repo: &str, digest: &str, payload: &[u8], signature: &[u8]) {
    let config = up.push_blob(repo, b"{}");
    let layer = up.push_blob(repo, payload);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": layer,
            "size": payload.len(),
            "annotations": {
                "dev.cosignproject.cosign/signature":
                    base64::engine::general_purpose::STANDARD.encode(signature)
            }
        }]
    });
    let tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
    let r = send(
        &format!("{}/v2/{repo}/manifests/{tag}", up.url()),
        "PUT",
        manifest.to_string().as_bytes(),
        &[("Content-Type", OCI_MANIFEST)],
    );
    assert_eq!(r.status, 201, "push signature of {repo}@{digest}");
}

fn sign(up: &Registry, signer: &SigStoreSigner, repo: &str, digest: &str, claims: &str) {
    let p = payload(claims, &format!("{}/{repo}", up.host()));
    let sig = signer.sign(&p).expect("sign");
    push_signature(up, repo, digest, &p, &sig);
}

struct World {
    up: Registry,
    tmp: TempDir,
    mirror: Mirror,
    good: String,
    plain: String,
    multi: (String, String),
    release: SigStoreSigner,
}

fn world() -> World {
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let mut digests = Vec::new();
    for (i, name) in ["good", "plain", "stranger", "liar", "imposter", "audited"]
        .iter()
        .enumerate()
    {
        let d = layout.build(name, &[("f.txt", &noise(60_000, 900 + i as u64))]);
        let repo = if *name == "audited" {
            "audit/app"
        } else {
            name
        };
        let repo = if repo.contains('/') {
            repo.to_string()
        } else {
            format!("myorg/{repo}")
        };
        layout.push(name, &format!("{}/{repo}:1", up.host()), None);
        digests.push(d);
    }
    let multi = layout.multiarch(100_000, 910);
    layout.push("multi", &format!("{}/myorg/multi:1", up.host()), None);
    let (release, release_pub) = key_pair(tmp.path(), "release");
    let (other, _) = key_pair(tmp.path(), "other");
    sign(&up, &release, "myorg/good", &digests[0], &digests[0]);
    sign(&up, &other, "myorg/stranger", &digests[2], &digests[2]);
    // A real signature of the good image, stored as the liar's.
    sign(&up, &release, "myorg/liar", &digests[3], &digests[0]);
    // Signed for another repository.
    let p = payload(&digests[4], &format!("{}/myorg/other", up.host()));
    push_signature(
        &up,
        "myorg/imposter",
        &digests[4],
        &p,
        &release.sign(&p).unwrap(),
    );
    sign(&up, &release, "myorg/multi", &multi.0, &multi.0);
    let keys = release_pub.display();
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{}\"\ntag_ttl = \"3s\"\n\n\
             [[policy]]\nname = \"release\"\nmatch = [\"docker.io/myorg/*\"]\nkeys = [\"{keys}\"]\nidentity = \"repository\"\n\n\
             [[policy]]\nname = \"watch\"\nmatch = [\"docker.io/audit/*\"]\nkeys = [\"{keys}\"]\nmode = \"audit\"\n",
            up.url()
        ),
    );
    World {
        up,
        tmp,
        mirror,
        good: digests[0].clone(),
        plain: digests[1].clone(),
        multi,
        release,
    }
}

fn manifest(w: &World, repo: &str, reference: &str) -> Reply {
    http(
        "GET",
        &format!(
            "{}/v2/docker.io/{repo}/manifests/{reference}",
            w.mirror.url()
        ),
        &[("Accept", OCI_MANIFEST)],
    )
}

/// Each refusal is a 403 DENIED naming the policy and the reason, the signed image is
/// served, nothing of a refused image beyond its manifest and signature is fetched, and
/// a verdict is reused (one signature fetch for many pulls).
#[test]
fn only_images_signed_by_the_release_key_are_served() {
    if !require(PEERS) {
        return;
    }
    let w = world();
    let r = manifest(&w, "myorg/good", "1");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("docker-content-digest"), Some(w.good.as_str()));
    for (repo, why) in [
        ("myorg/plain", "no signature found"),
        ("myorg/stranger", "signed by an unknown key"),
        ("myorg/liar", "payload names another digest"),
        ("myorg/imposter", "identity mismatch"),
    ] {
        let r = manifest(&w, repo, "1");
        assert_eq!((r.status, r.oci_code().as_str()), (403, "DENIED"), "{repo}");
        let msg = r.json()["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            msg.contains("policy \"release\"") && msg.contains(why),
            "{repo}: {msg}"
        );
        // HEAD is refused the same way.
        let h = http(
            "HEAD",
            &format!("{}/v2/docker.io/{repo}/manifests/1", w.mirror.url()),
            &[("Accept", OCI_MANIFEST)],
        );
        assert_eq!(h.status, 403, "HEAD {repo}");
    }
    // A platform manifest of the signed index, asked for before the index: no admitted
    // parent, no signature of its own.
    let r = manifest(&w, "myorg/multi", &w.multi.1);
    assert_eq!(r.status, 403, "a child manifest without its admitted index");
    let index = http(
        "GET",
        &format!("{}/v2/docker.io/myorg/multi/manifests/1", w.mirror.url()),
        &[("Accept", "application/vnd.oci.image.index.v1+json")],
    );
    assert_eq!(index.status, 200, "the index");
    assert_eq!(
        manifest(&w, "myorg/multi", &w.multi.1).status,
        200,
        "admitted through it"
    );
    // A blob of a refused image, asked for directly.
    let layer = Layout {
        dir: w.tmp.path().join("layout"),
    }
    .layers(&w.plain)[0]
        .clone();
    let r = get(&format!(
        "{}/v2/docker.io/myorg/plain/blobs/{layer}",
        w.mirror.url()
    ));
    assert_eq!(r.status, 403, "a blob no admitted manifest references");
    assert!(String::from_utf8_lossy(&r.body).contains("no admitted manifest"));
    assert_eq!(
        w.up.count("GET", "/myorg/plain/blobs/"),
        0,
        "nothing of it fetched"
    );

    // The signed image, whole, many times: one signature fetch.
    let good_layers = Layout {
        dir: w.tmp.path().join("layout"),
    }
    .layers(&w.good);
    for _ in 0..3 {
        pull_checked(
            &w.mirror.url(),
            "docker.io/myorg/good",
            "1",
            &good_layers,
            None,
        );
    }
    let sig_tag = format!("sha256-{}.sig", w.good.trim_start_matches("sha256:"));
    assert_eq!(w.up.count("GET", &sig_tag), 1, "the verdict is reused");
    assert!(
        w.mirror.metric(
            "entrepot_policy_decisions_total",
            &[("policy", "release"), ("result", "denied")]
        ) >= 8.0
    );

    // Signatures themselves are served (cosign verify reads them through the mirror),
    // payload included; an image merely tagged like a signature is not.
    let sig = manifest(&w, "myorg/good", &sig_tag);
    assert_eq!(sig.status, 200, "{}", String::from_utf8_lossy(&sig.body));
    let payload = sig.json()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let p = get(&format!(
        "{}/v2/docker.io/myorg/good/blobs/{payload}",
        w.mirror.url()
    ));
    assert_eq!(
        (p.status, format!("sha256:{}", sha256_hex(&p.body))),
        (200, payload)
    );
    let layout = Layout {
        dir: w.tmp.path().join("layout"),
    };
    let fake_tag = format!("sha256-{}.sig", "ab".repeat(32));
    layout.push(
        "plain",
        &format!("{}/myorg/trojan:{fake_tag}", w.up.host()),
        None,
    );
    let r = manifest(&w, "myorg/trojan", &fake_tag);
    assert_eq!(r.status, 403, "an image tagged like a signature");

    // The operator's view of the same verdicts.
    let (ok, text) = w.mirror.cli(&["policy", "check", "docker.io/myorg/good:1"]);
    assert!(
        ok && text.contains(&format!("ADMITTED docker.io/myorg/good@{}", w.good)),
        "{text}"
    );
    let (ok, text) = w
        .mirror
        .cli(&["policy", "check", "docker.io/myorg/stranger:1"]);
    assert!(
        !ok && text.contains("REFUSED") && text.contains("signed by an unknown key"),
        "{text}"
    );
    let (ok, text) = w
        .mirror
        .cli(&["policy", "check", "docker.io/library/free:1"]);
    assert!(
        ok && text.contains("no policy covers docker.io/library/free"),
        "{text}"
    );

    // Audit mode serves and counts.
    let r = manifest(&w, "audit/app", "1");
    assert_eq!(r.status, 200);
    assert_eq!(
        w.mirror.metric(
            "entrepot_policy_decisions_total",
            &[("policy", "watch"), ("result", "audit_denied")]
        ),
        1.0
    );
    assert!(w.mirror.log().contains("would refuse: no signature found"));

    // A signature added upstream later is seen once the tag's TTL passed.
    sign(&w.up, &w.release, "myorg/plain", &w.plain, &w.plain);
    assert_eq!(
        manifest(&w, "myorg/plain", "1").status,
        403,
        "the verdict holds for the TTL"
    );
    std::thread::sleep(std::time::Duration::from_millis(3200));
    assert_eq!(manifest(&w, "myorg/plain", "1").status, 200, "signed now");
}

/// Every client: the signed image (and the signed multi-arch index, its platform
/// manifests and blobs admitted through it) pulls; an unsigned one fails with the
/// reason in the client's own error.
#[test]
fn every_client_pulls_signed_images_and_is_refused_unsigned_ones() {
    if !require(PEERS) || !require(CLIENTS) {
        return;
    }
    let w = world();
    let host = format!("127.0.0.1:{}", w.mirror.port);

    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", "docker.io", &w.mirror.url(), Style::Ns);
    assert_eq!(
        ctr.pull("a", &hosts, "docker.io/myorg/good:1")
            .expect("containerd, signed"),
        w.good
    );
    assert_eq!(
        ctr.pull("b", &hosts, "docker.io/myorg/multi:1")
            .expect("containerd, signed index"),
        w.multi.0
    );
    // Platform by platform: every child manifest and layer of the signed index.
    ctr.pull_all_platforms("all", &hosts, "docker.io/myorg/multi:1")
        .expect("containerd, every platform of the signed index");
    let layout = Layout {
        dir: w.tmp.path().join("layout"),
    };
    for platform in ["amd", "arm"] {
        let child = layout.digest(platform);
        let asked = format!("/myorg/multi/manifests/{child}");
        assert!(w.mirror.log().contains(&asked), "{platform} asked");
        for layer in layout.layers(&child) {
            assert_eq!(
                w.up.count("GET", &layer),
                1,
                "{platform}: one upstream fetch"
            );
        }
    }
    let e = ctr
        .pull("c", &hosts, "docker.io/myorg/plain:1")
        .unwrap_err();
    assert!(
        e.contains("403") || e.contains("denied") || e.contains("no signature found"),
        "containerd: {e}"
    );

    let podman = Podman::new();
    podman
        .pull(&format!("{host}/docker.io/myorg/good:1"))
        .expect("podman, signed");
    podman
        .pull(&format!("{host}/docker.io/myorg/multi:1"))
        .expect("podman, signed index");
    let e = podman
        .pull(&format!("{host}/docker.io/myorg/plain:1"))
        .unwrap_err();
    assert!(e.contains("no signature found"), "podman: {e}");

    let out = TempDir::new().unwrap();
    let skopeo = |repo: &str| {
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{host}/docker.io/{repo}:1"))
            .arg(format!(
                "oci:{}:x",
                out.path().join(repo.replace('/', "-")).display()
            ))
            .output()
            .expect("skopeo")
    };
    assert!(skopeo("myorg/good").status.success(), "skopeo, signed");
    let o = skopeo("myorg/stranger");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("signed by an unknown key"),
        "skopeo: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let docker = Dockerd::start(&host);
    let got = docker
        .pull(&format!("{host}/docker.io/myorg/good:1"))
        .expect("docker, signed");
    assert!(got.iter().any(|d| d.ends_with(&w.good)), "{got:?}");
    let e = docker
        .pull(&format!("{host}/docker.io/myorg/liar:1"))
        .unwrap_err();
    assert!(e.contains("payload names another digest"), "docker: {e}");

    // Nothing of a refused image beyond its manifest and signature: none of its layers.
    for (repo, tag) in [
        ("plain", "plain"),
        ("stranger", "stranger"),
        ("liar", "liar"),
    ] {
        let d = layout.digest(tag);
        for layer in layout.layers(&d) {
            assert_eq!(w.up.count("GET", &layer), 0, "a layer of {repo} fetched");
        }
    }
}

/// An upstream with two unsigned images, `team/a:1` and `team/b:1` (their digests), and
/// the layout they were built in.
fn team_images(seed: u64) -> (Registry, TempDir, Layout, String, String) {
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let a = layout.build("a", &[("a.txt", &noise(30_000, seed))]);
    let b = layout.build("b", &[("b.txt", &noise(30_000, seed + 1))]);
    layout.push("a", &format!("{}/team/a:1", up.host()), None);
    layout.push("b", &format!("{}/team/b:1", up.host()), None);
    (up, tmp, layout, a, b)
}

/// A second signer that shares nothing with the product: `openssl dgst -sha256 -sign`
/// over the payload verifies; the same signature with one byte changed does not.
#[test]
fn a_signature_made_by_openssl_verifies_and_a_changed_byte_does_not() {
    if !require(PEERS) || !require(&["openssl"]) {
        return;
    }
    let (up, tmp, _layout, a, b) = team_images(920);
    let key = tmp.path().join("k.pem");
    let public = tmp.path().join("k.pub");
    run(Command::new("openssl")
        .args([
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
        ])
        .arg(&key));
    run(Command::new("openssl")
        .args(["ec", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public));
    for (repo, d, flip) in [("team/a", &a, false), ("team/b", &b, true)] {
        let p = payload(d, &format!("{}/{repo}", up.host()));
        let file = tmp.path().join("payload");
        std::fs::write(&file, &p).unwrap();
        let sig = tmp.path().join("sig");
        run(Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&key)
            .arg("-out")
            .arg(&sig)
            .arg(&file));
        let mut s = std::fs::read(&sig).unwrap();
        if flip {
            let last = s.len() - 1;
            s[last] ^= 1;
        }
        push_signature(&up, repo, d, &p, &s);
    }
    let m = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{}\"\n\n[[policy]]\nname = \"team\"\nmatch = [\"docker.io/team/*\"]\nkeys = [\"{}\"]\n",
            up.url(),
            public.display()
        ),
    );
    let get = |repo: &str| {
        http(
            "GET",
            &format!("{}/v2/docker.io/{repo}/manifests/1", m.url()),
            &[("Accept", OCI_MANIFEST)],
        )
    };
    assert_eq!(get("team/a").status, 200, "openssl's signature verifies");
    let r = get("team/b");
    assert_eq!(r.status, 403);
    assert!(String::from_utf8_lossy(&r.body).contains("signed by an unknown key"));
}

/// Key files are checked at start, with the file named.
#[test]
fn a_bad_key_file_stops_the_start_with_its_name() {
    let tmp = TempDir::new().unwrap();
    let bad = tmp.path().join("bad.pub");
    std::fs::write(&bad, "not a key").unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nstorage = \"{}\"\n[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:9\"\n[[policy]]\nname = \"p\"\nmatch = [\"docker.io/x/*\"]\nkeys = [\"{}\"]\n",
            free_port(),
            tmp.path().join("s").display(),
            bad.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("bad.pub") && text.contains("not a PEM public key"),
        "{text}"
    );
}

/// Pushes `bytes` as a blob of `repo` at `base` (a monolithic upload with `auth`).
fn push_blob_to(base: &str, repo: &str, bytes: &[u8], auth: &str) -> String {
    let d = format!("sha256:{}", sha256_hex(bytes));
    let start = send(
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        "POST",
        &[],
        &[("Authorization", auth)],
    );
    assert_eq!(start.status, 202, "start upload");
    let loc = start.header("location").expect("Location").to_string();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = send(
        &format!("{loc}{sep}digest={d}"),
        "PUT",
        bytes,
        &[
            ("Authorization", auth),
            ("Content-Type", "application/octet-stream"),
        ],
    );
    assert_eq!(r.status, 201, "upload {d}");
    d
}

/// Hosted repositories under a policy: a signed pushed image is served, an unsigned one
/// refused, a signature pushed to the mirror itself counts, and a push (whose blob
/// HEADs a policy leaves alone) still works.
#[test]
fn hosted_repositories_under_a_policy() {
    if !require(PEERS) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let signed = layout.build("s", &[("s.txt", &noise(50_000, 930))]);
    let plain = layout.build("p", &[("p.txt", &noise(50_000, 931))]);
    let (release, release_pub) = key_pair(tmp.path(), "release");
    let users = htpasswd(tmp.path(), &[("alice", "alice-pw")]);
    let m = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\nanonymous_pull = true\npush = [\"alice\"]\n\
             [[policy]]\nname = \"prod\"\nmatch = [\"local/prod/*\"]\nkeys = [\"{}\"]\nidentity = \"repository\"\n",
            users.display(),
            release_pub.display()
        ),
    );
    let host = format!("127.0.0.1:{}", m.port);
    layout.push(
        "s",
        &format!("{host}/local/prod/app:1"),
        Some("alice:alice-pw"),
    );
    layout.push(
        "p",
        &format!("{host}/local/prod/other:1"),
        Some("alice:alice-pw"),
    );
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:alice-pw")
    );
    // The signature, pushed to the mirror as `cosign sign` would.
    let p = payload(&signed, &format!("{host}/local/prod/app"));
    let sig = release.sign(&p).unwrap();
    let config = push_blob_to(&m.url(), "local/prod/app", b"{}", &auth);
    let layer = push_blob_to(&m.url(), "local/prod/app", &p, &auth);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": layer,
            "size": p.len(),
            "annotations": {"dev.cosignproject.cosign/signature": base64::engine::general_purpose::STANDARD.encode(&sig)}
        }]
    });
    let tag = format!("sha256-{}.sig", &signed[7..]);
    let r = send(
        &format!("{}/v2/local/prod/app/manifests/{tag}", m.url()),
        "PUT",
        manifest.to_string().as_bytes(),
        &[("Content-Type", OCI_MANIFEST), ("Authorization", &auth)],
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", &host, &m.url(), Style::Ns);
    let got = ctr
        .pull("a", &hosts, &format!("{host}/local/prod/app:1"))
        .expect("signed hosted image");
    assert_eq!(got, signed);
    let r = http(
        "GET",
        &format!("{}/v2/local/prod/other/manifests/1", m.url()),
        &[("Accept", OCI_MANIFEST)],
    );
    assert_eq!(r.status, 403);
    assert!(String::from_utf8_lossy(&r.body).contains("no signature found"));
    let _ = plain;
    assert!(ctr
        .pull("b", &hosts, &format!("{host}/local/prod/other:1"))
        .is_err());
}

/// A cosign signature stored as an OCI 1.1 referrer of the image (cosign
/// `--registry-referrers-mode=oci-1-1`): `base/repo` gets the payload, the referrer
/// manifest (artifact type, subject) and, for a registry without the referrers API
/// (Distribution 2.8), the referrers tag schema's index.
fn push_referrer_signature(
    base: &str,
    repo: &str,
    subject: &str,
    payload: &[u8],
    sig: &[u8],
    auth: &str,
    tag_index: bool,
) {
    let empty = push_blob_to(base, repo, b"{}", auth);
    let layer = push_blob_to(base, repo, payload, auth);
    let subject_size = http(
        "HEAD",
        &format!("{base}/v2/{repo}/manifests/{subject}"),
        &[("Accept", OCI_MANIFEST), ("Authorization", auth)],
    )
    .header("content-length")
    .and_then(|l| l.parse::<u64>().ok())
    .expect("subject size");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": layer,
            "size": payload.len(),
            "annotations": {"dev.cosignproject.cosign/signature": base64::engine::general_purpose::STANDARD.encode(sig)}
        }],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size}
    })
    .to_string();
    let d = format!("sha256:{}", sha256_hex(manifest.as_bytes()));
    let r = send(
        &format!("{base}/v2/{repo}/manifests/{d}"),
        "PUT",
        manifest.as_bytes(),
        &[("Content-Type", OCI_MANIFEST), ("Authorization", auth)],
    );
    assert_eq!(
        r.status,
        201,
        "referrer: {}",
        String::from_utf8_lossy(&r.body)
    );
    if tag_index {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": OCI_MANIFEST, "digest": d, "size": manifest.len(),
                "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json"
            }]
        })
        .to_string();
        let r = send(
            &format!("{base}/v2/{repo}/manifests/sha256-{}", &subject[7..]),
            "PUT",
            index.as_bytes(),
            &[
                ("Content-Type", "application/vnd.oci.image.index.v1+json"),
                ("Authorization", auth),
            ],
        );
        assert_eq!(
            r.status,
            201,
            "referrers tag: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

/// Signatures stored only as OCI 1.1 referrers admit the image, on an upstream (through
/// the referrers tag schema of a registry without the API) and on a hosted repository
/// (pushed with a subject); a referrer signed by another key does not.
#[test]
fn signatures_stored_as_oci_referrers_count_too() {
    if !require(PEERS) {
        return;
    }
    let (up, tmp, layout, a, b) = team_images(940);
    let (release, release_pub) = key_pair(tmp.path(), "release");
    let (other, _) = key_pair(tmp.path(), "other");
    let none = "Basic Og=="; // ignored by an anonymous registry
    for (repo, d, signer) in [("team/a", &a, &release), ("team/b", &b, &other)] {
        let p = payload(d, &format!("{}/{repo}", up.host()));
        push_referrer_signature(
            &up.url(),
            repo,
            d,
            &p,
            &signer.sign(&p).unwrap(),
            none,
            true,
        );
    }
    let users = htpasswd(tmp.path(), &[("alice", "alice-pw")]);
    let m = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\nanonymous_pull = true\npush = [\"alice\"]\n\
             [upstreams.\"docker.io\"]\nurl = \"{}\"\n\n\
             [[policy]]\nname = \"team\"\nmatch = [\"docker.io/team/*\", \"local/team/*\"]\nkeys = [\"{}\"]\n",
            users.display(),
            up.url(),
            release_pub.display()
        ),
    );
    let get = |path: &str| {
        http(
            "GET",
            &format!("{}/v2/{path}", m.url()),
            &[("Accept", OCI_MANIFEST)],
        )
    };
    let r = get("docker.io/team/a/manifests/1");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = get("docker.io/team/b/manifests/1");
    assert_eq!(r.status, 403);
    assert!(String::from_utf8_lossy(&r.body).contains("signed by an unknown key"));

    // Hosted: the image pushed, then its signature as a referrer (the mirror has the API).
    let host = format!("127.0.0.1:{}", m.port);
    layout.push(
        "a",
        &format!("{host}/local/team/a:1"),
        Some("alice:alice-pw"),
    );
    assert_eq!(
        get("local/team/a/manifests/1").status,
        403,
        "not signed yet"
    );
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:alice-pw")
    );
    let p = payload(&a, &format!("{host}/local/team/a"));
    push_referrer_signature(
        &m.url(),
        "local/team/a",
        &a,
        &p,
        &release.sign(&p).unwrap(),
        &auth,
        false,
    );
    // A signature pushed to the mirror counts at once (its verdict is asked again).
    let r = get("local/team/a/manifests/1");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
