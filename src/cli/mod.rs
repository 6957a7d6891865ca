//! Command-line work besides `serve`: eviction, verification, prefetch, export, import.
//! Each opens the store of the given config; all of them may run beside a live server.

mod images;
pub mod integrate;
mod progress;

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::routes::target::Router;
use crate::services::gc::GcPolicy;
use crate::services::{Hosted, Mirror};
use crate::store::Store;
use crate::upstream::Upstream;

pub use images::{export, import, policy_check, prefetch, ImageArgs};

/// Temp files older than this are leftovers, not writes in progress.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(600);

/// What a command does with the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Reads or trims what is there (`verify`, `gc`): a missing store is a mistyped
    /// `server.storage`, an error, not a new empty store that reports "0 bad".
    Existing,
    /// Adds content (`import`, `prefetch`, `export`): creates the store if needed, so a
    /// fresh air-gapped host (or an init container) can load a bundle before `serve` ever ran.
    Create,
}

/// The store of `cfg`.
async fn mirror(cfg: &Config, what: Use) -> anyhow::Result<Arc<Mirror>> {
    if what == Use::Existing {
        existing(cfg)?;
    }
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new())?);
    let store = Arc::new(crate::server::open_store(cfg, metrics.clone(), &*egress()?).await?);
    let hosted = cfg.hosted.as_ref().map(Hosted::new);
    let policies = crate::policy::Policies::load(&cfg.policy)?;
    Ok(Arc::new(
        Mirror::new(store, metrics, hosted).with_policies(policies),
    ))
}

/// The environment's egress proxies, as `serve` uses them.
fn egress() -> anyhow::Result<Arc<crate::egress::Proxies>> {
    crate::egress::Proxies::from_env().map_err(|e| anyhow::anyhow!("egress proxy {e}"))
}

/// Refuses a store that does not exist (see [`Use::Existing`]).
fn existing(cfg: &Config) -> anyhow::Result<()> {
    let path = &cfg.server.storage;
    if !path.join("blobs").is_dir() {
        anyhow::bail!(
            "no store at {} (server.storage); is the path right? `entrepot serve` or `entrepot import` creates it",
            path.display()
        );
    }
    Ok(())
}

