//! Referrers of pull-through images (OCI 1.1): from the referrers tag schema of an upstream
//! without the API (Distribution 2.8), filtered, cached like a tag, served stale when the
//! upstream is down; cosign's `sha256-<hex>.sig` tags pulled as tags.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tempfile::TempDir;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// PUTs `body` as a manifest of `repo` at `reference` on the upstream; returns its digest.
fn put(up: &Registry, repo: &str, reference: &str, media: &str, body: &Value) -> (String, usize) {
    let bytes = serde_json::to_vec(body).unwrap();
    let r = send(
        &format!("{}/v2/{repo}/manifests/{reference}", up.url()),
        "PUT",
        &bytes,
        &[("Content-Type", media)],
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    (format!("sha256:{}", sha256_hex(&bytes)), bytes.len())
}

/// An artifact manifest about `subject` (no layers, the empty config).
fn artifact(config: &str, subject: (&str, usize), kind: &str) -> Value {
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": kind,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.0, "size": subject.1},
    })
}

#[test]
fn referrers_of_upstream_images_from_the_tag_schema() {
    if !require(PEERS) {
        return;
    }
    let mut up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let subject = layout.build("img", &[("f", &noise(10_000, 81))]);
    layout.push("img", &format!("{}/library/app:1", up.host()), None);
    let size = layout.blob(&subject).len();
    let config = up.push_blob("library/app", b"{}");
    let repo = "library/app";
    let (sig, sig_len) = put(
        &up,
        repo,
        "sig",
        OCI_MANIFEST,
        &artifact(&config, (&subject, size), "application/x-sig"),
    );
    let (sbom, sbom_len) = put(
        &up,
        repo,
        "sbom",
        OCI_MANIFEST,
        &artifact(&config, (&subject, size), "application/x-sbom"),
    );
    // The fallback tag a client without the referrers API writes: an index of referrers.
    let hex = &subject[7..];
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sig, "size": sig_len, "artifactType": "application/x-sig"},
            {"mediaType": OCI_MANIFEST, "digest": sbom, "size": sbom_len, "artifactType": "application/x-sbom"},
        ],
    });
    put(&up, repo, &format!("sha256-{hex}"), OCI_INDEX, &index);
    // cosign's signature tag: an ordinary tag.
    let (cosign, _) = put(
        &up,
        repo,
        &format!("sha256-{hex}.sig"),
        OCI_MANIFEST,
        &artifact(
            &config,
            (&subject, size),
            "application/vnd.dev.cosign.artifact.sig.v1+json",
        ),
    );

    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{}\"\ntag_ttl = \"2s\"\n",
            up.url()
        ),
    );
    let m = mirror.url();
    let url = |d: &str| format!("{m}/v2/docker.io/library/app/referrers/{d}");
    let digests = |r: &Reply| -> Vec<String> {
        r.json()["manifests"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|d| d["digest"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };

    let r = get(&url(&subject));
    assert_eq!((r.status, r.header("content-type")), (200, Some(OCI_INDEX)));
    let mut got = digests(&r);
    got.sort();
    let mut want = vec![sig.clone(), sbom.clone()];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(r.header("oci-filters-applied"), None);
    // The upstream has no referrers API: it was asked, then the fallback tag.
    assert_eq!(
        up.count("GET", &format!("/v2/library/app/referrers/{subject}")),
        1
    );
    assert_eq!(up.count("GET", &format!("/manifests/sha256-{hex}")), 1);

    let r = get(&format!("{}?artifactType=application/x-sig", url(&subject)));
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(digests(&r), vec![sig.clone()]);
    assert_eq!(
        up.count("GET", &format!("/manifests/sha256-{hex}")),
        1,
        "within tag_ttl the cached index answers"
    );
    // No referrers: an empty index, not a 404.
    let none = format!("sha256:{}", "1".repeat(64));
    let r = get(&url(&none));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["manifests"], json!([]));

    // cosign's .sig tag travels as a tag.
    let r = http(
        "GET",
        &format!("{m}/v2/docker.io/library/app/manifests/sha256-{hex}.sig"),
        &[("Accept", OCI_MANIFEST)],
    );
    assert_eq!(r.header("docker-content-digest"), Some(cosign.as_str()));

    // Upstream down, TTL passed: the cached index is served stale.
    up.stop();
    std::thread::sleep(Duration::from_millis(2100));
    let r = get(&url(&subject));
    assert_eq!(r.status, 200);
    assert_eq!(digests(&r).len(), 2);
    assert!(mirror.metric("entrepot_stale_serves_total", &[("upstream", "docker.io")]) >= 1.0);
}
