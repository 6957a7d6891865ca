//! Blob upload sessions (POST, PATCH..., PUT) for hosted repositories.
//!
//! The bytes and the session itself are kept by the store (a local file, or objects in
//! the shared bucket), so a session opened on one replica can be continued and finished
//! on another. This replica keeps only what it needs to apply the caps and to take one
//! request of a session at a time. Sessions untouched for `upload_ttl` are dropped by
//! [`Services::expire_uploads`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::{Stream, StreamExt};
use tokio::sync::Mutex;

use super::{ServiceError, Services};
use crate::names::Digest;
use crate::store::{SessionInfo, SessionWriter, StoreError};

pub struct Uploads {
    sessions: DashMap<String, Arc<Session>>,
    limits: UploadLimits,
}

/// Bounds on upload sessions and their request bodies.
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
    info: SessionInfo,
    /// Held by the request working on the session; when it was last touched here.
    touched: Mutex<Instant>,
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

    pub fn ttl(&self) -> Duration {
        self.limits.ttl
    }

    /// The sessions to reclaim so that `owner` may open one more within the caps, or
    /// the cap that refuses it. A session is idle when no request works on it and none
    /// came for `body_timeout` (a CI job that crashed mid-push leaves such sessions): an
    /// idle one gives way, the owner's oldest first, then anyone's oldest for the total
    /// cap; busy and recent ones never do.
    fn room_for(&self, owner: &str) -> Result<Vec<String>, Cap> {
        let idle_since = |s: &Session| {
            s.touched
                .try_lock()
                .ok()
                .map(|t| *t)
                .filter(|t| t.elapsed() >= self.limits.body_timeout)
        };
        let (mut mine, mut mine_idle, mut others_idle) = (0, Vec::new(), Vec::new());
        for e in self.sessions.iter() {
            let idle = idle_since(e.value()).map(|t| (t, e.key().clone()));
            if e.info.owner == owner {
                mine += 1;
                mine_idle.extend(idle);
            } else {
                others_idle.extend(idle);
            }
        }
        // Oldest last, to be popped first.
        mine_idle.sort_by_key(|b| std::cmp::Reverse(b.0));
        others_idle.sort_by_key(|b| std::cmp::Reverse(b.0));
        let mut reclaim = Vec::new();
        let mut total = self.sessions.len();
        if mine >= self.limits.max_per_user {
            let (_, id) = mine_idle.pop().ok_or(Cap::PerUser(mine))?;
            reclaim.push(id);
            total -= 1;
        }
        if total >= self.limits.max_total {
            let (_, id) = mine_idle
                .pop()
                .or_else(|| others_idle.pop())
                .ok_or(Cap::Total(total))?;
            reclaim.push(id);
        }
        Ok(reclaim)
    }
}

/// The cap that refused a new session, with the sessions that count against it.
enum Cap {
    PerUser(usize),
    Total(usize),
}

impl Cap {
    fn label(&self) -> &'static str {
        match self {
            Cap::PerUser(_) => "per_user",
            Cap::Total(_) => "total",
        }
    }

    fn error(&self, owner: &str) -> ServiceError {
        ServiceError::TooMany(match self {
            Cap::PerUser(n) => format!(
                "{owner:?} has {n} upload sessions in use (hosted.max_uploads_per_user); finish or cancel some"
            ),
            Cap::Total(n) => format!(
                "{n} upload sessions are in use on this replica (hosted.max_uploads); retry later"
            ),
        })
    }
}

impl Services {
    fn uploads(&self) -> Result<&Uploads, ServiceError> {
        Ok(&self.hosted()?.uploads)
    }

    /// The session `id`, if it belongs to `repo` and was opened by `owner`: known here,
    /// or opened on another replica (then found in the store). Another user's session is
    /// unknown to this one, as if it did not exist.
    async fn session(
        &self,
        repo: &str,
        id: &str,
        owner: &str,
    ) -> Result<Arc<Session>, ServiceError> {
        let unknown = || ServiceError::UploadUnknown(id.into());
        let known = self.uploads()?.sessions.get(id).map(|s| s.clone());
        let s = match known {
            Some(s) => s,
            None => {
                let (info, _) = self.store().session_info(id).await?.ok_or_else(unknown)?;
                let s = Arc::new(Session {
                    info,
                    touched: Mutex::new(Instant::now()),
                });
                self.uploads()?.sessions.insert(id.to_string(), s.clone());
                s
            }
        };
        if s.info.repo != repo || s.info.owner != owner {
            return Err(unknown());
        }
        Ok(s)
    }

    /// Bytes a session holds (it may have been continued on another replica).
    async fn offset(&self, id: &str) -> Result<u64, ServiceError> {
        match self.store().session_info(id).await? {
            Some((_, offset)) => Ok(offset),
            None => {
                self.uploads()?.sessions.remove(id);
                Err(ServiceError::UploadUnknown(id.into()))
            }
        }
    }

