//! `prefetch`, `export` and `import`: whole images (index, platform manifests, configs,
//! layers) through the same services the server uses, so everything is verified and
//! singleflighted exactly as for a client pull.

use std::path::{Path, PathBuf};

use actix_web::http::Method;
use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::progress::Progress;
use super::{mirror, router, Use};
use crate::auth::Caller;
use crate::config::Config;
use crate::media::Accepted;
use crate::names::{Digest, Reference};
use crate::routes::target::Target;
use crate::services::{ManifestReply, Services};
use crate::store::layout::{LayoutEntry, LayoutReader, LayoutWriter};
use crate::store::{ManifestLink, Store, StoreError, TagRecord};
use crate::upstream::{ClientShared, UpstreamClient};

/// Images named on the command line and/or in a file (one per line, `#` comments).
#[derive(Debug, Clone, Default)]
pub struct ImageArgs {
    pub images: Vec<String>,
    pub file: Option<PathBuf>,
    /// `os/arch[/variant]`; none: every platform of an index.
    pub platform: Option<String>,
}

impl ImageArgs {
    /// The references, every one checked before anything is fetched or written: one bad
    /// line refuses the whole list, naming every bad line, so nothing is half done.
    fn references(&self, cfg: &Config) -> anyhow::Result<Vec<String>> {
        let mut out: Vec<(String, String)> = self
            .images
            .iter()
            .map(|i| (format!("argument {i:?}"), i.clone()))
            .collect();
        if let Some(f) = &self.file {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
            for (n, line) in text.lines().enumerate() {
                // `#` starts a comment anywhere: no reference contains one.
                let image = line.split('#').next().unwrap_or("").trim();
                if !image.is_empty() {
                    out.push((format!("{}:{}", f.display(), n + 1), image.to_string()));
                }
            }
        }
        if out.is_empty() {
            bail!("no images given (IMAGE... or --file LIST)");
        }
        let bad: Vec<String> = out
            .iter()
            .filter_map(|(at, image)| {
                check_reference(cfg, image)
                    .err()
                    .map(|e| format!("  {at}: {e:#}"))
            })
            .collect();
        if !bad.is_empty() {
            bail!(
                "{} of {} references are not valid; nothing was fetched or written:\n{}",
                bad.len(),
                out.len(),
                bad.join("\n")
            );
        }
        if let Some(p) = &self.platform {
            check_platform(p)?;
        }
        Ok(out.into_iter().map(|(_, i)| i).collect())
    }
}

/// `os/arch[/variant]`, lowercase, as in an index's `platform` (`linux/arm64/v8`).
fn check_platform(p: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = p.split('/').collect();
    let word = |w: &&str| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if !(2..=3).contains(&parts.len()) || !parts.iter().all(word) {
        bail!("--platform {p:?} must be os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8");
    }
    Ok(())
}

/// A reference this config can serve: well-formed, and its registry (when it names
/// one) is a configured upstream or the hosted prefix.
fn check_reference(cfg: &Config, image: &str) -> anyhow::Result<()> {
    let (name, _) = split_reference(image)?;
    let first = name.split('/').next().unwrap_or("");
    let hosted = cfg.hosted.as_ref().map_or("", |h| h.prefix.as_str());
    if (first.contains('.') || first.contains(':'))
        && name.contains('/')
        && !cfg.upstreams.contains_key(first)
        && first != hosted
    {
        let known: Vec<&String> = cfg.upstreams.keys().collect();
        bail!("registry {first} is not a configured upstream (configured: {known:?}); add [upstreams.\"{first}\"] or use one of those prefixes");
    }
    Ok(())
}

/// An image reference split into the mirror's name (prefix included) and reference.
fn split_reference(image: &str) -> anyhow::Result<(String, Reference)> {
    let (name, reference) = match image.split_once('@') {
        Some((n, d)) => (
            n,
            Reference::Digest(d.parse().map_err(|e| anyhow!("{image}: {e}"))?),
        ),
        None => match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Reference::Tag(t.to_string())),
            _ => (image, Reference::Tag("latest".into())),
        },
    };
    let name = crate::routes::path::valid_name(name).map_err(|e| anyhow!("{image}: {e}"))?;
    Ok((name, reference))
}

/// What one image consists of, once everything is in the store.
struct Fetched {
    top: LayoutEntry,
    objects: Vec<Digest>,
    /// With `--platform`, the index trimmed to what was fetched (not in the store): the
    /// export's top object, so `skopeo copy --all` of the layout finds every child.
    trimmed: Option<Vec<u8>>,
}

