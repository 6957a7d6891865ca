//! OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): the format of
//! `entrepot export` and `entrepot import`, readable by skopeo, umoci and containerd.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{not_found_is_none, Store, StoreError};
use crate::names::Digest;

/// One tagged entry of `index.json`.
#[derive(Debug, Clone)]
pub struct LayoutEntry {
    pub reference: String,
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// Writes into an OCI layout directory.
pub struct LayoutWriter {
    dir: PathBuf,
    entries: Vec<Value>,
}

impl LayoutWriter {
    pub fn create(dir: &Path) -> Result<LayoutWriter, StoreError> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(LayoutWriter {
            dir: dir.to_path_buf(),
            entries: Vec::new(),
        })
    }

    /// Copies a stored object into the layout (a hard link when on the same filesystem).
    pub fn add_blob(&self, store: &Store, d: &Digest) -> Result<u64, StoreError> {
        let src = store.blob_path(d);
        let dst = self.dir.join("blobs/sha256").join(d.hex());
        if dst.exists() {
            return Ok(fs::metadata(&dst)?.len());
        }
        if fs::hard_link(&src, &dst).is_err() {
            fs::copy(&src, &dst)?;
        }
        Ok(fs::metadata(&dst)?.len())
    }

    /// Writes an object made for the export (a platform-trimmed index); its digest.
    pub fn add_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let d = Digest::of(bytes);
        fs::write(self.dir.join("blobs/sha256").join(d.hex()), bytes)?;
        Ok(d)
    }

    pub fn add_entry(&mut self, e: &LayoutEntry) {
        self.entries.push(json!({
            "mediaType": e.media_type,
            "digest": e.digest.to_string(),
            "size": e.size,
            "annotations": {
                "org.opencontainers.image.ref.name": e.reference,
                "io.containerd.image.name": e.reference,
            },
        }));
    }

    pub fn finish(self) -> Result<(), StoreError> {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": crate::media::OCI_INDEX,
            "manifests": self.entries,
        });
        fs::write(self.dir.join("index.json"), index.to_string())?;
        Ok(())
    }
}

/// Reads an OCI layout directory.
pub struct LayoutReader {
    dir: PathBuf,
}

impl LayoutReader {
    pub fn open(dir: &Path) -> Result<LayoutReader, StoreError> {
        if !dir.join("index.json").is_file() {
            return Err(StoreError::Meta(format!(
                "{} has no index.json",
                dir.display()
            )));
        }
        Ok(LayoutReader {
            dir: dir.to_path_buf(),
        })
    }

    /// Entries of `index.json` that carry a reference name.
    pub fn entries(&self) -> Result<Vec<LayoutEntry>, StoreError> {
        let text = fs::read_to_string(self.dir.join("index.json"))?;
        let index: Value = serde_json::from_str(&text)
            .map_err(|e| StoreError::Meta(format!("index.json: {e}")))?;
        let mut out = Vec::new();
        for m in index["manifests"].as_array().into_iter().flatten() {
            let ann = &m["annotations"];
            let reference = ann["io.containerd.image.name"]
                .as_str()
                .or(ann["org.opencontainers.image.ref.name"].as_str());
            let (Some(reference), Some(digest)) = (reference, m["digest"].as_str()) else {
                continue;
            };
            let Ok(digest) = digest.parse() else {
                continue;
            };
            out.push(LayoutEntry {
                reference: reference.to_string(),
                media_type: m["mediaType"].as_str().unwrap_or_default().to_string(),
                digest,
                size: m["size"].as_u64().unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Opens a blob of the layout, if present.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<File>, StoreError> {
        not_found_is_none(File::open(self.dir.join("blobs/sha256").join(d.hex())))
    }
}

impl Store {
    /// Copies a layout blob into the store (and the bucket, when there is one); the digest
    /// is verified as for any write, so a blob whose bytes do not match its name is
    /// refused (`DigestMismatch`).
    pub async fn import_blob(&self, layout: &LayoutReader, d: &Digest) -> Result<bool, StoreError> {
        if self.stat(d).await?.is_some() {
            return Ok(true);
        }
        let Some(f) = layout.open_blob(d)? else {
            return Ok(false);
        };
        self.copy_in(f, d).await?;
        Ok(true)
    }

    /// Makes sure blob `d` is in the local tier (copied from the bucket, verified, when
    /// only the bucket has it); whether it is there now.
    pub async fn ensure_local(&self, d: &Digest) -> Result<bool, StoreError> {
        if self.local_size(d)?.is_some() {
            return Ok(true);
        }
        let Some((_, mut body)) = self.read_shared(d, 0).await? else {
            return Ok(false);
        };
        let mut w = self.begin()?;
        while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
            w.write(&chunk?)?;
        }
        self.commit(w, d, None)?;
        Ok(true)
    }

    /// Writes the bytes of `f` as blob `d` to both tiers, verified.
    async fn copy_in(&self, mut f: File, d: &Digest) -> Result<(), StoreError> {
        let mut upload = self.upload_shared(d).await?;
        let mut w = self.begin()?;
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = io::Read::read(&mut f, &mut buf)?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
            if let Some(u) = &mut upload {
                u.push(bytes::Bytes::copy_from_slice(&buf[..n])).await?;
            }
        }
        if let Some(u) = upload {
            if w.digest() == *d {
                u.complete().await?;
            } else {
                u.abort().await;
            }
        }
        self.commit(w, d, None)?;
        Ok(())
    }
}
