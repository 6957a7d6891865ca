//! The shared tier: an S3-API bucket (AWS S3, MinIO, Ceph RGW, Garage) through the
//! `object_store` crate, so signing, retries and multipart uploads are not hand-written.
//!
//! Its HTTP client (reqwest) ties connections to the runtime that opened them, while every
//! actix worker is a runtime of its own: all requests run on one dedicated IO runtime
//! (`SpawnedReqwestConnector`), whichever worker asks.
//!
//! Keys mirror the filesystem layout under `prefix`: `blobs/sha256/<hex>`, `repos/...`,
//! `uploads/<id>/...`. No conditional writes are used (Garage ignores `If-None-Match`):
//! blob keys are content addresses, so two replicas completing the same key is harmless.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::SpawnedReqwestConnector;
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::StoreError;
use crate::config::S3Config;
use crate::metrics::Metrics;

/// Size of the parts of a multipart upload (S3's minimum is 5 MiB, except the last).
pub const PART: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once: bounds the memory of one write to about
/// `(UPLOADING + 1) * PART`.
const UPLOADING: usize = 2;

/// How long a presigned GET stays valid: it only has to reach the bucket.
const SIGNED_FOR: Duration = Duration::from_secs(300);

/// The bytes of an object read on the calling worker (see [`Bucket::read_here`]).
pub type LocalBody = futures_util::stream::LocalBoxStream<'static, Result<Bytes, StoreError>>;

/// An object as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Key relative to the prefix.
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

pub struct Bucket {
    s3: Arc<AmazonS3>,
    prefix: String,
    /// The runtime the HTTP client lives on; shut down in the background on drop (a
    /// runtime may not be dropped inside another one).
    io: Option<tokio::runtime::Runtime>,
    metrics: Arc<Metrics>,
    /// Shown in errors and logs.
    pub name: String,
}

impl Drop for Bucket {
    fn drop(&mut self) {
        if let Some(rt) = self.io.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

fn s3_err(what: &str, e: object_store::Error) -> StoreError {
    StoreError::Bucket(format!("{what}: {e}"))
}

/// The S3 client's proxy, decided as for every other request of the mirror (see
/// [`crate::egress`]): reqwest reads the same environment, but not `NO_PROXY` entries with
/// a port, so the decision for the endpoint is made here and given to it explicitly.
fn proxied(opts: ClientOptions, cfg: &S3Config, egress: &crate::egress::Proxies) -> ClientOptions {
    if !egress.any() {
        return opts;
    }
    let endpoint = cfg
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("https://{}.s3.{}.amazonaws.com", cfg.bucket, cfg.region));
    let Ok(u) = url::Url::parse(&endpoint) else {
        return opts;
    };
    let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
        return opts;
    };
    match egress.route(u.scheme(), host, port) {
        Some(route) => opts.with_proxy_url(route.url),
        // An explicit proxy that excludes everything (names, and every address: `*`
        // alone does not cover IP hosts): direct, and the environment's proxies, which
        // reqwest would read otherwise, are not used.
        None => opts
            .with_proxy_url("http://127.0.0.1:9")
            .with_proxy_excludes("*,0.0.0.0/0,::/0"),
    }
}

