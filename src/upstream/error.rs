//! What can go wrong asking an upstream, and the one constructor of each error that
//! every part of [`super`] uses.

use std::time::Duration;

use super::configured::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No answer: the name did not resolve, the connection failed, or the answer did not
    /// come within `server.upstream_timeout`. `msg` names the URL and which of these.
    #[error("upstream {upstream}: {msg}")]
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

/// Says which URL got no answer and why, in words an operator can act on: an unresolved
/// host, a refused or failed connection, or a timeout (naming `server.upstream_timeout`:
/// a stalled upstream that had connected is not "cannot connect").
pub(super) fn connect_error(
    up: &Upstream,
    url: &url::Url,
    timeout: Duration,
    e: awc::error::SendRequestError,
) -> UpstreamError {
    use awc::error::{ConnectError, SendRequestError as E};
    let secs = timeout.as_secs_f64();
    let msg = match e {
        E::Connect(ConnectError::Resolver(e)) => {
            format!("cannot resolve the host of {url}: {e}; check its url and this machine's DNS")
        }
        E::Connect(ConnectError::Timeout) => format!(
            "cannot connect to {url} within server.upstream_timeout ({secs}s); check that it is reachable from this machine"
        ),
        E::Timeout => format!(
            "{url} sent no answer within server.upstream_timeout ({secs}s) after connecting; the upstream is stalled or slow (raise server.upstream_timeout if it is only slow)"
        ),
        E::Connect(e) => format!("cannot connect to {url}: {e}"),
        e => format!("request to {url} failed: {e}"),
    };
    connect_msg(up, msg)
}

pub(super) fn connect_msg(up: &Upstream, msg: String) -> UpstreamError {
    UpstreamError::Connect {
        upstream: up.name.clone(),
        msg,
    }
}
