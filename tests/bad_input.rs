//! Bad input gets a 4xx OCI error, never a panic, a 500 or a file outside the store.
//! Needs no peers: the upstreams are a closed port and a hostile server in this file.

mod common;

use common::fake::{FakeServer, Response};
use common::*;

#[test]
fn bad_requests_get_oci_errors() {
    // A hostile "registry" that answers everything with a 5 MiB manifest.
    let hostile = FakeServer::start(|_| {
        let ct = ("Content-Type", "application/vnd.oci.image.manifest.v1+json");
        Response::new(200, &[ct], vec![b' '; 5 << 20])
    });
    let rest = format!(
        "[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:9\"\n[upstreams.\"hostile.io\"]\nurl = \"{}\"\n",
        hostile.url()
    );
    let mirror = Mirror::start("", &rest);
    let m = mirror.url();
    let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let cases: &[(&str, u16, &str)] = &[
        ("/v2/../etc/passwd/manifests/latest", 400, "NAME_INVALID"),
        (
            "/v2/%2e%2e/%2e%2e/etc/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/docker.io/%2E%2E/x/blobs/sha256:00",
            400,
            "DIGEST_INVALID",
        ),
        ("/v2//etc/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/docker.io/UPPER/manifests/latest", 400, "NAME_INVALID"),
        // A malformed reference names no manifest (OCI conformance): 404 on reads.
        ("/v2/docker.io/a/manifests/..", 404, "MANIFEST_UNKNOWN"),
        (
            "/v2/docker.io/a/manifests/sha256:zz",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/docker.io/a/manifests/.INVALID_MANIFEST_NAME",
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/docker.io/a/blobs/sha512:abcd", 400, "DIGEST_INVALID"),
        ("/v2/docker.io/a/blobs/md5:../../x", 400, "DIGEST_INVALID"),
        ("/v2/docker.io/a/nothing", 404, "NAME_UNKNOWN"),
        ("/v2/x/manifests/1?ns=evil.example.com", 404, "NAME_UNKNOWN"),
        ("/v2/x/manifests/1", 404, "NAME_UNKNOWN"),
        ("/etc/passwd", 404, "NAME_UNKNOWN"),
    ];
    for (path, status, code) in cases {
        let r = raw(mirror.port, "GET", path, &[]);
        assert_eq!(
            (r.status, r.oci_code().as_str()),
            (*status, *code),
            "{path}"
        );
    }
    // (Several ranges are valid: tests/ranges.rs.)
    for range in [
        "bytes=9-1",
        "bytes=0-1,9-1",
        "bytes=0-1,",
        "pages=1-2",
        "bytes=x-",
    ] {
        let r = raw(
            mirror.port,
            "GET",
            &format!("/v2/docker.io/a/blobs/{d}"),
            &[("Range", range)],
        );
        assert_eq!(
            (r.status, r.oci_code().as_str()),
            (416, "RANGE_INVALID"),
            "{range}"
        );
    }
    let r = http("DELETE", &format!("{m}/v2/docker.io/a/manifests/1"), &[]);
    assert_eq!((r.status, r.oci_code().as_str()), (405, "UNSUPPORTED"));

    // An upstream that is down: a clean 503, not a hang or a 500.
    let r = get(&format!("{m}/v2/docker.io/library/x/manifests/1"));
    assert_eq!((r.status, r.oci_code().as_str()), (503, "UNAVAILABLE"));

    // An oversize manifest from upstream is refused, not buffered or stored.
    let r = get(&format!("{m}/v2/hostile.io/a/manifests/1"));
    assert_eq!((r.status, r.oci_code().as_str()), (400, "MANIFEST_INVALID"));
    assert_eq!(
        hostile.requests().len(),
        1,
        "the unknown ns made no connection; hostile got one"
    );

    // The ping challenges anonymous callers (as Docker Hub does): Docker, podman and
    // skopeo only send credentials, or fetch an anonymous token, after that challenge.
    let ok = get(&format!("{m}/v2/"));
    assert_eq!(ok.status, 401);
    assert_eq!(
        ok.header("www-authenticate"),
        Some(format!("Bearer realm=\"{m}/token\",service=\"entrepot\"").as_str())
    );
    assert_eq!(
        ok.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert!(!mirror.log().contains("panicked"));
    assert_eq!(
        std::fs::read_dir(mirror.store.join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}