/// One image's manifests and blobs through the services: an upstream's (fetched and
/// verified as for a client pull) or a hosted repository's.
struct Source<'a> {
    svc: &'a Services,
    target: &'a Target,
}

impl Source<'_> {
    async fn manifest(&self, reference: &Reference) -> anyhow::Result<ManifestReply> {
        Ok(match self.target {
            Target::Upstream { upstream, repo } => {
                self.svc
                    .manifest(
                        upstream,
                        repo,
                        reference,
                        Accepted::ALL,
                        &Method::GET,
                        &Caller::Anonymous,
                    )
                    .await?
            }
            Target::Hosted { repo } => {
                self.svc
                    .hosted_manifest(repo, reference, Accepted::ALL, false)
                    .await?
            }
        })
    }

    /// An image manifest (not an index) is one platform: the one its config names must
    /// be the one asked for, or `--platform` would export something else silently.
    async fn check_single_platform(&self, top: &[u8], p: &str) -> anyhow::Result<()> {
        let doc: Value = serde_json::from_slice(top).context("manifest json")?;
        if doc.get("manifests").is_some() {
            return Ok(());
        }
        let Some(config) = doc["config"]["digest"]
            .as_str()
            .and_then(|d| d.parse().ok())
        else {
            return Ok(());
        };
        let bytes = self
            .svc
            .mirror
            .store
            .read_small(&config)
            .await?
            .unwrap_or_default();
        let cfg: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let have = platform_of(&json!({ "platform": {
            "os": cfg["os"], "architecture": cfg["architecture"], "variant": cfg["variant"],
        }}));
        if have != p && !have.starts_with(&format!("{p}/")) {
            bail!("the image is {have}, not {p} (it is a single-platform image)");
        }
        Ok(())
    }

    /// Reads a blob through (filling the store for an upstream's); its length and
    /// whether the store had it already.
    async fn blob_counted(&self, d: &Digest) -> anyhow::Result<(u64, bool)> {
        let had = self.svc.mirror.store.stat(d).await?.is_some();
        Ok((self.blob(d).await?, had))
    }

    /// Reads a blob through (filling the store for an upstream's); its length.
    async fn blob(&self, d: &Digest) -> anyhow::Result<u64> {
        let r = match self.target {
            Target::Upstream { upstream, repo } => {
                self.svc
                    .blob(upstream, repo, d, None, &Method::GET, &Caller::Anonymous)
                    .await?
            }
            Target::Hosted { repo } => self.svc.hosted_blob(repo, d, None, false).await?,
        };
        let mut n = 0;
        if let Some(mut body) = r.body {
            while let Some(chunk) = body.next().await {
                n += chunk?.len() as u64;
            }
        }
        // The body ends once the blob checked out; `export` reads the file next.
        self.svc.blob_settled(d).await;
        Ok(n)
    }
}

/// Walks an image through the services, filling the store; returns its objects.
async fn fetch_image(
    src: &Source<'_>,
    image: &str,
    reference: &Reference,
    platform: Option<&str>,
    progress: &mut Progress,
) -> anyhow::Result<Fetched> {
    let top = src.manifest(reference).await?;
    let top_cached = !matches!(top.source, crate::services::Source::Upstream);
    let mut entry = LayoutEntry {
        reference: String::new(),
        media_type: top.media_type.to_string(),
        digest: top.digest,
        size: top.size,
    };
    let top_body = top.body.unwrap_or_default();
    if let Some(p) = platform {
        src.check_single_platform(&top_body, p).await?;
    }
    let mut objects = vec![top.digest];
    let mut pending = vec![top_body.clone()];
    while let Some(body) = pending.pop() {
        let doc: Value = serde_json::from_slice(&body).context("manifest json")?;
        for child in children(&doc, platform) {
            let d: Digest = child.parse().map_err(|e| anyhow!("{child}: {e}"))?;
            if doc.get("manifests").is_some() {
                let m = src.manifest(&Reference::Digest(d)).await?;
                pending.push(m.body.unwrap_or_default());
            } else {
                match src.blob_counted(&d).await? {
                    (n, true) => progress.cached(image, &d.to_string(), n),
                    (n, false) => progress.item(image, &d.to_string(), n),
                }
            }
            objects.push(d);
        }
    }
    let trimmed = match platform {
        Some(p) => trim_index(&top_body, p)?,
        None => None,
    };
    if let Some(t) = &trimmed {
        objects.remove(0);
        entry.digest = Digest::of(t);
        entry.size = t.len() as u64;
    }
    if top_cached {
        progress.cached(image, &entry.digest.to_string(), entry.size);
    } else {
        progress.item(image, &entry.digest.to_string(), entry.size);
    }
    Ok(Fetched {
        top: entry,
        objects,
        trimmed,
    })
}

