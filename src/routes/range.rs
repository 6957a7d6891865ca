//! The `Range` header: one `bytes=` range; anything else is refused with 416.

use actix_web::http::StatusCode;

use super::error::OciError;
use crate::services::ByteRange;

pub fn parse(v: &str) -> Result<ByteRange, OciError> {
    let bad = || {
        OciError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            format!("unsupported Range {v:?}: one `bytes=a-b`, `bytes=a-` or `bytes=-n` range"),
        )
    };
    let spec = v.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    if spec.contains(',') {
        return Err(bad());
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => Ok(ByteRange::Suffix(num(b)?)),
        (false, true) => Ok(ByteRange::From(num(a)?, None)),
        (false, false) => {
            let (a, b) = (num(a)?, num(b)?);
            if b < a {
                return Err(bad());
            }
            Ok(ByteRange::From(a, Some(b)))
        }
        (true, true) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse("bytes=0-9").ok(), Some(ByteRange::From(0, Some(9))));
        assert_eq!(parse("bytes=5-").ok(), Some(ByteRange::From(5, None)));
        assert_eq!(parse("bytes=-5").ok(), Some(ByteRange::Suffix(5)));
        for bad in [
            "bytes=",
            "bytes=-",
            "bytes=9-1",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=a-b",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
