//! The store at scale: manifest-by-digest rate on a store of 250k blobs in 25k
//! repositories (written in the store layout) against a one-blob store, `entrepot gc`
//! passes with nothing to evict, the rate while gc loops, and `serve` start-up. Run by
//! hand:
//!
//! ```sh
//! apt-get install -y docker-registry wrk
//! cargo bench --bench scale          # BENCH_BLOBS / BENCH_REPOS / BENCH_SECS to change it
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn main() {
    if !require(&["docker-registry", "wrk"]) {
        return;
    }
    let (blobs, repos, secs) = (
        env_or("BENCH_BLOBS", 250_000),
        env_or("BENCH_REPOS", 25_000),
        env_or("BENCH_SECS", 10) as u32,
    );
    let up = Registry::start(Auth::Anonymous);
    let small = scale_store(1, 1, &up.url());
    let start = Instant::now();
    let big = scale_store(blobs, repos, &up.url());
    eprintln!("wrote the store in {:.0} s", start.elapsed().as_secs_f64());
    let url = |m: &(Mirror, String)| format!("{}/v2/docker.io/r0/app/manifests/{}", m.0.url(), m.1);
    println!("| {blobs} blobs / {repos} repositories | figure |\n|---|---|");
    let (small_rps, small_p99) = wrk(&url(&small), "GET", Some(OCI_MANIFEST), secs);
    let (rps, p99) = wrk(&url(&big), "GET", Some(OCI_MANIFEST), secs);
    println!(
        "| manifest by digest, one-blob store | {small_rps:.0} req/s ({small_p99:.2} ms p99) |"
    );
    println!(
        "| manifest by digest, big store | {rps:.0} req/s ({p99:.2} ms p99): {:.2}x |",
        rps / small_rps.max(1e-9)
    );

    // `entrepot gc` on the same store (a cap it is far below: nothing to evict).
    let cfg = big.0.store.with_file_name("gc.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nstorage = \"{}\"\nmax_cache_size = \"1TiB\"\n[upstreams.\"docker.io\"]\nurl = \"{}\"\n",
            big.0.store.display(),
            up.url()
        ),
    )
    .expect("gc config");
    let gc = |cfg: &std::path::Path| {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
            .args(["gc", "--config"])
            .arg(cfg)
            .output()
            .expect("gc");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_secs_f64()
    };
    println!("| `entrepot gc`, nothing to evict | {:.1} s |", gc(&cfg));

    // The rate while gc passes run back to back beside the server.
    let stop = Arc::new(AtomicBool::new(false));
    let looping = {
        let (stop, cfg) = (stop.clone(), cfg.clone());
        std::thread::spawn(move || {
            let mut passes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                passes.push(gc(&cfg));
            }
            passes
        })
    };
    let (during, during_p99) = wrk(&url(&big), "GET", Some(OCI_MANIFEST), secs);
    stop.store(true, Ordering::Relaxed);
    let passes = looping.join().expect("gc loop");
    println!(
        "| manifest by digest while gc loops ({} passes, {:.1} s each) | {during:.0} req/s ({during_p99:.2} ms p99): {:.2}x the idle rate |",
        passes.len(),
        passes.iter().sum::<f64>() / passes.len().max(1) as f64,
        during / rps.max(1e-9)
    );

    // `serve` start-up on the big store: spawn to `/healthz` answering.
    let port = free_port();
    let cfg2 = big.0.store.with_file_name("serve.toml");
    std::fs::write(
        &cfg2,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstorage = \"{}\"\n[upstreams.\"docker.io\"]\nurl = \"{}\"\n",
            big.0.store.display(),
            up.url()
        ),
    )
    .expect("serve config");
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(["serve", "--config"])
        .arg(&cfg2)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    wait_port(port);
    println!(
        "| `serve` start-up (to listening) | {:.3} s |",
        t.elapsed().as_secs_f64()
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(big.0.store.parent().expect("dir"));
}
