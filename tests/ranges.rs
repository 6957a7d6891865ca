//! Byte ranges as lazy-pulling snapshotters use them (issue 28): several ranges in one
//! request answered as `206 multipart/byteranges` (overlapping and out of order), from a
//! stored blob and from a cold one; `If-Range`; `HEAD` with `Range`.

mod common;

use common::*;

/// The parts of a `multipart/byteranges` body: (Content-Range value, bytes).
fn parts(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .expect("boundary")
        .trim();
    let delim = format!("--{boundary}");
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let at = find(rest, delim.as_bytes()).expect("delimiter");
        rest = &rest[at + delim.len()..];
        if rest.starts_with(b"--") {
            return out;
        }
        let head_end = find(rest, b"\r\n\r\n").expect("part head");
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: "))
            .expect("Content-Range")
            .to_string();
        rest = &rest[head_end + 4..];
        let (a, b) = range
            .trim_start_matches("bytes ")
            .split('/')
            .next()
            .and_then(|r| r.split_once('-'))
            .expect("range");
        let len = b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1;
        out.push((range.clone(), rest[..len].to_vec()));
        rest = &rest[len..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn several_ranges_come_back_as_multipart_from_stored_and_cold_blobs() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let blob = noise(3 << 20, 291);
    let d = up.push_blob("library/lazy", &blob);
    let m = Mirror::start(
        "",
        &format!("[upstreams.\"docker.io\"]\nurl = \"{}\"\n", up.url()),
    );
    let url = format!("{}/v2/docker.io/library/lazy/blobs/{d}", m.url());
    let size = blob.len();
    let asked = format!("bytes=-100,0-9,1000-1999,5-14,{}-", size - 10);
    let expect: Vec<(String, Vec<u8>)> = [
        (size - 100, size),
        (0, 10),
        (1000, 2000),
        (5, 15),
        (size - 10, size),
    ]
    .iter()
    .map(|(a, b)| (format!("bytes {a}-{}/{size}", b - 1), blob[*a..*b].to_vec()))
    .collect();
    // Cold (nothing stored yet), then stored: the same parts, byte for byte.
    for when in ["cold", "stored"] {
        let r = http("GET", &url, &[("Range", &asked)]);
        assert_eq!(r.status, 206, "{when}");
        let ct = r.header("content-type").unwrap_or_default().to_string();
        assert!(
            ct.starts_with("multipart/byteranges; boundary="),
            "{when}: {ct}"
        );
        assert_eq!(
            r.header("content-length")
                .map(|l| l.parse::<usize>().unwrap()),
            Some(r.body.len()),
            "{when}"
        );
        assert_eq!(parts(&ct, &r.body), expect, "{when}");
        m.settle();
    }
    // One fill, plus the parts that went to the upstream ahead of it.
    let ahead = m.metric("entrepot_ranges_ahead_total", &[("upstream", "docker.io")]) as usize;
    assert_eq!(
        up.count("GET", &format!("/blobs/{d}")),
        1 + ahead,
        "one fill plus {ahead} ranges ahead of it"
    );
    // Unsatisfiable parts are dropped; none satisfiable: 416 with the size.
    let r = http("GET", &url, &[("Range", &format!("bytes=0-1,{size}-"))]);
    assert_eq!(
        (r.status, r.header("content-range")),
        (206, Some(format!("bytes 0-1/{size}").as_str()))
    );
    let r = http(
        "GET",
        &url,
        &[("Range", &format!("bytes={size}-,{}-", size + 5))],
    );
    assert_eq!(r.status, 416);
    // If-Range: this blob's ETag keeps the range; anything else gets the whole blob.
    let etag = format!("\"{d}\"");
    let r = http("GET", &url, &[("Range", "bytes=0-9"), ("If-Range", &etag)]);
    assert_eq!((r.status, r.body.len()), (206, 10));
    let r = http(
        "GET",
        &url,
        &[("Range", "bytes=0-9"), ("If-Range", "\"other\"")],
    );
    assert_eq!((r.status, r.body.len()), (200, size));
    // HEAD ignores Range (it is defined for GET only).
    let r = http("HEAD", &url, &[("Range", "bytes=0-9,20-29")]);
    assert_eq!(
        (r.status, r.header("content-length")),
        (200, Some(size.to_string().as_str()))
    );
    // Too many parts: the whole blob.
    let many = format!("bytes={}", vec!["0-0"; 33].join(","));
    let r = http("GET", &url, &[("Range", &many)]);
    assert_eq!((r.status, r.body.len()), (200, size));
}

/// The fill of a 32 MiB blob runs at 8 MiB/s (a throttled upstream): a tail range and a
/// middle range are answered before it could reach them (served ahead, the blob not yet
/// stored), with the upstream's bytes; 8 clients asking one range cause one upstream
/// range request; the fill completes once and nothing mismatches. With
/// `verify_ranges = "before"` nothing goes ahead.
#[test]
fn ranges_ahead_of_a_slow_fill_are_answered_at_once() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let blob = noise(32 << 20, 292);
    let d = up.push_blob("library/lazy", &blob);
    let other = noise(12 << 20, 293);
    let d2 = up.push_blob("library/careful", &other);
    let slow = common::throttle::Throttle::start(up.port, 8 << 20);
    let base = format!("http://127.0.0.1:{}", slow.port);
    let m = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{base}\"\n[upstreams.careful]\nurl = \"{base}\"\nverify_ranges = \"before\"\n"
        ),
    );
    let url = format!("{}/v2/docker.io/library/lazy/blobs/{d}", m.url());
    let size = blob.len();
    let ahead = |up: &str| m.metric("entrepot_ranges_ahead_total", &[("upstream", up)]);
    // The footer first, as a snapshotter reads it.
    let tail = http(
        "GET",
        &url,
        &[("Range", &format!("bytes={}-{}", size - (1 << 20), size - 1))],
    );
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, blob[size - (1 << 20)..]);
    assert_eq!(ahead("docker.io"), 1.0, "served ahead of the fill");
    assert!(
        m.store_files(&d[7..]).is_empty(),
        "the fill had not stored the blob yet"
    );
    // Eight nodes read the same table of contents at once.
    let (a, b) = (20 << 20, (21 << 20) - 1);
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || http("GET", &url, &[("Range", &format!("bytes={a}-{b}"))]))
        })
        .collect();
    for r in readers {
        let r = r.join().unwrap();
        assert_eq!((r.status, r.body.len()), (206, b - a + 1));
        assert_eq!(r.body, blob[a..=b]);
    }
    // The whole blob: still one fill, verified.
    let whole = get(&url);
    assert_eq!(format!("sha256:{}", sha256_hex(&whole.body)), d);
    m.settle();
    assert_eq!(m.store_files(&d[7..]).len(), 1);
    assert_eq!(
        up.count("GET", &format!("/blobs/{d}")),
        3,
        "one fill, one tail range, one middle range for eight clients"
    );
    assert_eq!(m.metric("entrepot_range_mismatches_total", &[]), 0.0);
    // verify_ranges = "before": the range waits for the verified fill.
    let careful = format!("{}/v2/careful/library/careful/blobs/{d2}", m.url());
    let r = http("GET", &careful, &[("Range", "bytes=11000000-11000099")]);
    assert_eq!(r.body, other[11_000_000..11_000_100]);
    assert_eq!(ahead("careful"), 0.0);
}

