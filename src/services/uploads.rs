//! Blob upload sessions (POST, PATCH..., PUT) for hosted repositories.
//!
//! A session is a temp file in the store plus a running hash, kept in memory: bytes are
//! verified at the final PUT and committed like any other blob. Sessions untouched for
//! `upload_ttl` are dropped (their temp file with them) by [`Uploads::expire`]; a restart
//! drops them all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::{Stream, StreamExt};
use tokio::sync::Mutex;

use super::{ServiceError, Services};
use crate::names::Digest;
use crate::store::{BlobWriter, StoreError};

pub struct Uploads {
    sessions: DashMap<String, Arc<Session>>,
    limits: UploadLimits,
}

/// Bounds on upload sessions (each holds a file descriptor) and their request bodies.
#[derive(Debug, Clone)]
pub struct UploadLimits {
    /// Sessions untouched this long are dropped.
    pub ttl: Duration,
    pub max_total: usize,
    pub max_per_user: usize,
    /// A body that sends nothing for this long fails the request (and its session).
    pub body_timeout: Duration,
}

struct Session {
    repo: String,
    /// Who opened it (the user name), for the per-user cap.
    owner: String,
    upload: Mutex<Upload>,
}

struct Upload {
    writer: Option<BlobWriter>,
    touched: Instant,
}

/// Where an upload stands.
pub struct UploadStatus {
    pub id: String,
    /// Bytes received so far.
    pub offset: u64,
}

impl Uploads {
    pub fn new(limits: UploadLimits) -> Uploads {
        Uploads {
            sessions: DashMap::new(),
            limits,
        }
    }

    /// Drops sessions idle for longer than the TTL; returns how many. (A session whose
    /// request is running is left to it: its body times out.)
    pub fn expire(&self) -> usize {
        let before = self.sessions.len();
        let ttl = self.limits.ttl;
        self.sessions.retain(|_, s| {
            s.upload
                .try_lock()
                .map_or(true, |u| u.touched.elapsed() < ttl)
        });
        before - self.sessions.len()
    }

    pub fn ttl(&self) -> Duration {
        self.limits.ttl
    }

    /// Refuses a new session past the total or the per-user cap.
    fn admit(&self, owner: &str) -> Result<(), ServiceError> {
        if self.sessions.len() >= self.limits.max_total {
            return Err(ServiceError::TooMany(format!(
                "{} upload sessions are open; finish or cancel some",
                self.sessions.len()
            )));
        }
        let mine = self.sessions.iter().filter(|s| s.owner == owner).count();
        if mine >= self.limits.max_per_user {
            return Err(ServiceError::TooMany(format!(
                "{owner:?} has {mine} upload sessions open; finish or cancel some"
            )));
        }
        Ok(())
    }
}

impl Services {
    /// The session `id`, if it belongs to `repo`.
    fn session(&self, repo: &str, id: &str) -> Result<Arc<Session>, ServiceError> {
        let s = self.hosted()?.uploads.sessions.get(id).map(|s| s.clone());
        s.filter(|s| s.repo == repo)
            .ok_or_else(|| ServiceError::UploadUnknown(id.into()))
    }

    /// Opens a session for `owner` (the pushing user), within the caps.
    pub fn upload_start(&self, repo: &str, owner: &str) -> Result<UploadStatus, ServiceError> {
        self.hosted()?.uploads.admit(owner)?;
        let writer = self.store().begin_upload()?;
        let id = uuid::Uuid::new_v4().to_string();
        let session = Session {
            repo: repo.to_string(),
            owner: owner.to_string(),
            upload: Mutex::new(Upload {
                writer: Some(writer),
                touched: Instant::now(),
            }),
        };
        self.hosted()?
            .uploads
            .sessions
            .insert(id.clone(), Arc::new(session));
        Ok(UploadStatus { id, offset: 0 })
    }

