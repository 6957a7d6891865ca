//! Several replicas on one bucket, side by side: 48 cold clients on one fresh blob through
//! one entrepot replica, through 3 cooperating replicas (16 clients each), and through 3
//! Distribution proxies sharing the same Garage bucket with its `s3` driver. Upstream bytes
//! come from the upstream's access log, bucket bytes from entrepot's metrics. Run by hand:
//!
//! ```sh
//! apt-get install -y docker-registry curl     # and Garage in /opt/garage (see .ci/run)
//! cargo bench --bench cluster                 # BENCH_MIB=32 BENCH_ROUNDS=1 for a quick run
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use common::garage::{garage_bin, Garage};
use common::*;

const CLIENTS: usize = 48;

/// Bytes of successful GETs of `digest` in the upstream's access log.
fn upstream_bytes(up: &Registry, digest: &str) -> u64 {
    up.log()
        .lines()
        .filter(|l| l.contains("\"GET ") && l.contains(digest))
        .filter_map(|l| {
            let mut it = l.split("\" ").nth(1)?.split_whitespace();
            (it.next()? == "200").then(|| it.next()?.parse::<u64>().ok())?
        })
        .sum()
}

fn s3_out(ms: &[Mirror]) -> f64 {
    ms.iter()
        .map(|m| m.metric("entrepot_s3_bytes_total", &[("direction", "out")]))
        .sum()
}

/// Each replica's fills of `digest`, as they logged them: where their time went.
fn fills(ms: &[Mirror], digest: &str) {
    for (i, m) in ms.iter().enumerate() {
        let log = m.log();
        let lines = log
            .lines()
            .filter(|l| l.contains(digest))
            .collect::<Vec<_>>();
        for l in fill_lines(&lines.join("\n")) {
            eprintln!("  replica {i}: {l}");
        }
    }
}

fn main() {
    let Some(bin) = garage_bin() else {
        eprintln!("garage not installed");
        return;
    };
    if !require(&["docker-registry", "curl"]) {
        return;
    }
    let mib = env_or("BENCH_MIB", 128);
    let size = (mib << 20) as u64;
    let g = Garage::start(&bin);
    let up = Registry::start(Auth::Anonymous);
    // BENCH_ROUNDS: pairs of runs (1 replica, 3 replicas), in alternating order.
    let rounds = env_or("BENCH_ROUNDS", 2);
    let blobs: Vec<String> = (0..5 + 2 * rounds as u64)
        .map(|i| up.push_blob("bench/c", &noise(mib << 20, 40 + i)))
        .collect();
    let s3 = |node: usize, prefix: &str| g.s3_section(node, prefix);
    let upstream = format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n", up.url());
    println!(
        "| {CLIENTS} cold clients, {mib} MiB blob | slowest client | upstream bytes | bucket bytes written |\n|---|---|---|---|"
    );
    let row = |name: &str, r: (f64, f64, u64), up_bytes: u64, s3_bytes: Option<f64>| {
        assert_eq!(
            r.2,
            size * CLIENTS as u64,
            "{name}: every client got the whole blob"
        );
        println!(
            "| {name} | {:.2} s | {:.2}x the blob | {} |",
            r.1,
            up_bytes as f64 / size as f64,
            s3_bytes.map_or("-".into(), |b| format!("{:.2}x the blob", b / size as f64))
        );
    };

    // One replica and three cooperating ones, all started up front; the rounds alternate
    // which layout goes first (1, 3, 3, 1, ...), each on a fresh blob after `sync`, so
    // neither inherits the other's writeback (Garage writes its copies through the page
    // cache).
    let one = vec![Mirror::start(&s3(0, "one/"), &upstream)];
    let url = |m: &Mirror, d: &str| format!("{}/v2/docker.io/bench/c/blobs/{d}", m.url());
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: Vec<String> = ports
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}\""))
        .collect();
    let three: Vec<Mirror> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Mirror::start_at(
                *p,
                &s3(i, "three/"),
                &format!(
                    "[cluster]\nself = \"http://127.0.0.1:{p}\"\npeers = [{}]\nsecret = \"bench\"\n{upstream}",
                    peers.join(", ")
                ),
            )
        })
        .collect();
    for m in &three {
        wait_until("peers up", std::time::Duration::from_secs(20), || {
            m.metric("entrepot_cluster_peers", &[("state", "up")]) == 3.0
        });
    }
    let (mut singles, mut triples) = (Vec::new(), Vec::new());
    // Round 0 warms the processes and the machine up (the first cold pulls after the
    // blobs were pushed ran 20-30% slower in either layout) and is not counted.
    for round in 0..=rounds {
        let order = if round % 2 == 0 { [1, 3] } else { [3, 1] };
        for n in order {
            let d = &blobs[3 + 2 * round + usize::from(n == 3)];
            let ms = if n == 1 { &one } else { &three };
            let (up0, s30) = (upstream_bytes(&up, d), s3_out(ms));
            sync();
            std::thread::sleep(std::time::Duration::from_secs(1));
            let urls: Vec<String> = ms.iter().map(|m| url(m, d)).collect();
            let r = concurrent(CLIENTS, &urls);
            std::thread::sleep(std::time::Duration::from_secs(3));
            let name = match (n, round) {
                (1, 0) => "warm-up, 1 replica",
                (_, 0) => "warm-up, 3 replicas",
                (1, _) => "entrepot, 1 replica",
                _ => "entrepot, 3 replicas",
            };
            row(
                name,
                r,
                upstream_bytes(&up, d) - up0,
                Some(s3_out(ms) - s30),
            );
            fills(ms, d);
            if round == 0 {
                continue;
            }
            if n == 1 {
                singles.push(r.1);
            } else {
                triples.push(r.1);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "slowest client, 3 replicas vs 1: {:.2}x (means over {rounds} rounds: {:.2} vs {:.2} s)",
        mean(&triples) / mean(&singles),
        mean(&triples),
        mean(&singles)
    );
    drop(one);
    drop(three);

    // Three Distribution proxies on the same bucket.
    let storage = format!(
        "  s3:\n    accesskey: {}\n    secretkey: {}\n    region: garage\n    regionendpoint: {}\n    bucket: {}\n    secure: false\n    v4auth: true\n    rootdirectory: /distribution\n",
        g.key_id,
        g.secret,
        g.endpoint(0),
        g.bucket
    );
    // The AWS SDK inside Distribution fails to start on an AWS_CA_BUNDLE it cannot load
    // into its transport (this machine sets one); the bucket is plain HTTP anyway.
    std::env::remove_var("AWS_CA_BUNDLE");
    let proxies: Vec<Registry> = (0..3)
        .map(|_| Registry::start_proxy_on(&up.url(), Some(&storage)))
        .collect();
    let urls: Vec<String> = proxies
        .iter()
        .map(|p| format!("{}/v2/bench/c/blobs/{}", p.url(), blobs[2]))
        .collect();
    let r = concurrent(CLIENTS, &urls);
    std::thread::sleep(std::time::Duration::from_secs(3));
    row(
        "Distribution proxy x3, s3 driver",
        r,
        upstream_bytes(&up, &blobs[2]),
        None,
    );
}
