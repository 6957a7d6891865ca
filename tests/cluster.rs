//! Replicas that cooperate: 3 entrepot processes with `[cluster]` on one bucket of a
//! 3-node Garage cluster (rf 3), behind a throttled Distribution upstream. Counts come from
//! the upstream's own access log and listings of the bucket.

mod common;

use std::time::Duration;

use common::garage::{require_garage, Garage};
use common::throttle::Throttle;
use common::*;
use sha2::Digest as _;

use common::garage::CLUSTER_SECRET as SECRET;

/// The Garage binary, with the other peers; `None` (skip) on a laptop without them.
fn garage() -> Option<std::path::PathBuf> {
    require(PEERS).then(require_garage).flatten()
}

/// Three replicas on ports chosen first, each naming all three as peers.
fn replicas(g: &Garage, upstream_url: &str, extra: &str) -> Vec<Mirror> {
    common::garage::replicas(g, 3, upstream_url, extra)
}

/// The rendezvous ranking entrepot uses: peers by sha256(peer "\n" key), first 8 bytes.
fn owner_rank(ms: &[Mirror], key: &str) -> Vec<usize> {
    let score = |m: &Mirror| {
        let h = sha2::Sha256::digest(format!("{}\n{key}", m.url()).as_bytes());
        u64::from_be_bytes(h[..8].try_into().unwrap())
    };
    let mut idx: Vec<usize> = (0..ms.len()).collect();
    idx.sort_by_key(|i| std::cmp::Reverse(score(&ms[*i])));
    idx
}

fn wait_all_up(ms: &[Mirror]) {
    for m in ms {
        wait_until("peers up", Duration::from_secs(20), || {
            m.metric("entrepot_cluster_peers", &[("state", "up")]) == 3.0
        });
    }
}