/// An index listing only `platform`'s manifests (`None` for an image manifest, or an
/// index that already lists nothing else).
fn trim_index(body: &[u8], platform: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let mut doc: Value = serde_json::from_slice(body).context("manifest json")?;
    let Some(all) = doc["manifests"].as_array() else {
        return Ok(None);
    };
    let keep: Vec<Value> = all
        .iter()
        .filter(|m| matches_platform(m, platform))
        .cloned()
        .collect();
    if keep.is_empty() {
        bail!("the index lists no {platform} image");
    }
    if keep.len() == all.len() {
        return Ok(None);
    }
    doc["manifests"] = Value::Array(keep);
    Ok(Some(serde_json::to_vec(&doc)?))
}

fn matches_platform(m: &Value, p: &str) -> bool {
    let have = platform_of(m);
    have == p || have.starts_with(&format!("{p}/"))
}

/// Digests an index or image manifest points to (index entries filtered by platform).
fn children(doc: &Value, platform: Option<&str>) -> Vec<String> {
    if let Some(ms) = doc["manifests"].as_array() {
        return ms
            .iter()
            .filter(|m| platform.is_none_or(|p| matches_platform(m, p)))
            .filter_map(|m| m["digest"].as_str().map(String::from))
            .collect();
    }
    let mut out: Vec<String> = doc["config"]["digest"]
        .as_str()
        .map(String::from)
        .into_iter()
        .collect();
    out.extend(
        doc["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["digest"].as_str().map(String::from)),
    );
    out
}

fn platform_of(m: &Value) -> String {
    let p = &m["platform"];
    let mut s = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or(""),
        p["architecture"].as_str().unwrap_or("")
    );
    if let Some(v) = p["variant"].as_str() {
        s = format!("{s}/{v}");
    }
    s
}

/// Runs `work` with a services instance on an actix runtime (awc needs one).
fn with_services<T>(
    cfg: &Config,
    work: impl AsyncFnOnce(&Services) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let timeout = cfg.server.upstream_timeout;
    let upstreams = crate::upstream::Upstream::all_from(cfg)?;
    actix_web::rt::System::new().block_on(async move {
        let m = mirror(cfg, Use::Create).await?;
        let shared = ClientShared::new(m.metrics.clone()).with_proxies(super::egress()?);
        let client = UpstreamClient::new(&shared, timeout, &upstreams);
        let svc = Services::new(m, client);
        work(&svc).await
    })
}

