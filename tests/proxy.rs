//! Upstreams behind a corporate egress proxy (issue 27): a real squid on loopback, with
//! names only it can resolve, so a request that did not go through it cannot succeed.
//! Cold pulls through it (absolute-URI for http://, CONNECT for https://), NO_PROXY hosts
//! reached directly, a proxy login whose password never shows, a refusing proxy named in
//! the error, and stale serving while the proxy is down.

mod common;

use std::process::Command;

use common::proxy::{secret_file, Squid};
use common::*;
use tempfile::TempDir;

/// A name that resolves only in squid's hosts file.
const CORP: &str = "registry.corp.test";

fn require_squid() -> bool {
    require(PEERS) && require(&["squid"])
}

/// An image pushed to `up` as `library/app:1`: (manifest digest, layers).
fn image(tmp: &TempDir, up: &Registry, seed: u64) -> (String, Vec<String>) {
    let layout = Layout::new(tmp.path());
    let digest = layout.build("app", &[("a", &noise(150_000, seed))]);
    layout.push("app", &format!("{}/library/app:1", up.host()), None);
    let layers = layout.layers(&digest);
    (digest, layers)
}

/// Lines of squid's log for requests to `what` (e.g. `registry.corp.test:5000`).
fn proxied(squid: &Squid, what: &str) -> usize {
    squid.log().lines().filter(|l| l.contains(what)).count()
}

#[test]
fn a_cold_pull_goes_through_the_environments_proxy() {
    if !require_squid() {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let (digest, layers) = image(&tmp, &up, 281);
    let squid = Squid::start(&[(CORP, "127.0.0.1")], None);
    let target = format!("{CORP}:{}", up.port);
    let m = Mirror::start_env(
        "",
        &format!("[upstreams.\"docker.io\"]\nurl = \"http://{target}\"\n"),
        &[("HTTP_PROXY", &squid.url()), ("NO_PROXY", "")],
    );
    // skopeo copies the image out of the mirror; every byte came through squid.
    let out = tmp.path().join("copy");
    run(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!(
            "docker://127.0.0.1:{}/docker.io/library/app:1",
            m.port
        ))
        .arg(format!("dir:{}", out.display())));
    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&manifest)), digest);
    for l in &layers {
        let bytes = std::fs::read(out.join(&l[7..])).unwrap();
        assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), *l);
    }
    // Absolute-URI requests, as many as the upstream answered.
    squid.wait_logged(&format!(
        "GET http://{target}/v2/library/app/blobs/{}",
        layers[0]
    ));
    let blob_gets = up.count("GET", "/blobs/");
    assert!(blob_gets >= 1);
    assert_eq!(
        squid
            .log()
            .lines()
            .filter(|l| l.contains(&format!("GET http://{target}/v2/library/app/blobs/")))
            .count(),
        blob_gets,
        "every upstream blob GET went through the proxy:\n{}",
        squid.log()
    );
    assert!(m.log().contains(&format!("docker.io=http://{target}/")));
}

#[test]
fn an_https_upstream_goes_through_connect_and_no_proxy_hosts_directly() {
    if !require_squid() {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let (ca, cert, key) = make_tls(tmp.path());
    let secure = Registry::start_tls(&cert, &key);
    let (digest, layers) = image(&tmp, &secure, 282);
    let internal = Registry::start(Auth::Anonymous);
    let tmp2 = TempDir::new().unwrap();
    let (digest2, layers2) = image(&tmp2, &internal, 283);
    let squid = Squid::start(&[("localhost", "127.0.0.1")], None);
    let m = Mirror::start_env(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"https://localhost:{}\"\nca_file = \"{}\"\n\
             [upstreams.internal]\nurl = \"http://127.0.0.1:{}\"\n",
            secure.port,
            ca.display(),
            internal.port
        ),
        &[
            ("HTTPS_PROXY", &squid.url()),
            ("HTTP_PROXY", &squid.url()),
            ("NO_PROXY", &format!("127.0.0.1:{}", internal.port)),
        ],
    );
    pull_checked(&m.url(), "docker.io/library/app", "1", &layers, None);
    pull_checked(&m.url(), "internal/library/app", "1", &layers2, None);
    // TLS end to end: squid saw a tunnel to the host, not the requests in it (it logs a
    // tunnel when it closes: the mirror's pooled connections close with it).
    let mut m = m;
    m.stop();
    squid.wait_logged(&format!("CONNECT localhost:{}", secure.port));
    assert!(!squid.log().contains("/v2/library/app"), "{}", squid.log());
    // The NO_PROXY host (named with its port) was reached directly.
    assert_eq!(proxied(&squid, &format!("127.0.0.1:{}", internal.port)), 0);
    assert!(internal.count("GET", "/v2/library/app/blobs/") >= 1);
    assert!(!digest.is_empty() && !digest2.is_empty());
}