/// `n` concurrent GETs spread over `ms` (client i on replica i % len); their bodies' sha256.
fn pull_all(ms: &[&Mirror], path: &str, n: usize) -> Vec<String> {
    let urls: Vec<String> = (0..n)
        .map(|i| format!("{}{path}", ms[i % ms.len()].url()))
        .collect();
    let handles: Vec<_> = urls
        .into_iter()
        .map(|u| std::thread::spawn(move || sha256_hex(&get(&u).body)))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn one_upstream_fetch_per_blob_across_the_cluster() {
    let Some(bin) = garage() else { return };
    let g = Garage::start(&bin);
    let up = Registry::start(Auth::Anonymous);
    let blob = image::noise(6 << 20, 77);
    let d = up.push_blob("library/big", &blob);
    // 3 MB/s per connection: the fill takes about two seconds.
    let port: u16 = up.url().rsplit(':').next().unwrap().parse().unwrap();
    let slow = Throttle::start(port, 3_000_000);
    let ms = replicas(&g, &format!("http://127.0.0.1:{}", slow.port), "");
    wait_all_up(&ms);

    let refs: Vec<&Mirror> = ms.iter().collect();
    let path = format!("/v2/docker.io/library/big/blobs/{d}");
    let sums = pull_all(&refs, &path, 48);
    assert!(sums.iter().all(|s| *s == d[7..]), "48 intact bodies");
    wait_until("upstream log", Duration::from_secs(10), || {
        up.count("GET", "/blobs/") >= 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        up.count("GET", "/blobs/"),
        1,
        "one upstream GET for the cluster"
    );
    let owner = owner_rank(&ms, &d)[0];
    for (i, m) in ms.iter().enumerate() {
        let asked = m.metric(
            "entrepot_peer_requests_total",
            &[("direction", "out"), ("result", "ok")],
        );
        if i == owner {
            assert_eq!(asked, 0.0, "the owner asks nobody");
        } else {
            assert!(asked >= 1.0, "replica {i} asked the owner");
        }
    }

    // A tag asked through all three at once: one upstream manifest GET (by the owner).
    let tmp = tempfile::TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let img = layout.build("img", &[("f", b"one manifest fetch")]);
    layout.push("img", &format!("{}/library/app:1", up.host()), None);
    let answers: Vec<(u16, Option<String>, String)> = (0..12)
        .map(|i| format!("{}/v2/docker.io/library/app/manifests/1", ms[i % 3].url()))
        .map(|u| {
            std::thread::spawn(move || {
                let r = get(&u);
                let d = r.header("docker-content-digest").map(str::to_string);
                (r.status, d, String::from_utf8_lossy(&r.body).into_owned())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(
        answers.iter().all(|a| a.1.as_deref() == Some(img.as_str())),
        "{:?}",
        answers
            .iter()
            .filter(|a| a.1.as_deref() != Some(img.as_str()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        up.count("GET", "/manifests/1"),
        1,
        "one upstream GET of the tag"
    );

    // A peer request without (or with a wrong) secret: 401, and nothing fetched.
    let other = up.push_blob("library/big", &image::noise(1000, 78));
    let peer_url = format!(
        "{}/_entrepot/peer/blob?upstream=docker.io&repo=library/big&digest={other}",
        ms[0].url()
    );
    let before = up.count("GET", "/blobs/") + up.count("HEAD", "/blobs/");
    assert_eq!(http("GET", &peer_url, &[]).status, 401);
    assert_eq!(
        http("GET", &peer_url, &[("x-entrepot-cluster", "wrong")]).status,
        401
    );
    assert_eq!(
        http(
            "GET",
            &format!("{}/_entrepot/peer/health", ms[0].url()),
            &[]
        )
        .status,
        401
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        up.count("GET", "/blobs/") + up.count("HEAD", "/blobs/"),
        before
    );
    assert_eq!(
        ms[0].metric(
            "entrepot_peer_requests_total",
            &[("direction", "in"), ("result", "unauthorized")]
        ),
        3.0
    );

    // The bucket holds one object for the blob (written by the owner).
    wait_until("bucket copy", Duration::from_secs(20), || {
        ms[owner].metric("entrepot_s3_bytes_total", &[("direction", "out")]) >= blob.len() as f64
    });
    let written: f64 = ms
        .iter()
        .map(|m| m.metric("entrepot_s3_bytes_total", &[("direction", "out")]))
        .sum();
    assert!(
        written < blob.len() as f64 * 1.1,
        "the blob was written to the bucket once ({written} bytes for {})",
        blob.len()
    );
}

#[test]
fn clients_of_other_replicas_survive_the_owner_dying_mid_fill() {
    let Some(bin) = garage() else { return };
    let g = Garage::start(&bin);
    let up = Registry::start(Auth::Anonymous);
    let blob = image::noise(8 << 20, 91);
    let d = up.push_blob("library/kill", &blob);
    let port: u16 = up.url().rsplit(':').next().unwrap().parse().unwrap();
    let slow = Throttle::start(port, 2_000_000);
    let mut ms = replicas(&g, &format!("http://127.0.0.1:{}", slow.port), "");
    wait_all_up(&ms);
    let rank = owner_rank(&ms, &d);
    let owner = rank[0];
    let path = format!("/v2/docker.io/library/kill/blobs/{d}");
    let urls: Vec<String> = rank[1..]
        .iter()
        .flat_map(|i| std::iter::repeat_n(format!("{}{path}", ms[*i].url()), 8))
        .collect();
    let handles: Vec<_> = urls
        .into_iter()
        .map(|u| std::thread::spawn(move || get(&u)))
        .collect();
    // Mid-fill: the owner has been streaming for a second (of about four).
    std::thread::sleep(Duration::from_millis(1500));
    ms[owner].stop();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            sha256_hex(&r.body),
            d[7..],
            "every client gets the verified blob"
        );
    }
    let survivors: Vec<&Mirror> = rank[1..].iter().map(|i| &ms[*i]).collect();
    let next = survivors[0];
    assert!(
        next.metric(
            "entrepot_upstream_requests_total",
            &[
                ("upstream", "docker.io"),
                ("kind", "blob"),
                ("method", "GET")
            ]
        ) >= 1.0,
        "the next peer in rank took over the upstream fetch"
    );
}

#[test]
fn a_replica_that_never_saw_a_tag_serves_it_stale_when_the_upstream_is_down() {
    let Some(bin) = garage() else { return };
    let g = Garage::start(&bin);
    let mut up = Registry::start(Auth::Anonymous);
    let tmp = tempfile::TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let img = layout.build("img", &[("f", b"hello cluster")]);
    layout.push("img", &format!("{}/library/app:1", up.host()), None);
    let ms = replicas(&g, &up.url(), "tag_ttl = \"1s\"");
    let tag = |m: &Mirror| get(&format!("{}/v2/docker.io/library/app/manifests/1", m.url()));
    let r = tag(&ms[0]);
    assert_eq!(r.header("docker-content-digest"), Some(img.as_str()));
    up.stop();
    std::thread::sleep(Duration::from_millis(1200));
    let r = tag(&ms[2]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("docker-content-digest"), Some(img.as_str()));
    assert_eq!(
        ms[2].metric("entrepot_stale_serves_total", &[("upstream", "docker.io")]),
        1.0
    );
}

#[test]
fn cluster_config_mistakes_are_named() {
    let tmp = tempfile::TempDir::new().unwrap();
    let check = |extra: &str| {
        let cfg = store_config(
            tmp.path(),
            &format!("{extra}\n[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:1\"\n"),
        );
        let (ok, out) = entrepot_cli(tmp.path(), Some(&cfg), &["serve"]);
        assert!(!ok);
        out
    };
    let err = check("[cluster]\nself = \"http://127.0.0.1:5000\"\npeers = [\"http://127.0.0.1:5000\"]\nsecret = \"0123456789abcdef\"");
    assert!(err.contains("[cluster] needs [server.s3]"), "{err}");
    let s3 = "[server.s3]\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\n";
    let err = check(&format!("{s3}[cluster]\nself = \"http://127.0.0.1:5000\"\npeers = [\"http://127.0.0.1:5001\"]\nsecret = \"0123456789abcdef\""));
    assert!(err.contains("peers must include self"), "{err}");
    // An empty or short secret would let anyone call the peer routes.
    for short in ["", "   ", "short-secret"] {
        let err = check(&format!("{s3}[cluster]\nself = \"http://127.0.0.1:5000\"\npeers = [\"http://127.0.0.1:5000\"]\nsecret = \"{short}\""));
        assert!(err.contains("give at least 16"), "{short:?}: {err}");
    }
    let empty = tmp.path().join("empty-secret");
    std::fs::write(&empty, "\n").unwrap();
    let err = check(&format!("{s3}[cluster]\nself = \"http://127.0.0.1:5000\"\npeers = [\"http://127.0.0.1:5000\"]\nsecret_file = \"{}\"", empty.display()));
    assert!(err.contains("cluster secret is 0 bytes"), "{err}");
    let err = check(&format!(
        "{s3}[cluster]\nself = \"http://127.0.0.1:5000\"\npeers = [\"http://127.0.0.1:5000\"]"
    ));
    assert!(err.contains("secret"), "{err}");
}

/// A private repository (the upstream wants the owner's credentials) pulled by its owner
/// through replica A is never served to an anonymous caller by B or C, which asked about
/// it just before (each had seen it as "not private") and poll right after the pull; nor
/// by the peer route with the cluster secret.
#[test]
fn private_content_stays_private_on_every_replica() {
    let Some(bin) = garage() else { return };
    let g = Garage::start(&bin);
    let up = Registry::start(Auth::Basic("owner", "s3cret"));
    let tmp = tempfile::TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let manifest = layout.build("s", &[("secret", &image::noise(80_000, 231))]);
    layout.push(
        "s",
        &format!("{}/team/secret:1", up.host()),
        Some("owner:s3cret"),
    );
    let layer = layout.layers(&manifest)[0].clone();
    let ms = replicas(&g, &up.url(), "");
    wait_all_up(&ms);
    let path = |what: &str| format!("/v2/docker.io/team/secret/{what}");
    let paths = [
        path("manifests/1"),
        path(&format!("manifests/{manifest}")),
        path(&format!("blobs/{layer}")),
    ];
    // B and C ask first, anonymously: the upstream refuses them.
    for m in &ms[1..] {
        for p in &paths {
            assert_eq!(get(&format!("{}{p}", m.url())).status, 401, "{p}");
        }
    }
    let owner = basic("owner", "s3cret");
    let r = http(
        "GET",
        &format!("{}{}", ms[0].url(), paths[0]),
        &[("Authorization", &owner)],
    );
    assert_eq!(r.header("docker-content-digest"), Some(manifest.as_str()));
    let r = http(
        "GET",
        &format!("{}{}", ms[0].url(), paths[2]),
        &[("Authorization", &owner)],
    );
    assert_eq!(format!("sha256:{}", sha256_hex(&r.body)), layer);

    // An anonymous poller on B and C, right after the owner's pull, for 3 s.
    let start = std::time::Instant::now();
    let mut asked = 0;
    while start.elapsed() < Duration::from_secs(3) {
        for m in &ms[1..] {
            for p in &paths {
                let r = get(&format!("{}{p}", m.url()));
                assert_ne!(r.status, 200, "{p} served anonymously by {}", m.url());
                assert_eq!(r.status, 401, "{p}");
                asked += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(asked >= 12);
    // The peer route applies the same rule as the blob route.
    for (kind, q) in [
        ("manifest", "reference=1".to_string()),
        ("blob", format!("digest={layer}")),
    ] {
        let u = format!(
            "{}/_entrepot/peer/{kind}?upstream=docker.io&repo=team/secret&{q}",
            ms[1].url()
        );
        let r = http("GET", &u, &[("x-entrepot-cluster", SECRET)]);
        assert_eq!(r.status, 401, "peer/{kind}");
    }
    // The owner still pulls through every replica.
    for m in &ms {
        let r = http(
            "GET",
            &format!("{}{}", m.url(), paths[1]),
            &[("Authorization", &owner)],
        );
        assert_eq!(r.status, 200);
        assert_eq!(format!("sha256:{}", sha256_hex(&r.body)), manifest);
    }
}