/// Fetches every image; one that fails is reported (`FAILED <ref>: why`) and the others
/// go on. Errors only when any failed, after all were tried.
async fn fetch_all(
    cfg: &Config,
    svc: &Services,
    images: &[String],
    platform: Option<&str>,
    progress: &mut Progress,
) -> anyhow::Result<Vec<Fetched>> {
    let router = router(cfg)?;
    let (mut out, mut failed) = (Vec::new(), 0);
    for image in images {
        match fetch_one(cfg, svc, &router, image, platform, progress).await {
            Ok(img) => out.push(img),
            Err(e) => {
                failed += 1;
                println!("FAILED {image}: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} images failed (see FAILED lines)",
            failed + out.len()
        );
    }
    Ok(out)
}

async fn fetch_one(
    cfg: &Config,
    svc: &Services,
    router: &crate::routes::target::Router,
    image: &str,
    platform: Option<&str>,
    progress: &mut Progress,
) -> anyhow::Result<Fetched> {
    let (name, reference) = split_reference(image)?;
    let hosted = cfg.hosted.as_ref().map_or("", |h| h.prefix.as_str());
    let target = router.resolve(&name, None)?;
    let src = Source {
        svc,
        target: &target,
    };
    let mut img = fetch_image(&src, image, &reference, platform, progress).await?;
    let ns = target.namespace(hosted);
    img.top.reference = match &reference {
        Reference::Tag(t) => format!("{ns}/{}:{t}", target.repo()),
        // The exported object (a trimmed index has a digest of its own).
        Reference::Digest(_) => format!("{ns}/{}@{}", target.repo(), img.top.digest),
    };
    Ok(img)
}

/// `entrepot prefetch IMAGE... | --file LIST [--platform os/arch]`.
pub fn prefetch(cfg: &Config, args: &ImageArgs) -> anyhow::Result<()> {
    // Every reference (and the platform) checked before anything is fetched.
    let asked = args.references(cfg)?;
    let images = with_services(cfg, async |svc| {
        let mut progress = Progress::new("prefetch");
        let r = fetch_all(cfg, svc, &asked, args.platform.as_deref(), &mut progress).await;
        let (cached_items, cached_bytes) = progress.cached_totals();
        let (items, bytes) = progress.finish();
        println!(
            "prefetched {} images: {} objects downloaded ({}), {cached_items} already cached ({})",
            r.as_ref().map_or(0, Vec::len),
            items - cached_items,
            bytesize::ByteSize(bytes - cached_bytes),
            bytesize::ByteSize(cached_bytes),
        );
        r
    })?;
    for i in images {
        println!("{} {}", i.top.reference, i.top.digest);
    }
    Ok(())
}

/// `entrepot export --out DIR [--copy] IMAGE...`: an OCI layout of the images (fetched
/// first if they are not cached). Into an earlier export, the new references are added
/// (one of the same name replaced) and the others kept.
pub fn export(cfg: &Config, out: &Path, copy: bool, args: &ImageArgs) -> anyhow::Result<()> {
    // Refused before any network: a bad reference or platform, a directory that is
    // neither empty nor a layout.
    let asked = args.references(cfg)?;
    let mut layout = LayoutWriter::create(out, copy)?;
    let (images, store) = with_services(cfg, async |svc| {
        let mut progress = Progress::new("fetch");
        let r = fetch_all(cfg, svc, &asked, args.platform.as_deref(), &mut progress).await;
        progress.finish();
        let images = r.map_err(|e| anyhow!("{e:#}; nothing was written to {}", out.display()))?;
        // With a bucket, what another replica fetched may not be on this disk yet.
        for d in images.iter().flat_map(|i| &i.objects) {
            svc.mirror.store.ensure_local(d).await?;
        }
        Ok((images, svc.mirror.store.clone()))
    })?;
    let mut progress = Progress::new("export");
    for img in &images {
        for d in &img.objects {
            let n = layout.add_blob(&store, d)?;
            progress.item(&img.top.reference, &d.to_string(), n);
        }
        if let Some(t) = &img.trimmed {
            layout.add_bytes(t)?;
        }
        layout.add_entry(&img.top);
    }
    let counts = layout.finish()?;
    let (items, bytes) = progress.finish();
    println!(
        "exported {} images ({items} objects, {}) to {}: {} references added, {} replaced, {} kept from before",
        images.len(),
        bytesize::ByteSize(bytes),
        out.display(),
        counts.added,
        counts.replaced,
        counts.kept,
    );
    if counts.linked > 0 {
        println!(
            "{} objects are hard links to the store's files: they take no extra space, and `entrepot gc` frees none of it while this export exists; use --copy for an independent copy",
            counts.linked
        );
    }
    Ok(())
}

/// `entrepot import DIR`: loads a layout so its references are served with the upstreams
/// unreachable. Objects whose bytes do not match their digest are refused; returns
/// whether everything was imported.
pub fn import(cfg: &Config, dir: &Path) -> anyhow::Result<bool> {
    super::on_runtime(cfg, Use::Create, async |m| import_into(&m.store, dir).await)
}

async fn import_into(store: &Store, dir: &Path) -> anyhow::Result<bool> {
    anyhow::ensure!(dir.is_dir(), "import {}: no such directory", dir.display());
    let layout = LayoutReader::open(dir)
        .with_context(|| format!("import {}: not an OCI image layout", dir.display()))?;
    let mut progress = Progress::new("import");
    let (mut refused, mut imported) = (0, 0);
    let entries = layout.entries()?;
    for e in &entries {
        let (name, reference) = split_reference(&e.reference)?;
        let (ns, repo) = name
            .split_once('/')
            .ok_or_else(|| anyhow!("{}: reference has no registry prefix", e.reference))?;
        let repo = if ns == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        };
        let mut imp = Importer {
            store,
            layout: &layout,
            ns,
            repo: &repo,
            refused: 0,
        };
        imp.manifest(&e.digest, &e.media_type, &mut progress)
            .await?;
        refused += imp.refused;
        if imp.refused > 0 {
            println!(
                "NOT imported {}: some of its objects were refused",
                e.reference
            );
            continue;
        }
        if let Reference::Tag(t) = &reference {
            let rec = TagRecord {
                digest: e.digest.to_string(),
                media_type: e.media_type.clone(),
                size: e.size,
                checked_at: crate::store::now_secs(),
            };
            store.put_tag(ns, &repo, t, &rec).await?;
        }
        imported += 1;
        println!("imported {}", e.reference);
    }
    let (items, bytes) = progress.finish();
    let skipped = entries.len() - imported;
    println!(
        "imported {imported} of {} references ({items} objects, {}){}",
        entries.len(),
        bytesize::ByteSize(bytes),
        if skipped > 0 {
            format!("; {skipped} NOT imported because {refused} of their objects were refused (see REFUSED lines)")
        } else {
            String::new()
        }
    );
    Ok(refused == 0)
}

struct Importer<'a> {
    store: &'a Store,
    layout: &'a LayoutReader,
    ns: &'a str,
    repo: &'a str,
    refused: usize,
}

