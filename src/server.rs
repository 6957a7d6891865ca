//! Builds the shared state once and runs the HTTP server.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};

use anyhow::Context;

use crate::auth::Access;
use crate::cluster::Cluster;
use crate::config::{Config, TlsConfig};
use crate::egress::Proxies;
use crate::metrics::Metrics;
use crate::routes::{self, target::Router};
use crate::services::gc::GcPolicy;
use crate::services::{Hosted, Mirror, Services};
use crate::store::{Bucket, Store};
use crate::upstream::{ClientShared, Upstream, UpstreamClient};

/// Abandoned uploads are looked for at least this often (and twice per `upload_ttl`).
const UPLOAD_SWEEP: Duration = Duration::from_secs(60);
/// The rendezvous key whose owner runs eviction on the bucket.
const GC_KEY: &str = "entrepot:gc";
/// With a bucket: how often uses are written to it and the local tier is trimmed.
const USES_EVERY: Duration = Duration::from_secs(30);

/// The store of `cfg`: the directory `server.storage`, as the local tier of the bucket
/// `[server.s3]` when there is one (reached once here, so a wrong endpoint, bucket or key
/// stops the start with a clear message).
pub async fn open_store(
    cfg: &Config,
    metrics: Arc<Metrics>,
    egress: &Proxies,
) -> anyhow::Result<Store> {
    let storage = &cfg.server.storage;
    let local = || {
        format!(
            "server.storage {}: cannot use it as the store (it must be a directory, or a path where one can be made)",
            storage.display()
        )
    };
    let Some(s3) = &cfg.server.s3 else {
        return Store::open(storage).with_context(local);
    };
    let bucket = Bucket::new(s3, metrics, egress)?;
    let name = bucket.name.clone();
    Store::open_shared(storage, bucket, s3.local_cache_size.as_u64())
        .await
        .with_context(|| format!("server.s3: cannot use {name}"))
}

pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new())?);
    let egress = Proxies::from_env().map_err(|e| anyhow::anyhow!("egress proxy {e}"))?;
    let store = open_store(&cfg, metrics.clone(), &egress)
        .await?
        .keep_in_memory(cfg.server.memory_cache.as_u64());
    let store = Arc::new(store);
    let _owner = store.own()?;
    let removed = store.clean_tmp()?;
    if removed > 0 {
        tracing::warn!(removed, "removed temp files left by an earlier process");
    }
    let names: Vec<&str> = cfg.upstreams.keys().map(String::as_str).collect();
    metrics.init_labels(&names, cfg.server.s3.is_some(), cfg.cluster.is_some());
    spawn_measure(store.clone(), metrics.clone());
    spawn_memory_metrics(store.clone(), metrics.clone());
    let limit = cfg.server.max_cache_size.map_or(0, |s| s.as_u64());
    metrics.cache_limit_bytes.set(limit as i64);
    let hosted_prefix = cfg.hosted.as_ref().map(|h| h.prefix.as_str());
    let upstreams = Upstream::all_from(&cfg)?;
    let upstream_urls: Vec<String> = upstreams
        .iter()
        .map(|u| format!("{}={}", u.name, u.base))
        .collect();
    let router = web::Data::new(Router::new(
        upstreams.clone(),
        cfg.server.default_upstream.as_deref(),
        hosted_prefix,
    ));
    let access = web::Data::new(Access::load(&cfg.auth, metrics.clone())?);
    let front = web::Data::new(routes::Frontend::new(
        cfg.server.external_url.as_deref(),
        cfg.server.trusted_proxies()?,
    ));
    let hosted = cfg.hosted.as_ref().map(Hosted::new);
    let policies = crate::policy::Policies::load(&cfg.policy)?;
    let mut mirror = Mirror::new(store.clone(), metrics.clone(), hosted).with_policies(policies);
    if let Some(c) = &cfg.cluster {
        let cluster = Arc::new(Cluster::new(
            c,
            metrics.clone(),
            cfg.server.upstream_timeout,
            egress.clone(),
        )?);
        actix_web::rt::spawn(cluster.clone().watch());
        mirror = mirror.with_cluster(cluster);
    }
    let mirror = Arc::new(mirror);
    mirror.refresh_catalog();
    spawn_upload_sweeper(mirror.clone());
    spawn_gc(mirror.clone(), &cfg);
    let evicts = cfg.server.max_cache_size.is_some() || cfg.server.max_age.is_some();
    spawn_local_tier(mirror.clone(), evicts);
    actix_web::rt::spawn(crate::services::memory::release_when_idle(mirror.clone()));
    let shared = ClientShared::new(metrics.clone()).with_proxies(egress.clone());
    let timeout = cfg.server.upstream_timeout;
    let metrics_data = web::Data::from(metrics);
    let separate_metrics = cfg.server.metrics_listen;
    let md = metrics_data.clone();
    let server = HttpServer::new(move || {
        // awc clients are per worker thread; the token cache is shared by all.
        let client = UpstreamClient::new(&shared, timeout, &upstreams);
        App::new()
            .app_data(web::Data::new(Services::new(mirror.clone(), client)))
            .app_data(router.clone())
            .app_data(access.clone())
            .app_data(front.clone())
            .app_data(md.clone())
            .wrap(routes::AccessLog)
            .configure(|c| routes::configure(c, separate_metrics.is_none()))
    })
    // No Nagle: a small answer (a config blob) after its headers must not wait for the
    // client's delayed ACK (40 ms per small blob on a kept-alive connection).
    .tcp_nodelay(true);
    let listen = cfg.server.listen;
    let bound = match &cfg.server.tls {
        Some(tls) => server.bind_rustls_0_23(listen, tls_config(tls)?),
        None => server.bind(listen),
    };
    let server = bound.with_context(|| format!("server.listen {listen}: cannot listen there"))?;
    if cfg.hosted.is_none() && !cfg.auth.push.is_empty() {
        tracing::warn!(
            "auth.push names users but there is no [hosted] section: nothing can be pushed to this mirror; add [hosted] (prefix = \"local\") to host repositories"
        );
    }
    if cfg.hosted.is_some() && cfg.auth.push.is_empty() {
        tracing::warn!(
            "hosted repositories are on but auth.push names no user: every push will be refused (401); set [auth] htpasswd and push"
        );
    }
    let config = cfg
        .file
        .as_ref()
        .map_or("built-in defaults".to_string(), |f| f.display().to_string());
    tracing::info!(
        listen = %listen,
        tls = cfg.server.tls.is_some(),
        metrics_listen = %cfg.server.metrics_listen.map_or("(on listen)".to_string(), |a| a.to_string()),
        config = %config,
        storage = %store.root().display(),
        upstreams = %upstream_urls.join(" "),
        default_upstream = %cfg.server.default_upstream.as_deref().unwrap_or("(none: prefixes only)"),
        hosted = %hosted_prefix.unwrap_or("(none)"),
        egress = %egress.describe(),
        "entrepot serving"
    );
    match separate_metrics {
        None => server.run().await?,
        Some(addr) => {
            let metrics_server = HttpServer::new(move || {
                App::new()
                    .app_data(metrics_data.clone())
                    .configure(routes::configure_metrics)
            })
            .workers(1)
            .bind(addr)
            .with_context(|| format!("server.metrics_listen {addr}: cannot listen there"))?
            .run();
            futures_util::future::try_join(server.run(), metrics_server).await?;
        }
    }
    Ok(())
}

