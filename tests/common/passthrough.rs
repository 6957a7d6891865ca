//! An upstream in front of a real Distribution: passes requests through, records them,
//! and can be switched to answer `429`/`503` with a `Retry-After`, as Docker Hub does
//! when its pull limit is hit. Adds Docker Hub's `ratelimit-*` headers to its answers.

use std::io::Read;
use std::sync::{Arc, Mutex};

use super::fake::{FakeServer, Request, Response};

/// What the pass-through answers right now.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Pass,
    /// Every request gets this status with this `Retry-After` value (none: no header).
    Refuse(u16, Option<String>),
    /// Like `Refuse`, saying `ratelimit-remaining: 0` (Docker Hub's pull limit used up).
    Exhausted(u16, Option<String>),
    /// Requests without credentials get `404 NAME_UNKNOWN` (a repository deleted, renamed
    /// or hidden); the rest pass.
    HideFromAnonymous,
    /// Requests without credentials get `401` with a Basic challenge (a private
    /// repository); the rest pass.
    RequireCredentials,
}

/// Modes for repositories whose name starts with a prefix, before the general mode.
type Modes = Arc<Mutex<Vec<(String, Mode)>>>;

pub struct Passthrough {
    pub server: FakeServer,
    mode: Arc<Mutex<Mode>>,
    for_repos: Modes,
    delay: Arc<Mutex<std::time::Duration>>,
}

/// The token a [`Passthrough::start_bearer`] issues to anyone who asks at its `/token`.
pub const ANON_TOKEN: &str = "anonymous-pull-token";

impl Passthrough {
    /// Forwards to `target` (a Distribution base URL).
    pub fn start(target: &str) -> Passthrough {
        Passthrough::start_with(target, false)
    }

    /// Like [`start`](Self::start), but Docker Hub-style: a request without the anonymous
    /// token gets a Bearer challenge whose realm (this server's `/token`) hands that token
    /// to anyone, so a client that wrongly sends credentials here would show them.
    pub fn start_bearer(target: &str) -> Passthrough {
        Passthrough::start_with(target, true)
    }

    fn start_with(target: &str, bearer: bool) -> Passthrough {
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let for_repos: Modes = Arc::default();
        let fr = for_repos.clone();
        let delay = Arc::new(Mutex::new(std::time::Duration::ZERO));
        let realm = Arc::new(Mutex::new(String::new()));
        let (m, target, r, wait) = (
            mode.clone(),
            target.to_string(),
            realm.clone(),
            delay.clone(),
        );
        let server = FakeServer::start(move |req| {
            let pause = wait.lock().map(|g| *g).unwrap_or_default();
            std::thread::sleep(pause);
            if bearer {
                if req.path.starts_with("/token") {
                    let body = format!("{{\"token\":\"{ANON_TOKEN}\",\"expires_in\":300}}");
                    return Response::new(
                        200,
                        &[("Content-Type", "application/json")],
                        body.into_bytes(),
                    );
                }
                if req.header("authorization") != Some(&format!("Bearer {ANON_TOKEN}")) {
                    let realm = r.lock().map(|g| g.clone()).unwrap_or_default();
                    let c = format!("Bearer realm=\"{realm}\",service=\"fallback\"");
                    return Response::new(401, &[("WWW-Authenticate", c.as_str())], vec![]);
                }
            }
            let general = m.lock().map(|g| g.clone()).unwrap_or(Mode::Pass);
            let now = fr
                .lock()
                .ok()
                .and_then(|g| {
                    g.iter()
                        .find(|(p, _)| req.path.starts_with(&format!("/v2/{p}")))
                        .map(|(_, m)| m.clone())
                })
                .unwrap_or(general);
            match now {
                Mode::Pass => forward(&target, req, !bearer),
                Mode::HideFromAnonymous if req.header("authorization").is_some() => {
                    forward(&target, req, !bearer)
                }
                Mode::RequireCredentials if req.header("authorization").is_some() => {
                    forward(&target, req, !bearer)
                }
                Mode::RequireCredentials => Response::new(
                    401,
                    &[("WWW-Authenticate", "Basic realm=\"private\"")],
                    vec![],
                ),
                Mode::HideFromAnonymous => {
                    let body = br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#;
                    Response::new(404, &[("Content-Type", "application/json")], body.to_vec())
                }
                Mode::Refuse(status, ref retry) | Mode::Exhausted(status, ref retry) => {
                    let mut h = vec![("Content-Type", "application/json")];
                    if matches!(now, Mode::Exhausted(..)) {
                        h.push(("ratelimit-remaining", "0;w=21600"));
                    }
                    if let Some(r) = retry.as_deref() {
                        h.push(("Retry-After", r));
                    }
                    let body = br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#;
                    Response::new(status, &h, body.to_vec())
                }
            }
        });
        if let Ok(mut g) = realm.lock() {
            *g = format!("{}/token", server.url());
        }
        Passthrough {
            server,
            mode,
            for_repos,
            delay,
        }
    }

    /// Every answer waits this long first (so that concurrent requests overlap).
    pub fn set_delay(&self, d: std::time::Duration) {
        if let Ok(mut g) = self.delay.lock() {
            *g = d;
        }
    }

    pub fn set(&self, mode: Mode) {
        if let Ok(mut g) = self.mode.lock() {
            *g = mode;
        }
    }

    /// Repositories whose name starts with `prefix` get `mode` (the latest set for a
    /// prefix wins; the general mode applies to the rest).
    pub fn set_for(&self, prefix: &str, mode: Mode) {
        if let Ok(mut g) = self.for_repos.lock() {
            g.retain(|(p, _)| p != prefix);
            g.insert(0, (prefix.to_string(), mode));
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.server.requests()
    }
}

/// One request passed to Distribution with the headers that matter, its answer returned
/// with Docker Hub's rate-limit headers added.
fn forward(target: &str, req: &Request, with_auth: bool) -> Response {
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let mut r = agent.request(&req.method, &format!("{target}{}", req.path));
    for name in ["accept", "authorization", "range"] {
        if name == "authorization" && !with_auth {
            continue;
        }
        if let Some(v) = req.header(name) {
            r = r.set(name, v);
        }
    }
    let resp = match r.call() {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => return Response::new(502, &[], e.to_string().into_bytes()),
    };
    let status = resp.status();
    let mut headers: Vec<(String, String)> = [
        "content-type",
        "docker-content-digest",
        "www-authenticate",
        "location",
        "content-range",
        "link",
    ]
    .iter()
    .filter_map(|k| resp.header(k).map(|v| (k.to_string(), v.to_string())))
    .collect();
    headers.push(("ratelimit-limit".into(), "100;w=21600".into()));
    headers.push(("ratelimit-remaining".into(), "42;w=21600".into()));
    if req.method == "HEAD" {
        // No body to measure: pass Distribution's length on.
        if let Some(n) = resp.header("content-length") {
            headers.push(("Content-Length".into(), n.to_string()));
        }
    }
    let mut body = Vec::new();
    let _ = resp.into_reader().take(1 << 30).read_to_end(&mut body);
    Response {
        status,
        headers,
        body,
        http10: false,
        silent_close: false,
    }
}
