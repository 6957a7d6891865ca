//! What can go wrong asking an upstream, and the one constructor of each error that
//! every part of [`super`] uses.

use std::time::Duration;

use super::configured::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream}: cannot connect: {msg}")]
    Connect { upstream: String, msg: String },
    #[error("upstream {upstream}: auth failed: {msg}")]
    Auth { upstream: String, msg: String },
    #[error("upstream {upstream}: {msg}")]
    Protocol { upstream: String, msg: String },
    /// The upstream said `429`/`503` (now or within its `Retry-After`): not asked again
    /// before `retry_after` has passed.
    #[error("upstream {upstream} is rate limiting or unavailable; retry after {}s", .retry_after.as_secs())]
    RateLimited {
        upstream: String,
        retry_after: Duration,
    },
}

pub(super) fn rate_limited(up: &Upstream, retry_after: Duration) -> UpstreamError {
    UpstreamError::RateLimited {
        upstream: up.name.clone(),
        retry_after,
    }
}

pub(super) fn protocol(up: &Upstream, msg: String) -> UpstreamError {
    UpstreamError::Protocol {
        upstream: up.name.clone(),
        msg,
    }
}

pub(super) fn connect_error(up: &Upstream, e: awc::error::SendRequestError) -> UpstreamError {
    connect_msg(up, e.to_string())
}

pub(super) fn connect_msg(up: &Upstream, msg: String) -> UpstreamError {
    UpstreamError::Connect {
        upstream: up.name.clone(),
        msg,
    }
}
