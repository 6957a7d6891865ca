//! Upload sessions of hosted pushes, kept by the store so that any replica can continue
//! one: a push behind a load balancer sends its POST, PATCHes and PUT to whichever replica
//! the balancer picks.
//!
//! Locally a session is `uploads/<id>` (the bytes) beside `uploads/<id>.json` (who opened
//! it, for which repository). In a bucket it is `uploads/<id>/info` plus one object per
//! chunk, `uploads/<id>/p<offset>`, each written by a multipart upload as it arrives; the
//! replica that gets the final PUT reads the chunks back in order, hashing them into the
//! blob's own upload, and completes it only if the digest matches.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::bucket::Upload;
use super::{not_found_is_none, Store, StoreError};
use crate::names::Digest;

/// Who opened a session, for which repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub repo: String,
    pub owner: String,
}

/// Appends one request body to a session.
pub struct SessionWriter {
    sink: Sink,
    start: u64,
    offset: u64,
}

enum Sink {
    File(File),
    Bucket(Option<Upload>),
}

impl SessionWriter {
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let n = chunk.len() as u64;
        match &mut self.sink {
            Sink::File(f) => f.write_all(&chunk)?,
            Sink::Bucket(Some(u)) => u.push(chunk).await?,
            Sink::Bucket(None) => return Err(StoreError::Bucket("chunk already closed".into())),
        }
        self.offset += n;
        Ok(())
    }

    /// Bytes in the session once this body is in.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Makes the chunk part of the session; returns the new offset.
    pub async fn close(mut self) -> Result<u64, StoreError> {
        if let Sink::Bucket(u) = &mut self.sink {
            match u.take() {
                // S3 refuses a multipart upload without parts: an empty body adds nothing.
                Some(u) if self.offset == self.start => u.abort().await,
                Some(u) => u.complete().await?,
                None => {}
            }
        }
        Ok(self.offset)
    }
}

impl Store {
    fn session_file(&self, id: &str) -> std::path::PathBuf {
        self.root.join("uploads").join(id)
    }

    /// Opens a session (`id` is a fresh UUID).
    pub async fn session_create(&self, id: &str, info: &SessionInfo) -> Result<(), StoreError> {
        let json = serde_json::to_vec(info).map_err(|e| StoreError::Meta(e.to_string()))?;
        match &self.shared {
            Some(sh) => {
                sh.bucket
                    .put(&format!("uploads/{id}/info"), json.into())
                    .await
            }
            None => {
                File::create(self.session_file(id))?;
                fs::write(self.session_file(&format!("{id}.json")), json)?;
                Ok(())
            }
        }
    }

