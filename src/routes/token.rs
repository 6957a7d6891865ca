//! The client-facing token flow: `WWW-Authenticate: Bearer` challenges and the `/token`
//! endpoint they point at (the same flow as Docker Hub and Distribution's token auth, so
//! Docker uses the mirror with or without a login, and podman, skopeo and containerd
//! authenticate the way they do everywhere else).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::error::OciError;
use super::Frontend;
use crate::auth::SERVICE;
use crate::auth::{Access, Need, Scope};

/// `GET /token?service=..&scope=..[&scope=..]`, optionally with Basic credentials.
pub async fn token(
    req: HttpRequest,
    access: web::Data<Access>,
    front: web::Data<Frontend>,
) -> Result<HttpResponse, OciError> {
    let scopes: Vec<Scope> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').filter_map(Scope::parse).collect::<Vec<_>>())
        .collect();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let issued = access
        .token(auth, front.client_ip(&req), &scopes)
        .await
        .map_err(|e| {
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
/// token endpoint under `base` (an absolute origin, see [`Frontend::public_base`]: no
/// character in it needs escaping) and the scope the request needs.
pub fn challenge(base: &str, need: Need<'_>) -> String {
    let mut c = format!("Bearer realm=\"{base}/token\",service=\"{SERVICE}\"");
    if let Some(scope) = need.scope() {
        c.push_str(&format!(",scope=\"{scope}\""));
    }
    c
}