/// rustls server config from PEM files; ALPN (h2, http/1.1) is added by actix.
fn tls_config(tls: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("tls.cert {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("tls.key {}", tls.key.display()))?;
    Ok(rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?)
}

/// Runs eviction every `gc_interval` on a blocking thread, when a limit is set.
fn spawn_gc(mirror: Arc<Mirror>, cfg: &Config) {
    let policy = GcPolicy {
        max_cache_size: cfg.server.max_cache_size.map(|s| s.as_u64()),
        max_age: cfg.server.max_age,
        dry_run: false,
        // With a bucket, uses from other replicas arrive in batches: what any of them
        // may be serving now is kept.
        keep_recent: if cfg.server.s3.is_some() {
            cfg.server.gc_interval.max(USES_EVERY * 2)
        } else {
            Duration::ZERO
        },
    };
    if cfg.server.s3.as_ref().is_some_and(|s| !s.gc) {
        return;
    }
    if policy.max_cache_size.is_none() && policy.max_age.is_none() {
        return;
    }
    let every = cfg.server.gc_interval.max(Duration::from_secs(1));
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            // In a cluster, one replica evicts: the owner of this key among live peers.
            if mirror.cluster.as_ref().is_some_and(|c| !c.leads(GC_KEY)) {
                continue;
            }
            let (m, p) = (mirror.clone(), policy.clone());
            match crate::services::offload_low(async move { m.gc(&p).await }).await {
                Ok(r) if !r.evicted.is_empty() => {
                    tracing::info!(
                        objects = r.evicted.len(),
                        bytes = r.evicted_bytes(),
                        cached_bytes = r.cached_bytes_after,
                        images = %r.images_lost.join(" "),
                        "evicted"
                    );
                    // Repositories left without an image leave `_catalog` now.
                    mirror.refresh_catalog();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "eviction failed"),
            }
        }
    });
}

/// Copies the memory cache's counts into the metrics every few seconds (the store knows
/// nothing of Prometheus; counting there is one atomic add per lookup).
fn spawn_memory_metrics(store: Arc<Store>, metrics: Arc<Metrics>) {
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let s = store.memory_stats();
            metrics.memory_cache_bytes.set(s.bytes as i64);
            for (result, now) in [("hit", s.hits), ("miss", s.misses)] {
                let c = metrics.memory_cache_lookups.with_label_values(&[result]);
                c.inc_by(now.saturating_sub(c.get()));
            }
        }
    });
}

/// Measures the store's bytes in the background (a walk of every blob), for the size
/// metric and the local tier's cap; serving starts without waiting for it.
fn spawn_measure(store: Arc<Store>, metrics: Arc<Metrics>) {
    actix_web::rt::spawn(async move {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.measure()).await {
            Ok(Ok(_)) => metrics.store_bytes.set(store.size() as i64),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not measure the store"),
            Err(e) => tracing::warn!(error = %e, "could not measure the store"),
        }
    });
}

/// With a bucket: writes recorded uses to it (when eviction is configured) and keeps the
/// local tier under its cap.
fn spawn_local_tier(mirror: Arc<Mirror>, evicts: bool) {
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(USES_EVERY);
        loop {
            tick.tick().await;
            if !evicts {
                mirror.store.forget_uses();
            } else if let Err(e) = mirror.store.flush_uses().await {
                tracing::warn!(error = %e, "could not record uses in the bucket");
            }
            let store = mirror.store.clone();
            match crate::services::offload(async move { store.trim_local().await }).await {
                Ok((0, _)) => {}
                Ok((bytes, objects)) => {
                    tracing::info!(bytes, objects, "trimmed the local tier");
                    mirror.metrics.store_bytes.set(mirror.store.size() as i64);
                }
                Err(e) => tracing::warn!(error = %e, "could not trim the local tier"),
            }
        }
    });
}

/// Drops upload sessions idle for longer than `hosted.upload_ttl`, with their temp files.
fn spawn_upload_sweeper(mirror: Arc<Mirror>) {
    if mirror.hosted.is_none() {
        return;
    }
    let ttl = mirror
        .hosted
        .as_ref()
        .map_or(UPLOAD_SWEEP, |h| h.uploads.ttl());
    actix_web::rt::spawn(async move {
        let mut tick =
            tokio::time::interval(UPLOAD_SWEEP.min(ttl / 2).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            if let Some(h) = &mirror.hosted {
                let _ = h;
                match mirror.expire_uploads().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "dropped abandoned uploads"),
                    Err(e) => tracing::warn!(error = %e, "could not sweep upload sessions"),
                }
            }
        }
    });
}
