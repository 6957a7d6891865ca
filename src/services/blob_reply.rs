//! What a blob request asks and gets back: the `Range` it names and the reply the routes
//! shape (a leaf shared by blobs, fills and hosted repositories).

use super::fill::stream::BodyStream;
use super::{ServiceError, Source};

/// A single `Range` request, as parsed from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-b` (inclusive) or `bytes=a-`.
    From(u64, Option<u64>),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// `[start, end)` within a blob of `size` bytes.
    pub fn resolve(self, size: u64) -> Result<(u64, u64), ServiceError> {
        let r = match self {
            ByteRange::From(a, b) => (a, b.map_or(size, |b| (b + 1).min(size))),
            ByteRange::Suffix(n) => (size.saturating_sub(n), size),
        };
        if r.0 >= r.1 {
            return Err(ServiceError::RangeNotSatisfiable { size });
        }
        Ok(r)
    }
}

pub struct BlobReply {
    /// Full size of the blob, when known.
    pub size: Option<u64>,
    /// `[start, end)` when answering a range request.
    pub range: Option<(u64, u64)>,
    /// `None` for HEAD.
    pub body: Option<BodyStream>,
    pub source: Source,
    /// Set when the blob was known from the served-blob memory: how long the same
    /// answer holds (see [`Services::still_served`](crate::services::Services::still_served)).
    pub served: Option<crate::store::Stamp>,
}