/// Runs `work` on an actix runtime (awc and the bucket client need one) with the store
/// of `cfg`.
fn on_runtime<T>(
    cfg: &Config,
    what: Use,
    work: impl AsyncFnOnce(Arc<Mirror>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    actix_web::rt::System::new().block_on(async move { work(mirror(cfg, what).await?).await })
}

fn router(cfg: &Config) -> anyhow::Result<Router> {
    Ok(Router::new(
        Upstream::all_from(cfg)?,
        cfg.server.default_upstream.as_deref(),
        cfg.hosted.as_ref().map(|h| h.prefix.as_str()),
    ))
}

/// `entrepot gc [--dry-run]`.
pub fn gc(cfg: &Config, dry_run: bool) -> anyhow::Result<()> {
    let policy = GcPolicy {
        max_cache_size: cfg.server.max_cache_size.map(|s| s.as_u64()),
        max_age: cfg.server.max_age,
        dry_run,
        keep_recent: std::time::Duration::ZERO,
    };
    existing(cfg)?;
    if policy.max_cache_size.is_none() && policy.max_age.is_none() {
        println!("no max_cache_size or max_age configured: nothing to evict");
        return Ok(());
    }
    // Beside a live server, eviction yields the cores to serving.
    crate::services::lower_priority();
    let r = on_runtime(cfg, Use::Existing, async |m| Ok(m.gc(&policy).await?))?;
    let verb = if dry_run { "would evict" } else { "evicted" };
    for (d, size) in &r.evicted {
        println!("{verb} {d} ({})", bytesize::ByteSize(*size));
    }
    let lost = if dry_run { "would lose" } else { "lost" };
    for image in &r.images_lost {
        println!("{lost} {image} (fetched again on its next pull)");
    }
    println!(
        "{verb} {} objects, {}; cached content {} -> {}; {} manifests and {} tags dropped",
        r.evicted.len(),
        bytesize::ByteSize(r.evicted_bytes()),
        bytesize::ByteSize(r.cached_bytes_before),
        bytesize::ByteSize(r.cached_bytes_after),
        r.manifests_dropped,
        r.tags_dropped,
    );
    Ok(())
}

/// `entrepot verify [--repair]`: re-hashes every object. Exits non-zero if anything bad
/// is left.
pub fn verify(cfg: &Config, repair: bool) -> anyhow::Result<bool> {
    on_runtime(cfg, Use::Existing, async |m| {
        verify_all(cfg, &m.store, repair).await
    })
}

async fn verify_all(cfg: &Config, store: &Store, repair: bool) -> anyhow::Result<bool> {
    let mut progress = progress::Progress::new("verify");
    let mut bad = 0;
    for b in store.list().await? {
        if let Some(actual) = store.verify(&b.digest).await? {
            bad += 1;
            println!("BAD {} (content hashes to {actual})", b.digest);
            if repair {
                store.delete(&b.digest).await?;
                println!("removed {}", b.digest);
            }
        }
        progress.item("-", &b.digest.to_string(), b.size);
    }
    let (items, bytes) = progress.finish();
    let mut leftovers = 0;
    // An upload session may sit idle for upload_ttl (and is swept at most a minute or so
    // after): only files older than that are leftovers of a server that stopped.
    let upload_ttl = cfg.hosted.as_ref().map_or(STALE_TEMP, |h| h.upload_ttl);
    let stale = store
        .temp_files(false)?
        .into_iter()
        .filter(|(_, age)| *age >= STALE_TEMP)
        .chain(
            store
                .temp_files(true)?
                .into_iter()
                .filter(|(_, age)| *age >= upload_ttl + STALE_TEMP),
        );
    for (path, _) in stale {
        leftovers += 1;
        println!("temp leftover {}", path.display());
        if repair {
            store.remove_temp(&path)?;
        }
    }
    println!(
        "checked {items} objects ({}): {bad} bad, {leftovers} temp leftovers{}",
        bytesize::ByteSize(bytes),
        if repair && bad + leftovers > 0 {
            " (removed)"
        } else {
            ""
        }
    );
    if !repair && bad + leftovers > 0 {
        println!(
            "run `entrepot verify --repair` to remove them (safe beside a live server; a removed blob is fetched again on its next pull)"
        );
    }
    Ok(repair || bad + leftovers == 0)
}

/// `entrepot ls [PREFIX]`: every repository that holds an image (private ones left out,
/// as in `_catalog`), with its tags, size and last pull.
pub fn ls(cfg: &Config, prefix: Option<&str>) -> anyhow::Result<()> {
    let hosted = cfg.hosted.as_ref().map(|h| h.prefix.clone());
    let repos = on_runtime(cfg, Use::Existing, async |m| {
        Ok(crate::services::inventory_walk(&m.store, hosted.as_deref(), prefix).await?)
    })?;
    let width = repos
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(10)
        .max(10);
    println!(
        "{:<width$}  {:<6}  {:>10}  {:<20}  TAGS",
        "REPOSITORY", "KIND", "SIZE", "LAST PULLED (UTC)"
    );
    let mut total = 0;
    for r in &repos {
        total += r.bytes;
        let last = r.last_pulled.map_or("-".to_string(), |t| {
            humantime::format_rfc3339_seconds(t).to_string()
        });
        println!(
            "{:<width$}  {:<6}  {:>10}  {:<20}  {}",
            r.name,
            if r.hosted { "hosted" } else { "cached" },
            bytesize::ByteSize(r.bytes).to_string(),
            last,
            r.tags.join(" "),
        );
    }
    println!(
        "{} repositories, {} (a blob shared by several repositories counts in each)",
        repos.len(),
        bytesize::ByteSize(total)
    );
    Ok(())
}
