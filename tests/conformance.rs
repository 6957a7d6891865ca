//! The OCI distribution-spec v1.1 workflows, request by request as the official
//! conformance suite runs them (pull, push, content discovery, content management), on
//! the hosted prefix with an htpasswd user, including the malformed-reference 404s.

mod common;

use common::*;
use serde_json::json;
use tempfile::TempDir;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

/// The hosted mirror and alice's Basic credentials, for each request.
struct Api {
    m: Mirror,
    auth: String,
    _tmp: TempDir,
}

impl Api {
    fn start() -> Api {
        let tmp = TempDir::new().unwrap();
        let file = htpasswd(tmp.path(), &[("alice", "alice-pw")]);
        let m = Mirror::start(
            "",
            &format!(
                "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\nanonymous_pull = false\npush = [\"alice\"]\n",
                file.display()
            ),
        );
        Api {
            m,
            auth: basic("alice", "alice-pw"),
            _tmp: tmp,
        }
    }

    /// `method /v2/<path>` (or an absolute Location) with alice's credentials.
    fn req(&self, method: &str, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
        let url = if path.starts_with("http") {
            path.to_string()
        } else if let Some(p) = path.strip_prefix('/') {
            format!("{}/{p}", self.m.url())
        } else {
            format!("{}/v2/{path}", self.m.url())
        };
        let mut h = vec![("Authorization", self.auth.as_str())];
        h.extend_from_slice(headers);
        send(&url, method, body, &h)
    }

    /// Pushes a blob monolithically (POST, then PUT with the bytes).
    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let d = format!("sha256:{}", sha256_hex(bytes));
        let r = self.req("POST", &format!("local/{repo}/blobs/uploads/"), &[], &[]);
        assert_eq!(r.status, 202);
        let loc = location(&r);
        let r = self.req("PUT", &with_digest(&loc, &d), bytes, &octets());
        assert_eq!(r.status, 201, "monolithic PUT");
        d
    }

    fn put_manifest(&self, repo: &str, reference: &str, media: &str, body: &[u8]) -> Reply {
        self.req(
            "PUT",
            &format!("local/{repo}/manifests/{reference}"),
            body,
            &[("Content-Type", media)],
        )
    }
}

fn octets() -> Vec<(&'static str, &'static str)> {
    vec![("Content-Type", "application/octet-stream")]
}

fn location(r: &Reply) -> String {
    r.header("location").expect("Location header").to_string()
}

fn with_digest(loc: &str, d: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={d}")
}

/// An image manifest over `config` (empty JSON) and `layers`, with optional subject and
/// artifact type.
fn manifest(
    config: &str,
    layers: &[(&str, usize)],
    subject: Option<(&str, usize)>,
    artifact: Option<&str>,
) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY_CONFIG, "digest": config, "size": 2},
        "layers": layers.iter().map(|(d, n)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n
        })).collect::<Vec<_>>(),
    });
    if let Some((d, n)) = subject {
        m["subject"] = json!({"mediaType": OCI_MANIFEST, "digest": d, "size": n});
    }
    if let Some(t) = artifact {
        m["artifactType"] = json!(t);
    }
    serde_json::to_vec(&m).unwrap()
}

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(b))
}

