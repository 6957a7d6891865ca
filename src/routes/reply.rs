//! Shaping service results into registry responses.

use actix_web::body::{BodyStream, BoxBody, SizedStream};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures_util::stream;

use super::API_VERSION;
use crate::names::Digest;
use crate::services::{BlobReply, ManifestReply, Page};

/// `Docker-Content-Digest`, parsed once.
const DIGEST: header::HeaderName = header::HeaderName::from_static("docker-content-digest");

pub fn manifest(r: ManifestReply) -> HttpResponse {
    // A manifest request is small enough that its headers' allocations and checks
    // showed in the profile: the response is made with its body and the values go in
    // as they are (no builder); the digest and ETag are written into two exact buffers,
    // and the common media types need no copy.
    let body = match r.body {
        Some(b) => BoxBody::new(b),
        None => empty_sized(r.size),
    };
    let mut resp = HttpResponse::with_body(StatusCode::OK, body);
    let headers = resp.headers_mut();
    digest_headers(headers, &r.digest);
    if let Some(v) = content_type(&r.media_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// The API version, `Docker-Content-Digest` and the ETag (the quoted digest) of a
/// manifest or blob answer.
fn digest_headers(headers: &mut HeaderMap, digest: &Digest) {
    let hex = digest.hex().as_bytes();
    headers.insert(API_VERSION.0, API_VERSION.1);
    headers.insert(DIGEST, digest_value(&[b"sha256:", hex]));
    headers.insert(header::ETAG, digest_value(&[b"\"sha256:", hex, b"\""]));
}

/// A header value made of a digest's parts (ASCII letters, digits, `:` and quotes).
fn digest_value(parts: &[&[u8]]) -> HeaderValue {
    let bytes = Bytes::from(parts.concat());
    // SAFETY: a digest is `sha256:` and 64 lowercase hex digits (`names::Digest` checks
    // them), and the quotes are visible ASCII: all valid in a header value, so the
    // byte-by-byte check is skipped.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// A manifest's `Content-Type`: one of the known types without a copy; another as it
/// came (it came in as a header, so it is valid; one that is not is left out).
fn content_type(t: &str) -> Option<HeaderValue> {
    match crate::media::MANIFEST_TYPES.iter().find(|k| **k == t) {
        Some(k) => Some(HeaderValue::from_static(k)),
        None => HeaderValue::from_str(t).ok(),
    }
}

pub fn blob(r: BlobReply, digest: &Digest) -> HttpResponse {
    let status = if r.range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let (start, end) = r.range.unwrap_or((0, r.size.unwrap_or(0)));
    let body = match (r.body, r.size) {
        (Some(body), Some(_)) => BoxBody::new(SizedStream::new(end - start, body)),
        (Some(body), None) => BoxBody::new(BodyStream::new(body)),
        (None, size) => empty_sized(size.unwrap_or(0)),
    };
    // Made as a manifest's answer is (see `manifest`): a blob HEAD is as small.
    let mut resp = HttpResponse::with_body(status, body);
    let headers = resp.headers_mut();
    digest_headers(headers, digest);
    let octets = HeaderValue::from_static("application/octet-stream");
    headers.insert(header::CONTENT_TYPE, octets);
    if r.size.is_some() {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    if let (Some((start, end)), Some(size)) = (r.range, r.size) {
        let range = format!("bytes {start}-{}/{size}", end - 1);
        // Digits, a dash, a slash and a space: always a valid value.
        if let Ok(v) = HeaderValue::try_from(range) {
            headers.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

/// `206 multipart/byteranges` of `parts` (`[start, end)`) of a blob of `size` bytes,
/// their bodies streamed one after the other between the part headers.
pub fn multipart(
    digest: &Digest,
    size: u64,
    parts: &[(u64, u64)],
    bodies: Vec<Option<crate::services::BodyStream>>,
) -> HttpResponse {
    use futures_util::StreamExt;
    let m = super::range::Multipart::new(parts, size);
    let len = m.len(parts);
    let text = |t: String| -> futures_util::stream::LocalBoxStream<
        'static,
        Result<bytes::Bytes, crate::services::ServiceError>,
    > { stream::once(async move { Ok(bytes::Bytes::from(t)) }).boxed_local() };
    let mut pieces = Vec::with_capacity(parts.len() * 2 + 1);
    for (head, body) in m.heads.iter().zip(bodies) {
        pieces.push(text(head.clone()));
        if let Some(b) = body {
            pieces.push(b.boxed_local());
        }
    }
    pieces.push(text(m.tail.clone()));
    let body = stream::iter(pieces).flatten();
    let mut resp = HttpResponse::build(StatusCode::PARTIAL_CONTENT)
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((header::CONTENT_TYPE, m.content_type()))
        .body(SizedStream::new(len, body));
    digest_headers(resp.headers_mut(), digest);
    resp
}

/// A body that announces `len` bytes and has none: HEAD responses carry the real
/// Content-Length this way (actix writes no body for HEAD).
pub fn empty_sized(len: u64) -> BoxBody {
    BoxBody::new(SizedStream::new(
        len,
        stream::empty::<Result<bytes::Bytes, std::io::Error>>(),
    ))
}

/// A JSON list page with an RFC 5988 `Link` to the next page, as Distribution sends.
pub fn page(body: serde_json::Value, page: &Page, path: &str, n: Option<usize>) -> HttpResponse {
    let mut resp = HttpResponse::Ok();
    resp.insert_header(API_VERSION);
    if let (Some(next), Some(n)) = (&page.next, n) {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("n", &n.to_string())
            .append_pair("last", next)
            .finish();
        resp.insert_header((header::LINK, format!("<{path}?{q}>; rel=\"next\"")));
    }
    resp.json(body)
}

/// `Range: 0-<last byte>` for upload progress (`0-0` when nothing arrived yet).
pub fn upload_range(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}
