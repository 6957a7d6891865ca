//! Lazy pulling and small requests. The last 1 MiB of a cold blob (a snapshotter's footer read) through
//! entrepot, a Distribution proxy and the upstream itself, on loopback; each round a
//! fresh blob. (The test throttle paces each connection from its start, so a kept-alive
//! connection is not paced for a short burst: it cannot measure small ranges over a slow
//! link, and is not used here.) Run by hand:
//!
//! ```sh
//! apt-get install -y docker-registry curl
//! cargo bench --bench ranges          # BENCH_MIB=192 BENCH_ROUNDS=5
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The same manifest by digest from entrepot and as a static file from nginx (wrk -t2
/// -c64): issue 28's goal is 0.8x nginx.
fn manifests_vs_static(up: &Registry, mirror: &Mirror) {
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
    let url = format!("{}/v2/docker.io/bench/app/manifests/{d}", mirror.url());
    assert_eq!(get(&url).status, 200);
    let nginx = common::bench::Nginx::start(|dir, port| {
        std::fs::write(dir.join("manifest"), &manifest).expect("manifest");
        format!(
            "server {{ listen 127.0.0.1:{port}; location = /manifest {{ alias {}/manifest; default_type application/vnd.oci.image.manifest.v1+json; }} }}",
            dir.display()
        )
    });
    let secs = env_or("BENCH_SECS", 5) as u32;
    let (e, e99) = wrk(&url, "GET", oci, secs);
    let (n, n99) = wrk(
        &format!("http://127.0.0.1:{}/manifest", nginx.port),
        "GET",
        oci,
        secs,
    );
    println!("\n| manifest by digest, wrk -t2 -c64 | entrepot | nginx static file | entrepot / nginx |\n|---|---|---|---|");
    println!(
        "| req/s (p99) | {e:.0} ({e99:.2} ms) | {n:.0} ({n99:.2} ms) | {:.2}x |",
        e / n.max(1.0)
    );
}

fn main() {
    if !require(&["docker-registry", "curl"]) {
        return;
    }
    let mib = env_or("BENCH_MIB", 192);
    let rounds = env_or("BENCH_ROUNDS", 5);
    let up = Registry::start(Auth::Anonymous);
    let mirror = Mirror::start(
        "",
        &format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n", up.url()),
    );
    let proxy = Registry::start_proxy(&up.url());
    let tail = format!("{}-{}", (mib << 20) - (1 << 20), (mib << 20) - 1);
    let range = ["-r", tail.as_str()];
    println!("| last 1 MiB of a cold {mib} MiB blob, median of {rounds} | entrepot | Distribution proxy | upstream directly | entrepot / upstream |\n|---|---|---|---|---|");
    let mut seed = 500u64;
    let (mut e, mut p, mut u) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        seed += 1;
        let d = up.push_blob("bench/lazy", &noise(mib << 20, seed));
        let path = format!("bench/lazy/blobs/{d}");
        sync();
        u.push(curl(&format!("{}/v2/{path}", up.url()), &range).1);
        e.push(curl(&format!("{}/v2/docker.io/{path}", mirror.url()), &range).1);
        p.push(curl(&format!("{}/v2/{path}", proxy.url()), &range).1);
        // Let the fills finish before the next round.
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    let (e, p, u) = (median(&mut e), median(&mut p), median(&mut u));
    println!(
        "| loopback | {:.4} s | {:.4} s | {:.4} s | {:.2}x |",
        e,
        p,
        u,
        e / u
    );
    manifests_vs_static(&up, &mirror);
}
