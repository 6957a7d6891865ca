//! Who is calling and why a call is refused: the two types every part of [`crate::auth`]
//! and the services below it share (a leaf, so the auth files import it, never each other
//! in a circle).

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    /// An htpasswd user whose password checked out.
    User(String),
    /// Basic credentials that are not an htpasswd user's: taken as the caller's own
    /// credentials for upstream registries.
    Foreign {
        user: String,
        pass: String,
    },
}

impl Caller {
    /// The user name ("" when anonymous), e.g. for per-user caps.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anonymous => "",
            Caller::User(u) | Caller::Foreign { user: u, .. } => u,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AccessError {
    #[error("authentication required")]
    Unauthenticated,
    #[error("invalid username or password")]
    BadCredentials,
    #[error("invalid or expired token; fetch a new one from the token endpoint")]
    BadToken,
    #[error("the token does not grant {0}")]
    InsufficientScope(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Internal(&'static str),
    /// Too many failed logins from this address as this user.
    #[error("too many failed logins; retry after {}s", .0.as_secs())]
    Throttled(std::time::Duration),
}
