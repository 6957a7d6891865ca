//! The `Range` header (RFC 9110 §14): one `bytes=` range or several. Several are
//! answered as `206 multipart/byteranges`; past [`MAX_PARTS`] the header is ignored and
//! the whole blob is sent, as the RFC lets a server do with a request it finds abusive.

use actix_web::http::StatusCode;

use super::error::OciError;
use crate::services::ByteRange;

/// Most parts answered as a multipart body.
pub const MAX_PARTS: usize = 32;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    Whole,
    One(ByteRange),
    Many(Vec<ByteRange>),
}

pub fn parse(v: &str) -> Result<Asked, OciError> {
    let bad = || {
        OciError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            format!(
                "unsupported Range {v:?}: `bytes=` with ranges like `a-b`, `a-` or `-n`, separated by commas"
            ),
        )
    };
    let spec = v.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    let specs: Vec<&str> = spec.split(',').map(str::trim).collect();
    if specs.len() > MAX_PARTS {
        return Ok(Asked::Whole);
    }
    let mut parts = Vec::with_capacity(specs.len());
    for s in specs {
        parts.push(one(s).ok_or_else(bad)?);
    }
    Ok(match parts.len() {
        1 => Asked::One(parts[0]),
        _ => Asked::Many(parts),
    })
}

fn one(spec: &str) -> Option<ByteRange> {
    let (a, b) = spec.split_once('-')?;
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => Some(ByteRange::Suffix(num(b)?)),
        (false, true) => Some(ByteRange::From(num(a)?, None)),
        (false, false) => {
            let (a, b) = (num(a)?, num(b)?);
            (b >= a).then_some(ByteRange::From(a, Some(b)))
        }
        (true, true) => None,
    }
}

/// The parts of `asked` within a blob of `size` bytes, as `[start, end)`; the ones that
/// are not satisfiable are left out (the request fails only if none is).
pub fn satisfiable(parts: &[ByteRange], size: u64) -> Vec<(u64, u64)> {
    parts.iter().filter_map(|p| p.resolve(size).ok()).collect()
}

/// A multipart/byteranges body around parts of a blob: the text before each part, and
/// the closing text. Lengths are known up front, so the response carries Content-Length.
pub struct Multipart {
    pub boundary: String,
    pub heads: Vec<String>,
    pub tail: String,
}

impl Multipart {
    pub fn new(parts: &[(u64, u64)], size: u64) -> Multipart {
        let boundary = format!("entrepot-{:016x}", rand::random::<u64>());
        let heads = parts
            .iter()
            .enumerate()
            .map(|(i, (s, e))| {
                format!(
                    "{}--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {s}-{}/{size}\r\n\r\n",
                    if i == 0 { "" } else { "\r\n" },
                    e - 1
                )
            })
            .collect();
        let tail = format!("\r\n--{boundary}--\r\n");
        Multipart {
            boundary,
            heads,
            tail,
        }
    }

    /// The whole body's length for these parts.
    pub fn len(&self, parts: &[(u64, u64)]) -> u64 {
        let text: usize = self.heads.iter().map(String::len).sum::<usize>() + self.tail.len();
        text as u64 + parts.iter().map(|(s, e)| e - s).sum::<u64>()
    }

    pub fn content_type(&self) -> String {
        format!("multipart/byteranges; boundary={}", self.boundary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(
            parse("bytes=0-9").ok(),
            Some(Asked::One(ByteRange::From(0, Some(9))))
        );
        assert_eq!(
            parse("bytes=5-").ok(),
            Some(Asked::One(ByteRange::From(5, None)))
        );
        assert_eq!(
            parse("bytes=-5").ok(),
            Some(Asked::One(ByteRange::Suffix(5)))
        );
        assert_eq!(
            parse("bytes=0-1, 4-5,-3").ok(),
            Some(Asked::Many(vec![
                ByteRange::From(0, Some(1)),
                ByteRange::From(4, Some(5)),
                ByteRange::Suffix(3)
            ]))
        );
        let many = format!("bytes={}", vec!["0-0"; MAX_PARTS + 1].join(","));
        assert_eq!(parse(&many).ok(), Some(Asked::Whole));
        for bad in [
            "bytes=",
            "bytes=-",
            "bytes=9-1",
            "items=0-1",
            "bytes=a-b",
            "bytes=0-1,",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn multipart_length_matches_the_parts() {
        let parts = satisfiable(
            &[
                ByteRange::From(0, Some(9)),
                ByteRange::From(500, None),
                ByteRange::Suffix(5),
            ],
            100,
        );
        assert_eq!(parts, vec![(0, 10), (95, 100)]);
        let m = Multipart::new(&parts, 100);
        let body: usize = m.heads.iter().map(String::len).sum::<usize>() + m.tail.len() + 15;
        assert_eq!(m.len(&parts), body as u64);
        assert!(m.heads[1].starts_with("\r\n--entrepot-"));
        assert!(m.heads[0].contains("Content-Range: bytes 0-9/100"));
    }
}
