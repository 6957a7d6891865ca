//! The mirror's own bearer tokens (the Docker Hub / Distribution token flow, for clients).
//!
//! Docker skips a mirror whose `GET /v2/` answers with a Basic challenge, so the mirror
//! challenges with `Bearer` and issues short-lived HS256 JWTs at its `/token` endpoint for
//! exactly the actions the ACL allows. A client's own upstream credentials (for private
//! upstream images) travel inside the token sealed with ChaCha20-Poly1305 under a key derived
//! from the same secret, so any replica sharing the secret can use them and nobody else can
//! read them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::caller::{AccessError, Caller};
use crate::config::{AuthConfig, ConfigError};

/// `service` of the challenge, and the tokens' issuer and audience.
pub const SERVICE: &str = "entrepot";

/// One access grant, as in Distribution's token claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Grant {
    /// Whether this grant covers `action` on `kind:name`.
    pub fn allows(&self, kind: &str, name: &str, action: &str) -> bool {
        self.kind == kind
            && self.name == name
            && self.actions.iter().any(|a| a == action || a == "*")
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Grant>,
    /// Who the caller is: `user` (htpasswd), `client` (its own upstream credentials,
    /// sealed in `cred`) or `anonymous`.
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cred: Option<String>,
}

/// A token as the token endpoint answers it.
pub struct Issued {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: SystemTime,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    seal: LessSafeKey,
    rng: SystemRandom,
    ttl: Duration,
}

impl Tokens {
    pub fn load(cfg: &AuthConfig) -> Result<Tokens, ConfigError> {
        let rng = SystemRandom::new();
        let secret = match cfg.token_secret()? {
            Some(s) => s,
            None => {
                let mut s = vec![0u8; 32];
                rng.fill(&mut s)
                    .map_err(|_| ConfigError::Server("no system randomness".into()))?;
                s
            }
        };
        let seal_key = Sha256::new()
            .chain_update(b"entrepot token credential seal\0")
            .chain_update(&secret)
            .finalize();
        let seal = UnboundKey::new(&CHACHA20_POLY1305, &seal_key)
            .map_err(|_| ConfigError::Server("token seal key".into()))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[SERVICE]);
        validation.set_audience(&[SERVICE]);
        validation.leeway = 0;
        Ok(Tokens {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            seal: LessSafeKey::new(seal),
            rng,
            ttl: cfg.token_ttl.max(Duration::from_secs(1)),
        })
    }

    /// Signs a token for `caller` with `access`.
    pub fn issue(&self, caller: &Caller, access: Vec<Grant>) -> Result<Issued, AccessError> {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (kind, sub, cred) = match caller {
            Caller::Anonymous => ("anonymous", String::new(), None),
            Caller::User(u) => ("user", u.clone(), None),
            Caller::Foreign { user, pass } => {
                ("client", user.clone(), Some(self.seal(user, pass)?))
            }
        };
        let claims = Claims {
            iss: SERVICE.into(),
            aud: SERVICE.into(),
            sub,
            exp: secs + self.ttl.as_secs(),
            nbf: secs,
            iat: secs,
            jti: uuid::Uuid::new_v4().to_string(),
            access,
            kind: kind.into(),
            cred,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| AccessError::Internal("token signing failed"))?;
        Ok(Issued {
            token,
            expires_in: self.ttl.as_secs(),
            issued_at: now,
        })
    }

    /// Checks a token's signature, issuer, audience and expiry; returns who it was issued
    /// to and what it grants.
    pub fn verify(&self, token: &str) -> Result<(Caller, Vec<Grant>), AccessError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| AccessError::BadToken)?;
        let c = data.claims;
        let caller = match (c.kind.as_str(), c.cred) {
            ("anonymous", _) => Caller::Anonymous,
            ("user", _) => Caller::User(c.sub),
            ("client", Some(sealed)) => Caller::Foreign {
                pass: self.open(&c.sub, &sealed)?,
                user: c.sub,
            },
            _ => return Err(AccessError::BadToken),
        };
        Ok((caller, c.access))
    }

    /// `pass` encrypted and authenticated, bound to `user`: base64url(nonce || ciphertext).
    fn seal(&self, user: &str, pass: &str) -> Result<String, AccessError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| AccessError::Internal("no system randomness"))?;
        let mut buf = pass.as_bytes().to_vec();
        self.seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(user.as_bytes()),
                &mut buf,
            )
            .map_err(|_| AccessError::Internal("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    fn open(&self, user: &str, sealed: &str) -> Result<String, AccessError> {
        let raw = URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| AccessError::BadToken)?;
        if raw.len() < NONCE_LEN {
            return Err(AccessError::BadToken);
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AccessError::BadToken)?;
        let mut buf = ct.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, Aad::from(user.as_bytes()), &mut buf)
            .map_err(|_| AccessError::BadToken)?;
        String::from_utf8(plain.to_vec()).map_err(|_| AccessError::BadToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(key: &str, ttl: u64) -> Tokens {
        Tokens::load(&AuthConfig {
            token_key: Some(key.into()),
            token_ttl: Duration::from_secs(ttl),
            ..Default::default()
        })
        .expect("tokens")
    }

    #[test]
    fn round_trip_seals_client_credentials() {
        let t = tokens("0123456789abcdef-shared", 60);
        let grant = Grant {
            kind: "repository".into(),
            name: "quay.io/team/app".into(),
            actions: vec!["pull".into()],
        };
        let caller = Caller::Foreign {
            user: "robot".into(),
            pass: "hunter2".into(),
        };
        let issued = t.issue(&caller, vec![grant.clone()]).expect("issue");
        assert!(!issued.token.contains("hunter2"));
        let payload = issued.token.split('.').nth(1).expect("payload");
        let payload = URL_SAFE_NO_PAD.decode(payload).expect("b64");
        assert!(!String::from_utf8_lossy(&payload).contains("hunter2"));
        // Another replica with the same key reads it; one with another key does not.
        let other = tokens("0123456789abcdef-shared", 60);
        assert_eq!(other.verify(&issued.token), Ok((caller, vec![grant])));
        let stranger = tokens("another-key-0123456789", 60);
        assert_eq!(stranger.verify(&issued.token), Err(AccessError::BadToken));
        // An altered token is refused.
        let mut bad = issued.token.clone();
        bad.push('x');
        assert_eq!(t.verify(&bad), Err(AccessError::BadToken));
    }
}
