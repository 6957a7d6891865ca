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
    /// The egress proxy did not carry the request (refused, asked for a login, could not
    /// be reached): an outage of the upstream as far as serving goes, but the fix is the
    /// proxy's, which `msg` names with its answer.
    #[error("upstream {upstream}: {msg}")]
    Proxy { upstream: String, msg: String },
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
    if let E::Connect(ConnectError::Io(io)) = &e {
        if let Some(p) = io
            .get_ref()
            .and_then(|r| r.downcast_ref::<crate::egress::ProxyFailure>())
        {
            return UpstreamError::Proxy {
                upstream: up.name.clone(),
                msg: format!("{p} (asking {url})"),
            };
        }
    }
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

/// Whether an answer is a proxy's own (to a request it carried in absolute form, for an
/// `http://` target): `407`, or a gateway error it marks as its own (`Proxy-Status`,
/// squid's `X-Squid-Error`).
pub(super) fn from_proxy(
    status: awc::http::StatusCode,
    headers: &awc::http::header::HeaderMap,
) -> bool {
    let marked = headers.contains_key("proxy-status") || headers.contains_key("x-squid-error");
    status == awc::http::StatusCode::PROXY_AUTHENTICATION_REQUIRED
        || (status.is_server_error() && marked)
}

/// The error for a proxy's own answer `status` (see [`from_proxy`]) to a request for
/// `url`, naming the proxy.
pub(super) fn proxy_answer(
    up: &Upstream,
    proxy: &str,
    url: &str,
    status: awc::http::StatusCode,
) -> UpstreamError {
    let hint = if status == awc::http::StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        "; check the proxy user and password (HTTP_PROXY, or the upstream's proxy and proxy_password_file)"
    } else {
        ""
    };
    UpstreamError::Proxy {
        upstream: up.name.clone(),
        msg: format!("egress proxy {proxy} answered {status} for {url}{hint}"),
    }
}
