//! Upstream behaviour that real registries show but Distribution on a filesystem does not:
//! Docker Hub's 307 from the registry to a CDN, and an upstream whose digest header lies.

mod common;

use common::fake::{FakeServer, Response};
use common::*;

const USER: &str = "Basic bWlycm9yOnB3"; // mirror:pw

/// A registry that demands Basic auth and redirects blob GETs to `cdn`.
fn registry(cdn: String, manifest: Vec<u8>, manifest_digest: String) -> FakeServer {
    FakeServer::start(move |req| {
        if req.header("authorization") != Some(USER) {
            return Response::new(401, &[("WWW-Authenticate", "Basic realm=\"test\"")], vec![]);
        }
        if req.path.contains("/blobs/") {
            let digest = req.path.rsplit('/').next().unwrap_or("");
            let loc = format!("{cdn}/cdn/{digest}?sig=abc");
            return Response::new(307, &[("Location", loc.as_str())], vec![]);
        }
        if req.path.contains("/manifests/") {
            return Response::new(
                200,
                &[
                    ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
                    ("Docker-Content-Digest", manifest_digest.as_str()),
                ],
                manifest.clone(),
            );
        }
        Response::new(404, &[], vec![])
    })
}

#[test]
fn redirects_are_followed_without_leaking_the_upstream_authorization() {
    let blob = noise(300_000, 21);
    let digest = format!("sha256:{}", sha256_hex(&blob));
    let served = blob.clone();
    let cdn = FakeServer::start(move |_| Response::new(200, &[], served.clone()));
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let md = format!("sha256:{}", sha256_hex(&manifest));
    let reg = registry(cdn.url(), manifest, md);
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"hub\"]\nurl = \"{}\"\nusername = \"mirror\"\npassword = \"pw\"\n",
            reg.url()
        ),
    );

    let r = get(&format!("{}/v2/hub/lib/app/blobs/{digest}", mirror.url()));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, blob);
    let cdn_reqs = cdn.requests();
    assert_eq!(cdn_reqs.len(), 1, "one CDN fetch");
    assert!(
        cdn_reqs[0].path.ends_with("?sig=abc"),
        "Location used as given"
    );
    assert_eq!(
        cdn_reqs[0].header("authorization"),
        None,
        "no upstream credentials sent to the CDN"
    );
    let authed = reg
        .requests()
        .iter()
        .filter(|q| q.header("authorization") == Some(USER))
        .count();
    assert!(authed >= 1, "the registry itself got the credentials");
    mirror.settle();
    assert_eq!(
        mirror.store_files(&digest[7..]).len(),
        1,
        "verified and stored"
    );
}

#[test]
fn a_manifest_that_does_not_match_its_digest_header_is_refused() {
    let cdn = FakeServer::start(|_| Response::new(404, &[], vec![]));
    let manifest = br#"{"schemaVersion":2,"layers":[]}"#.to_vec();
    let wrong = format!("sha256:{}", sha256_hex(b"something else"));
    let reg = registry(cdn.url(), manifest.clone(), wrong);
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"hub\"]\nurl = \"{}\"\nusername = \"mirror\"\npassword = \"pw\"\n",
            reg.url()
        ),
    );
    for _ in 0..2 {
        let r = get(&format!("{}/v2/hub/lib/app/manifests/latest", mirror.url()));
        assert_eq!((r.status, r.oci_code().as_str()), (502, "UNAVAILABLE"));
    }
    assert_eq!(
        mirror.metric("entrepot_digest_mismatches_total", &[("upstream", "hub")]),
        2.0
    );
    assert!(
        mirror.store_files(&sha256_hex(&manifest)).is_empty(),
        "not stored"
    );
    // The by-digest form of the real content is refused the same way.
    let by_digest = format!("sha256:{}", sha256_hex(b"x"));
    let r = get(&format!(
        "{}/v2/hub/lib/app/manifests/{by_digest}",
        mirror.url()
    ));
    assert_eq!(r.status, 502);
}

/// An upstream with the OCI 1.1 referrers API (Distribution 2.8 has none): its answer is
/// used, and the fallback tag is never asked.
#[test]
fn referrers_api_of_an_upstream_that_has_one() {
    let subject = format!("sha256:{}", "ab".repeat(32));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{}", "cd".repeat(32)), "size": 10,
                       "artifactType": "application/x-sig"}],
    })
    .to_string()
    .into_bytes();
    let reg = FakeServer::start(move |req| {
        if req.path.contains("/referrers/") {
            let ct = [("Content-Type", "application/vnd.oci.image.index.v1+json")];
            return Response::new(200, &ct, index.clone());
        }
        Response::new(404, &[], vec![])
    });
    let mirror = Mirror::start(
        "",
        &format!("[upstreams.\"ghcr.io\"]\nurl = \"{}\"\n", reg.url()),
    );
    let url = format!("{}/v2/ghcr.io/org/app/referrers/{subject}", mirror.url());
    let r = get(&format!("{url}?artifactType=application/x-sbom"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["manifests"], serde_json::json!([]));
    let r = get(&url);
    assert_eq!(
        r.json()["manifests"][0]["artifactType"],
        "application/x-sig"
    );
    let asked: Vec<String> = reg.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        asked,
        [format!("/v2/org/app/referrers/{subject}")],
        "one API call, cached; no fallback tag"
    );
}

/// Hardening item 5: an upstream that answers its 401 in HTTP/1.0 and closes the
/// connection: the retry with credentials goes out on a new connection.
#[test]
fn credential_retry_after_an_http10_401_uses_a_new_connection() {
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#.to_vec();
    let digest = format!("sha256:{}", sha256_hex(&manifest));
    let (m, d) = (manifest.clone(), digest.clone());
    let reg = FakeServer::start(move |req| {
        if req.header("authorization") != Some(USER) {
            let c = [("WWW-Authenticate", "Basic realm=\"test\"")];
            // Alternately HTTP/1.0, and HTTP/1.1 closed without saying so.
            let r = Response::new(401, &c, vec![]);
            return if req.path.contains("/b") {
                r.silent_close()
            } else {
                r.http10()
            };
        }
        let h = [
            ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
            ("Docker-Content-Digest", d.as_str()),
        ];
        Response::new(200, &h, m.clone()).http10()
    });
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"hub\"]\nurl = \"{}\"\nusername = \"mirror\"\npassword = \"pw\"\n",
            reg.url()
        ),
    );
    for tag in ["a", "b", "c", "b2"] {
        let r = get(&format!("{}/v2/hub/lib/app/manifests/{tag}", mirror.url()));
        assert_eq!(
            r.status,
            200,
            "tag {tag}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    }
}