/// An upstream that answers ranges with wrong bytes: served ahead (nothing can check
/// them then), found out once the fill verified the blob: counted, logged, and the
/// repository's upstream treated as corrupt for that blob.
#[test]
fn wrong_bytes_served_ahead_are_caught_after_the_fill() {
    if !require(PEERS) {
        return;
    }
    let blob = std::sync::Arc::new(noise(24 << 20, 294));
    let d = format!("sha256:{}", sha256_hex(&blob));
    let served = blob.clone();
    let fake = common::fake::FakeServer::start(move |req| {
        let len = served.len().to_string();
        if req.method == "GET" && req.path.contains("/blobs/") {
            if let Some(range) = req.header("range") {
                let (a, b) = range
                    .trim_start_matches("bytes=")
                    .split_once('-')
                    .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
                    .unwrap();
                let cr = format!("bytes {a}-{b}/{len}");
                return common::fake::Response::new(
                    206,
                    &[("Content-Range", cr.as_str())],
                    vec![0x5a; b - a + 1],
                );
            }
            return common::fake::Response::new(200, &[], served.to_vec());
        }
        common::fake::Response::new(404, &[], Vec::new())
    });
    let slow = common::throttle::Throttle::start(fake.port, 8 << 20);
    let m = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:{}\"\n",
            slow.port
        ),
    );
    let url = format!("{}/v2/docker.io/library/liar/blobs/{d}", m.url());
    let size = blob.len();
    let tail = http(
        "GET",
        &url,
        &[("Range", &format!("bytes={}-{}", size - 4096, size - 1))],
    );
    assert_eq!((tail.status, tail.body.len()), (206, 4096));
    let whole = get(&url);
    assert_eq!(
        format!("sha256:{}", sha256_hex(&whole.body)),
        d,
        "the fill is right"
    );
    wait_until(
        "the mismatch is found",
        std::time::Duration::from_secs(20),
        || {
            m.metric(
                "entrepot_range_mismatches_total",
                &[("upstream", "docker.io")],
            ) == 1.0
        },
    );
    assert!(m.log().contains("a range served ahead of the fill differs"));
    assert!(
        m.log().contains("repo=library/liar"),
        "the log names the repository"
    );
    // The verified blob itself is served as stored.
    m.settle();
    let again = get(&url);
    assert_eq!(format!("sha256:{}", sha256_hex(&again.body)), d);
}

