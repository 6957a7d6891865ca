//! Cache lifecycle against real peers: size-capped eviction, kill -9 in the middle of
//! cold pulls, air-gapped export/import, and a full disk.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

fn upstream_toml(key: &str, url: &str) -> String {
    format!("[upstreams.\"{key}\"]\nurl = \"{url}\"\n")
}

#[test]
fn eviction_keeps_the_cache_under_its_cap_least_recently_pulled_first() {
    if !require(PEERS) {
        return;
    }
    let mut up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let names = ["a", "b", "c", "d"];
    let mut digests = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let d = layout.build(n, &[("big.bin", &noise(15 << 20, 50 + i as u64))]);
        layout.push(n, &format!("{}/library/{n}:1", up.host()), None);
        digests.push(d);
    }
    let hosted = layout.build("h", &[("hosted.bin", &noise(15 << 20, 60))]);
    let file = htpasswd(tmp.path(), &[("alice", "pw")]);
    let mirror = Mirror::start(
        "max_cache_size = \"50MiB\"\ngc_interval = \"1h\"",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\npush = [\"alice\"]\n{}",
            file.display(),
            upstream_toml("docker.io", &up.url())
        ),
    );
    layout.push(
        "h",
        &format!("127.0.0.1:{}/local/h:1", mirror.port),
        Some("alice:pw"),
    );
    let hosted_layer = layout.layers(&hosted)[0].clone();

    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", "docker.io", &mirror.url(), Style::Ns);
    for (n, d) in names.iter().zip(&digests) {
        assert_eq!(
            &ctr.pull(
                &format!("warm-{n}"),
                &hosts,
                &format!("docker.io/library/{n}:1")
            )
            .unwrap(),
            d
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    mirror.settle();
    let before = mirror.store_bytes();
    assert!(
        before > 75 << 20,
        "4 cached + 1 hosted image: {before} bytes"
    );

    let (ok, dry) = mirror.cli(&["gc", "--dry-run"]);
    assert!(ok && dry.contains("would evict"), "{dry}");
    assert_eq!(mirror.store_bytes(), before, "dry run deletes nothing");
    let (ok, out) = mirror.cli(&["gc"]);
    assert!(ok, "{out}");
    // The dry run said exactly what the real run did (objects, manifests, tags).
    let summary = |t: &str| {
        t.lines()
            .last()
            .unwrap_or("")
            .replace("would evict", "evicted")
    };
    assert_eq!(summary(&dry), summary(&out));
    let hosted_bytes = layout.blob(&hosted_layer).len() as u64;
    let cached_after = mirror.store_bytes() - hosted_bytes;
    assert!(
        cached_after <= 50 << 20,
        "cached content under the cap: {cached_after}"
    );
    assert_eq!(
        mirror.store_files(&hosted_layer[7..]).len(),
        1,
        "hosted content is never evicted"
    );
    let a_layer = layout.layers(&digests[0])[0].clone();
    assert!(
        mirror.store_files(&a_layer[7..]).is_empty(),
        "the least recently pulled image went first"
    );

    // The most recent image still pulls with the upstream down; the evicted one does not.
    up.stop();
    assert_eq!(
        ctr.pull("d-offline", &hosts, "docker.io/library/d:1")
            .expect("recent image survives"),
        digests[3]
    );
    assert!(ctr
        .pull("a-offline", &hosts, "docker.io/library/a:1")
        .is_err());
    // With the upstream back, the evicted image is fetched again on demand.
    up.restart();
    assert_eq!(
        ctr.pull("a-again", &hosts, "docker.io/library/a:1")
            .expect("re-fetched"),
        digests[0]
    );
    assert_eq!(
        up.count("GET", &format!("/blobs/{a_layer}")),
        2,
        "fetched, evicted, fetched again"
    );
}

#[test]
fn kill_9_during_cold_pulls_leaves_nothing_corrupt() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let blobs: Vec<Vec<u8>> = (0..16).map(|i| noise(4 << 20, 70 + i)).collect();
    let digests: Vec<String> = blobs
        .iter()
        .map(|b| up.push_blob("crash/test", b))
        .collect();
    let slow = throttle::Throttle::start(up.port, 8 << 20);
    let mut mirror = Mirror::start(
        "",
        &upstream_toml("docker.io", &format!("http://127.0.0.1:{}", slow.port)),
    );
    let urls: Vec<String> = digests
        .iter()
        .map(|d| format!("{}/v2/docker.io/crash/test/blobs/{d}", mirror.url()))
        .collect();
    let pulls: Vec<_> = urls
        .iter()
        .cloned()
        .map(|u| std::thread::spawn(move || agent().get(&u).call().map(|r| r.status()).ok()))
        .collect();
    wait_until("fills under way", Duration::from_secs(20), || {
        mirror.tmp_files() >= 4
    });
    mirror.stop(); // SIGKILL
    for p in pulls {
        let _ = p.join();
    }
    assert!(
        mirror.tmp_files() > 0,
        "the kill left partial downloads behind"
    );

    mirror.restart();
    assert_eq!(
        mirror.tmp_files(),
        0,
        "temp files of the dead process are cleaned at start"
    );
    let (ok, out) = mirror.cli(&["verify"]);
    assert!(ok && out.contains("0 bad, 0 temp leftovers"), "{out}");
    let results: Vec<_> = urls
        .into_iter()
        .map(|u| std::thread::spawn(move || sha256_hex(&get(&u).body)))
        .collect();
    for (r, d) in results.into_iter().zip(&digests) {
        assert_eq!(
            format!("sha256:{}", r.join().unwrap()),
            *d,
            "identical digests after restart"
        );
    }

    // verify finds a corrupted object, and --repair removes it.
    mirror.settle();
    let victim = mirror.store_files(&digests[0][7..]).pop().expect("stored");
    std::fs::write(&victim, b"rotten").unwrap();
    let (ok, out) = mirror.cli(&["verify"]);
    assert!(!ok && out.contains("1 bad"), "{out}");
    let (ok, _) = mirror.cli(&["verify", "--repair"]);
    assert!(ok);
    assert!(mirror.store_files(&digests[0][7..]).is_empty());
    let (ok, out) = mirror.cli(&["verify"]);
    assert!(ok && out.contains("0 bad"), "{out}");
}