impl Bucket {
    /// Builds the client (no request yet: see [`Bucket::check`]).
    pub fn new(
        cfg: &S3Config,
        metrics: Arc<Metrics>,
        egress: &crate::egress::Proxies,
    ) -> Result<Bucket, StoreError> {
        // rustls needs a process-wide provider for reqwest; ring is already linked. An
        // error means one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let io = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_http_connector(SpawnedReqwestConnector::new(io.handle().clone()))
            // No SHA-256 of each uploaded part for the signature: it was a second full
            // hashing pass over every cold blob, on the requesting worker, and entrepot
            // verifies every byte it reads back from the bucket against the digest anyway.
            .with_unsigned_payload(true)
            .with_client_options(proxied(
                ClientOptions::new()
                    .with_timeout(cfg.timeout)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_allow_http(true),
                cfg,
                egress,
            ))
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..RetryConfig::default()
            });
        if let Some(e) = &cfg.endpoint {
            b = b
                .with_endpoint(e.trim_end_matches('/'))
                .with_virtual_hosted_style_request(false);
        }
        if let Some(k) = &cfg.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = cfg
            .resolve_secret()
            .map_err(|e| StoreError::Bucket(e.to_string()))?
        {
            b = b.with_secret_access_key(s);
        }
        let s3 = b.build().map_err(|e| s3_err("server.s3", e))?;
        Ok(Bucket {
            s3: Arc::new(s3),
            prefix: cfg.prefix.clone(),
            io: Some(io),
            metrics,
            name: format!(
                "s3 bucket {:?} at {}",
                cfg.bucket,
                cfg.endpoint.as_deref().unwrap_or("AWS")
            ),
        })
    }

    /// One listing: fails clearly when the endpoint is unreachable, the bucket missing
    /// or the key refused, so `serve` stops at start instead of failing every request.
    /// An endpoint that does not answer yet is asked again for [`START_PATIENCE`]: a
    /// store started beside the mirror (a pod, a test) may still be coming up.
    pub async fn check(&self) -> Result<(), StoreError> {
        let start = Instant::now();
        let prefix = self.path("")?;
        loop {
            let (s3, prefix) = (self.s3.clone(), prefix.clone());
            let r = self
                .timed("list", async move {
                    s3.list_with_delimiter(Some(&prefix)).await
                })
                .await;
            let Err(e) = r else {
                return Ok(());
            };
            let (hint, unreachable) = explain(&e);
            if !unreachable || start.elapsed() >= START_PATIENCE {
                return Err(StoreError::Bucket(format!("{hint}: {e}")));
            }
            tracing::warn!(bucket = %self.name, error = %e, "the bucket does not answer yet; asking again");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn path(&self, key: &str) -> Result<Path, StoreError> {
        let full = format!("{}{key}", self.prefix);
        Path::parse(full.trim_end_matches('/'))
            .map_err(|e| StoreError::Meta(format!("bucket key {key:?}: {e}")))
    }

    /// Runs one request, counting it by operation and result, with its latency.
    async fn timed<T>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let start = Instant::now();
        let r = f.await;
        let result = match &r {
            Ok(_) => "ok",
            Err(object_store::Error::NotFound { .. }) => "not_found",
            Err(_) => "error",
        };
        self.counted(op, result, start);
        r
    }

    /// Counts one request by operation and result, with its latency.
    fn counted(&self, op: &str, result: &str, start: Instant) {
        self.metrics
            .s3_requests
            .with_label_values(&[op, result])
            .inc();
        self.metrics
            .s3_seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
    }

    fn bytes(&self, direction: &str, n: usize) {
        self.metrics
            .s3_bytes
            .with_label_values(&[direction])
            .inc_by(n as u64);
    }

    /// A whole small object; `None` if absent.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let r = self
            .timed("get", async move { s3.get(&p).await?.bytes().await })
            .await;
        match r {
            Ok(b) => {
                self.bytes("in", b.len());
                Ok(Some(b))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err(key, e)),
        }
    }

    /// Size and last change of an object; `None` if absent.
    pub async fn head(&self, key: &str) -> Result<Option<Listed>, StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        match self.timed("head", async move { s3.head(&p).await }).await {
            Ok(m) => Ok(Some(Listed {
                key: key.to_string(),
                size: m.size,
                modified: m.last_modified.into(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err(key, e)),
        }
    }

    /// Writes a small object in one request.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let n = bytes.len();
        self.timed(
            "put",
            async move { s3.put(&p, PutPayload::from(bytes)).await },
        )
        .await
        .map_err(|e| s3_err(key, e))?;
        self.bytes("out", n);
        Ok(())
    }

    /// Deletes an object (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        match self
            .timed("delete", async move { s3.delete(&p).await })
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_err(key, e)),
        }
    }

    /// Names directly under `dir` (one level, like a directory listing): objects and
    /// "sub-directories", sorted.
    pub async fn list_dir(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let p = self.path(dir)?;
        let s3 = self.s3.clone();
        let r = self
            .timed(
                "list",
                async move { s3.list_with_delimiter(Some(&p)).await },
            )
            .await
            .map_err(|e| s3_err(dir, e))?;
        let mut out: Vec<String> = r
            .common_prefixes
            .iter()
            .chain(r.objects.iter().map(|o| &o.location))
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every object under `dir`, recursively (for gc, verify and upload sessions).
    pub async fn list_all(&self, dir: &str) -> Result<Vec<Listed>, StoreError> {
        let p = self.path(dir)?;
        let strip = self.prefix.len();
        let start = Instant::now();
        let r: object_store::Result<Vec<_>> = self.s3.list(Some(&p)).try_collect().await;
        self.metrics
            .s3_seconds
            .with_label_values(&["list"])
            .observe(start.elapsed().as_secs_f64());
        self.metrics
            .s3_requests
            .with_label_values(&["list", if r.is_ok() { "ok" } else { "error" }])
            .inc();
        Ok(r.map_err(|e| s3_err(dir, e))?
            .into_iter()
            .map(|m| Listed {
                key: m
                    .location
                    .as_ref()
                    .get(strip..)
                    .unwrap_or_default()
                    .to_string(),
                size: m.size,
                modified: m.last_modified.into(),
            })
            .collect())
    }

    /// The bytes of an object from `from` on, as they arrive; `None` if absent.
    pub async fn read(
        &self,
        key: &str,
        from: u64,
    ) -> Result<Option<(u64, BoxStream<'static, Result<Bytes, StoreError>>)>, StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let opts = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..GetOptions::default()
        };
        let r = self
            .timed("get", async move { s3.get_opts(&p, opts).await })
            .await;
        let got = match r {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(s3_err(key, e)),
        };
        let size = got.meta.size;
        let metrics = self.metrics.clone();
        let key = key.to_string();
        let stream = got
            .into_stream()
            .map(move |c| {
                let c = c.map_err(|e| s3_err(&key, e))?;
                metrics
                    .s3_bytes
                    .with_label_values(&["in"])
                    .inc_by(c.len() as u64);
                Ok(c)
            })
            .boxed();
        Ok(Some((size, stream)))
    }

    /// A whole object, read on the calling worker with `http` (GET of a presigned URL), as
    /// its bytes arrive; `None` if absent. [`Bucket::read`] hands every chunk from the IO
    /// runtime to the reader through an unbounded channel: a second thread per read, and
    /// a reader held up by its disk would let the whole object pile up in memory there.
    /// Here the socket is read only as fast as the reader takes the bytes. Falls back to
    /// [`Bucket::read`] (with its retries) when the GET fails in any other way than 404.
    pub async fn read_here(
        &self,
        http: &awc::Client,
        key: &str,
    ) -> Result<Option<(u64, LocalBody)>, StoreError> {
        use object_store::signer::{Method, Signer};
        let p = self.path(key)?;
        let url = match self.s3.signed_url(Method::GET, &p, SIGNED_FOR).await {
            Ok(u) => u,
            Err(e) => return Err(s3_err(key, e)),
        };
        let start = Instant::now();
        let why = match http.get(url.as_str()).send().await {
            Err(e) => e.to_string(),
            Ok(resp) => {
                let size = resp
                    .headers()
                    .get(awc::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                match (resp.status().as_u16(), size) {
                    (200, Some(size)) => {
                        self.counted("get", "ok", start);
                        let received = self.metrics.s3_bytes.with_label_values(&["in"]);
                        let key = key.to_string();
                        let body = resp.map(move |c| {
                            let c = c.map_err(|e| StoreError::Bucket(format!("{key}: {e}")))?;
                            received.inc_by(c.len() as u64);
                            Ok(c)
                        });
                        return Ok(Some((size, Box::pin(body))));
                    }
                    (404, _) => {
                        self.counted("get", "not_found", start);
                        return Ok(None);
                    }
                    (status, _) => format!("answered {status}"),
                }
            }
        };
        // Anything else (a 5xx, a store that refuses presigned URLs, no length) goes
        // through the S3 client, with its retries and its own errors.
        self.counted("get", "error", start);
        tracing::debug!(key, error = %why, "presigned GET failed; reading through the S3 client");
        Ok(self.read(key, 0).await?.map(|(n, b)| (n, b as LocalBody)))
    }

    /// Starts a multipart upload to `key`; nothing is visible there before
    /// [`Upload::complete`].
    pub async fn upload(self: &Arc<Self>, key: &str) -> Result<Upload, StoreError> {
        let p = self.path(key)?;
        let s3 = self.s3.clone();
        let up = self
            .timed(
                "create_multipart",
                async move { s3.put_multipart(&p).await },
            )
            .await
            .map_err(|e| s3_err(key, e))?;
        Ok(Upload {
            inner: Some(WriteMultipart::new_with_chunk_size(up, PART)),
            bucket: self.clone(),
            key: key.to_string(),
        })
    }
}