impl Importer<'_> {
    /// Imports one object; false if it is absent or its bytes do not match.
    async fn object(&mut self, d: &Digest, progress: &mut Progress) -> anyhow::Result<bool> {
        match self.store.import_blob(self.layout, d).await {
            Ok(true) => {
                let image = format!("{}/{}", self.ns, self.repo);
                progress.item(
                    &image,
                    &d.to_string(),
                    self.store.stat(d).await?.unwrap_or(0),
                );
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(StoreError::DigestMismatch { actual, .. }) => {
                println!("REFUSED {d}: its bytes hash to {actual}");
                self.refused += 1;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn manifest(
        &mut self,
        d: &Digest,
        media_type: &str,
        progress: &mut Progress,
    ) -> anyhow::Result<()> {
        if !self.object(d, progress).await? {
            return Ok(());
        }
        let refused_before = self.refused;
        let bytes = self.store.read_small(d).await?.unwrap_or_default();
        let doc: Value = serde_json::from_slice(&bytes).context("manifest json")?;
        if let Some(ms) = doc["manifests"].as_array() {
            for m in ms {
                let (Some(child), Some(mt)) = (m["digest"].as_str(), m["mediaType"].as_str())
                else {
                    continue;
                };
                if let Ok(child) = child.parse() {
                    Box::pin(self.manifest(&child, mt, progress)).await?;
                }
            }
        } else {
            for b in children(&doc, None) {
                let b: Digest = b.parse().map_err(|e| anyhow!("{b}: {e}"))?;
                if self.object(&b, progress).await? {
                    self.store.link_blob(self.ns, self.repo, &b).await?;
                }
            }
        }
        // Linked only when everything it refers to was imported: nothing may point at
        // content that was refused.
        if self.refused == refused_before {
            let link = ManifestLink {
                media_type: media_type.to_string(),
            };
            self.store
                .put_manifest_link(self.ns, self.repo, d, &link)
                .await?;
        }
        Ok(())
    }
}

/// `entrepot policy check IMAGE`: the verdict of the `[[policy]]` covering IMAGE, as a
/// pull through the mirror would get it (signatures read through the store and the
/// upstream); true when it would be served.
pub fn policy_check(cfg: &Config, image: &str) -> anyhow::Result<bool> {
    check_reference(cfg, image)?;
    let (name, reference) = split_reference(image)?;
    let router = router(cfg)?;
    let target = router.resolve(&name, None)?;
    let hosted = cfg.hosted.as_ref().map_or("", |h| h.prefix.as_str());
    let (ns, repo) = (
        target.namespace(hosted).to_string(),
        target.repo().to_string(),
    );
    with_services(cfg, async |svc| {
        let Some(policy) = svc.policy_for(&ns, &repo) else {
            println!("no policy covers {ns}/{repo}: served unchecked");
            return Ok(true);
        };
        let r = match &target {
            Target::Upstream { upstream, repo } => {
                svc.manifest(
                    upstream,
                    repo,
                    &reference,
                    Accepted::ALL,
                    &Method::GET,
                    &Caller::Anonymous,
                )
                .await
            }
            Target::Hosted { repo } => {
                svc.hosted_manifest(repo, &reference, Accepted::ALL, false)
                    .await
            }
        };
        match r {
            Ok(m) => {
                println!("ADMITTED {ns}/{repo}@{} by policy {policy:?}: a signature by one of its keys verifies", m.digest);
                Ok(true)
            }
            Err(e @ crate::services::ServiceError::Denied(_)) => {
                println!("REFUSED {e}");
                Ok(false)
            }
            Err(e) => Err(anyhow!("{image}: {e}")),
        }
    })
}
