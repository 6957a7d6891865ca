//! Builds the shared state once and runs the HTTP server.

use std::sync::Arc;

use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::routes::{self, target::Router};
use crate::services::{Mirror, Services};
use crate::store::Store;
use crate::upstream::{TokenCache, Upstream, UpstreamClient};

pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let store = Arc::new(Store::open(&cfg.server.storage)?);
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new())?);
    metrics.store_bytes.set(store.size() as i64);
    let router = web::Data::new(Router::new(
        Upstream::all_from(&cfg)?,
        cfg.server.default_upstream.as_deref(),
    ));
    let mirror = Arc::new(Mirror::new(store.clone(), metrics.clone()));
    let tokens = Arc::new(TokenCache::default());
    let timeout = cfg.server.upstream_timeout;
    let metrics_data = web::Data::from(metrics);
    tracing::info!(
        listen = %cfg.server.listen,
        storage = %store.root().display(),
        upstreams = ?cfg.upstreams.keys().collect::<Vec<_>>(),
        default = ?cfg.server.default_upstream,
        "entrepot serving"
    );
    HttpServer::new(move || {
        // awc clients are per worker thread; the token cache is shared by all.
        let client = UpstreamClient::new(tokens.clone(), timeout);
        App::new()
            .app_data(web::Data::new(Services::new(mirror.clone(), client)))
            .app_data(router.clone())
            .app_data(metrics_data.clone())
            .wrap(from_fn(routes::log_request))
            .configure(routes::configure)
    })
    .bind(cfg.server.listen)?
    .run()
    .await?;
    Ok(())
}
