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
    assert_eq!(
        up.count("GET", &format!("/blobs/{d}")),
        1,
        "one upstream fetch"
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