#[test]
fn export_then_import_serves_images_with_the_upstreams_unreachable() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let (index, _) = layout.multiarch(200_000, 81);
    let single = layout.build("single", &[("s", &noise(100_000, 83))]);
    layout.push("multi", &format!("{}/library/multi:1", up.host()), None);
    layout.push("single", &format!("{}/tools/single:2", up.host()), None);

    let online = Mirror::start("", &upstream_toml("docker.io", &up.url()));
    let out = tmp.path().join("airgap");
    let out_s = out.display().to_string();
    let (ok, text) = online.cli(&[
        "export",
        "--out",
        &out_s,
        "docker.io/library/multi:1",
        "docker.io/tools/single:2",
    ]);
    assert!(ok, "{text}");
    // Any OCI tool reads it: skopeo copies the single image out of the layout.
    let copy = tmp.path().join("copy");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{out_s}:docker.io/tools/single:2"))
        .arg(format!("dir:{}", copy.display())));
    assert_eq!(
        format!(
            "sha256:{}",
            sha256_hex(&std::fs::read(copy.join("manifest.json")).unwrap())
        ),
        single
    );

    // A tampered copy is refused for the tampered blob.
    let bad = tmp.path().join("bad");
    run(Command::new("cp").arg("-r").arg(&out).arg(&bad));
    let victim = layout.layers(&single)[0][7..].to_string();
    std::fs::write(bad.join("blobs/sha256").join(&victim), b"tampered").unwrap();

    let offline = Mirror::start("", &upstream_toml("docker.io", "http://127.0.0.1:9"));
    let (ok, text) = offline.cli(&["import", &bad.display().to_string()]);
    assert!(
        !ok && text.contains(&format!("REFUSED sha256:{victim}")),
        "{text}"
    );
    assert!(
        offline.store_files(&victim).is_empty(),
        "tampered blob not stored"
    );
    // Nothing points at refused content: the image's tag and manifest are not served.
    let r = get(&format!(
        "{}/v2/docker.io/tools/single/manifests/2",
        offline.url()
    ));
    assert_ne!(r.status, 200, "a tag of an image with a refused layer");
    let (ok, text) = offline.cli(&["import", &out_s]);
    assert!(ok, "{text}");

    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", "docker.io", &offline.url(), Style::Ns);
    assert_eq!(
        ctr.pull("m", &hosts, "docker.io/library/multi:1")
            .expect("multi-arch from the import"),
        index
    );
    assert_eq!(
        ctr.pull("s", &hosts, "docker.io/tools/single:2")
            .expect("single from the import"),
        single
    );
}

