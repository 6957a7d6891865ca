//! The shared S3 store, side by side with its peers on one machine: a 3-node Garage
//! cluster (rf 3) on loopback, Distribution as the upstream, nginx (sendfile) serving the
//! local-tier file, and curl reading the object straight from Garage (SigV4). Run by hand:
//!
//! ```sh
//! apt-get install -y docker-registry nginx-light curl   # and Garage in /opt/garage (see .ci/run)
//! cargo bench --bench s3                                # BENCH_MIB=64 for a quick run
//! ```
//!
//! Prints a Markdown table; BENCHMARKS.md keeps the latest one.

#[path = "../tests/common/mod.rs"]
mod common;

use common::garage::{garage_bin, Garage};
use common::*;

/// nginx relaying a presigned GET from Garage to its client while storing the response
/// in a local file (`proxy_store`): the work of filling an empty local tier, minus the
/// digest check.
fn relay(garage: &str) -> Nginx {
    Nginx::start(|d, port| {
        std::fs::create_dir_all(d.join("tmp")).expect("tmp");
        format!(
            "server {{ listen 127.0.0.1:{port}; root {d}/store; proxy_temp_path {d}/tmp; location / {{ proxy_pass {garage}; proxy_http_version 1.1; proxy_store on; }} }}",
            d = d.display()
        )
    })
}

/// A presigned GET URL of `key` in the bench bucket on node 0.
fn presigned(g: &Garage, key: &str) -> String {
    use object_store::signer::{Method, Signer};
    let s3 = g.client();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let path = object_store::path::Path::from(key);
    rt.block_on(s3.signed_url(Method::GET, &path, std::time::Duration::from_secs(3600)))
        .expect("presign")
        .to_string()
}

