//! Names the protocol uses: digests (`sha256:<64 hex>`, the only identity the store
//! knows), tags, references and repository name components, with their grammars.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A validated `sha256` digest. Other algorithms are refused at parse time so that no
/// unverifiable name ever reaches the store.
///
/// ```
/// use entrepot::names::Digest;
/// let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
///     .parse()
///     .unwrap();
/// assert_eq!(d, Digest::of(b""));
/// assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
/// assert!("sha512:abcd".parse::<Digest>().is_err());
/// ```
///
/// The hex digits are held inline: a digest is parsed, copied and compared on every
/// request, and a heap string made each of those an allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// Lowercase ASCII hex digits only (every constructor checks or writes them).
    hex: [u8; 64],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DigestError {
    #[error("unsupported digest algorithm {0:?}")]
    Algorithm(String),
    #[error("malformed digest")]
    Malformed,
}

impl Digest {
    pub fn hex(&self) -> &str {
        // SAFETY: `hex` holds ASCII hex digits only (see the field), which are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.hex) }
    }

    /// Digest of a byte slice (used for small objects: manifests).
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub fn from_hasher(h: Sha256) -> Digest {
        let mut hex = [0u8; 64];
        // 32 bytes always fit 64 digits: the error case cannot happen.
        let _ = hex::encode_to_slice(h.finalize(), &mut hex);
        Digest { hex }
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algo, hex) = s.split_once(':').ok_or(DigestError::Malformed)?;
        if algo != "sha256" {
            let known = !algo.is_empty() && algo.bytes().all(|b| b.is_ascii_alphanumeric());
            return Err(if known {
                DigestError::Algorithm(algo.to_string())
            } else {
                DigestError::Malformed
            });
        }
        let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !ok {
            return Err(DigestError::Malformed);
        }
        let mut d = Digest { hex: [0u8; 64] };
        d.hex.copy_from_slice(hex.as_bytes());
        Ok(d)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// Tag grammar: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn is_valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`. This rejects `..`, empty
/// components (absolute paths, `//`) and anything with a leading or trailing separator.
pub fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(&b[0]) || !alnum(&b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(&b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+", always followed by an alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || !b.get(i).is_some_and(alnum) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
        assert!(matches!(
            "sha512:abcd".parse::<Digest>(),
            Err(DigestError::Algorithm(_))
        ));
        assert_eq!("sha256:ABC".parse::<Digest>(), Err(DigestError::Malformed));
        assert_eq!("../../etc".parse::<Digest>(), Err(DigestError::Malformed));
        let upper = format!("sha256:{}", "A".repeat(64));
        assert_eq!(upper.parse::<Digest>(), Err(DigestError::Malformed));
    }

    #[test]
    fn components() {
        for ok in ["a", "a.b", "a_b", "a__b", "a--b", "registry.k8s.io", "0"] {
            assert!(is_valid_component(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a.", "_a", "a..b", "a._b", "a b"] {
            assert!(!is_valid_component(bad), "{bad}");
        }
    }
}
