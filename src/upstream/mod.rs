//! Everything about talking to upstream registries, split by job: the upstreams as
//! configured ([`configured`]), the client that sends one request ([`client`]), auth
//! challenges and tokens ([`auth`]), where a redirect or a token realm may lead
//! ([`network`]), back-off by scope ([`backoff`]), repository filters ([`filter`]), and
//! the errors ([`error`]).

mod auth;
mod backoff;
mod client;
mod configured;
mod error;
mod filter;
pub mod network;

pub use auth::{parse_challenge, Challenge, TokenCache};
pub use backoff::{Backoff, Scope};
pub use client::{ClientShared, UpRequest, UpstreamClient};
pub use configured::{Creds, Upstream};
pub use error::UpstreamError;
pub use filter::RepoFilter;