fn main() {
    let Some(bin) = garage_bin() else {
        eprintln!("garage not installed");
        return;
    };
    if !require(&["docker-registry", "nginx", "curl", "htpasswd"]) {
        return;
    }
    let mib = env_or("BENCH_MIB", 256);
    let g = Garage::start(&bin);
    let up = Registry::start(Auth::Anonymous);
    let d = up.push_blob("bench/s3", &noise(mib << 20, 21));
    // A small second blob, to warm a fresh replica's connections before measuring.
    let small = up.push_blob("bench/s3", &noise(1 << 20, 22));
    let fs_d = up.push_blob("bench/s3", &noise(mib << 20, 23));
    let s3 = g.s3_section(0, "mirror/");
    let rest = format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n", up.url());
    let a = Mirror::start(&s3, &rest);
    let url = |m: &Mirror| format!("{}/v2/docker.io/bench/s3/blobs/{d}", m.url());
    println!("| scenario ({mib} MiB blob) | entrepot | peer | ratio |\n|---|---|---|---|");

    // Cold: upstream -> clients + local tier + bucket, bytes written to the bucket.
    let out_before = a.metric("entrepot_s3_bytes_total", &[("direction", "out")]);
    let direct = curl(&format!("{}/v2/bench/s3/blobs/{d}", up.url()), &[]);
    let cold = curl(&url(&a), &[]);
    a.settle();
    // The bucket copy trails the fill: wait for it.
    let mut written = 0.0;
    for _ in 0..600 {
        written = a.metric("entrepot_s3_bytes_total", &[("direction", "out")]) - out_before;
        if written >= cold.2 as f64 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let small_url = format!("{}/v2/docker.io/bench/s3/blobs/{small}", a.url());
    assert_eq!(curl(&small_url, &[]).2, 1 << 20);
    println!(
        "| cold, S3 bytes written | {:.0} B | blob {} B | {:.2}x |",
        written,
        cold.2,
        written / cold.2 as f64
    );
    println!(
        "| cold wall (TTFB) | {:.3} s ({:.1} ms) | direct from upstream {:.3} s ({:.1} ms) | {:.2}x |",
        cold.1,
        cold.0 * 1e3,
        direct.1,
        direct.0 * 1e3,
        cold.1 / direct.1
    );

    // The same cold pull by a replica without a bucket (filesystem store only).
    let fs = Mirror::start("", &rest);
    let fs_cold = curl(
        &format!("{}/v2/docker.io/bench/s3/blobs/{fs_d}", fs.url()),
        &[],
    );
    println!(
        "| cold wall, no bucket (TTFB) | {:.3} s ({:.1} ms) | with the bucket {:.3} s | {:.2}x |",
        fs_cold.1,
        fs_cold.0 * 1e3,
        cold.1,
        cold.1 / fs_cold.1
    );
    drop(fs);

    // Warm from the local tier vs nginx sendfile of the same file.
    let file = a.store_files(&d[7..]).pop().expect("local copy");
    let ngx_file = Nginx::sendfile(&file);
    let port = ngx_file.port;
    let mut warm = (0.0, 0.0, 0);
    let mut ngx = (0.0, 0.0, 0);
    for _ in 0..5 {
        // Alternate, keep the best of each.
        let w = curl(&url(&a), &[]);
        let n = curl(&format!("http://127.0.0.1:{port}/blob"), &[]);
        if warm.1 == 0.0 || w.1 < warm.1 {
            warm = w;
        }
        if ngx.1 == 0.0 || n.1 < ngx.1 {
            ngx = n;
        }
    }
    let gbs = |r: (f64, f64, u64)| r.2 as f64 / r.1 / 1e9;
    println!(
        "| warm from the local tier | {:.2} GB/s | nginx sendfile {:.2} GB/s | {:.2}x |",
        gbs(warm),
        gbs(ngx),
        gbs(warm) / gbs(ngx)
    );

    // Empty local tier: a fresh replica reads the blob from the bucket, vs curl reading
    // the object straight from Garage.
    let key = format!(
        "{}/{}/mirror/blobs/sha256/{}",
        g.endpoint(0),
        g.bucket,
        &d[7..]
    );
    let sig = format!("{}:{}", g.key_id, g.secret);
    let direct_s3 = || {
        curl(
            &key,
            &[
                "--aws-sigv4",
                "aws:amz:garage:s3",
                "--user",
                &sig,
                "-H",
                "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            ],
        )
    };
    // BENCH_SOLO=entrepot|curl: only that reader of the bucket, a fresh replica per round,
    // with each process's CPU, for profiles (`perf record -a`).
    if let Ok(who) = std::env::var("BENCH_SOLO") {
        let garage_cpu = || g.pids().iter().map(|p| cpu_secs(Some(*p))).sum::<f64>();
        let relay = relay(&g.endpoint(0));
        let rport = relay.port;
        let signed = presigned(&g, &format!("mirror/blobs/sha256/{}", &d[7..]));
        let relayed = signed.replacen(&g.endpoint(0), &format!("http://127.0.0.1:{rport}"), 1);
        // BENCH_SOLO=ab with BENCH_AB=<another entrepot binary>: this build and that one.
        let other = std::env::var("BENCH_AB").ok();
        let readers: Vec<&str> = match who.as_str() {
            "all" => vec!["curl", "nginx", "tools", "entrepot"],
            "ab" => vec!["entrepot", "B"],
            w => vec![w],
        };
        for round in 0..env_or("BENCH_ROUNDS", 5) {
            let a = Mirror::start(&s3, &rest);
            let b_bin = other.as_ref().filter(|_| who == "ab");
            let b_other = b_bin.map(|bin| Mirror::start_bin(bin.into(), &s3, &rest));
            let mirror_for = |who: &str| match (who, &b_other) {
                ("B", Some(m)) => m,
                _ => &a,
            };
            for m in [Some(&a), b_other.as_ref()].into_iter().flatten() {
                let small_url = format!("{}/v2/docker.io/bench/s3/blobs/{small}", m.url());
                assert_eq!(curl(&small_url, &[]).2, 1 << 20, "warm-up");
            }
            for i in 0..readers.len() {
                let who = readers[(round + i) % readers.len()];
                let b = mirror_for(who);
                std::thread::sleep(std::time::Duration::from_secs(1));
                let pids = match who {
                    "entrepot" | "B" => b.pid().into_iter().collect(),
                    "nginx" => relay.pids(),
                    _ => vec![],
                };
                let cpu = || pids.iter().map(|p| cpu_secs(Some(*p))).sum::<f64>();
                let (c0, g0, t0) = (cpu(), garage_cpu(), thread_secs(b.pid()));
                let m0 = machine_busy_secs();
                let _ = std::fs::remove_dir_all(relay.dir.path().join("store"));
                let x = match who {
                    "curl" => direct_s3(),
                    "nginx" => curl(&relayed, &[]),
                    "presigned" => curl(&signed, &[]),
                    "tools" => {
                        let (wall, bytes, hex) = pipeline(&signed, relay.dir.path());
                        assert_eq!(hex, &d[7..], "the tools' copy hashes right");
                        (0.0, wall, bytes)
                    }
                    _ => curl(&url(b), &[]),
                };
                assert_eq!(x.2, cold.2, "whole blob");
                let busy = (machine_busy_secs() - m0) / x.1;
                std::thread::sleep(std::time::Duration::from_secs(1));
                let (c, gc) = (cpu() - c0, garage_cpu() - g0);
                let threads = match who {
                    "entrepot" | "B" => threads_since(b.pid(), &t0),
                    _ => String::new(),
                };
                println!(
                    "{who}: {:.2} GB/s, TTFB {:.1} ms, CPU {c:.2} s, Garage CPU {gc:.2} s, machine busy {busy:.2} cores; threads: {threads}",
                    gbs(x),
                    x.0 * 1e3,
                );
                if matches!(who, "entrepot" | "B") {
                    // The fill's own account of its stalls (its last log line of them).
                    if let Some(l) = fill_lines(&b.log()).pop() {
                        println!("  {l}");
                    }
                }
            }
        }
        drop(relay);
        return;
    }
    let mut rows = Vec::new();
    for run in 0..6 {
        let b = Mirror::start(&s3, &rest);
        let small_url = format!("{}/v2/docker.io/bench/s3/blobs/{small}", b.url());
        assert_eq!(curl(&small_url, &[]).2, 1 << 20, "warm-up");
        // Alternate which one reads first (Garage's own caches favour the second).
        let (from_bucket, s3_direct) = if run % 2 == 0 {
            let e = curl(&url(&b), &[]);
            (e, direct_s3())
        } else {
            let s = direct_s3();
            (curl(&url(&b), &[]), s)
        };
        assert_eq!(from_bucket.2, cold.2, "whole blob from the bucket");
        assert_eq!(s3_direct.2, cold.2, "whole object from Garage");
        rows.push((from_bucket, s3_direct));
    }
    // The median run by the ratio of the two walls (the machine is shared with Garage).
    rows.sort_by(|x, y| (x.0 .1 / x.1 .1).total_cmp(&(y.0 .1 / y.1 .1)));
    let ratios: Vec<String> = rows
        .iter()
        .map(|(e, s)| format!("{:.2}", s.1 / e.1))
        .collect();
    println!(
        "empty-tier runs, entrepot/curl throughput: {}",
        ratios.join(" ")
    );
    let (e, s) = rows[rows.len() / 2];
    println!(
        "| empty local tier, from the bucket: GB/s (TTFB) | {:.2} GB/s ({:.1} ms) | curl from Garage {:.2} GB/s ({:.1} ms) | {:.2}x, TTFB +{:.1} ms |",
        gbs(e),
        e.0 * 1e3,
        gbs(s),
        s.0 * 1e3,
        gbs(e) / gbs(s),
        (e.0 - s.0) * 1e3
    );
}
