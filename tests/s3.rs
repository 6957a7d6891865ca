//! The shared S3-API store on a real distributed object store: Garage, 3 nodes on
//! loopback, replication factor 3, with two entrepot processes on the same bucket.

mod common;

use std::sync::Arc;

use common::garage::{require_garage, Garage};
use common::*;
use object_store::path::Path as S3Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tempfile::TempDir;

/// The Garage binary, with the other peers; `None` (skip) on a laptop without them.
fn garage() -> Option<std::path::PathBuf> {
    require(PEERS).then(require_garage).flatten()
}

/// `[server.s3]` lines for node `n` of the cluster.
fn s3_lines(g: &Garage, n: usize, extra: &str) -> String {
    format!("{}{extra}\n", g.s3_section(n, "mirror/"))
}

/// A replica with hosted prefix `local` (alice may push) caching `upstream_url`.
fn replica(tmp: &TempDir, g: &Garage, node: usize, upstream_url: &str) -> Mirror {
    replica_with(tmp, g, node, upstream_url, "", "")
}

/// `replica` with extra `[server]` and `[server.s3]` lines.
fn replica_with(
    tmp: &TempDir,
    g: &Garage,
    node: usize,
    upstream_url: &str,
    server: &str,
    s3: &str,
) -> Mirror {
    let file = htpasswd(tmp.path(), &[("alice", "alice-pw"), ("bob", "bob-pw")]);
    Mirror::start(
        &format!("{server}\n{}", s3_lines(g, node, s3)),
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\nanonymous_pull = true\npush = [\"alice\", \"bob\"]\n\
             [upstreams.\"docker.io\"]\nurl = \"{upstream_url}\"\n",
            file.display()
        ),
    )
}

/// A direct S3 client on the bucket (to list and to tamper with objects).
struct Direct {
    rt: tokio::runtime::Runtime,
    s3: Arc<dyn ObjectStore>,
}

impl Direct {
    fn new(g: &Garage) -> Direct {
        let s3 = g.client();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Direct {
            rt,
            s3: Arc::new(s3),
        }
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        use futures_util::TryStreamExt;
        let p = S3Path::from(prefix);
        let list: Vec<_> = self
            .rt
            .block_on(self.s3.list(Some(&p)).try_collect::<Vec<_>>())
            .expect("list");
        list.into_iter().map(|m| m.location.to_string()).collect()
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        self.rt
            .block_on(self.s3.put(&S3Path::from(key), PutPayload::from(bytes)))
            .expect("put");
    }

    fn get(&self, key: &str) -> Vec<u8> {
        self.rt
            .block_on(async { self.s3.get(&S3Path::from(key)).await?.bytes().await })
            .expect("get")
            .to_vec()
    }
}

/// Pushes a blob through the upload API with POST on `a`, PATCH on `b` and the final
/// PUT on `a` again, as a load balancer may spread them; returns the final status.
fn split_upload(a: &Mirror, b: &Mirror, bytes: &[u8], digest: &str) -> u16 {
    let auth = basic("alice", "alice-pw");
    let h = [("Authorization", auth.as_str())];
    let r = send(
        &format!("{}/v2/local/split/blobs/uploads/", a.url()),
        "POST",
        b"",
        &h,
    );
    assert_eq!(r.status, 202, "POST on A");
    let loc = r.header("location").expect("Location").to_string();
    let (half, rest) = bytes.split_at(bytes.len() / 2);
    let patch = |m: &Mirror, chunk: &[u8], from: usize| {
        let range = format!("{}-{}", from, from + chunk.len() - 1);
        let r = send(
            &format!("{}{loc}", m.url()),
            "PATCH",
            chunk,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Range", range.as_str()),
                ("Content-Type", "application/octet-stream"),
            ],
        );
        assert_eq!(r.status, 202, "PATCH: {}", String::from_utf8_lossy(&r.body));
        r.header("range").map(str::to_string)
    };
    assert_eq!(
        patch(b, half, 0).as_deref(),
        Some(format!("0-{}", half.len() - 1).as_str())
    );
    // Another push user finds no such session, on either replica.
    let bob = basic("bob", "bob-pw");
    for m in [a, b] {
        for method in ["GET", "PATCH", "DELETE"] {
            let r = send(
                &format!("{}{loc}", m.url()),
                method,
                b"x",
                &[("Authorization", &bob)],
            );
            assert_eq!(
                (r.status, r.oci_code().as_str()),
                (404, "BLOB_UPLOAD_UNKNOWN"),
                "{method} by bob on {}",
                m.url()
            );
        }
    }
    // The status of the session, asked on A, counts what B received.
    let r = send(&format!("{}{loc}", a.url()), "GET", b"", &h);
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("range"),
        Some(format!("0-{}", half.len() - 1).as_str())
    );
    patch(b, rest, half.len());
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = send(
        &format!("{}{loc}{sep}digest={digest}", a.url()),
        "PUT",
        b"",
        &h,
    );
    r.status
}

