//! entrepot: a multi-upstream OCI/Docker registry mirror with one verified,
//! content-addressed store shared by every upstream.
//!
//! Data flows config -> [`routes`] (parse, pick the upstream; [`auth`] says who calls)
//! -> [`services`] (cache logic, singleflight, TTL) -> [`upstream`] (upstream auth,
//! tokens, redirects) and [`store`] (all disk I/O, atomic commit); [`egress`] makes the
//! outbound connections, through a proxy when one is set.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod egress;
pub mod media;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod routes;
pub mod server;
pub mod services;
pub mod store;
pub mod upstream;