/// An upstream whose range answers do not match the range asked: a `Content-Range`
/// naming other bytes is left to the fill (the client gets the right bytes), and a body
/// shorter than its range ends that client's response early, never passing half a range
/// off as whole; the blob still fills, verifies and then serves the range.
#[test]
fn range_answers_that_do_not_match_the_range_asked() {
    if !require(PEERS) {
        return;
    }
    let other = std::sync::Arc::new(noise(24 << 20, 295));
    let short = std::sync::Arc::new(noise(24 << 20, 296));
    let (d_other, d_short) = (
        format!("sha256:{}", sha256_hex(&other)),
        format!("sha256:{}", sha256_hex(&short)),
    );
    let (o, s, dd) = (other.clone(), short.clone(), d_other.clone());
    let fake = common::fake::FakeServer::start(move |req| {
        let blob = if req.path.ends_with(&dd) { &o } else { &s };
        let len = blob.len();
        if !req.path.contains("/blobs/") {
            return common::fake::Response::new(404, &[], Vec::new());
        }
        let Some(range) = req.header("range").filter(|_| req.method == "GET") else {
            return common::fake::Response::new(200, &[], blob.to_vec());
        };
        let (a, b) = range
            .trim_start_matches("bytes=")
            .split_once('-')
            .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
            .unwrap();
        if req.path.ends_with(&dd) {
            // The first bytes of the blob, whatever was asked.
            let cr = format!("bytes 0-{}/{len}", b - a);
            let body = blob[..=b - a].to_vec();
            return common::fake::Response::new(206, &[("Content-Range", cr.as_str())], body);
        }
        // The range asked, cut short by half.
        let cr = format!("bytes {a}-{b}/{len}");
        let body = blob[a..a + (b - a + 1).div_euclid(2)].to_vec();
        common::fake::Response::new(206, &[("Content-Range", cr.as_str())], body)
    });
    let slow = common::throttle::Throttle::start(fake.port, 16 << 20);
    let m = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:{}\"\n",
            slow.port
        ),
    );
    let size = other.len();
    let (a, b) = (size - 8192, size - 1);
    let range = format!("bytes={a}-{b}");
    let url = |d: &str| format!("{}/v2/docker.io/library/app/blobs/{d}", m.url());
    // Another range named: the right bytes anyway, from the fill.
    let r = http("GET", &url(&d_other), &[("Range", &range)]);
    assert_eq!(r.status, 206);
    assert!(
        r.body == other[a..=b],
        "the bytes asked, not the ones named"
    );
    // Cut short: the connection ends before the range is whole (with or without the
    // headers, which actix may not have flushed yet): a client sees an error.
    let path = format!("/v2/docker.io/library/app/blobs/{d_short}");
    let r = raw(m.port, "GET", &path, &[("Range", &range)]);
    assert!(
        r.body.len() < 8192,
        "status {}, {} bytes passed off as the range",
        r.status,
        r.body.len()
    );
    // The fill goes on: the range then comes whole from verified bytes.
    let hex = d_short.trim_start_matches("sha256:").to_string();
    wait_until(
        "the blob is stored",
        std::time::Duration::from_secs(30),
        || !m.store_files(&hex).is_empty(),
    );
    let r = http("GET", &url(&d_short), &[("Range", &range)]);
    assert_eq!((r.status, r.body == short[a..=b]), (206, true));
    assert!(
        m.log().contains("fewer bytes than the range asked"),
        "the log says why"
    );
}