    pub async fn upload_status(&self, repo: &str, id: &str) -> Result<UploadStatus, ServiceError> {
        let s = self.session(repo, id)?;
        let u = s.upload.lock().await;
        Ok(UploadStatus {
            id: id.to_string(),
            offset: u.writer.as_ref().map_or(0, |w| w.written()),
        })
    }

    /// Appends a chunk. `range`, from `Content-Range` (inclusive), must start at the bytes
    /// received and span exactly the body.
    pub async fn upload_append<S, E>(
        &self,
        repo: &str,
        id: &str,
        range: Option<(u64, u64)>,
        body: S,
    ) -> Result<UploadStatus, ServiceError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let s = self.session(repo, id)?;
        let mut u = s.upload.lock().await;
        u.touched = Instant::now();
        let w = u
            .writer
            .as_mut()
            .ok_or_else(|| ServiceError::UploadUnknown(id.into()))?;
        let before = w.written();
        if let Some(start) = range.map(|r| r.0).filter(|s| *s != before) {
            return Err(ServiceError::UploadRange(format!(
                "chunk starts at {start}, upload has {} bytes",
                w.written()
            )));
        }
        let idle = self.hosted()?.uploads.limits.body_timeout;
        let mut r = write_body(w, body, idle).await;
        if let (Ok(()), Some((a, b))) = (&r, range) {
            let got = w.written() - before;
            if got != b - a + 1 {
                r = Err(ServiceError::UploadRange(format!(
                    "Content-Range {a}-{b} announces {} bytes, the body had {got}",
                    b - a + 1
                )));
            }
        }
        if let Err(e) = r {
            // Part of the chunk may be written: the session cannot go on.
            drop(u);
            self.hosted()?.uploads.sessions.remove(id);
            return Err(e);
        }
        Ok(UploadStatus {
            id: id.to_string(),
            offset: w.written(),
        })
    }

    /// Appends the last bytes, verifies the digest and stores the blob in the repository.
    pub async fn upload_finish<S, E>(
        &self,
        repo: &str,
        id: &str,
        digest: &Digest,
        body: S,
    ) -> Result<(), ServiceError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let s = self.session(repo, id)?;
        let mut w = {
            let mut u = s.upload.lock().await;
            u.writer
                .take()
                .ok_or_else(|| ServiceError::UploadUnknown(id.into()))?
        };
        self.hosted()?.uploads.sessions.remove(id);
        let idle = self.hosted()?.uploads.limits.body_timeout;
        write_body(&mut w, body, idle).await?;
        let (expected, ns, r) = (
            digest.clone(),
            self.hosted()?.prefix.clone(),
            repo.to_string(),
        );
        self.blocking(move |s| {
            s.linking(|s| {
                s.commit(w, &expected, None)?;
                s.link_blob(&ns, &r, &expected)
            })
        })
        .await
        .map_err(|e| match e {
            ServiceError::Store(StoreError::DigestMismatch { actual, .. }) => {
                ServiceError::DigestInvalid(format!(
                    "uploaded bytes hash to {actual}, not {digest}"
                ))
            }
            e => e,
        })?;
        self.mirror.catalog.add(&self.hosted()?.prefix, repo);
        self.metrics().store_bytes.set(self.store().size() as i64);
        Ok(())
    }

    pub fn upload_cancel(&self, repo: &str, id: &str) -> Result<(), ServiceError> {
        self.session(repo, id)?;
        self.hosted()?.uploads.sessions.remove(id);
        Ok(())
    }
}

/// Appends a request body; a body that sends nothing for `idle` fails, so a stalled
/// client cannot hold a session (and its file) forever.
async fn write_body<S, E>(
    w: &mut BlobWriter,
    mut body: S,
    idle: Duration,
) -> Result<(), ServiceError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    loop {
        let next = tokio::time::timeout(idle, body.next())
            .await
            .map_err(|_| ServiceError::BodyTimeout(idle))?;
        let Some(chunk) = next else {
            return Ok(());
        };
        let chunk = chunk.map_err(|e| ServiceError::UploadRange(format!("request body: {e}")))?;
        w.write(&chunk).map_err(StoreError::from)?;
    }
}
