use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use spki::der::asn1::{Any, BitString};
use spki::der::pem::LineEnding;
use spki::der::EncodePem;
use spki::{AlgorithmIdentifierOwned, ObjectIdentifier, SubjectPublicKeyInfoOwned};

use super::keys::{KeyError, PublicKey};
use super::*;

const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

fn pem(oid: &str, curve: Option<&str>, key: &[u8]) -> String {
    let parameters = curve.map(|c| Any::from(ObjectIdentifier::new_unwrap(c)));
    SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: ObjectIdentifier::new_unwrap(oid),
            parameters,
        },
        subject_public_key: BitString::from_bytes(key).expect("bits"),
    }
    .to_pem(LineEnding::LF)
    .expect("pem")
}

/// A P-256 key pair: (its public key as a policy reads it, a signing function).
fn p256() -> (PublicKey, impl Fn(&[u8]) -> Vec<u8>) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("gen");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .expect("pair");
    let pubkey = PublicKey::from_pem(
        &pem(
            "1.2.840.10045.2.1",
            Some("1.2.840.10045.3.1.7"),
            pair.public_key().as_ref(),
        ),
        Path::new("p256.pub"),
    )
    .expect("p256 key");
    let sign = move |msg: &[u8]| {
        pair.sign(&SystemRandom::new(), msg)
            .expect("sign")
            .as_ref()
            .to_vec()
    };
    (pubkey, sign)
}

fn payload(digest: &str, reference: &str) -> Vec<u8> {
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{reference}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
    )
    .into_bytes()
}

fn verdict(
    keys: &[PublicKey],
    repos: Option<&[String]>,
    p: &[u8],
    sig: &[u8],
) -> Result<(), Reason> {
    judge(
        keys,
        DIGEST,
        repos,
        &[Signed {
            payload: p,
            signature: sig,
        }],
    )
    .map(|_| ())
}

#[test]
fn a_signature_by_a_listed_key_over_this_digest_admits() {
    let (key, sign) = p256();
    let p = payload(DIGEST, "registry.example/org/app:1");
    assert_eq!(
        verdict(std::slice::from_ref(&key), None, &p, &sign(&p)),
        Ok(())
    );
    let repos = vec!["registry.example/org/app".to_string()];
    assert_eq!(verdict(&[key], Some(&repos), &p, &sign(&p)), Ok(()));
}

#[test]
fn each_refusal_says_why() {
    let (key, sign) = p256();
    let (_, other_sign) = p256();
    let p = payload(DIGEST, "registry.example/org/app:1");
    assert_eq!(
        judge(std::slice::from_ref(&key), DIGEST, None, &[]).map(|_| ()),
        Err(Reason::NoSignature)
    );
    assert_eq!(
        verdict(std::slice::from_ref(&key), None, &p, &other_sign(&p)),
        Err(Reason::UnknownKey)
    );
    let mut changed = p.clone();
    changed[20] ^= 1;
    assert_eq!(
        verdict(std::slice::from_ref(&key), None, &changed, &sign(&p)),
        Err(Reason::UnknownKey)
    );
    let elsewhere = payload(&DIGEST.replace("01", "02"), "registry.example/org/app");
    assert_eq!(
        verdict(
            std::slice::from_ref(&key),
            None,
            &elsewhere,
            &sign(&elsewhere)
        ),
        Err(Reason::OtherDigest)
    );
    let repos = vec!["registry.example/org/other".to_string()];
    assert_eq!(
        verdict(std::slice::from_ref(&key), Some(&repos), &p, &sign(&p)),
        Err(Reason::IdentityMismatch)
    );
    // The most specific reason wins over an unknown key's signature.
    let sigs = [
        Signed {
            payload: &p,
            signature: &other_sign(&p),
        },
        Signed {
            payload: &elsewhere,
            signature: &sign(&elsewhere),
        },
    ];
    assert_eq!(
        judge(&[key], DIGEST, None, &sigs).map(|_| ()),
        Err(Reason::OtherDigest)
    );
}

#[test]
fn ed25519_keys_verify_too() {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("gen");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
    let key = PublicKey::from_pem(
        &pem("1.3.101.112", None, pair.public_key().as_ref()),
        Path::new("ed.pub"),
    )
    .expect("ed25519 key");
    let p = payload(DIGEST, "r/a");
    assert_eq!(verdict(&[key], None, &p, pair.sign(&p).as_ref()), Ok(()));
}

#[test]
fn key_files_that_are_not_keys_are_named() {
    let e = PublicKey::from_pem("hello", Path::new("/k/bad.pub")).unwrap_err();
    assert!(matches!(e, KeyError::NotAKey(..)), "{e}");
    assert!(e.to_string().contains("/k/bad.pub"), "{e}");
    // DSA (1.2.840.10040.4.1) is not supported.
    let dsa = pem("1.2.840.10040.4.1", None, &[1, 2, 3]);
    let e = PublicKey::from_pem(&dsa, Path::new("dsa.pub")).unwrap_err();
    assert!(matches!(e, KeyError::Unsupported(..)), "{e}");
    let e = PublicKey::read(Path::new("/nonexistent/k.pub")).unwrap_err();
    assert!(matches!(e, KeyError::Unreadable(..)), "{e}");
}

#[test]
fn signature_manifests_and_references_are_read() {
    let m = format!(
        r#"{{"schemaVersion":2,"layers":[
        {{"mediaType":"{t}","size":10,"digest":"{DIGEST}","annotations":{{"{a}":"AQID"}}}},
        {{"mediaType":"application/octet-stream","size":10,"digest":"{DIGEST}","annotations":{{"{a}":"AQID"}}}},
        {{"mediaType":"{t}","size":10,"digest":"{DIGEST}"}},
        {{"mediaType":"{t}","size":99999999,"digest":"{DIGEST}","annotations":{{"{a}":"AQID"}}}}]}}"#,
        t = cosign::PAYLOAD_TYPE,
        a = cosign::SIGNATURE_ANNOTATION
    );
    let layers = cosign::layers(m.as_bytes()).expect("layers");
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].signature, vec![1, 2, 3]);
    assert!(cosign::layers(b"{").is_err());
    assert_eq!(
        cosign::repository_of("host:5000/org/app:1"),
        "host:5000/org/app"
    );
    assert_eq!(
        cosign::repository_of("host:5000/org/app"),
        "host:5000/org/app"
    );
    assert_eq!(
        cosign::repository_of("index.docker.io/library/a@sha256:ab"),
        "index.docker.io/library/a"
    );
}