    /// Opens a session for `owner` (the pushing user), within the caps.
    pub async fn upload_start(
        &self,
        repo: &str,
        owner: &str,
    ) -> Result<UploadStatus, ServiceError> {
        let room = self.uploads()?.room_for(owner);
        let reclaim = room.map_err(|cap| {
            self.metrics()
                .upload_refusals
                .with_label_values(&[cap.label()])
                .inc();
            cap.error(owner)
        })?;
        for idle in reclaim {
            tracing::info!(session = %idle, for_user = owner, "reclaimed an idle upload session for a new one");
            self.metrics().uploads_reclaimed.inc();
            self.mirror.drop_session(&idle).await?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let info = SessionInfo {
            repo: repo.to_string(),
            owner: owner.to_string(),
        };
        self.store().session_create(&id, &info).await?;
        let session = Session {
            info,
            touched: Mutex::new(Instant::now()),
        };
        self.uploads()?
            .sessions
            .insert(id.clone(), Arc::new(session));
        Ok(UploadStatus { id, offset: 0 })
    }

    pub async fn upload_status(
        &self,
        repo: &str,
        id: &str,
        owner: &str,
    ) -> Result<UploadStatus, ServiceError> {
        let s = self.session(repo, id, owner).await?;
        let _busy = s.touched.lock().await;
        Ok(UploadStatus {
            id: id.to_string(),
            offset: self.offset(id).await?,
        })
    }

    /// Appends a chunk. `range`, from `Content-Range` (inclusive), must start at the bytes
    /// received and span exactly the body.
    pub async fn upload_append<S, E>(
        &self,
        repo: &str,
        id: &str,
        owner: &str,
        range: Option<(u64, u64)>,
        body: S,
    ) -> Result<UploadStatus, ServiceError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let s = self.session(repo, id, owner).await?;
        let mut touched = s.touched.lock().await;
        *touched = Instant::now();
        let before = self.offset(id).await?;
        if let Some(start) = range.map(|r| r.0).filter(|s| *s != before) {
            return Err(ServiceError::UploadRange(format!(
                "chunk starts at {start}, upload has {before} bytes"
            )));
        }
        let mut r = self.append(id, before, body).await;
        if let (Ok(after), Some((a, b))) = (&r, range) {
            let got = after - before;
            if got != b - a + 1 {
                r = Err(ServiceError::UploadRange(format!(
                    "Content-Range {a}-{b} announces {} bytes, the body had {got}",
                    b - a + 1
                )));
            }
        }
        match r {
            Ok(offset) => Ok(UploadStatus {
                id: id.to_string(),
                offset,
            }),
            Err(e) => {
                // Part of the chunk may be written: the session cannot go on.
                drop(touched);
                self.mirror.drop_session(id).await?;
                Err(e)
            }
        }
    }

    /// Writes a request body at `offset`; the session's new size.
    async fn append<S, E>(&self, id: &str, offset: u64, body: S) -> Result<u64, ServiceError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let idle = self.uploads()?.limits.body_timeout;
        let mut w = self.store().session_writer(id, offset).await?;
        write_body(&mut w, body, idle).await?;
        Ok(w.close().await?)
    }

    /// Appends the last bytes, verifies the digest and stores the blob in the repository.
    pub async fn upload_finish<S, E>(
        &self,
        repo: &str,
        id: &str,
        owner: &str,
        digest: &Digest,
        body: S,
    ) -> Result<(), ServiceError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let s = self.session(repo, id, owner).await?;
        let _busy = s.touched.lock().await;
        let offset = self.offset(id).await?;
        if let Err(e) = self.append(id, offset, body).await {
            self.mirror.drop_session(id).await?;
            return Err(e);
        }
        self.uploads()?.sessions.remove(id);
        let (ns, r, id, expected) = (
            self.hosted()?.prefix.clone(),
            repo.to_string(),
            id.to_string(),
            *digest,
        );
        let store = self.mirror.store.clone();
        super::offload(async move {
            let _lock = store.lock_linking().await?;
            store.session_commit(&id, &expected).await?;
            store.link_blob(&ns, &r, &expected).await
        })
        .await
        .map_err(|e| match e {
            StoreError::DigestMismatch { actual, .. } => ServiceError::DigestInvalid(format!(
                "uploaded bytes hash to {actual}, not {digest}"
            )),
            e => e.into(),
        })?;
        self.mirror.catalog.add(&self.hosted()?.prefix, repo);
        self.metrics().store_bytes.set(self.store().size() as i64);
        self.mirror.keep_local_tier();
        Ok(())
    }

    pub async fn upload_cancel(
        &self,
        repo: &str,
        id: &str,
        owner: &str,
    ) -> Result<(), ServiceError> {
        let s = self.session(repo, id, owner).await?;
        let _busy = s.touched.lock().await;
        self.mirror.drop_session(id).await
    }
}

impl super::Mirror {
    fn uploads(&self) -> Result<&Uploads, ServiceError> {
        self.hosted
            .as_ref()
            .map(|h| &h.uploads)
            .ok_or_else(|| ServiceError::NameUnknown("no hosted repositories".into()))
    }

    /// Forgets a session and drops its bytes.
    pub(super) async fn drop_session(&self, id: &str) -> Result<(), ServiceError> {
        self.uploads()?.sessions.remove(id);
        self.store.session_delete(id).await?;
        Ok(())
    }

    /// Drops sessions idle for longer than the TTL, here and in the store (whichever
    /// replica opened them); returns how many. A session whose request is running here
    /// is left to it: its body times out.
    pub async fn expire_uploads(&self) -> Result<usize, ServiceError> {
        let uploads = self.uploads()?;
        let ttl = uploads.limits.ttl;
        uploads
            .sessions
            .retain(|_, s| s.touched.try_lock().map_or(true, |t| t.elapsed() < ttl));
        let mut n = 0;
        for (id, age) in self.store.sessions().await? {
            let busy = uploads
                .sessions
                .get(&id)
                .is_some_and(|s| s.touched.try_lock().is_err());
            if age >= ttl && !busy {
                self.drop_session(&id).await?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Appends a request body; a body that sends nothing for `idle` fails, so a stalled
/// client cannot hold a session forever.
async fn write_body<S, E>(
    w: &mut SessionWriter,
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
        w.write(chunk).await?;
    }
}
