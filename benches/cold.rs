//! The cold path side by side: entrepot vs a Distribution proxy on the same fresh blobs
//! from the same upstream, in one run, alternating which goes first. Run by hand:
//!
//! ```sh
//! apt-get install -y docker-registry curl
//! cargo bench --bench cold             # BENCH_MIB=64 BENCH_ROUNDS=2 for a quick run
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use common::throttle::Throttle;
use common::*;

/// How long a measurement waits for the server it measured to finish its own work
/// before the next one starts (see `quiesce`).
const QUIET_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One pull of `url` by curl: (TTFB, wall, bytes), then the CPU seconds the server and
/// the upstream used for it, counted until the server went quiet.
fn measured(url: &str, server: Option<u32>, upstream: Option<u32>) -> ((f64, f64, u64), f64, f64) {
    let (c0, u0) = (cpu_secs(server), cpu_secs(upstream));
    let x = curl(url, &[]);
    quiesce(server, QUIET_LIMIT);
    (x, cpu_secs(server) - c0, cpu_secs(upstream) - u0)
}

/// Where the last fill of a mirror's log waited (see [`fill_lines`]).
fn last_fill(log: &str) -> String {
    fill_lines(log).pop().unwrap_or_default()
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    if !require(&["docker-registry", "curl"]) {
        return;
    }
    let mib = env_or("BENCH_MIB", 256);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let up = Registry::start(Auth::Anonymous);
    let mut seed = 100u64;
    let mut fresh = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                seed += 1;
                up.push_blob("bench/cold", &noise(mib << 20, seed))
            })
            .collect()
    };
    // BENCH_STORE: put entrepot's store there (e.g. a tmpfs, to take the disk out).
    let store = std::env::var("BENCH_STORE")
        .ok()
        .map(std::path::PathBuf::from);
    let upstream = format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n", up.url());
    let mirror = Mirror::start_with_store(store, "", &upstream);
    // BENCH_AB=<another entrepot binary>: that build as well, in turns with this one (solo
    // rounds) or as a third server on the same blobs (back-to-back rounds).
    let other = std::env::var("BENCH_AB")
        .ok()
        .map(|b| Mirror::start_bin(b.into(), "", &upstream));
    let proxy = Registry::start_proxy(&up.url());
    let blob_url = |m: &Mirror, d: &str| format!("{}/v2/docker.io/bench/cold/blobs/{d}", m.url());
    let e = |d: &str| blob_url(&mirror, d);
    let p = |d: &str| format!("{}/v2/bench/cold/blobs/{d}", proxy.url());
    let direct = |d: &str| format!("{}/v2/bench/cold/blobs/{d}", up.url());
    println!("| scenario ({mib} MiB) | entrepot | Distribution proxy | direct | entrepot / proxy |\n|---|---|---|---|---|");

    // BENCH_SOLO=entrepot|proxy: only that server, one fresh blob per round with a quiet
    // second between (nothing else running), for profiles (`perf record -a`).
    if let Ok(who) = std::env::var("BENCH_SOLO") {
        // BENCH_SOLO=ab with BENCH_AB: the two builds in turn.
        let o = |d: &str| match &other {
            Some(m) => blob_url(m, d),
            None => e(d),
        };
        let (url, pid): (&dyn Fn(&str) -> String, _) = match who.as_str() {
            "proxy" => (&p, proxy.pid()),
            _ => (&e, mirror.pid()),
        };
        // BENCH_SOLO_N: that many different fresh blobs at once per round.
        let n = env_or("BENCH_SOLO_N", 1);
        for round in 0..rounds * if other.is_some() { 2 } else { 1 } {
            let b_turn = other.is_some() && round % 2 == 1;
            let (url, pid, who): (&dyn Fn(&str) -> String, _, &str) = if b_turn {
                (&o, other.as_ref().and_then(|m| m.pid()), "B")
            } else {
                (url, pid, who.as_str())
            };
            let blobs = fresh(n);
            sync();
            std::thread::sleep(std::time::Duration::from_secs(1));
            let (c0, u0, t0) = (cpu_secs(pid), cpu_secs(up.pid()), thread_secs(pid));
            let (m0, w0) = (machine_busy_secs(), cpu_secs(pid));
            let x = if n == 1 {
                curl(&url(&blobs[0]), &[])
            } else {
                let all = concurrent(n, &blobs.iter().map(|d| url(d)).collect::<Vec<_>>());
                (0.0, all.0, all.2)
            };
            let (m, w) = (machine_busy_secs() - m0, cpu_secs(pid) - w0);
            std::thread::sleep(std::time::Duration::from_secs(1));
            let (c, u) = (cpu_secs(pid) - c0, cpu_secs(up.pid()) - u0);
            println!(
                "  while the client pulled: machine busy {:.2} cores, the server {:.2} cores",
                m / x.1,
                w / x.1
            );
            let threads = threads_since(pid, &t0);
            println!("{who}: wall {:.2} s, TTFB {:.1} ms, CPU {c:.2} s, upstream CPU {u:.2} s; threads: {threads}", x.1, x.0 * 1e3);
            let served = if b_turn {
                other.as_ref()
            } else {
                Some(&mirror)
            };
            if let Some(m) = served.filter(|_| who != "proxy") {
                println!("  {}", last_fill(&m.log()));
            }
        }
        return;
    }
    // Where the stock-tools peer writes its copy (the same disk as the store by default).
    let tools = tempfile::tempdir().expect("tempdir");
    let only_eight = std::env::var("BENCH_ONLY_EIGHT").is_ok();
    // BENCH_ONLY_SYNC=0|1: only the back-to-back rounds without (0) or with (1) `sync`.
    let only_sync = std::env::var("BENCH_ONLY_SYNC").ok();
    let chosen = |s: &bool| only_sync.as_deref().is_none_or(|o| (o == "1") == *s);
    for with_sync in [false, true]
        .into_iter()
        .filter(|_| !only_eight)
        .filter(chosen)
    {
        // Each round: two fresh blobs; each server pulls both, in alternating order.
        let (mut dw, mut et, mut pt, mut dt) = (0.0, 0.0, 0.0, 0.0);
        // Each pull's wall: means and medians (one stalled pull moves a mean of six a lot).
        let (mut e_walls, mut p_walls, mut b_walls, mut t_walls) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // CPU seconds: (entrepot, upstream during entrepot's pulls, proxy, upstream during
        // the proxy's pulls).
        let mut cpu = [0.0f64; 4];
        for r in 0..rounds {
            let blobs = fresh(3);
            let mut run = |who: usize, d: &str| {
                if with_sync {
                    sync();
                }
                match who {
                    0 => {
                        let (x, c, u) = measured(&e(d), mirror.pid(), up.pid());
                        cpu[0] += c;
                        cpu[1] += u;
                        let fill = last_fill(&mirror.log());
                        eprintln!("entrepot sync={with_sync} {:.2} s; {fill}", x.1);
                        e_walls.push(x.1);
                        et += x.0;
                    }
                    1 => {
                        let (x, c, u) = measured(&p(d), proxy.pid(), up.pid());
                        cpu[2] += c;
                        cpu[3] += u;
                        eprintln!("proxy sync={with_sync} {:.2} s", x.1);
                        p_walls.push(x.1);
                        pt += x.0;
                    }
                    3 => {
                        let Some(m) = &other else { return };
                        let (x, _, _) = measured(&blob_url(m, d), m.pid(), up.pid());
                        let fill = last_fill(&m.log());
                        eprintln!("B sync={with_sync} {:.2} s; {fill}", x.1);
                        b_walls.push(x.1);
                    }
                    4 => {
                        let (wall, bytes, hex) = pipeline(&direct(d), tools.path());
                        assert_eq!((bytes, hex.as_str()), ((mib << 20) as u64, &d[7..]));
                        eprintln!("tools sync={with_sync} {wall:.2} s");
                        t_walls.push(wall);
                    }
                    _ => {
                        let x = curl(&direct(d), &[]);
                        dw += x.1;
                        dt += x.0;
                    }
                }
            };
            let mut order = vec![0, 1, 4];
            if other.is_some() {
                order.push(3);
            }
            let k = r % order.len();
            order.rotate_left(k);
            for &who in &order {
                run(who, &blobs[0]);
            }
            for &who in order.iter().rev() {
                run(who, &blobs[1]);
            }
            run(2, &blobs[2]);
        }
        let n = (rounds * 2) as f64;
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        let (ew, pw, bw) = (sum(&e_walls), sum(&p_walls), sum(&b_walls));
        println!(
            "| cold, back to back{}: mean wall (TTFB) | {:.2} s ({:.1} ms) | {:.2} s ({:.1} ms) | {:.2} s ({:.1} ms) | {:.2}x |",
            if with_sync { ", sync between" } else { "" },
            ew / n,
            et / n * 1e3,
            pw / n,
            pt / n * 1e3,
            dw / rounds as f64,
            dt / rounds as f64 * 1e3,
            ew / pw
        );
        let (em, pm) = (median(&mut e_walls), median(&mut p_walls));
        println!(
            "| cold, back to back{}: median wall | {em:.2} s | {pm:.2} s | - | {:.2}x |",
            if with_sync { ", sync between" } else { "" },
            em / pm
        );
        let tm = median(&mut t_walls);
        println!(
            "| the same work by stock tools (curl \\| tee file \\| openssl dgst){}: median wall | {tm:.2} s | entrepot / tools {:.2}x | - | - |",
            if with_sync { ", sync between" } else { "" },
            em / tm
        );
        if other.is_some() {
            println!(
                "| B (BENCH_AB): mean wall | {:.2} s | B / entrepot {:.2}x, B / proxy {:.2}x |",
                bw / n,
                bw / ew,
                bw / pw
            );
        }
        println!(
            "| CPU per pull (server + upstream){} | {:.2} + {:.2} s | {:.2} + {:.2} s | - | {:.2}x |",
            if with_sync { ", sync between" } else { "" },
            cpu[0] / n,
            cpu[1] / n,
            cpu[2] / n,
            cpu[3] / n,
            (cpu[0] + cpu[1]) / (cpu[2] + cpu[3]).max(1e-9)
        );
    }

    if only_sync.is_some() {
        return;
    }
    // 8 different cold blobs at once, each server on its own fresh blobs, alternating
    // which goes first; each waits for the other to go quiet.
    let (mut ea, mut pb) = (0.0, 0.0);
    let eight_rounds = rounds.min(2);
    for r in 0..eight_rounds {
        let blobs = fresh(16);
        let (a, b) = blobs.split_at(8);
        let mut go = |who: usize| {
            if who == 0 {
                ea += concurrent(8, &a.iter().map(|d| e(d)).collect::<Vec<_>>()).0;
                quiesce(mirror.pid(), QUIET_LIMIT);
            } else {
                pb += concurrent(8, &b.iter().map(|d| p(d)).collect::<Vec<_>>()).0;
                quiesce(proxy.pid(), QUIET_LIMIT);
            }
        };
        let first = r % 2;
        go(first);
        go(1 - first);
    }
    let k = eight_rounds as f64;
    println!(
        "| 8 different cold blobs at once: mean wall | {:.2} s | {:.2} s | - | {:.2}x |",
        ea / k,
        pb / k,
        ea / pb
    );

    if only_eight {
        return;
    }
    // Over a 125 MB/s link (1 Gbit/s-like): entrepot vs direct.
    let port: u16 = up
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let link = Throttle::start(port, 125_000_000);
    let slow = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:{}\"\n",
            link.port
        ),
    );
    let blobs = fresh(2);
    let d = curl(
        &format!(
            "http://127.0.0.1:{}/v2/bench/cold/blobs/{}",
            link.port, blobs[0]
        ),
        &[],
    );
    let m = curl(
        &format!("{}/v2/docker.io/bench/cold/blobs/{}", slow.url(), blobs[1]),
        &[],
    );
    println!(
        "| cold over a 125 MB/s link: wall (TTFB) | {:.2} s ({:.1} ms) | - | {:.2} s ({:.1} ms) | {:.2}x direct |",
        m.1,
        m.0 * 1e3,
        d.1,
        d.0 * 1e3,
        m.1 / d.1
    );
}