/// A multipart upload in progress. Dropped without [`Upload::complete`], it is aborted in
/// the background (S3 keeps the parts of an upload nobody aborts: a bucket lifecycle rule
/// for incomplete uploads catches what a crash leaves).
pub struct Upload {
    inner: Option<WriteMultipart>,
    bucket: Arc<Bucket>,
    key: String,
}

impl Upload {
    /// Adds bytes; waits while too many parts are in flight (back-pressure).
    pub async fn push(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let n = bytes.len();
        let w = self
            .inner
            .as_mut()
            .ok_or_else(|| StoreError::Bucket("upload already ended".into()))?;
        w.wait_for_capacity(UPLOADING)
            .await
            .map_err(|e| s3_err(&self.key, e))?;
        w.put(bytes);
        self.bucket.bytes("out", n);
        Ok(())
    }

    /// Makes the object visible (only after the bytes were verified).
    pub async fn complete(mut self) -> Result<(), StoreError> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| StoreError::Bucket("upload already ended".into()))?;
        self.bucket
            .timed("complete_multipart", w.finish())
            .await
            .map(|_| ())
            .map_err(|e| s3_err(&self.key, e))
    }

    /// Drops the parts sent so far.
    pub async fn abort(mut self) {
        if let Some(w) = self.inner.take() {
            let r = self.bucket.timed("abort_multipart", w.abort()).await;
            if let Err(e) = r {
                tracing::warn!(key = %self.key, error = %e, "could not abort a multipart upload (a lifecycle rule will drop its parts)");
            }
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(w) = self.inner.take() {
            let (bucket, key) = (self.bucket.clone(), self.key.clone());
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    if let Err(e) = bucket.timed("abort_multipart", w.abort()).await {
                        tracing::warn!(%key, error = %e, "could not abort a multipart upload");
                    }
                });
            }
        }
    }
}

/// How long `check` keeps asking an endpoint that does not answer.
const START_PATIENCE: Duration = Duration::from_secs(5);

/// What a failed start-up listing most likely means, and whether the endpoint did not
/// answer at all (worth asking again).
fn explain(e: &object_store::Error) -> (&'static str, bool) {
    // S3 errors arrive as "Generic" with the status and S3 code in the text.
    let text = e.to_string();
    if matches!(e, object_store::Error::NotFound { .. }) || text.contains("NoSuchBucket") {
        return ("the bucket does not exist", false);
    }
    let refused = matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || [
        "403 Forbidden",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    ]
    .iter()
    .any(|c| text.contains(c));
    if refused {
        return (
            "the access key or secret was refused (or it may not use this bucket)",
            false,
        );
    }
    ("is the endpoint reachable?", true)
}
