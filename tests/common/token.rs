//! A small Docker-style token issuer for Distribution's `auth: token` (the flow Docker Hub,
//! Quay and GHCR use): `GET /token?service=..&scope=..` answers `{"token": <RS256 JWT>}`
//! signed by a key whose self-signed certificate is Distribution's root bundle.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::json;

use super::run;

/// The issuer stops serving after this long, whatever happens to the test.
const LIFETIME: Duration = Duration::from_secs(900);

pub struct TokenIssuer {
    pub port: u16,
    pub cert: PathBuf,
    /// Tokens issued so far.
    pub issued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TokenIssuer {
    /// Starts an issuer; with `creds`, requests must carry those Basic credentials.
    pub fn start(dir: &Path, creds: Option<(&str, &str)>) -> TokenIssuer {
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=test-issuer",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let key_pem = std::fs::read(&key).expect("read key");
        let cert_pem = std::fs::read_to_string(&cert).expect("read cert");
        let der_b64: String = cert_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let signer = Signer {
            key: jsonwebtoken::EncodingKey::from_rsa_pem(&key_pem).expect("rsa key"),
            x5c: der_b64,
            basic: creds.map(|(u, p)| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
            }),
        };
        let listener = super::bind_free("127.0.0.1");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let issued = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (issued2, stop2) = (issued.clone(), stop.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop2.load(Ordering::Relaxed) && start.elapsed() < LIFETIME {
                match listener.accept() {
                    Ok((s, _)) => {
                        if signer.handle(s) {
                            issued2.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TokenIssuer {
            port,
            cert,
            issued,
            stop,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::Relaxed)
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Signer {
    key: jsonwebtoken::EncodingKey,
    x5c: String,
    basic: Option<String>,
}

impl Signer {
    /// Answers one request; true if a token was issued.
    fn handle(&self, stream: TcpStream) -> bool {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(&stream);
        let mut head = Vec::new();
        for _ in 0..100 {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let target = head.first().and_then(|l| l.split(' ').nth(1)).unwrap_or("");
        let auth = head.iter().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        });
        let (status, body, ok) = if self.basic.is_some() && auth != self.basic {
            (
                "401 Unauthorized",
                json!({"details": "bad credentials"}),
                false,
            )
        } else {
            (
                ("200 OK"),
                json!({"token": self.token(target), "expires_in": 300}),
                true,
            )
        };
        let body = body.to_string();
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = (&stream).write_all(resp.as_bytes());
        ok
    }

    /// A JWT granting every action asked for in the `scope` parameters.
    fn token(&self, target: &str) -> String {
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let access: Vec<_> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == "scope")
            .filter_map(|(_, v)| {
                let mut parts = v.splitn(3, ':');
                let (ty, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(json!({"type": ty, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = json!({
            "iss": "test-issuer", "sub": "tester", "aud": "test-registry",
            "exp": now + 300, "nbf": now - 10, "iat": now - 10,
            "jti": format!("{now}-{}", rand::random::<u64>()),
            "access": access,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5c = Some(vec![self.x5c.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign token")
    }
}
