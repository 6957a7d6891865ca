//! Side-by-side benchmark: entrepot vs Distribution in proxy mode vs nginx (sendfile) vs
//! the upstream itself, all on loopback. Run by hand:
//!
//! ```sh
//! apt-get install -y docker-registry nginx-light wrk curl
//! cargo bench --bench mirror            # BENCH_QUICK=1 for a smaller, faster smoke run
//! ```
//!
//! Prints a Markdown table (also written to `target/bench-results.md`); BENCHMARKS.md keeps
//! the latest one with the machine it ran on.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::Duration;

use common::*;

const MIB: usize = 1 << 20;

struct Sizes {
    warm: usize,
    coalesce: usize,
    scale_blobs: usize,
    scale_repos: usize,
    wrk_secs: u32,
}

fn sizes() -> Sizes {
    if std::env::var("BENCH_QUICK").is_ok() {
        Sizes {
            warm: 64 * MIB,
            coalesce: 32 * MIB,
            scale_blobs: 10_000,
            scale_repos: 1_000,
            wrk_secs: 3,
        }
    } else {
        Sizes {
            warm: 512 * MIB,
            coalesce: 256 * MIB,
            scale_blobs: 100_000,
            scale_repos: 10_000,
            wrk_secs: 10,
        }
    }
}

