//! Real-world upstreams: rate limits (`429`/`503` with `Retry-After`), Docker Hub's
//! rate-limit headers, and fallback URLs, against Distribution behind a pass-through that
//! can be told to refuse.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::passthrough::{Mode, Passthrough};
use common::*;
use tempfile::TempDir;

const ACCEPT_ALL: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

fn manifest(m: &Mirror, repo: &str, tag: &str) -> Reply {
    http(
        "GET",
        &format!("{}/v2/{repo}/manifests/{tag}", m.url()),
        &[("Accept", ACCEPT_ALL)],
    )
}

/// Requests the pass-through received since `from` (an index into its log).
fn since(p: &Passthrough, from: usize) -> usize {
    p.requests().len().saturating_sub(from)
}

#[test]
fn rate_limited_upstream_serves_stale_and_backs_off() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let one = layout.build("one", &[("a", &noise(20_000, 61))]);
    layout.push("one", &format!("{}/library/app:1", up.host()), None);
    layout.build("two", &[("b", &noise(20_000, 62))]);
    layout.push("two", &format!("{}/library/app:2", up.host()), None);
    let hub = Passthrough::start(&up.url());
    let quay = Passthrough::start(&up.url());
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{}\"\ntag_ttl = \"1s\"\n\
             [upstreams.\"quay.io\"]\nurl = \"{}\"\ntag_ttl = \"1s\"\n",
            hub.url(),
            quay.url()
        ),
    );

    let r = manifest(&mirror, "docker.io/library/app", "1");
    assert_eq!(r.header("docker-content-digest"), Some(one.as_str()));
    let labels = [("upstream", "docker.io")];
    assert_eq!(
        mirror.metric("entrepot_upstream_ratelimit_remaining", &labels),
        42.0
    );
    assert_eq!(
        mirror.metric("entrepot_upstream_ratelimit_limit", &labels),
        100.0
    );

    // Docker Hub says "slow down" for 30 s; the tag's TTL has run out.
    hub.set(Mode::Refuse(429, Some("30".into())));
    std::thread::sleep(Duration::from_millis(1100));
    let before = hub.requests().len();
    let start = Instant::now();
    for i in 0..20 {
        let r = manifest(&mirror, "docker.io/library/app", "1");
        assert_eq!(
            (r.status, r.header("docker-content-digest")),
            (200, Some(one.as_str())),
            "pull {i} while throttled is served stale"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(start.elapsed() >= Duration::from_secs(5));
    assert!(
        since(&hub, before) <= 1,
        "at most one upstream request in the window, got {}",
        since(&hub, before)
    );
    assert!(mirror.metric("entrepot_stale_serves_total", &labels) >= 19.0);
    assert!(mirror.metric("entrepot_upstream_rate_limited_total", &labels) >= 1.0);
    // Nothing cached: 429 TOOMANYREQUESTS with the Retry-After passed on, and still no
    // upstream request.
    let before = hub.requests().len();
    let r = manifest(&mirror, "docker.io/library/app", "2");
    assert_eq!((r.status, r.oci_code().as_str()), (429, "TOOMANYREQUESTS"));
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((20..=30).contains(&secs), "Retry-After {secs}");
    assert_eq!(since(&hub, before), 0);

    // 503 with an HTTP-date Retry-After: honoured, then the upstream is asked again.
    let when = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    quay.set(Mode::Refuse(503, Some(when)));
    let r = manifest(&mirror, "quay.io/library/app", "2");
    assert_eq!((r.status, r.oci_code().as_str()), (429, "TOOMANYREQUESTS"));
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&secs), "Retry-After {secs}");
    quay.set(Mode::Pass);
    let before = quay.requests().len();
    let r = manifest(&mirror, "quay.io/library/app", "2");
    assert_eq!(r.status, 429, "still in back-off");
    assert_eq!(since(&quay, before), 0);
    std::thread::sleep(Duration::from_secs(4));
    let r = manifest(&mirror, "quay.io/library/app", "2");
    assert_eq!(r.status, 200, "asked again once the Retry-After passed");
}

#[test]
fn fallback_urls_serve_verified_content_without_credentials() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("img", &[("f", &noise(300_000, 63))]);
    layout.push("img", &format!("{}/library/app:1", up.host()), None);
    let layer = layout.layers(&digest)[0].clone();
    // The fallback wants anonymous Bearer tokens (as Docker Hub-style registries do);
    // the primary fails with 500s.
    let fallback = Passthrough::start_bearer(&up.url());
    let primary = Passthrough::start(&up.url());
    primary.set(Mode::Refuse(500, None));
    let closed = format!("http://127.0.0.1:{}", free_port());
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{closed}\"\nusername = \"hub-user\"\npassword = \"hub-secret\"\n\
             fallback_urls = [\"{fb}\"]\n\
             [upstreams.\"quay.io\"]\nurl = \"{p}\"\nusername = \"quay-user\"\npassword = \"quay-secret\"\n\
             fallback_urls = [\"{fb}\"]\n",
            fb = fallback.url(),
            p = primary.url(),
        ),
    );

    // A closed-port primary: skopeo copies the image through the mirror (verifying every
    // digest itself), and the layer's bytes hash to its digest.
    let host = format!("127.0.0.1:{}", mirror.port);
    for prefix in ["docker.io", "quay.io"] {
        let out = tmp.path().join(format!("out-{prefix}"));
        run(Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{host}/{prefix}/library/app:1"))
            .arg(format!("oci:{}:x", out.display())));
        let r = get(&format!(
            "{}/v2/{prefix}/library/app/blobs/{layer}",
            mirror.url()
        ));
        assert_eq!(format!("sha256:{}", sha256_hex(&r.body)), layer);
        let r = manifest(&mirror, &format!("{prefix}/library/app"), "1");
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(format!("sha256:{}", sha256_hex(&r.body)), digest);
    }
    // The fallback's token endpoint was asked without credentials and its registry saw
    // only that anonymous token: the mirror's credentials never went there.
    let reqs = fallback.requests();
    let tokens: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.starts_with("/token"))
        .collect();
    assert!(
        !tokens.is_empty(),
        "anonymous token fetched from the fallback"
    );
    assert!(tokens.iter().all(|r| r.header("authorization").is_none()));
    let anon = format!("Bearer {}", common::passthrough::ANON_TOKEN);
    assert!(
        reqs.iter()
            .all(|r| r.header("authorization").is_none_or(|a| a == anon)),
        "no credentials sent to a fallback host"
    );
    assert!(
        primary.requests().len() <= 2,
        "the failing primary is in back-off after its 500: {} requests",
        primary.requests().len()
    );
    let answered = mirror.metric(
        "entrepot_upstream_answers_total",
        &[("upstream", "quay.io"), ("url", &fallback.url())],
    );
    assert!(answered >= 2.0, "answers counted by URL: {answered}");
    assert!(mirror.log().contains("answered by a fallback URL"));
    assert!(!mirror.log().contains("secret"));
}