#[test]
fn distribution_spec_workflows() {
    if !require(&["htpasswd"]) {
        return;
    }
    let api = Api::start();
    let layer = noise(70_000, 91);
    let config = api.push_blob("pull", b"{}");
    let layer_d = api.push_blob("pull", &layer);
    let man = manifest(&config, &[(&layer_d, layer.len())], None, None);
    let man_d = digest_of(&man);
    assert_eq!(
        api.put_manifest("pull", "tagged", OCI_MANIFEST, &man)
            .status,
        201
    );

    // --- Pull ---
    let r = api.req("HEAD", &format!("local/pull/blobs/{layer_d}"), &[], &[]);
    assert_eq!((r.status, r.header("content-length")), (200, Some("70000")));
    let missing = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        api.req("HEAD", &format!("local/pull/blobs/{missing}"), &[], &[])
            .status,
        404
    );
    for reference in ["tagged", man_d.as_str()] {
        let path = format!("local/pull/manifests/{reference}");
        let r = api.req("HEAD", &path, &[], &[("Accept", OCI_MANIFEST)]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("docker-content-digest"), Some(man_d.as_str()));
        let r = api.req("GET", &path, &[], &[("Accept", OCI_MANIFEST)]);
        assert_eq!((r.status, r.body.as_slice()), (200, man.as_slice()));
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    }
    let r = api.req("GET", "local/pull/manifests/nonexistent", &[], &[]);
    assert_eq!((r.status, r.oci_code().as_str()), (404, "MANIFEST_UNKNOWN"));
    let r = api.req("GET", &format!("local/pull/blobs/{layer_d}"), &[], &[]);
    assert_eq!((r.status, digest_of(&r.body)), (200, layer_d.clone()));
    let r = api.req("GET", &format!("local/pull/blobs/{missing}"), &[], &[]);
    assert_eq!((r.status, r.oci_code().as_str()), (404, "BLOB_UNKNOWN"));
    // Malformed references name no manifest: 404 on GET, HEAD and DELETE; PUT is 400.
    for method in ["GET", "HEAD", "DELETE"] {
        let r = api.req(
            method,
            "local/pull/manifests/.INVALID_MANIFEST_NAME",
            &[],
            &[],
        );
        assert_eq!(r.status, 404, "{method} of a malformed reference");
    }
    let r = api.put_manifest("pull", ".INVALID_MANIFEST_NAME", OCI_MANIFEST, &man);
    assert_eq!((r.status, r.oci_code().as_str()), (400, "TAG_INVALID"));

    // --- Push ---
    // Single POST with the digest.
    let blob = noise(4_000, 92);
    let d = digest_of(&blob);
    let r = api.req(
        "POST",
        &format!("local/push/blobs/uploads/?digest={d}"),
        &blob,
        &octets(),
    );
    assert_eq!(r.status, 201);
    assert_eq!(location(&r), format!("/v2/local/push/blobs/{d}"));
    // Chunked: POST, PATCH, status, an out-of-order chunk (416), PATCH, PUT.
    let blob = noise(50_000, 93);
    let d = digest_of(&blob);
    let r = api.req(
        "POST",
        "local/push/blobs/uploads/",
        &[],
        &[("Content-Length", "0")],
    );
    assert_eq!(r.status, 202);
    let loc = location(&r);
    let (a, b) = blob.split_at(30_000);
    let r = api.req(
        "PATCH",
        &loc,
        a,
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Range", "0-29999"),
        ],
    );
    assert_eq!((r.status, r.header("range")), (202, Some("0-29999")));
    let loc = location(&r);
    let r = api.req("GET", &loc, &[], &[]);
    assert_eq!((r.status, r.header("range")), (204, Some("0-29999")));
    let r = api.req(
        "PATCH",
        &loc,
        b,
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Range", "40000-59999"),
        ],
    );
    assert_eq!(r.status, 416, "out-of-order chunk");
    let r = api.req(
        "PATCH",
        &loc,
        b,
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Range", "30000-49999"),
        ],
    );
    assert_eq!((r.status, r.header("range")), (202, Some("0-49999")));
    let r = api.req("PUT", &with_digest(&location(&r), &d), &[], &octets());
    assert_eq!(r.status, 201);
    let r = api.req("GET", &format!("local/push/blobs/{d}"), &[], &[]);
    assert_eq!(r.body, blob);
    // Cross-repository mount: 201 for a blob the source has, 202 (an upload) otherwise.
    let r = api.req(
        "POST",
        &format!("local/push/blobs/uploads/?mount={layer_d}&from=local/pull"),
        &[],
        &[],
    );
    assert_eq!(r.status, 201);
    assert_eq!(location(&r), format!("/v2/local/push/blobs/{layer_d}"));
    let r = api.req(
        "POST",
        &format!("local/push/blobs/uploads/?mount={missing}&from=local/pull"),
        &[],
        &[],
    );
    assert_eq!(r.status, 202);
    // A manifest referencing a blob the repository lacks is refused.
    let bad = manifest(&config, &[(&missing, 1)], None, None);
    let r = api.put_manifest("push", "bad", OCI_MANIFEST, &bad);
    assert_eq!(
        (r.status, r.oci_code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );
    // Manifests by tag and by digest.
    let pcfg = api.push_blob("push", b"{}");
    let m1 = manifest(&pcfg, &[(&layer_d, layer.len())], None, None);
    let m1_d = digest_of(&m1);
    let r = api.put_manifest("push", "v1", OCI_MANIFEST, &m1);
    assert_eq!(r.status, 201);
    assert_eq!(location(&r), format!("/v2/local/push/manifests/{m1_d}"));
    assert_eq!(r.header("docker-content-digest"), Some(m1_d.as_str()));
    let m2 = manifest(&pcfg, &[(&d, blob.len())], None, None);
    let m2_d = digest_of(&m2);
    assert_eq!(
        api.put_manifest("push", &m2_d, OCI_MANIFEST, &m2).status,
        201
    );
    let r = api.put_manifest("push", &m1_d, OCI_MANIFEST, &m2);
    assert_eq!((r.status, r.oci_code().as_str()), (400, "DIGEST_INVALID"));

    // --- Content discovery ---
    for t in ["v2", "v3", "v4"] {
        assert_eq!(api.put_manifest("push", t, OCI_MANIFEST, &m1).status, 201);
    }
    let r = api.req("GET", "local/push/tags/list", &[], &[]);
    assert_eq!(
        r.json(),
        json!({"name": "local/push", "tags": ["v1", "v2", "v3", "v4"]})
    );
    let r = api.req("GET", "local/push/tags/list?n=2", &[], &[]);
    assert_eq!(r.json()["tags"], json!(["v1", "v2"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/local/push/tags/list?n=2&last=v2>; rel=\"next\"")
    );
    let r = api.req("GET", "local/push/tags/list?n=2&last=v2", &[], &[]);
    assert_eq!(r.json()["tags"], json!(["v3", "v4"]));
    let r = api.req("GET", "local/push/tags/list?last=v3", &[], &[]);
    assert_eq!(r.json()["tags"], json!(["v4"]));
    // Referrers: two artifacts with m1 as subject; the filter; an empty answer.
    let sig = manifest(
        &pcfg,
        &[],
        Some((&m1_d, m1.len())),
        Some("application/x-sig"),
    );
    let sbom = manifest(
        &pcfg,
        &[],
        Some((&m1_d, m1.len())),
        Some("application/x-sbom"),
    );
    for a in [&sig, &sbom] {
        let r = api.put_manifest("push", &digest_of(a), OCI_MANIFEST, a);
        assert_eq!(
            (r.status, r.header("oci-subject")),
            (201, Some(m1_d.as_str()))
        );
    }
    let r = api.req("GET", &format!("local/push/referrers/{m1_d}"), &[], &[]);
    assert_eq!((r.status, r.header("content-type")), (200, Some(OCI_INDEX)));
    let mut found: Vec<String> = r.json()["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["artifactType"].as_str().unwrap().to_string())
        .collect();
    found.sort();
    assert_eq!(found, ["application/x-sbom", "application/x-sig"]);
    let r = api.req(
        "GET",
        &format!("local/push/referrers/{m1_d}?artifactType=application/x-sig"),
        &[],
        &[],
    );
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let only = r.json()["manifests"].clone();
    assert_eq!(only.as_array().map(Vec::len), Some(1));
    assert_eq!(only[0]["digest"], json!(digest_of(&sig)));
    let r = api.req("GET", &format!("local/push/referrers/{m2_d}"), &[], &[]);
    assert_eq!((r.status, r.json()["manifests"].clone()), (200, json!([])));

    // --- Content management ---
    // Delete a tag: the manifest stays; delete the manifest: it is gone with its tags.
    assert_eq!(
        api.req("DELETE", "local/push/manifests/v4", &[], &[])
            .status,
        202
    );
    let r = api.req("GET", "local/push/tags/list", &[], &[]);
    assert_eq!(r.json()["tags"], json!(["v1", "v2", "v3"]));
    assert_eq!(
        api.req("GET", &format!("local/push/manifests/{m1_d}"), &[], &[])
            .status,
        200
    );
    let r = api.req("DELETE", &format!("local/push/manifests/{m1_d}"), &[], &[]);
    assert_eq!(r.status, 202);
    let r = api.req("GET", &format!("local/push/manifests/{m1_d}"), &[], &[]);
    assert_eq!((r.status, r.oci_code().as_str()), (404, "MANIFEST_UNKNOWN"));
    let r = api.req("GET", "local/push/manifests/v1", &[], &[]);
    assert_eq!(r.status, 404, "its tags went with it");
    let r = api.req("DELETE", &format!("local/push/manifests/{m1_d}"), &[], &[]);
    assert_eq!(r.status, 404, "deleting twice");
    // Blobs.
    assert_eq!(
        api.req("DELETE", &format!("local/push/blobs/{d}"), &[], &[])
            .status,
        202
    );
    let r = api.req("GET", &format!("local/push/blobs/{d}"), &[], &[]);
    assert_eq!((r.status, r.oci_code().as_str()), (404, "BLOB_UNKNOWN"));
    assert_eq!(
        api.req("DELETE", &format!("local/push/blobs/{d}"), &[], &[])
            .status,
        404
    );
    // Without credentials nothing is readable (anonymous_pull = false).
    let r = get(&format!("{}/v2/local/pull/manifests/tagged", api.m.url()));
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));
}
