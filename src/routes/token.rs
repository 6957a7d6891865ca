//! The client-facing token flow: `WWW-Authenticate: Bearer` challenges and the `/token`
//! endpoint they point at (the same flow as Docker Hub and Distribution's token auth, so
//! Docker uses the mirror with or without a login, and podman, skopeo and containerd
//! authenticate the way they do everywhere else).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::error::OciError;
use crate::services::access::{Access, Need, Scope};
use crate::services::tokens::SERVICE;

/// `GET /token?service=..&scope=..[&scope=..]`, optionally with Basic credentials.
pub async fn token(req: HttpRequest, access: web::Data<Access>) -> Result<HttpResponse, OciError> {
    let scopes: Vec<Scope> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').filter_map(Scope::parse).collect::<Vec<_>>())
        .collect();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let peer = req.peer_addr().map(|a| a.ip());
    let issued = access.token(auth, peer, &scopes).await.map_err(|e| {
        let e = OciError::from(e);
        let basic = format!("Basic realm=\"{SERVICE}\"");
        e.challenged(&basic)
    })?;
    let issued_at = humantime::format_rfc3339_seconds(issued.issued_at).to_string();
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": issued.expires_in,
            "issued_at": issued_at,
        })))
}

/// The `WWW-Authenticate` value for a refused request: a Bearer challenge naming the
/// token endpoint (an absolute URL: `server.external_url`, or the scheme and host the
/// client used, `X-Forwarded-*` included) and the scope the request needs.
pub fn challenge(req: &HttpRequest, access: &Access, need: Need<'_>) -> String {
    let base = match &access.external_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let info = req.connection_info();
            format!("{}://{}", info.scheme(), info.host())
        }
    };
    let mut c = format!("Bearer realm=\"{base}/token\",service=\"{SERVICE}\"");
    if let Some(scope) = need.scope() {
        c.push_str(&format!(",scope=\"{scope}\""));
    }
    c
}
