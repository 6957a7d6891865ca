//! Manifest media types and content negotiation (`Accept`).
//!
//! Clients say what they accept very differently: containerd sends one comma-separated
//! `Accept` line, containers/image (podman, skopeo, CRI-O) one line per type, Docker 20.10
//! six lines in a random order that include schema1 and `application/json`. [`Accepted`]
//! reads every line and every item, keeps only the types entrepot stores and ignores the
//! rest, so the order and the extras never matter.

/// OCI image index (multi-platform).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (multi-platform).
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Every manifest type entrepot stores and serves.
pub const MANIFEST_TYPES: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];
/// The types that list other manifests.
pub const INDEX_TYPES: [&str; 2] = [OCI_INDEX, DOCKER_LIST];
/// The types that describe one image.
pub const IMAGE_TYPES: [&str; 2] = [OCI_MANIFEST, DOCKER_MANIFEST];

/// What every upstream manifest request asks for, whatever the client asked: the cached
/// answer then suits any later client, and Distribution never falls back to schema1.
pub const UPSTREAM_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The stored manifest types a client accepts (a bit per entry of [`MANIFEST_TYPES`]).
///
/// ```
/// use entrepot::media::{Accepted, DOCKER_MANIFEST, OCI_INDEX};
/// // containers/image: one line per type.
/// let a = Accepted::from_lines([
///     "application/vnd.oci.image.manifest.v1+json",
///     "application/vnd.docker.distribution.manifest.v2+json",
/// ]);
/// assert!(a.admits(DOCKER_MANIFEST) && !a.admits(OCI_INDEX));
/// // curl's */* (or no header at all) admits every stored type.
/// assert!(Accepted::from_lines(["*/*"]).admits(OCI_INDEX));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted(u8);

impl Accepted {
    /// Every stored type: no `Accept` header, or one naming none of the stored types.
    pub const ALL: Accepted = Accepted((1 << MANIFEST_TYPES.len()) - 1);

    /// Reads every `Accept` line; items are split on `,` and parameters (`;q=`) dropped.
    pub fn from_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Accepted {
        let mut bits = 0u8;
        for item in lines.into_iter().flat_map(|l| l.split(',')) {
            let t = item.split(';').next().unwrap_or("").trim();
            if let Some(i) = MANIFEST_TYPES
                .iter()
                .position(|m| m.eq_ignore_ascii_case(t))
            {
                bits |= 1 << i;
            }
        }
        if bits == 0 {
            Accepted::ALL
        } else {
            Accepted(bits)
        }
    }

    /// Whether a manifest of `media_type` may be served. A type outside
    /// [`MANIFEST_TYPES`] (an artifact manifest) cannot be negotiated and is served as is.
    pub fn admits(self, media_type: &str) -> bool {
        match MANIFEST_TYPES.iter().position(|m| *m == media_type) {
            Some(i) => self.0 & (1 << i) != 0,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_lines_in_any_order() {
        let docker = [
            "application/json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            DOCKER_LIST,
            OCI_INDEX,
            DOCKER_MANIFEST,
            OCI_MANIFEST,
        ];
        let mut lines = docker.to_vec();
        for _ in 0..6 {
            lines.rotate_left(1);
            let a = Accepted::from_lines(lines.iter().copied());
            assert_eq!(a, Accepted::ALL);
        }
    }

    #[test]
    fn comma_lists_parameters_and_ignored_types() {
        let a = Accepted::from_lines([
            "application/vnd.docker.distribution.manifest.v1+json, application/json",
            "application/vnd.oci.image.index.v1+json;q=0.5",
        ]);
        assert!(a.admits(OCI_INDEX));
        assert!(!a.admits(OCI_MANIFEST));
        assert!(!a.admits(DOCKER_LIST));
        assert!(a.admits("application/vnd.example.artifact"));
        assert_eq!(Accepted::from_lines([]), Accepted::ALL);
        assert_eq!(Accepted::from_lines(["application/json"]), Accepted::ALL);
    }
}
