//! Test images: built with umoci into an OCI layout, pushed with skopeo.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use super::{run, sha256_hex};

/// An OCI image layout directory holding any number of tagged images.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        let dir = dir.join("layout");
        run(Command::new("umoci").args(["init", "--layout"]).arg(&dir));
        Layout { dir }
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.dir.display())
    }

    /// Builds `tag`: one layer holding `files`; returns the manifest digest.
    pub fn build(&self, tag: &str, files: &[(&str, &[u8])]) -> String {
        run(Command::new("umoci").args(["new", "--image", &self.image(tag)]));
        let bundle = self.dir.with_file_name(format!("bundle-{tag}"));
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image", &self.image(tag)])
            .arg(&bundle));
        for (name, bytes) in files {
            std::fs::write(bundle.join("rootfs").join(name), bytes).expect("write file");
        }
        run(Command::new("umoci")
            .args(["repack", "--image", &self.image(tag)])
            .arg(&bundle));
        let _ = std::fs::remove_dir_all(&bundle);
        self.digest(tag)
    }

    /// Sets the architecture of `tag` (a new config and manifest); returns the digest.
    pub fn set_arch(&self, tag: &str, arch: &str) -> String {
        run(Command::new("umoci").args([
            "config",
            "--image",
            &self.image(tag),
            "--architecture",
            arch,
            "--os",
            "linux",
        ]));
        self.digest(tag)
    }

    fn index(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.join("index.json")).expect("index.json");
        serde_json::from_str(&text).expect("index json")
    }

    fn entry(&self, tag: &str) -> Value {
        self.index()["manifests"]
            .as_array()
            .and_then(|m| {
                m.iter()
                    .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
                    .cloned()
            })
            .unwrap_or_else(|| panic!("tag {tag} not in layout"))
    }

    /// The manifest digest of `tag`.
    pub fn digest(&self, tag: &str) -> String {
        self.entry(tag)["digest"]
            .as_str()
            .expect("digest")
            .to_string()
    }

    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.trim_start_matches("sha256:");
        std::fs::read(self.dir.join("blobs/sha256").join(hex)).expect("read blob")
    }

    /// Layer digests of the image manifest `digest`.
    pub fn layers(&self, digest: &str) -> Vec<String> {
        let m: Value = serde_json::from_slice(&self.blob(digest)).expect("manifest json");
        m["layers"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|d| d["digest"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Builds a two-platform image (linux/amd64 and linux/arm64, one random layer each of
    /// `size` bytes) tagged `multi`; returns (index digest, amd64 manifest digest).
    pub fn multiarch(&self, size: usize, seed: u64) -> (String, String) {
        self.build("amd", &[("a", &noise(size, seed))]);
        self.build("arm", &[("b", &noise(size, seed + 1))]);
        let amd = self.set_arch("amd", "amd64");
        self.set_arch("arm", "arm64");
        let index = self.make_index("multi", &[("amd", "amd64"), ("arm", "arm64")]);
        (index, amd)
    }

    /// Writes an image index over `tags` (each tag's config names its platform) as `tag`.
    pub fn make_index(&self, tag: &str, tags: &[(&str, &str)]) -> String {
        let manifests: Vec<Value> = tags
            .iter()
            .map(|(t, arch)| {
                let e = self.entry(t);
                json!({"mediaType": e["mediaType"], "digest": e["digest"], "size": e["size"],
                       "platform": {"architecture": arch, "os": "linux"}})
            })
            .collect();
        let body = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .expect("index");
        let hex = sha256_hex(&body);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), &body).expect("write index");
        let mut index = self.index();
        if let Some(m) = index["manifests"].as_array_mut() {
            m.push(json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": format!("sha256:{hex}"),
                "size": body.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }));
        }
        std::fs::write(self.dir.join("index.json"), index.to_string()).expect("write index.json");
        format!("sha256:{hex}")
    }

    /// `skopeo copy --all` of `tag` to `dest` (`host:port/repo:tag`).
    pub fn push(&self, tag: &str, dest: &str, creds: Option<&str>) {
        self.copy(tag, dest, creds, &[]);
    }

    /// Pushes converting the manifest format (`v2s2`: Docker schema 2).
    pub fn push_as(&self, tag: &str, dest: &str, format: &str) {
        self.copy(tag, dest, None, &["--format", format]);
    }

    fn copy(&self, tag: &str, dest: &str, creds: Option<&str>, extra: &[&str]) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--dest-tls-verify=false"])
            .args(extra);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        cmd.arg(format!("oci:{}", self.image(tag)))
            .arg(format!("docker://{dest}"));
        run(&mut cmd);
    }
}

/// Pseudo-random bytes from a seed (incompressible, reproducible).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pulls `<repo>:<tag>` (an OCI image manifest) and its `layers` from the registry at
/// `base` as a client would, with `auth` as the Authorization header if given, and checks
/// every layer's bytes against its digest.
pub fn pull_checked(base: &str, repo: &str, tag: &str, layers: &[String], auth: Option<&str>) {
    let mut headers = vec![("Accept", "application/vnd.oci.image.manifest.v1+json")];
    if let Some(a) = auth {
        headers.push(("Authorization", a));
    }
    let r = super::http(
        "GET",
        &format!("{base}/v2/{repo}/manifests/{tag}"),
        &headers,
    );
    assert_eq!(r.status, 200, "{repo}:{tag}");
    for layer in layers {
        let b = super::http("GET", &format!("{base}/v2/{repo}/blobs/{layer}"), &headers);
        assert_eq!(format!("sha256:{}", sha256_hex(&b.body)), *layer, "{repo}");
    }
}