/// One repository that the upstream refuses (`503 Retry-After: 600`, as any registry may
/// answer for one broken repository) holds that repository only, for at most 5 min:
/// other repositories are still fetched, and a private one pulled with a client's own
/// credentials is not affected. A 500 for one repository sends only that repository to
/// the fallback.
#[test]
fn one_refused_repository_holds_only_itself() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let mut digests = Vec::new();
    for (i, repo) in [
        "library/broken",
        "library/good",
        "library/other",
        "team/secret",
    ]
    .iter()
    .enumerate()
    {
        let tag = format!("t{i}");
        digests.push(layout.build(&tag, &[("f", &noise(10_000, 140 + i as u64))]));
        layout.push(&tag, &format!("{}/{repo}:1", up.host()), None);
    }
    let primary = Passthrough::start(&up.url());
    let fallback = Passthrough::start(&up.url());
    primary.set_for("library/broken", Mode::Refuse(503, Some("600".into())));
    primary.set_for("team/", Mode::RequireCredentials);
    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{}\"\n\
             [upstreams.\"quay.io\"]\nurl = \"{}\"\nfallback_urls = [\"{}\"]\n",
            primary.url(),
            primary.url(),
            fallback.url()
        ),
    );

    let r = manifest(&mirror, "docker.io/library/broken", "1");
    assert_eq!((r.status, r.oci_code().as_str()), (429, "TOOMANYREQUESTS"));
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((290..=300).contains(&secs), "capped at 5 min: {secs}");
    // The same repository again: held, nothing sent.
    let before = primary.requests().len();
    assert_eq!(
        manifest(&mirror, "docker.io/library/broken", "1").status,
        429
    );
    assert_eq!(since(&primary, before), 0);
    // Another repository, anonymous: fetched.
    let r = manifest(&mirror, "docker.io/library/good", "1");
    assert_eq!(r.header("docker-content-digest"), Some(digests[1].as_str()));
    assert!(since(&primary, before) >= 1);
    // A private repository with the client's own credentials: fetched with them.
    let owner = basic("owner", "s3cret");
    let r = http(
        "GET",
        &format!("{}/v2/docker.io/team/secret/manifests/1", mirror.url()),
        &[("Accept", ACCEPT_ALL), ("Authorization", &owner)],
    );
    assert_eq!(r.header("docker-content-digest"), Some(digests[3].as_str()));
    assert!(primary
        .requests()
        .iter()
        .any(|q| q.path.contains("/team/secret/") && q.header("authorization") == Some(&owner)));
    let held = [
        ("upstream", "docker.io"),
        ("scope", "repository"),
        ("reason", "rate_limited"),
    ];
    assert_eq!(mirror.metric("entrepot_upstream_holds_total", &held), 1.0);
    assert!(
        mirror.log().contains("scope=\"repository\"") || mirror.log().contains("scope=repository")
    );

    // A 500 for one repository with a fallback: that repository goes to the fallback,
    // the others still to the primary.
    primary.set_for("library/broken", Mode::Refuse(500, None));
    let r = manifest(&mirror, "quay.io/library/broken", "1");
    assert_eq!(r.header("docker-content-digest"), Some(digests[0].as_str()));
    let (p0, f0) = (primary.requests().len(), fallback.requests().len());
    let r = manifest(&mirror, "quay.io/library/other", "1");
    assert_eq!(r.header("docker-content-digest"), Some(digests[2].as_str()));
    assert!(
        since(&primary, p0) >= 1,
        "the primary still answers other repositories"
    );
    assert_eq!(since(&fallback, f0), 0);
    // Docker Hub's "pull limit used up" (ratelimit-remaining: 0) is upstream-wide: every
    // repository is held for that identity (a client's own credentials are held apart:
    // see the unit tests of upstream::backoff).
    primary.set_for("library/other", Mode::Exhausted(429, Some("60".into())));
    assert_eq!(
        manifest(&mirror, "docker.io/library/other", "1").status,
        429
    );
    let before = primary.requests().len();
    let r = manifest(&mirror, "docker.io/library/good", "2");
    assert_eq!((r.status, r.oci_code().as_str()), (429, "TOOMANYREQUESTS"));
    assert_eq!(since(&primary, before), 0, "held without asking");
    let wide = [
        ("upstream", "docker.io"),
        ("scope", "upstream"),
        ("reason", "ratelimit_exhausted"),
    ];
    assert_eq!(mirror.metric("entrepot_upstream_holds_total", &wide), 1.0);
}