#[test]
fn two_replicas_share_one_bucket() {
    let Some(bin) = garage() else { return };
    let mut g = Garage::start(&bin);
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let img = layout.build("img", &[("a.bin", &image::noise(3_000_000, 5))]);
    let layer = layout.layers(&img)[0].clone();
    layout.push("img", &format!("{}/library/app:1", up.host()), None);

    let a = replica(&tmp, &g, 0, &up.url());
    let mut b = replica(&tmp, &g, 1, &up.url());
    let (host_a, host_b) = (
        format!("127.0.0.1:{}", a.port),
        format!("127.0.0.1:{}", b.port),
    );

    // Hosted: pushed through A, pulled through B (skopeo and containerd).
    let (index, _) = layout.multiarch(400_000, 41);
    layout.push(
        "multi",
        &format!("{host_a}/local/team/app:1"),
        Some("alice:alice-pw"),
    );
    assert_eq!(
        skopeo_raw_digest(&format!("{host_b}/local/team/app:1")),
        index
    );
    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", &host_b, &b.url(), Style::Ns);
    let got = ctr
        .pull("s3", &hosts, &format!("{host_b}/local/team/app:1"))
        .expect("containerd pulls through B what was pushed through A");
    assert_eq!(got, index);

    // An upload spread over both replicas.
    let blob = image::noise(700_000, 9);
    let digest = format!("sha256:{}", sha256_hex(&blob));
    assert_eq!(split_upload(&a, &b, &blob, &digest), 201);
    let r = get(&format!("{}/v2/local/split/blobs/{digest}", b.url()));
    assert_eq!(
        (r.status, sha256_hex(&r.body)),
        (200, digest[7..].to_string())
    );

    // Cache: A fetches from the upstream, B serves the same blob from the bucket.
    let blob_url = |m: &Mirror| format!("{}/v2/docker.io/library/app/blobs/{layer}", m.url());
    let out = |m: &Mirror| m.metric("entrepot_s3_bytes_total", &[("direction", "out")]);
    let written = out(&a);
    let r = get(&blob_url(&a));
    assert_eq!(sha256_hex(&r.body), layer[7..]);
    let full = r.body.len();
    a.settle();
    // The bucket copy trails the fill (clients do not wait for the bucket).
    let s3 = Direct::new(&g);
    let key = format!("mirror/blobs/sha256/{}", &layer[7..]);
    wait_until("bucket copy", std::time::Duration::from_secs(20), || {
        s3.keys("mirror/blobs/sha256").contains(&key)
    });
    assert_eq!(
        out(&a) - written,
        full as f64,
        "a cold blob is written to the bucket once (1.00x), while it is served"
    );
    let r = get(&format!("{}/v2/docker.io/library/app/manifests/1", a.url()));
    assert_eq!(r.status, 200);
    let before = up.count("GET", "/blobs/");
    let r = get(&blob_url(&b));
    assert_eq!(sha256_hex(&r.body), layer[7..]);
    assert_eq!(
        up.count("GET", "/blobs/"),
        before,
        "B read the bucket, not the upstream"
    );
    let copies = s3
        .keys("mirror/blobs/sha256")
        .iter()
        .filter(|k| k.ends_with(&layer[7..]))
        .count();
    assert_eq!(copies, 1, "one object per blob in the bucket");

    // B restarted with an empty local disk serves what is cached, asking the upstream
    // nothing (tag records live in the bucket).
    b.stop();
    std::fs::remove_dir_all(&b.store).unwrap();
    b.restart();
    let (gets, heads) = (up.count("GET", "/v2/"), up.count("HEAD", "/v2/"));
    let r = get(&format!("{}/v2/docker.io/library/app/manifests/1", b.url()));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-content-digest"), Some(img.as_str()));
    let r = get(&blob_url(&b));
    assert_eq!(sha256_hex(&r.body), layer[7..]);
    assert_eq!(
        (up.count("GET", "/v2/"), up.count("HEAD", "/v2/")),
        (gets, heads),
        "an empty local disk is filled from the bucket: 0 upstream requests"
    );

    // A storage node down: pushes and pulls go on (2 of 3 nodes hold every object).
    g.stop(2);
    let img2 = layout.build("img2", &[("b.bin", &image::noise(200_000, 6))]);
    layout.push(
        "img2",
        &format!("{host_a}/local/team/two:1"),
        Some("alice:alice-pw"),
    );
    assert_eq!(
        skopeo_raw_digest(&format!("{host_b}/local/team/two:1")),
        img2
    );

    // A corrupt object in the bucket is never served as valid: `verify` reports it, and
    // a replica that must read it refuses the bytes, deletes the object, and the next
    // request fetches the blob from the upstream again.
    let mut bad = s3.get(&key);
    bad[1000] ^= 0xff;
    s3.put(&key, bad);
    let (ok, out) = b.cli(&["verify"]);
    assert!(!ok && out.contains(&format!("BAD {layer}")), "{out}");
    b.stop();
    std::fs::remove_dir_all(&b.store).unwrap();
    b.restart();
    let first = get(&blob_url(&b));
    assert!(
        first.status != 200 || sha256_hex(&first.body) != layer[7..] && first.body.len() < full,
        "a corrupt bucket object must not reach a client whole"
    );
    assert_eq!(b.metric("entrepot_s3_corrupt_objects_total", &[]), 1.0);
    let before = up.count("GET", "/blobs/");
    let again = get(&blob_url(&b));
    assert_eq!(sha256_hex(&again.body), layer[7..]);
    assert_eq!(
        up.count("GET", "/blobs/"),
        before + 1,
        "fetched from the upstream again"
    );
    wait_until(
        "bucket copy again",
        std::time::Duration::from_secs(20),
        || s3.keys("mirror/blobs/sha256").contains(&key),
    );
    assert_eq!(
        sha256_hex(&s3.get(&key)),
        layer[7..],
        "and the bucket holds it whole"
    );

    // A Range read of an altered object (same length) gets none of its bytes: a part is
    // served only once the whole object checked out, and the object is repaired.
    let mut bad = s3.get(&key);
    bad[full / 2] ^= 0xff;
    s3.put(&key, bad);
    b.stop();
    std::fs::remove_dir_all(&b.store).unwrap();
    b.restart();
    let part = http("GET", &blob_url(&b), &[("Range", "bytes=0-99")]);
    assert_ne!(part.status, 206, "a part of an unverified bucket object");
    assert!(part.status >= 500, "{}", part.status);
    assert_eq!(b.metric("entrepot_s3_corrupt_objects_total", &[]), 1.0);
    let part = http("GET", &blob_url(&b), &[("Range", "bytes=0-99")]);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, layout.blob(&layer)[..100]);
    assert!(
        b.metric(
            "entrepot_s3_requests_total",
            &[("op", "get"), ("result", "ok")]
        ) > 0.0
    );

    // A small local tier: what is read is trimmed from the disk, still served from the
    // bucket.
    let c = replica_with(
        &tmp,
        &g,
        1,
        &up.url(),
        "max_cache_size = \"1KiB\"",
        "local_cache_size = \"100KiB\"\ngc = false",
    );
    for _ in 0..2 {
        let r = get(&format!("{}/v2/local/split/blobs/{digest}", c.url()));
        assert_eq!(sha256_hex(&r.body), digest[7..]);
        wait_until(
            "local tier trimmed",
            std::time::Duration::from_secs(10),
            || c.store_files(&digest[7..]).is_empty(),
        );
    }
    // Eviction runs on the bucket: upstream-cached content goes, hosted content stays.
    let (ok, out) = c.cli(&["gc"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("evicted {layer}")), "{out}");
    let keys = s3.keys("mirror/blobs/sha256");
    assert!(
        !keys.iter().any(|k| k.ends_with(&layer[7..])),
        "cached layer evicted"
    );
    assert!(
        keys.iter().any(|k| k.ends_with(&digest[7..])),
        "hosted blob kept"
    );
    assert_eq!(
        skopeo_raw_digest(&format!("{host_b}/local/team/app:1")),
        index
    );
}

#[test]
fn s3_start_errors_say_what_is_wrong() {
    let Some(bin) = garage() else { return };
    let g = Garage::start(&bin);
    let tmp = TempDir::new().unwrap();
    let serve = |s3: &str| {
        let cfg = store_config(
            tmp.path(),
            &format!("{s3}\n[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:1\"\n"),
        );
        let (ok, out) = entrepot_cli(tmp.path(), Some(&cfg), &["serve"]);
        assert!(!ok);
        out
    };
    let good = s3_lines(&g, 0, "");
    let err = serve(&good.replace(
        &g.secret,
        "0000000000000000000000000000000000000000000000000000000000000000",
    ));
    assert!(
        err.contains("server.s3") && err.contains("refused"),
        "{err}"
    );
    let err = serve(&good.replace("bucket = \"entrepot\"", "bucket = \"nope\""));
    assert!(
        err.contains("server.s3") && err.contains("\"nope\""),
        "{err}"
    );
    let err = serve(&good.replace(&g.endpoint(0), &format!("http://127.0.0.1:{}", free_port())));
    assert!(
        err.contains("server.s3") && err.contains("reachable"),
        "{err}"
    );
}
