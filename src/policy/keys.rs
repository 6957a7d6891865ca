//! Public keys of a policy: PEM `PUBLIC KEY` blocks (SubjectPublicKeyInfo, what `cosign
//! generate-key-pair` writes as `cosign.pub`), parsed with the `spki` crate and checked
//! with `ring` (already linked for TLS). ECDSA P-256 (cosign's default) and P-384,
//! Ed25519 and RSA (PKCS#1 v1.5 or PSS, SHA-256, 2048-8192 bits).

use std::path::{Path, PathBuf};

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use spki::der::{DecodePem, Encode};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoOwned};

const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("policy key {path}: cannot read it ({err}); give a readable PEM public key file", path = .0.display(), err = .1)]
    Unreadable(PathBuf, std::io::Error),
    #[error("policy key {path}: not a PEM public key ({err}); give the `cosign.pub` of a key pair (-----BEGIN PUBLIC KEY-----)", path = .0.display(), err = .1)]
    NotAKey(PathBuf, String),
    #[error("policy key {path}: unsupported algorithm {alg}; use ECDSA P-256 or P-384, Ed25519 or RSA", path = .0.display(), alg = .1)]
    Unsupported(PathBuf, String),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Alg {
    P256,
    P384,
    Ed25519,
    Rsa,
}

/// One public key a signature may verify with.
#[derive(Clone, Debug)]
pub struct PublicKey {
    alg: Alg,
    /// The key bytes as `ring` takes them (the EC point, the Ed25519 key, or the
    /// PKCS#1 `RSAPublicKey`).
    bytes: Vec<u8>,
    /// Where it was read, to name it in verdicts and logs.
    pub file: PathBuf,
}

impl PublicKey {
    pub fn read(path: &Path) -> Result<PublicKey, KeyError> {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Unreadable(path.to_path_buf(), e))?;
        PublicKey::from_pem(&pem, path)
    }

    pub fn from_pem(pem: &str, path: &Path) -> Result<PublicKey, KeyError> {
        let not_key = |e: String| KeyError::NotAKey(path.to_path_buf(), e);
        let spki =
            SubjectPublicKeyInfoOwned::from_pem(pem.trim()).map_err(|e| not_key(e.to_string()))?;
        let oid = spki.algorithm.oid;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        let alg = match (oid, curve) {
            (EC_PUBLIC_KEY, Some(P256)) => Alg::P256,
            (EC_PUBLIC_KEY, Some(P384)) => Alg::P384,
            (EC_PUBLIC_KEY, c) => {
                let c = c.map_or("(none)".to_string(), |c| c.to_string());
                return Err(KeyError::Unsupported(
                    path.to_path_buf(),
                    format!("ECDSA on curve {c}"),
                ));
            }
            (ED25519, _) => Alg::Ed25519,
            (RSA, _) => Alg::Rsa,
            (other, _) => return Err(KeyError::Unsupported(path.to_path_buf(), other.to_string())),
        };
        let bytes = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| not_key("the key bits are not whole bytes".into()))?
            .to_vec();
        // The DER round trip proves the structure is complete (nothing ignored).
        spki.to_der().map_err(|e| not_key(e.to_string()))?;
        Ok(PublicKey {
            alg,
            bytes,
            file: path.to_path_buf(),
        })
    }

    /// Whether `sig` is this key's signature of `msg`. RSA keys accept PKCS#1 v1.5 and
    /// PSS (cosign signs RSA keys with either, depending on its version).
    pub fn verifies(&self, msg: &[u8], sig: &[u8]) -> bool {
        let algs: &[&dyn VerificationAlgorithm] = match self.alg {
            Alg::P256 => &[&signature::ECDSA_P256_SHA256_ASN1],
            Alg::P384 => &[&signature::ECDSA_P384_SHA384_ASN1],
            Alg::Ed25519 => &[&signature::ED25519],
            Alg::Rsa => &[
                &signature::RSA_PKCS1_2048_8192_SHA256,
                &signature::RSA_PSS_2048_8192_SHA256,
            ],
        };
        algs.iter().any(|a| {
            UnparsedPublicKey::new(*a, &self.bytes)
                .verify(msg, sig)
                .is_ok()
        })
    }
}
