//! Lazy pulling and small requests. The last 1 MiB of a cold blob (a snapshotter's footer read) through
//! entrepot, a Distribution proxy and the upstream itself, on loopback; each round a
//! fresh blob; then the same behind a throttled 125 MB/s link. Run by hand:
//!
//! ```sh
//! apt-get install -y docker-registry curl nginx-light wrk
//! cargo bench --bench ranges          # BENCH_MIB=192 BENCH_ROUNDS=5
//! BENCH_SMALL_ONLY=1 cargo bench --bench ranges   # only the small requests
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use common::throttle::Throttle;
use common::*;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Small requests, entrepot against nginx serving the same bytes as a static file (wrk
/// -t2 -c64; HEAD with the harness's own keep-alive load, as wrk cannot): a manifest by
/// digest, by tag within its TTL, and a blob HEAD. nginx is run twice: without an
/// access log (issue 28's figure) and with one (the same work: entrepot logs every
/// request). Issue 28's goal: 0.8x nginx.
fn small_vs_static(up: &Registry, mirror: &Mirror) {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let c = up.push_blob("bench/app", config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    let r = send(
        &format!("{}/v2/bench/app/manifests/1", up.url()),
        "PUT",
        manifest.as_bytes(),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(r.status, 201, "push manifest");
    let d = format!("sha256:{}", sha256_hex(manifest.as_bytes()));
    let oci = Some("application/vnd.oci.image.manifest.v1+json");
    let base = format!("{}/v2/docker.io/bench/app", mirror.url());
    for what in [
        format!("manifests/{d}"),
        "manifests/1".into(),
        format!("blobs/{c}"),
    ] {
        assert_eq!(get(&format!("{base}/{what}")).status, 200, "{what}");
    }
    let secs = env_or("BENCH_SECS", 5) as u32;
    let nginx = |log: bool| {
        common::bench::Nginx::start(|dir, port| {
            std::fs::write(dir.join("manifest"), &manifest).expect("manifest");
            let log = if log {
                format!("access_log {}/access.log;", dir.display())
            } else {
                "access_log off;".into()
            };
            format!(
                "server {{ listen 127.0.0.1:{port}; {log} location = /manifest {{ alias {}/manifest; default_type application/vnd.oci.image.manifest.v1+json; }} }}",
                dir.display()
            )
        })
    };
    let (quiet, logged) = (nginx(false), nginx(true));
    let at = |n: &common::bench::Nginx| format!("http://127.0.0.1:{}/manifest", n.port);
    let rate = |url: &str, head: bool| {
        if head {
            let port = url
                .trim_start_matches("http://127.0.0.1:")
                .split('/')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port");
            let path = &url[url
                .find("/v2")
                .or_else(|| url.find("/manifest"))
                .expect("path")..];
            common::bench::head_load(port, path, secs)
        } else {
            wrk(url, "GET", oci, secs)
        }
    };
    println!("\n| wrk -t2 -c64 | entrepot | nginx static file, no log | nginx, access log | entrepot / nginx (no log, log) |\n|---|---|---|---|---|");
    for (label, what, head) in [
        ("manifest by digest", format!("manifests/{d}"), false),
        (
            "manifest by tag (within TTL)",
            "manifests/1".to_string(),
            false,
        ),
        (
            "blob HEAD (nginx: HEAD of the file)",
            format!("blobs/{c}"),
            true,
        ),
    ] {
        let (e, e99) = rate(&format!("{base}/{what}"), head);
        let (n, n99) = rate(&at(&quiet), head);
        let (l, l99) = rate(&at(&logged), head);
        println!(
            "| {label} | {e:.0} ({e99:.2} ms) | {n:.0} ({n99:.2} ms) | {l:.0} ({l99:.2} ms) | {:.2}x, {:.2}x |",
            e / n.max(1.0),
            e / l.max(1.0)
        );
    }
}

fn main() {
    if !require(&["docker-registry", "curl", "nginx", "wrk"]) {
        return;
    }
    if std::env::var("BENCH_SMALL_ONLY").is_ok() {
        let up = Registry::start(Auth::Anonymous);
        let mirror = Mirror::start(
            "",
            &format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n", up.url()),
        );
        return small_vs_static(&up, &mirror);
    }
    let mib = env_or("BENCH_MIB", 192);
    let rounds = env_or("BENCH_ROUNDS", 5);
    let up = Registry::start(Auth::Anonymous);
    println!("| last 1 MiB of a cold {mib} MiB blob, median of {rounds} | entrepot | Distribution proxy | upstream directly | entrepot / upstream |\n|---|---|---|---|---|");
    let mirror = tails("loopback", &up, &up.url(), mib, rounds, 500);
    // The same behind a link of 125 MB/s (every byte from the upstream paced, the
    // direct reads included).
    let mbs = env_or("BENCH_LINK_MBS", 125);
    let link = Throttle::start(up.port, mbs * 1_000_000);
    let via = format!("http://127.0.0.1:{}", link.port);
    drop(tails(
        &format!("{mbs} MB/s link"),
        &up,
        &via,
        mib,
        rounds,
        600,
    ));
    small_vs_static(&up, &mirror);
}

/// Rounds of a tail read of a fresh cold blob through a mirror and a proxy of `via`
/// (the upstream, or a throttle in front of it) and from `via` itself; prints the row
/// and returns the mirror.
fn tails(label: &str, up: &Registry, via: &str, mib: usize, rounds: usize, seed: u64) -> Mirror {
    let mirror = Mirror::start("", &format!("[upstreams.\"docker.io\"]\nurl = \"{via}\"\n"));
    let proxy = Registry::start_proxy(via);
    let tail = format!("{}-{}", (mib << 20) - (1 << 20), (mib << 20) - 1);
    let range = ["-r", tail.as_str()];
    let (mut e, mut p, mut u) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let d = up.push_blob("bench/lazy", &noise(mib << 20, seed + round as u64));
        let path = format!("bench/lazy/blobs/{d}");
        sync();
        let t = std::time::Instant::now();
        u.push(curl(&format!("{via}/v2/{path}"), &range).1);
        e.push(curl(&format!("{}/v2/docker.io/{path}", mirror.url()), &range).1);
        p.push(curl(&format!("{}/v2/{path}", proxy.url()), &range).1);
        // Let the fills (the mirror's and the proxy's) finish before the next round.
        mirror.settle();
        std::thread::sleep(std::time::Duration::from_secs(1).max(t.elapsed()));
    }
    let (e, p, u) = (median(&mut e), median(&mut p), median(&mut u));
    println!(
        "| {label} | {e:.4} s | {p:.4} s | {u:.4} s | {:.2}x |",
        e / u
    );
    mirror
}
