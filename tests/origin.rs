//! Credentials never leave their origin: an upstream's (or a client's) credentials go only
//! to the upstream's own origin and to a token realm that origin named. A redirect target
//! on another host (127.0.0.2 here) that challenges for credentials gets none, and its
//! challenge is never taken as the upstream's.

mod common;

use common::fake::{FakeServer, Request, Response};
use common::*;

const MANIFEST: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;

/// Another host: every request but its `/token` gets a Bearer challenge naming its own
/// realm, and the token it hands out is never accepted (so a client that answers the
/// challenge with credentials shows them at `/token`).
fn hostile_target() -> FakeServer {
    let realm = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let r = realm.clone();
    let server = FakeServer::start_on("127.0.0.2", move |req| {
        if req.path.starts_with("/token") {
            let body = br#"{"token":"never-accepted","expires_in":300}"#.to_vec();
            return Response::new(200, &[("Content-Type", "application/json")], body);
        }
        let realm = r.lock().map(|g| g.clone()).unwrap_or_default();
        let c = format!("Bearer realm=\"{realm}\",service=\"elsewhere\"");
        Response::new(401, &[("WWW-Authenticate", c.as_str())], vec![])
    });
    if let Ok(mut g) = realm.lock() {
        *g = format!("{}/token", server.url());
    }
    server
}

/// A registry that wants `expected` as Basic credentials (a Basic challenge otherwise),
/// serves a manifest for any repository and redirects blob GETs to `target`.
fn registry(expected: String, target: String) -> FakeServer {
    let digest = format!("sha256:{}", sha256_hex(MANIFEST));
    FakeServer::start(move |req: &Request| {
        if req.header("authorization") != Some(expected.as_str()) {
            return Response::new(401, &[("WWW-Authenticate", "Basic realm=\"r\"")], vec![]);
        }
        if req.path.contains("/blobs/") {
            let loc = format!("{target}/cdn/{}", req.path.rsplit('/').next().unwrap_or(""));
            return Response::new(307, &[("Location", loc.as_str())], vec![]);
        }
        Response::new(
            200,
            &[
                ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
                ("Docker-Content-Digest", digest.as_str()),
            ],
            MANIFEST.to_vec(),
        )
    })
}

/// Every Authorization header the target received, by path.
fn credentials_at(target: &FakeServer) -> Vec<(String, String)> {
    target
        .requests()
        .iter()
        .filter_map(|r| {
            r.header("authorization")
                .map(|a| (r.path.clone(), a.to_string()))
        })
        .filter(|(_, a)| !a.starts_with("Bearer never-accepted"))
        .collect()
}

fn blob_url(mirror: &Mirror, upstream: &str, repo: &str) -> String {
    let d = format!("sha256:{}", sha256_hex(b"some layer"));
    format!("{}/v2/{upstream}/{repo}/blobs/{d}", mirror.url())
}

#[test]
fn a_redirect_targets_challenge_gets_none_of_the_configured_credentials() {
    let target = hostile_target();
    let mine = basic("mirror", "pw");
    let reg = registry(mine.clone(), target.url());
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"hub\"]\nurl = \"{}\"\nusername = \"mirror\"\npassword = \"pw\"\n",
            reg.url()
        ),
    );
    // A pull starts with the manifest: the registry's Basic challenge is known from then.
    let r = get(&format!("{}/v2/hub/lib/app/manifests/1", mirror.url()));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = get(&blob_url(&mirror, "hub", "lib/app"));
    assert_ne!(r.status, 200, "the target never serves the blob");
    assert!(
        !target.requests().is_empty(),
        "the redirect was followed to the target"
    );
    assert_eq!(
        credentials_at(&target),
        Vec::<(String, String)>::new(),
        "the target and the realm it named got no credentials"
    );

    // The target's challenge was not kept as the upstream's: an unrelated pull goes to
    // the registry with its Basic credentials, and nothing of it to the target.
    let before = target.requests().len();
    let r = get(&format!("{}/v2/hub/other/app/manifests/1", mirror.url()));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(sha256_hex(&r.body), sha256_hex(MANIFEST));
    assert_eq!(
        target.requests().len(),
        before,
        "nothing more reached the target"
    );
    assert!(reg
        .requests()
        .iter()
        .any(|q| q.path.contains("/other/app/") && q.header("authorization") == Some(&mine)));
}

#[test]
fn a_redirect_targets_challenge_gets_none_of_a_clients_credentials() {
    let target = hostile_target();
    let owner = basic("owner", "s3cret");
    let reg = registry(owner.clone(), target.url());
    let mirror = Mirror::start(
        "",
        &format!("[upstreams.\"corp\"]\nurl = \"{}\"\n", reg.url()),
    );
    let url = blob_url(&mirror, "corp", "team/secret");
    let r = http("GET", &url, &[("Authorization", &owner)]);
    assert_ne!(r.status, 200, "the target never serves the blob");
    assert!(
        reg.requests()
            .iter()
            .any(|q| q.path.contains("/blobs/") && q.header("authorization") == Some(&owner)),
        "the client's credentials went to the registry itself"
    );
    assert!(!target.requests().is_empty(), "the redirect was followed");
    assert_eq!(credentials_at(&target), Vec::<(String, String)>::new());

    // No challenge of the target's is kept for the upstream: a new repository's
    // anonymous request sends nothing to the target's realm.
    let before = target.requests().len();
    let r = get(&format!("{}/v2/corp/other/app/manifests/1", mirror.url()));
    assert_eq!(r.status, 401, "anonymous gets the registry's refusal");
    assert_eq!(target.requests().len(), before);
}