/// `range_fill = false`: a range of a cold blob is served from the upstream alone (with
/// the blob's size in `Content-Range`), and no fill downloads the whole blob.
#[test]
fn with_range_fill_off_a_range_starts_no_fill() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let blob = noise(6 << 20, 295);
    let d = up.push_blob("library/lazy", &blob);
    let m = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"{}\"\nrange_fill = false\n",
            up.url()
        ),
    );
    let url = format!("{}/v2/docker.io/library/lazy/blobs/{d}", m.url());
    let r = http("GET", &url, &[("Range", "bytes=100-4195")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, blob[100..4196]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 100-4195/{}", blob.len()).as_str())
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(up.count("GET", &format!("/blobs/{d}")), 1, "the range only");
    assert!(m.store_files(&d[7..]).is_empty(), "nothing stored");
}

/// A lazy-pulling client as a snapshotter reads an eStargz-shaped layer: the footer (the
/// last 51 bytes, naming where the table of contents starts), the table of contents, then
/// the chunks the files it opens need, each checked against the digest the table gives
/// (the format's own verification). The layer is cold and its fill slow; every read is
/// answered, the chunks check out, and the fill later verifies the whole layer with no
/// range mismatch.
#[test]
fn an_estargz_shaped_lazy_read_through_a_cold_layer() {
    if !require(PEERS) {
        return;
    }
    const FOOTER: usize = 51;
    let chunks: Vec<Vec<u8>> = (0..24).map(|i| noise(1 << 20, 300 + i)).collect();
    let mut blob = Vec::new();
    let mut toc = Vec::new();
    for c in &chunks {
        toc.push(
            serde_json::json!({"offset": blob.len(), "size": c.len(), "sha256": sha256_hex(c)}),
        );
        blob.extend_from_slice(c);
    }
    let toc_offset = blob.len();
    blob.extend_from_slice(serde_json::json!({ "entries": toc }).to_string().as_bytes());
    let mut footer = format!("ESTARGZ-TOC:{toc_offset:016x}").into_bytes();
    footer.resize(FOOTER, b' ');
    blob.extend_from_slice(&footer);
    let up = Registry::start(Auth::Anonymous);
    let d = up.push_blob("library/lazy", &blob);
    let slow = common::throttle::Throttle::start(up.port, 8 << 20);
    let m = Mirror::start(
        "",
        &format!(
            "[upstreams.\"docker.io\"]\nurl = \"http://127.0.0.1:{}\"\n",
            slow.port
        ),
    );
    let url = format!("{}/v2/docker.io/library/lazy/blobs/{d}", m.url());
    let range = |a: usize, b: usize| {
        let r = http("GET", &url, &[("Range", &format!("bytes={a}-{}", b - 1))]);
        assert_eq!((r.status, r.body.len()), (206, b - a), "bytes {a}-{b}");
        r.body
    };
    // The size comes with the layer's descriptor; a HEAD says the same.
    let size: usize = http("HEAD", &url, &[])
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .expect("size");
    assert_eq!(size, blob.len());
    let footer = range(size - FOOTER, size);
    let text = String::from_utf8_lossy(&footer);
    let at = usize::from_str_radix(
        text.trim().strip_prefix("ESTARGZ-TOC:").expect("footer"),
        16,
    )
    .expect("offset");
    let toc: serde_json::Value = serde_json::from_slice(&range(at, size - FOOTER)).expect("toc");
    for i in [3, 17, 22, 9] {
        let e = &toc["entries"][i];
        let (off, len) = (
            e["offset"].as_u64().unwrap() as usize,
            e["size"].as_u64().unwrap() as usize,
        );
        let chunk = range(off, off + len);
        assert_eq!(
            sha256_hex(&chunk),
            e["sha256"].as_str().unwrap(),
            "chunk {i}"
        );
    }
    assert!(
        m.metric("entrepot_ranges_ahead_total", &[("upstream", "docker.io")]) >= 1.0,
        "reads went ahead of the slow fill"
    );
    // The whole layer, later: one fill, verified; nothing served ahead differed.
    let whole = get(&url);
    assert_eq!(format!("sha256:{}", sha256_hex(&whole.body)), d);
    m.settle();
    assert_eq!(m.metric("entrepot_range_mismatches_total", &[]), 0.0);
    assert_eq!(m.store_files(&d[7..]).len(), 1);
}