#[test]
fn a_proxy_login_works_and_its_password_never_shows() {
    if !require_squid() {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let (_, layers) = image(&tmp, &up, 284);
    const PASSWORD: &str = "s3cret-Proxy_pw";
    let squid = Squid::start(&[(CORP, "127.0.0.1")], Some(("corp", PASSWORD)));
    let pw = secret_file(tmp.path(), "proxy-pw", &format!("{PASSWORD}\n"));
    let m = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"http://{CORP}:{}\"\nproxy = \"http://corp@127.0.0.1:{}\"\nproxy_password_file = \"{}\"\n\
             [upstreams.direct]\nurl = \"http://127.0.0.1:{}\"\nproxy = \"none\"\n",
            up.port,
            squid.port,
            pw.display(),
            up.port
        ),
    );
    pull_checked(&m.url(), "docker.io/library/app", "1", &layers, None);
    squid.wait_logged(&format!(
        "GET http://{CORP}:{}/v2/library/app/blobs/",
        up.port
    ));
    assert!(
        squid
            .log()
            .lines()
            .any(|l| l.contains(&format!("GET http://{CORP}:")) && l.contains(" corp ")),
        "the proxy saw the user: {}",
        squid.log()
    );
    // proxy = "none": straight to the registry.
    pull_checked(&m.url(), "direct/library/app", "1", &layers, None);
    assert_eq!(proxied(&squid, &format!("127.0.0.1:{}", up.port)), 0);
    let metrics = String::from_utf8(get(&format!("{}/metrics", m.url())).body).unwrap();
    let page = String::from_utf8(get(&format!("{}/", m.url())).body).unwrap();
    for (what, text) in [
        ("log", m.log()),
        ("metrics", metrics),
        ("status page", page),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "the {what} shows the proxy password"
        );
    }
}

#[test]
fn a_refusing_proxy_is_named_and_cached_tags_are_served_stale() {
    if !require_squid() {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let (ca, cert, key) = make_tls(tmp.path());
    let secure = Registry::start_tls(&cert, &key);
    image(&tmp, &secure, 285);
    let plain = Registry::start(Auth::Anonymous);
    let tmp2 = TempDir::new().unwrap();
    let (_, layers) = image(&tmp2, &plain, 286);
    let mut squid = Squid::start(&[(CORP, "127.0.0.1")], Some(("corp", "right")));
    let wrong = format!("http://corp:wrong@127.0.0.1:{}", squid.port);
    let right = format!("http://corp:right@127.0.0.1:{}", squid.port);
    let m = Mirror::start(
        "",
        &format!(
            "[upstreams.tls]\nurl = \"https://localhost:{}\"\nca_file = \"{}\"\nproxy = \"{wrong}\"\n\
             [upstreams.plain]\nurl = \"http://{CORP}:{}\"\nproxy = \"{wrong}\"\n\
             [upstreams.good]\nurl = \"http://{CORP}:{}\"\nproxy = \"{right}\"\ntag_ttl = \"1s\"\n",
            secure.port,
            ca.display(),
            plain.port,
            plain.port
        ),
    );
    let proxy = format!("egress proxy http://127.0.0.1:{}", squid.port);
    // A 407 to CONNECT (https) and to an absolute-URI request (http): named, with the answer.
    for repo in ["tls/library/app", "plain/library/app"] {
        let r = get(&format!("{}/v2/{repo}/manifests/1", m.url()));
        let msg = String::from_utf8_lossy(&r.body).into_owned();
        assert!(
            r.status == 503 && msg.contains(&proxy) && msg.contains("407"),
            "{repo}: {} {msg}",
            r.status
        );
        assert!(!msg.contains("wrong"), "no password in the message: {msg}");
    }
    // A cached tag is served while the proxy is down; anything else names the proxy.
    pull_checked(&m.url(), "good/library/app", "1", &layers, None);
    squid.stop();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    pull_checked(&m.url(), "good/library/app", "1", &layers, None);
    assert_eq!(
        m.metric("entrepot_stale_serves_total", &[("upstream", "good")]),
        1.0
    );
    let r = get(&format!("{}/v2/good/library/other/manifests/1", m.url()));
    let msg = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        r.status == 503 && msg.contains(&proxy) && msg.contains("cannot connect to the proxy"),
        "{} {msg}",
        r.status
    );
}