    /// A session and the bytes it holds; `None` if unknown (never opened, finished,
    /// cancelled or expired).
    pub async fn session_info(&self, id: &str) -> Result<Option<(SessionInfo, u64)>, StoreError> {
        let bytes = match &self.shared {
            Some(sh) => sh
                .bucket
                .get(&format!("uploads/{id}/info"))
                .await?
                .map(|b| b.to_vec()),
            None => not_found_is_none(fs::read(self.session_file(&format!("{id}.json"))))?,
        };
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let info: SessionInfo = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Meta(format!("upload session {id}: {e}")))?;
        let offset = match &self.shared {
            Some(_) => self.session_chunks(id).await?.values().sum(),
            None => match not_found_is_none(fs::metadata(self.session_file(id)))? {
                Some(m) => m.len(),
                None => return Ok(None),
            },
        };
        Ok(Some((info, offset)))
    }

    /// The chunks of a bucket session: offset -> size, checked to follow each other.
    async fn session_chunks(&self, id: &str) -> Result<BTreeMap<u64, u64>, StoreError> {
        let Some(sh) = &self.shared else {
            return Ok(BTreeMap::new());
        };
        let mut chunks = BTreeMap::new();
        for o in sh.bucket.list_all(&format!("uploads/{id}/")).await? {
            let name = o.key.rsplit('/').next().unwrap_or_default();
            if let Some(off) = name.strip_prefix('p').and_then(|n| n.parse::<u64>().ok()) {
                chunks.insert(off, o.size);
            }
        }
        let mut expect = 0;
        for (off, size) in &chunks {
            if *off != expect {
                return Err(StoreError::Meta(format!(
                    "upload session {id}: chunk at {off}, expected {expect}"
                )));
            }
            expect += size;
        }
        Ok(chunks)
    }

    /// Starts appending a body at `offset` (the session's current size).
    pub async fn session_writer(&self, id: &str, offset: u64) -> Result<SessionWriter, StoreError> {
        let sink = match &self.shared {
            Some(sh) => Sink::Bucket(Some(
                sh.bucket
                    .upload(&format!("uploads/{id}/p{offset:020}"))
                    .await?,
            )),
            None => {
                let f = File::options().append(true).open(self.session_file(id))?;
                if f.metadata()?.len() != offset {
                    return Err(StoreError::Meta(format!(
                        "upload session {id} changed under this request"
                    )));
                }
                Sink::File(f)
            }
        };
        Ok(SessionWriter {
            sink,
            start: offset,
            offset,
        })
    }

    /// Verifies the session's bytes against `expected` and stores them as that blob;
    /// returns its size. The session is gone afterwards either way.
    pub async fn session_commit(&self, id: &str, expected: &Digest) -> Result<u64, StoreError> {
        let r = match &self.shared {
            Some(_) => self.session_commit_shared(id, expected).await,
            None => self.session_commit_local(id, expected).await,
        };
        self.session_delete(id).await?;
        r
    }

    async fn session_commit_local(&self, id: &str, expected: &Digest) -> Result<u64, StoreError> {
        let path = self.session_file(id);
        let hashed = path.clone();
        let (actual, len) = tokio::task::spawn_blocking(move || -> io::Result<(Digest, u64)> {
            use sha2::Digest as _;
            let mut f = File::open(&hashed)?;
            let mut h = sha2::Sha256::new();
            let len = io::copy(&mut f, &mut h)?;
            f.sync_all()?;
            Ok((Digest::from_hasher(h), len))
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        if actual != *expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        self.adopt(&path, expected, len)?;
        Ok(len)
    }

    async fn session_commit_shared(&self, id: &str, expected: &Digest) -> Result<u64, StoreError> {
        let chunks = self.session_chunks(id).await?;
        let mut upload = self.upload_shared(expected).await?;
        let mut w = self.begin()?;
        for off in chunks.keys() {
            let key = format!("uploads/{id}/p{off:020}");
            let Some(sh) = &self.shared else { break };
            let Some((_, mut body)) = sh.bucket.read(&key, 0).await? else {
                return Err(StoreError::Meta(format!(
                    "upload session {id}: chunk {off} is gone"
                )));
            };
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                w.write(&chunk)?;
                if let Some(u) = &mut upload {
                    u.push(chunk).await?;
                }
            }
        }
        if w.digest() != *expected {
            if let Some(u) = upload {
                u.abort().await;
            }
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual: w.digest(),
            });
        }
        if let Some(u) = upload {
            u.complete().await?;
        }
        let expected = expected.clone();
        self.commit(w, &expected, None)
    }

    /// Removes a session and its bytes (finished, cancelled or expired).
    pub async fn session_delete(&self, id: &str) -> Result<(), StoreError> {
        match &self.shared {
            Some(sh) => {
                for o in sh.bucket.list_all(&format!("uploads/{id}/")).await? {
                    sh.bucket.delete(&o.key).await?;
                }
            }
            None => {
                not_found_is_none(fs::remove_file(self.session_file(id)))?;
                not_found_is_none(fs::remove_file(self.session_file(&format!("{id}.json"))))?;
            }
        }
        Ok(())
    }

    /// Every session with the time since it was last written to.
    pub async fn sessions(&self) -> Result<Vec<(String, Duration)>, StoreError> {
        let now = SystemTime::now();
        let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
        let mut latest: BTreeMap<String, SystemTime> = BTreeMap::new();
        match &self.shared {
            Some(sh) => {
                for o in sh.bucket.list_all("uploads/").await? {
                    if let Some(id) = o
                        .key
                        .strip_prefix("uploads/")
                        .and_then(|k| k.split('/').next())
                    {
                        let e = latest.entry(id.to_string()).or_insert(o.modified);
                        *e = (*e).max(o.modified);
                    }
                }
            }
            None => {
                for (path, a) in self.temp_files(true)? {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    let Some(name) = name else { continue };
                    let id = name.trim_end_matches(".json").to_string();
                    let t = now - a;
                    let e = latest.entry(id).or_insert(t);
                    *e = (*e).max(t);
                }
            }
        }
        Ok(latest.into_iter().map(|(id, t)| (id, age(t))).collect())
    }
}
