//! Client authentication and authorisation: htpasswd Basic credentials (bcrypt, bounded
//! and throttled: [`passwords`]), the mirror's own bearer tokens ([`tokens`]), and the
//! ACL deciding pull, push, delete and catalog ([`access`]). A subsystem of its own beside
//! the cache logic: it needs only the config and the metrics, and the services below the
//! routes see nothing of it but the [`Caller`].

mod access;
mod caller;
mod passwords;
mod tokens;

pub use access::{Access, Identity, Need, Scope};
pub use caller::{AccessError, Caller};
pub use tokens::{Grant, SERVICE};