/// Peak resident memory of a process (VmHWM), MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Bytes the upstream sent for GETs of `path_part` (from its access log).
fn upstream_bytes(up: &Registry, path_part: &str) -> u64 {
    up.log()
        .lines()
        .filter(|l| {
            l.contains(&format!("\"GET {path_part}"))
                || (l.contains("\"GET ") && l.contains(path_part))
        })
        .filter_map(|l| {
            let after = l.split("\" ").nth(1)?;
            let mut it = after.split_whitespace();
            let status = it.next()?;
            (status == "200")
                .then(|| it.next()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// Pushes a small image (config + layer + manifest) as `repo:tag`; returns the manifest digest.
fn push_small_image(up: &Registry, repo: &str, tag: &str) -> String {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = noise(4096, 1);
    let c = up.push_blob(repo, config);
    let l = up.push_blob(repo, &layer);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let r = send(
        &format!("{}/v2/{repo}/manifests/{tag}", up.url()),
        "PUT",
        manifest.as_bytes(),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(r.status, 201, "push manifest");
    format!("sha256:{}", sha256_hex(manifest.as_bytes()))
}

struct Report(String);

impl Report {
    fn row(&mut self, cells: &[String]) {
        let _ = writeln!(self.0, "| {} |", cells.join(" | "));
        println!("| {} |", cells.join(" | "));
    }
}

fn gbs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e9
}

fn main() {
    if !require(&["docker-registry", "nginx", "wrk", "curl"]) {
        return;
    }
    let s = sizes();
    let mut report = Report(String::new());
    let head = "| scenario | entrepot | Distribution proxy | nginx sendfile / direct upstream | entrepot vs peers |";
    println!("{head}\n|---|---|---|---|---|");
    let _ = writeln!(report.0, "{head}\n|---|---|---|---|---|");

    let up = Registry::start(Auth::Anonymous);
    let warm_blob = noise(s.warm, 11);
    let warm_d = up.push_blob("bench/warm", &warm_blob);
    drop(warm_blob);
    let co_blob = noise(s.coalesce, 12);
    let co_d = up.push_blob("bench/co", &co_blob);
    let co_d_proxy = up.push_blob("bench/co", &noise(s.coalesce, 13));
    drop(co_blob);
    let cold_d = up.push_blob("bench/cold", &noise(s.warm, 14));
    let manifest_d = push_small_image(&up, "bench/app", "1");
    let small_layer = format!("sha256:{}", sha256_hex(&noise(4096, 1)));

    let mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{}\"\ntag_ttl = \"1h\"\n",
            up.url()
        ),
    );
    let proxy = Registry::start_proxy(&up.url());
    let ngx = Nginx::sendfile(&up.blob_data(&warm_d[7..]));
    let m = |repo: &str, what: &str| format!("{}/v2/docker.io/{repo}/{what}", mirror.url());
    let p = |repo: &str, what: &str| format!("{}/v2/{repo}/{what}", proxy.url());

    // 2. Cold pull of one big blob, vs fetching it straight from the upstream.
    let direct = curl(&format!("{}/v2/bench/cold/blobs/{cold_d}", up.url()), &[]);
    let cold = curl(&m("bench/cold", &format!("blobs/{cold_d}")), &[]);
    let pcold = curl(&p("bench/cold", &format!("blobs/{cold_d}")), &[]);
    report.row(&[
        format!("cold {} MiB: wall (TTFB)", s.warm / MIB),
        format!("{:.2} s ({:.1} ms)", cold.1, cold.0 * 1e3),
        format!("{:.2} s ({:.1} ms)", pcold.1, pcold.0 * 1e3),
        format!("direct {:.2} s ({:.1} ms)", direct.1, direct.0 * 1e3),
        format!("{:.2}x direct wall", cold.1 / direct.1),
    ]);

    // 2b. The same over a link slower than one core's SHA-256 (as any real network is):
    //     upstream behind a 200 MB/s per-connection throttle, direct and through entrepot.
    let slow_d = up.push_blob("bench/slow", &noise(s.coalesce / 2, 15));
    let link = throttle::Throttle::start(up.port, 200_000_000);
    let slow_mirror = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:{}\"\n",
            link.port
        ),
    );
    let sdirect = curl(
        &format!(
            "http://127.0.0.1:{}/v2/bench/slow/blobs/{slow_d}",
            link.port
        ),
        &[],
    );
    let scold = curl(
        &format!(
            "{}/v2/docker.io/bench/slow/blobs/{slow_d}",
            slow_mirror.url()
        ),
        &[],
    );
    report.row(&[
        format!(
            "cold {} MiB over a 200 MB/s link: wall (TTFB)",
            s.coalesce / 2 / MIB
        ),
        format!("{:.2} s ({:.1} ms)", scold.1, scold.0 * 1e3),
        "-".into(),
        format!("direct {:.2} s ({:.1} ms)", sdirect.1, sdirect.0 * 1e3),
        format!("{:.2}x direct wall", scold.1 / sdirect.1),
    ]);
    drop(slow_mirror);

    // 1. Warm throughput, 1 and 16 clients.
    curl(&p("bench/warm", &format!("blobs/{warm_d}")), &[]);
    curl(&m("bench/warm", &format!("blobs/{warm_d}")), &[]);
    mirror.settle();
    std::thread::sleep(Duration::from_secs(1));
    let ngx_url = format!("http://127.0.0.1:{}/blob", ngx.port);
    for clients in [1usize, 16] {
        // Best of three, to keep one noisy run (2 cores, shared) from deciding.
        let run = |url: &str| {
            (0..3)
                .map(|_| {
                    let (wall, _, bytes) = concurrent(clients, &[url]);
                    gbs(bytes, wall)
                })
                .fold(0.0, f64::max)
        };
        let (e, pr, n) = (
            run(&m("bench/warm", &format!("blobs/{warm_d}"))),
            run(&p("bench/warm", &format!("blobs/{warm_d}"))),
            run(&ngx_url),
        );
        report.row(&[
            format!("warm {} MiB, {clients} client(s)", s.warm / MIB),
            format!("{e:.2} GB/s"),
            format!("{pr:.2} GB/s"),
            format!("nginx {n:.2} GB/s"),
            format!("{:.2}x nginx, {:.1}x proxy", e / n, e / pr),
        ]);
    }

    // 3. Coalescing: 64 concurrent cold requests.
    let before = upstream_bytes(&up, &co_d);
    let (_, slowest, bytes) = concurrent(64, &[&m("bench/co", &format!("blobs/{co_d}"))]);
    let e_ratio = (upstream_bytes(&up, &co_d) - before) as f64 / s.coalesce as f64;
    let before = upstream_bytes(&up, &co_d_proxy);
    let (_, pslowest, pbytes) = concurrent(64, &[&p("bench/co", &format!("blobs/{co_d_proxy}"))]);
    let p_ratio = (upstream_bytes(&up, &co_d_proxy) - before) as f64 / s.coalesce as f64;
    report.row(&[
        format!(
            "64 cold clients, {} MiB: upstream bytes / blob (slowest client)",
            s.coalesce / MIB
        ),
        format!(
            "{e_ratio:.2}x ({slowest:.2} s, {} MiB served)",
            bytes / MIB as u64
        ),
        format!(
            "{p_ratio:.2}x ({pslowest:.2} s, {} MiB served)",
            pbytes / MIB as u64
        ),
        "-".into(),
        format!("{:.0}x fewer upstream bytes", p_ratio / e_ratio.max(1e-9)),
    ]);
    let rss = mirror.pid().map_or(0.0, peak_rss_mib);

    // 4. Small requests at 64 connections.
    let oci = Some("application/vnd.oci.image.manifest.v1+json");
    curl(
        &m("bench/app", "manifests/1"),
        &["-H", "Accept: application/vnd.oci.image.manifest.v1+json"],
    );
    curl(
        &p("bench/app", "manifests/1"),
        &["-H", "Accept: application/vnd.oci.image.manifest.v1+json"],
    );
    curl(&m("bench/app", &format!("blobs/{small_layer}")), &[]);
    curl(&p("bench/app", &format!("blobs/{small_layer}")), &[]);
    for (name, what, method) in [
        (
            "manifest by digest",
            format!("manifests/{manifest_d}"),
            "GET",
        ),
        (
            "manifest by tag (within TTL)",
            "manifests/1".to_string(),
            "GET",
        ),
        ("HEAD blob", format!("blobs/{small_layer}"), "HEAD"),
    ] {
        let ((e, ep99), (pr, pp99)) = if method == "HEAD" {
            (
                head_load(
                    mirror.port,
                    &format!("/v2/docker.io/bench/app/{what}"),
                    s.wrk_secs,
                ),
                head_load(proxy.port, &format!("/v2/bench/app/{what}"), s.wrk_secs),
            )
        } else {
            (
                wrk(&m("bench/app", &what), method, oci, s.wrk_secs),
                wrk(&p("bench/app", &what), method, oci, s.wrk_secs),
            )
        };
        report.row(&[
            format!("{name}: req/s (p99)"),
            format!("{e:.0} ({ep99:.2} ms)"),
            format!("{pr:.0} ({pp99:.2} ms)"),
            "-".into(),
            format!("{:.1}x proxy", e / pr.max(1e-9)),
        ]);
    }

    // 5. Memory while 64 clients stream the warm blob: the peak is reset first (the
    // cold fills of 1-3 held their windows, see "after 1-3"), so this is the peak of
    // the 64 streams themselves.
    if let Some(pid) = mirror.pid() {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
    let (wall, _, bytes) = concurrent(64, &[&m("bench/warm", &format!("blobs/{warm_d}"))]);
    let rss64 = mirror.pid().map_or(0.0, peak_rss_mib);
    report.row(&[
        "peak RSS (after 1-3; during 64 warm streams)".into(),
        format!(
            "{rss:.1} MiB; {rss64:.1} MiB ({:.2} GB/s)",
            gbs(bytes, wall)
        ),
        format!("{:.1} MiB", proxy.pid().map_or(0.0, peak_rss_mib)),
        "-".into(),
        "-".into(),
    ]);

    // 6. Scale: manifest by digest with many blobs and repositories in the store.
    let (small_rps, small_p99) = wrk(
        &m("bench/app", &format!("manifests/{manifest_d}")),
        "GET",
        oci,
        s.wrk_secs,
    );
    let big = scale_store(s.scale_blobs, s.scale_repos, &up.url());
    let (rps, p99) = wrk(
        &format!("{}/v2/docker.io/r0/app/manifests/{}", big.0.url(), big.1),
        "GET",
        oci,
        s.wrk_secs,
    );
    report.row(&[
        format!(
            "manifest by digest, {} blobs / {} repos",
            s.scale_blobs, s.scale_repos
        ),
        format!("{rps:.0} req/s ({p99:.2} ms p99)"),
        "-".into(),
        format!("small store {small_rps:.0} req/s ({small_p99:.2} ms)"),
        format!("{:.2}x small-store rate", rps / small_rps.max(1e-9)),
    ]);

    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results.md");
    let _ = std::fs::write(&out, &report.0);
    println!("\nwritten to {}", out.display());
}
