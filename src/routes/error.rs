//! The one place where errors of every layer become OCI error responses
//! (`{"errors":[{"code":..,"message":..}]}` with the right status). It lives with the
//! HTTP layer, the only one that answers clients: every arrow points down from here.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use super::path::PathError;
use super::target::RouteError;
use crate::auth::AccessError;
use crate::services::ServiceError;

#[derive(Debug, Clone)]
pub struct OciError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// `WWW-Authenticate` of a `401` (the request's Bearer challenge; set by the route,
    /// which knows the scope).
    pub challenge: Option<String>,
    /// `Retry-After` seconds (with `429 TOOMANYREQUESTS`).
    pub retry_after: Option<u64>,
}

impl OciError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> OciError {
        OciError {
            status,
            code,
            message: message.into(),
            challenge: None,
            retry_after: None,
        }
    }

    /// A `401` gets `challenge` unless it has one; other errors are left as they are.
    pub fn challenged(mut self, challenge: &str) -> OciError {
        if self.status == StatusCode::UNAUTHORIZED && self.challenge.is_none() {
            self.challenge = Some(challenge.to_string());
        }
        self
    }
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for OciError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let body =
            json!({"errors": [{"code": self.code, "message": self.message, "detail": null}]});
        let mut resp = HttpResponse::build(self.status);
        resp.insert_header(("Docker-Distribution-API-Version", "registry/2.0"));
        if let Some(secs) = self.retry_after {
            resp.insert_header(("Retry-After", secs.to_string()));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // The challenge that makes docker, skopeo and containerd send credentials.
            let c = self
                .challenge
                .as_deref()
                .unwrap_or("Basic realm=\"entrepot\"");
            resp.insert_header(("WWW-Authenticate", c));
            // A refusal (and the realm in it, built from this request) is never cached.
            resp.insert_header(("Cache-Control", "no-store"));
        }
        resp.json(body)
    }
}

impl From<PathError> for OciError {
    fn from(e: PathError) -> Self {
        let (status, code) = match e {
            PathError::Name => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            PathError::Reference => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            PathError::Digest(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            PathError::Unknown => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            PathError::Upload => (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
        };
        OciError::new(status, code, e.to_string())
    }
}

impl From<AccessError> for OciError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Denied(_) => OciError::new(StatusCode::FORBIDDEN, "DENIED", e.to_string()),
            AccessError::Internal(_) => {
                OciError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string())
            }
            AccessError::Throttled(left) => {
                let mut err = OciError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    e.to_string(),
                );
                err.retry_after = Some(left.as_secs().max(1));
                err
            }
            _ => OciError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", e.to_string()),
        }
    }
}

impl From<RouteError> for OciError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NameTooLong(_) => {
                OciError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string())
            }
            _ => OciError::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", e.to_string()),
        }
    }
}

impl From<ServiceError> for OciError {
    fn from(e: ServiceError) -> Self {
        use ServiceError as E;
        let msg = e.to_string();
        if let E::TooMany(_) = e.root() {
            let mut err = OciError::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", msg);
            err.retry_after = Some(10);
            return err;
        }
        if let E::RateLimited { retry_after, .. } = e.root() {
            let mut err = OciError::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", msg);
            // Whole seconds, rounded up: a client never comes back too early.
            err.retry_after =
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0));
            return err;
        }
        let (status, code) = match e.root() {
            E::ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            E::BlobUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            E::NameUnknown(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            E::Unavailable(_) | E::RateLimited { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
            }
            // As Docker Hub answers for private repositories: a client holding
            // credentials for it retries with them after this challenge.
            E::UpstreamDenied { .. } => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            E::DigestMismatch { .. } | E::BadUpstream { .. } => {
                (StatusCode::BAD_GATEWAY, "UNAVAILABLE")
            }
            E::ManifestTooLarge => (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            E::RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
            E::Denied(_) => (StatusCode::FORBIDDEN, "DENIED"),
            E::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            E::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            E::ManifestInvalid(_) => (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            E::ManifestBlobUnknown(_) => (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN"),
            E::UploadUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
            E::UploadRange(_) => (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID"),
            E::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "BLOB_UPLOAD_INVALID"),
            E::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
            E::Store(_) | E::Shared(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        };
        if status.is_server_error() {
            tracing::warn!(error = %msg, "request failed");
        }
        OciError::new(status, code, msg)
    }
}
