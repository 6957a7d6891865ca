//! Upload sessions of hosted pushes, kept by the store so that any replica can continue
//! one: a push behind a load balancer sends its POST, PATCHes and PUT to whichever replica
//! the balancer picks.
//!
//! Locally a session is `uploads/<id>` (the bytes) beside `uploads/<id>.json` (who opened
//! it, for which repository). In a bucket it is `uploads/<id>/info` plus one object per
//! chunk, `uploads/<id>/p<offset>`, each written by a multipart upload as it arrives; the
//! replica that gets the final PUT reads the chunks back in order, hashing them into the
//! blob's own upload, and completes it only if the digest matches.

use std::fs::File;
use std::io::Write;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::bucket::Upload;
use super::StoreError;

/// Who opened a session, for which repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub repo: String,
    pub owner: String,
}

/// Appends one request body to a session.
pub struct SessionWriter {
    pub(super) sink: Sink,
    pub(super) start: u64,
    pub(super) offset: u64,
}

pub(super) enum Sink {
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
