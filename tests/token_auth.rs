//! The mirror's token endpoint and Bearer challenges: grants, refusals, expiry, tampering,
//! realms behind a proxy, and replicas that share a key.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use tempfile::TempDir;

/// A mirror with hosted prefix `local`, alice (may push) and bob, and `extra` lines in
/// `[auth]` (e.g. the token key and TTL) and `[server]`.
fn mirror(tmp: &TempDir, server: &str, auth: &str) -> Mirror {
    let file = tmp.path().join("htpasswd");
    if !file.exists() {
        htpasswd(tmp.path(), &[("alice", "alice-pw"), ("bob", "bob-pw")]);
    }
    Mirror::start(
        server,
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\npush = [\"alice\"]\n{auth}\n",
            file.display()
        ),
    )
}

/// Asks the token endpoint for `scope` with optional credentials.
fn token(m: &Mirror, scope: &str, creds: Option<(&str, &str)>) -> Reply {
    let url = format!(
        "{}/token?service=entrepot&scope={}",
        m.url(),
        scope.replace(':', "%3A").replace(',', "%2C")
    );
    match creds {
        Some((u, p)) => http("GET", &url, &[("Authorization", &basic(u, p))]),
        None => get(&url),
    }
}

/// The `access` claim of a token (its payload, read without checking the signature).
fn access(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("jwt payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice::<Value>(&bytes).expect("claims")["access"].clone()
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[test]
fn token_endpoint_grants_what_the_acl_allows_and_refuses_the_rest() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let m = mirror(&tmp, "", "token_ttl = \"3s\"");
    let app = "repository:local/app:pull,push";

    // Anonymous: pull only, even when push is asked for.
    let r = token(&m, app, None);
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["token"], body["access_token"]);
    assert_eq!(body["expires_in"], 3);
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'));
    let anon = body["token"].as_str().unwrap().to_string();
    assert_eq!(
        access(&anon),
        json!([{"type": "repository", "name": "local/app", "actions": ["pull"]}])
    );
    // alice may push; bob may not; a wrong password gets no token at all.
    let alice = token(&m, app, Some(("alice", "alice-pw"))).json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(access(&alice)[0]["actions"], json!(["pull", "push"]));
    let bob = token(&m, app, Some(("bob", "bob-pw"))).json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(access(&bob)[0]["actions"], json!(["pull"]));
    let r = token(&m, app, Some(("alice", "wrong")));
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));

    // The tokens at work: alice starts an upload; the anonymous token is refused with
    // a challenge naming the scope; Basic credentials keep working.
    let start = format!("{}/v2/local/app/blobs/uploads/", m.url());
    assert_eq!(
        http("POST", &start, &[("Authorization", &bearer(&alice))]).status,
        202
    );
    let r = http("POST", &start, &[("Authorization", &bearer(&anon))]);
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"{}/token\",service=\"entrepot\",scope=\"{app}\"",
                m.url()
            )
            .as_str()
        )
    );
    let r = http(
        "POST",
        &start,
        &[("Authorization", &basic("alice", "alice-pw"))],
    );
    assert_eq!(r.status, 202);
    let tags = format!("{}/v2/local/app/tags/list", m.url());
    assert_eq!(
        http("GET", &tags, &[("Authorization", &bearer(&anon))]).status,
        404,
        "a pull token passes auth (the repository is empty)"
    );
    // A token for one repository does not open another.
    let r = http(
        "GET",
        &format!("{}/v2/local/other/tags/list", m.url()),
        &[("Authorization", &bearer(&alice))],
    );
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("scope=\"repository:local/other:pull\""));

    // An altered token (payload swapped for one granting push) is refused.
    let parts: Vec<&str> = anon.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        alice.split('.').nth(1).unwrap(),
        parts[2]
    );
    let r = http("POST", &start, &[("Authorization", &bearer(&forged))]);
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));
    // An expired one too.
    std::thread::sleep(Duration::from_secs(4));
    let r = http("POST", &start, &[("Authorization", &bearer(&alice))]);
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));
}

#[test]
fn realm_follows_the_proxy_or_external_url_and_replicas_share_tokens() {
    if !require(&["htpasswd"]) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let key = "token_key = \"shared-secret-of-the-cluster-0123\"";
    // Forwarded headers count from a trusted proxy (here: the test, on 127.0.0.1).
    let a = mirror(&tmp, "trusted_proxies = [\"127.0.0.1\"]", key);
    let r = http(
        "GET",
        &format!("{}/v2/", a.url()),
        &[
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "mirror.example.com"),
        ],
    );
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (
            401,
            Some("Bearer realm=\"https://mirror.example.com/token\",service=\"entrepot\"")
        )
    );
    let b = mirror(
        &tmp,
        "external_url = \"https://registry.example.com/\"",
        key,
    );
    let r = get(&format!("{}/v2/local/app/tags/list?n=x", b.url()));
    assert_eq!(
        r.status, 400,
        "pagination checked after auth: anonymous pull is on"
    );
    let r = http(
        "DELETE",
        &format!("{}/v2/local/app/manifests/latest", b.url()),
        &[],
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            "Bearer realm=\"https://registry.example.com/token\",service=\"entrepot\",scope=\"repository:local/app:delete\""
        )
    );
    // A token issued by one replica is accepted by another with the same key, not by a
    // mirror with its own.
    let t = token(
        &a,
        "repository:local/app:pull,push",
        Some(("alice", "alice-pw")),
    );
    let t = t.json()["token"].as_str().unwrap().to_string();
    let start = |m: &Mirror| format!("{}/v2/local/app/blobs/uploads/", m.url());
    let auth = [("Authorization", bearer(&t))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(http("POST", &start(&b), &auth).status, 202);
    let c = mirror(&tmp, "", "");
    assert_eq!(http("POST", &start(&c), &auth).status, 401);
}