/// The S3 client follows the same decision as every other request: through the proxy
/// from the environment, and directly for an endpoint `NO_PROXY` names with its port
/// (which reqwest alone would not honour).
#[test]
fn the_bucket_is_reached_as_the_environment_says() {
    if !require_squid() {
        return;
    }
    let Some(bin) = common::garage::require_garage() else {
        return;
    };
    let g = common::garage::Garage::start(&bin);
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let (_, layers) = image(&tmp, &up, 287);
    let squid = Squid::start(&[(CORP, "127.0.0.1")], None);
    let endpoint = g.endpoint(0).trim_start_matches("http://").to_string();
    let upstream = format!(
        "[upstreams.\"docker.io\"]\nurl = \"http://{CORP}:{}\"\n",
        up.port
    );
    let via = Mirror::start_env(
        &g.s3_section(0, "via/"),
        &upstream,
        &[("HTTP_PROXY", &squid.url()), ("NO_PROXY", "")],
    );
    pull_checked(&via.url(), "docker.io/library/app", "1", &layers, None);
    via.settle();
    squid.wait_logged(&format!("PUT http://{endpoint}/entrepot/via/"));
    drop(via);
    let direct = Mirror::start_env(
        &g.s3_section(0, "direct/"),
        &upstream,
        &[("HTTP_PROXY", &squid.url()), ("NO_PROXY", &endpoint)],
    );
    pull_checked(&direct.url(), "docker.io/library/app", "1", &layers, None);
    direct.settle();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let through: Vec<String> = squid
        .log()
        .lines()
        .filter(|l| l.contains(&format!("{endpoint}/entrepot/direct/")))
        .map(String::from)
        .collect();
    assert!(
        through.is_empty(),
        "NO_PROXY {endpoint} keeps the bucket off the proxy: {through:#?}"
    );
}

/// A token-auth upstream behind the proxy, its realm a name only the proxy resolves:
/// the token is fetched through the proxy too (a realm the mirror cannot resolve is
/// checked by its form and handed to the proxy by name).
#[test]
fn token_realms_go_through_the_proxy_too() {
    if !require_squid() {
        return;
    }
    const AUTH: &str = "auth.corp.test";
    let up = Registry::start(Auth::TokenAt(AUTH));
    let squid = Squid::start(&[(CORP, "127.0.0.1"), (AUTH, "127.0.0.1")], None);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("app", &[("a", &noise(40_000, 288))]);
    // skopeo pushes through the same proxy (it cannot resolve the realm either).
    let mut push = Command::new("skopeo");
    push.args(["copy", "--dest-tls-verify=false"])
        .env("HTTP_PROXY", squid.url())
        .arg(format!("oci:{}:app", layout.dir.display()))
        .arg(format!("docker://{}/library/app:1", up.host()));
    run(&mut push);
    let m = Mirror::start_env(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"http://{CORP}:{}\"\n",
            up.port
        ),
        &[("HTTP_PROXY", &squid.url()), ("NO_PROXY", "")],
    );
    pull_checked(
        &m.url(),
        "docker.io/library/app",
        "1",
        &layout.layers(&digest),
        None,
    );
    let port = up.token.as_ref().expect("issuer").port;
    squid.wait_logged(&format!("GET http://{AUTH}:{port}/token?"));
}