/// Hosted images export too, and `--platform` writes an index listing only what the
/// export holds, so `skopeo copy --all` of the layout works.
#[test]
fn export_of_hosted_images_and_of_one_platform() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let (index, amd) = layout.multiarch(150_000, 85);
    layout.push("multi", &format!("{}/library/multi:1", up.host()), None);
    let file = htpasswd(tmp.path(), &[("alice", "pw")]);
    let mirror = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\npush = [\"alice\"]\n{}",
            file.display(),
            upstream_toml("docker.io", &up.url())
        ),
    );
    let host = format!("127.0.0.1:{}", mirror.port);
    layout.push(
        "multi",
        &format!("{host}/local/team/app:1"),
        Some("alice:pw"),
    );

    let out = tmp.path().join("export").display().to_string();
    let (ok, text) = mirror.cli(&[
        "export",
        "--out",
        &out,
        "--platform",
        "linux/amd64",
        "docker.io/library/multi:1",
        "local/team/app:1",
    ]);
    assert!(ok, "{text}");
    for name in ["docker.io/library/multi:1", "local/team/app:1"] {
        let copy = tmp
            .path()
            .join(format!("copy-{}", name.replace(['/', ':'], "-")));
        run(Command::new("skopeo")
            .args(["copy", "--all"])
            .arg(format!("oci:{out}:{name}"))
            .arg(format!("dir:{}", copy.display())));
        let top: serde_json::Value =
            serde_json::from_slice(&std::fs::read(copy.join("manifest.json")).unwrap()).unwrap();
        let listed: Vec<&str> = top["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["digest"].as_str())
            .collect();
        assert_eq!(listed, [amd.as_str()], "{name}: only linux/amd64 listed");
    }

    // Without --platform: the hosted index as pushed.
    let whole = tmp.path().join("whole").display().to_string();
    let (ok, text) = mirror.cli(&["export", "--out", &whole, "local/team/app:1"]);
    assert!(ok, "{text}");
    let copy = tmp.path().join("copy-whole");
    run(Command::new("skopeo")
        .args(["copy", "--all"])
        .arg(format!("oci:{whole}:local/team/app:1"))
        .arg(format!("dir:{}", copy.display())));
    assert_eq!(
        format!(
            "sha256:{}",
            sha256_hex(&std::fs::read(copy.join("manifest.json")).unwrap())
        ),
        index
    );
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_passes_blobs_through_and_caching_resumes_with_space() {
    if !require(&["docker-registry", "mount", "umount"]) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&store)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: mounting a tmpfs failed (needs root)"
        );
        eprintln!("SKIP: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _mount = Mount(store.clone());
    let up = Registry::start(Auth::Anonymous);
    let blob = Arc::new(noise(12 << 20, 91));
    let digest = up.push_blob("big/one", &blob);
    let mirror = Mirror::start_with_store(
        Some(store.clone()),
        "",
        &upstream_toml("docker.io", &up.url()),
    );
    let url = Arc::new(format!(
        "{}/v2/docker.io/big/one/blobs/{digest}",
        mirror.url()
    ));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || get(&url).body)
        })
        .collect();
    for c in clients {
        assert_eq!(
            sha256_hex(&c.join().unwrap()),
            digest[7..],
            "every client got the whole blob"
        );
    }
    assert!(
        mirror.store_files(&digest[7..]).is_empty(),
        "nothing partial kept"
    );
    assert_eq!(mirror.tmp_files(), 0);
    assert!(
        mirror.metric(
            "entrepot_store_write_errors_total",
            &[("reason", "no_space")]
        ) >= 1.0
    );
    assert!(mirror.log().contains("store is full"));

    // Space returns: the next pull is cached again.
    run(Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&store));
    assert_eq!(sha256_hex(&get(&url).body), digest[7..]);
    mirror.settle();
    assert_eq!(
        mirror.store_files(&digest[7..]).len(),
        1,
        "cached once space is back"
    );
    let gets = up.count("GET", &format!("/blobs/{digest}"));
    assert_eq!(sha256_hex(&get(&url).body), digest[7..]);
    assert_eq!(
        up.count("GET", &format!("/blobs/{digest}")),
        gets,
        "then served from the cache"
    );
}
