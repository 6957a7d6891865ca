//! OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): the format of
//! `entrepot export` and `entrepot import`, readable by skopeo, umoci and containerd.

use std::collections::HashSet;
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

/// Writes into an OCI layout directory: a new one, or one that already holds images
/// (its references are kept; an entry of the same name is replaced).
pub struct LayoutWriter {
    dir: PathBuf,
    entries: Vec<Value>,
    /// Copy objects instead of hard-linking them to the store's files.
    copy: bool,
    /// Objects hard-linked so far.
    linked: usize,
    /// Reference names in the layout before this export.
    before: HashSet<String>,
    /// Reference names this export wrote.
    added: HashSet<String>,
}

/// What an export did to the layout, for its summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct LayoutCounts {
    /// References that were there before and stay.
    pub kept: usize,
    /// References that were there before under the same name, now pointing at the new export.
    pub replaced: usize,
    pub added: usize,
    /// Objects hard-linked to the store's files (they share their disk blocks).
    pub linked: usize,
}

fn ref_name(entry: &Value) -> Option<&str> {
    let ann = &entry["annotations"];
    ann["io.containerd.image.name"]
        .as_str()
        .or(ann["org.opencontainers.image.ref.name"].as_str())
}

impl LayoutWriter {
    /// Opens `dir` for writing: created if missing; an existing layout keeps its
    /// references; a directory with other things in it is refused (an export must never
    /// scatter blobs over, say, a home directory).
    pub fn create(dir: &Path, copy: bool) -> Result<LayoutWriter, StoreError> {
        let mut entries = Vec::new();
        let index = dir.join("index.json");
        if index.is_file() {
            let text = fs::read_to_string(&index)?;
            let doc: Value = serde_json::from_str(&text).map_err(|e| {
                StoreError::Meta(format!(
                    "{}: not an OCI index ({e}); export into an empty directory or an OCI layout",
                    index.display()
                ))
            })?;
            entries = doc["manifests"].as_array().cloned().unwrap_or_default();
        } else if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(StoreError::Meta(format!(
                "{} is not empty and not an OCI image layout (no index.json); export into an empty or new directory, or an earlier export",
                dir.display()
            )));
        }
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let before = entries
            .iter()
            .filter_map(|m| ref_name(m).map(String::from))
            .collect();
        Ok(LayoutWriter {
            dir: dir.to_path_buf(),
            entries,
            copy,
            linked: 0,
            before,
            added: HashSet::new(),
        })
    }

    /// Puts a stored object into the layout: a hard link to the store's file when on the
    /// same filesystem (unless copying was asked for), else a copy.
    pub fn add_blob(&mut self, store: &Store, d: &Digest) -> Result<u64, StoreError> {
        let src = store.blob_path(d);
        let dst = self.dir.join("blobs/sha256").join(d.hex());
        if dst.exists() {
            return Ok(fs::metadata(&dst)?.len());
        }
        if !self.copy && fs::hard_link(&src, &dst).is_ok() {
            self.linked += 1;
        } else {
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

    /// Adds a reference, replacing one of the same name already in the layout.
    pub fn add_entry(&mut self, e: &LayoutEntry) {
        self.entries
            .retain(|m| ref_name(m) != Some(e.reference.as_str()));
        self.added.insert(e.reference.clone());
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

    /// Writes `index.json` (through a temp file and a rename: a layout is never left
    /// with half an index).
    pub fn finish(self) -> Result<LayoutCounts, StoreError> {
        let replaced = self.added.intersection(&self.before).count();
        let counts = LayoutCounts {
            kept: self.before.len() - replaced,
            replaced,
            added: self.added.len() - replaced,
            linked: self.linked,
        };
        let index = json!({
            "schemaVersion": 2,
            "mediaType": crate::media::OCI_INDEX,
            "manifests": self.entries,
        });
        let tmp = self.dir.join("index.json.tmp");
        fs::write(&tmp, index.to_string())?;
        fs::rename(&tmp, self.dir.join("index.json"))?;
        Ok(counts)
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
            let (Some(reference), Some(digest)) = (ref_name(m), m["digest"].as_str()) else {
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
