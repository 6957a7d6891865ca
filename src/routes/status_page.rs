//! `GET /`: a read-only status page for people, rendered on the server from memory
//! ([`crate::services::Status`]): each upstream (URL, last answer, back-off, rate limit,
//! hit ratio, bytes fetched), what the cache saved, fills in progress, the largest and
//! most pulled images. Same access rule as `_catalog`; no script, no external asset.

use std::fmt::Write as _;
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};

use super::logging::RequestInfo;
use super::target::Router;
use super::Frontend;
use crate::auth::{Access, Need};
use crate::services::{RepoSummary, Services, Status, UpstreamStatus};

pub async fn page(
    req: HttpRequest,
    svc: web::Data<Services>,
    router: web::Data<Router>,
    access: web::Data<Access>,
    front: web::Data<Frontend>,
) -> HttpResponse {
    req.extensions_mut().insert(RequestInfo::new("status"));
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let allowed = match access.identify(auth, front.client_ip(&req)).await {
        Ok(id) => {
            RequestInfo::note(&req, "status", |i| i.user.push_str(id.caller.name()));
            access.authorize(&id, Need::Catalog).is_ok()
        }
        Err(_) => false,
    };
    if !allowed {
        // A browser can answer Basic (the htpasswd users), not the registry's Bearer.
        return HttpResponse::build(StatusCode::UNAUTHORIZED)
            .insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"entrepot\""))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .content_type("text/plain; charset=utf-8")
            .body(
                "the status page needs the same access as _catalog: log in as an htpasswd user\n",
            );
    }
    let upstreams: Vec<_> = router.upstreams().cloned().collect();
    let status = svc.status(&upstreams);
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type("text/html; charset=utf-8")
        .body(render(&status))
}

/// HTML-escapes text (names are validated already; escaped all the same).
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn bytes(n: f64) -> String {
    bytesize::ByteSize(n.max(0.0) as u64).to_string()
}

fn ago(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

fn ratio(part: f64, whole: f64) -> String {
    if whole <= 0.0 {
        return "-".into();
    }
    format!("{:.0}%", 100.0 * part / whole)
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1d2330}\
h1{font-size:22px}h2{font-size:17px;margin-top:1.6em}\
table{border-collapse:collapse;min-width:60%}td,th{padding:4px 10px;border-bottom:1px solid #dde;text-align:left}\
th{background:#f2f4f8}.ok{color:#137333}.warn{color:#b06000}.bad{color:#c5221f}\
.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#667}";

fn render(s: &Status) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>entrepot</title>\
         <style>{STYLE}</style></head><body><h1>entrepot registry mirror</h1>"
    );
    let served = s.served_from_cache + s.served_from_upstream;
    let _ = write!(
        h,
        "<p>Blob bytes sent to clients: <b>{}</b> from the cache, {} relayed while fetched \
         (<b>{}</b> from the cache). Store: {}{}. Hosted repositories: {}.</p>",
        bytes(s.served_from_cache),
        bytes(s.served_from_upstream),
        ratio(s.served_from_cache, served),
        bytes(s.store_bytes),
        if s.cache_limit > 0.0 {
            format!(" of {} (max_cache_size)", bytes(s.cache_limit))
        } else {
            String::new()
        },
        s.hosted
            .as_deref()
            .map_or("none".to_string(), |p| format!("<code>{}/</code>", esc(p))),
    );
    upstreams(&mut h, &s.upstreams);
    fills(&mut h, s);
    images(&mut h, s);
    h.push_str("<p class=muted>Read-only; the same listing rules as <code>_catalog</code> (private repositories are never shown). Metrics: <code>/metrics</code>.</p></body></html>");
    h
}

fn upstreams(h: &mut String, ups: &[UpstreamStatus]) {
    h.push_str("<h2>Upstreams</h2><table><tr><th>prefix</th><th>URL</th><th>state</th><th>pull limit</th><th>hit ratio</th><th class=num>fetched</th><th class=num>stale serves</th></tr>");
    for u in ups {
        let state = match (&u.held, u.last_answer) {
            (Some((d, scope)), _) => format!(
                "<span class=bad>backing off ({}) for {} s</span>",
                scope.label(),
                d.as_secs()
            ),
            (None, Some((class, at))) if class == "2xx" || class == "3xx" || class == "4xx" => {
                format!(
                    "<span class=ok>answering</span> <span class=muted>(last {class} {})</span>",
                    ago(at)
                )
            }
            (None, Some((class, at))) => {
                format!(
                    "<span class=warn>failing</span> <span class=muted>(last {class} {})</span>",
                    ago(at)
                )
            }
            (None, None) => "<span class=muted>not asked yet</span>".to_string(),
        };
        let held = if u.repos_held > 0 {
            format!(", {} repositories held", u.repos_held)
        } else {
            String::new()
        };
        let limit = u.ratelimit.map_or("-".to_string(), |(left, max)| {
            format!("{left:.0} of {max:.0} left")
        });
        let fallbacks = if u.fallbacks.is_empty() {
            String::new()
        } else {
            format!(
                "<br><span class=muted>fallbacks: {}</span>",
                esc(&u.fallbacks.join(", "))
            )
        };
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}{fallbacks}</td><td>{state}{held}</td><td>{limit}</td>\
             <td>{} <span class=muted>({:.0} hits, {:.0} misses)</span></td><td class=num>{}</td><td class=num>{:.0}</td></tr>",
            esc(&u.name),
            esc(&u.url),
            ratio(u.hits, u.hits + u.misses),
            u.hits,
            u.misses,
            bytes(u.fetched_bytes),
            u.stale_serves,
        );
    }
    h.push_str("</table>");
}

fn fills(h: &mut String, s: &Status) {
    let _ = write!(h, "<h2>Fills in progress: {}</h2>", s.fills_total);
    if s.fills.is_empty() {
        return;
    }
    h.push_str("<table><tr><th>repository</th><th>blob</th><th class=num>received</th></tr>");
    for f in &s.fills {
        let origin = f
            .origin
            .as_deref()
            .map_or("<span class=muted>(not listed)</span>".to_string(), |o| {
                format!("<code>{}</code>", esc(o))
            });
        let of = f
            .size
            .map_or(String::new(), |n| format!(" of {}", bytes(n as f64)));
        let _ = write!(
            h,
            "<tr><td>{origin}</td><td><code>{}</code></td><td class=num>{}{of}</td></tr>",
            esc(&f.digest[..f.digest.len().min(19)]),
            bytes(f.written as f64),
        );
    }
    h.push_str("</table>");
}

fn images(h: &mut String, s: &Status) {
    let Some((age, count)) = s.inventory else {
        h.push_str(
            "<h2>Images</h2><p class=muted>Counting what the store holds; reload in a moment.</p>",
        );
        return;
    };
    let _ = write!(
        h,
        "<h2>Largest images</h2><p class=muted>{count} repositories hold images (counted {}).</p>",
        ago(age)
    );
    repo_table(h, &s.largest);
    h.push_str("<h2>Most pulled since start</h2>");
    if s.most_pulled.is_empty() {
        h.push_str("<p class=muted>No tag resolved yet.</p>");
    } else {
        repo_table(h, &s.most_pulled);
    }
}

fn repo_table(h: &mut String, repos: &[RepoSummary]) {
    h.push_str("<table><tr><th>repository</th><th>tags</th><th class=num>size</th><th class=num>pulls</th><th>last pulled</th></tr>");
    for r in repos {
        let mut tags: Vec<&str> = r.tags.iter().map(String::as_str).take(5).collect();
        if r.tags.len() > 5 {
            tags.push("…");
        }
        let last = r
            .last_pulled
            .and_then(|t| t.elapsed().ok())
            .map_or("-".to_string(), ago);
        let _ = write!(
            h,
            "<tr><td><code>{}</code>{}</td><td>{}</td><td class=num>{}</td><td class=num>{}</td><td>{last}</td></tr>",
            esc(&r.name),
            if r.hosted { " <span class=muted>hosted</span>" } else { "" },
            esc(&tags.join(", ")),
            bytes(r.bytes as f64),
            r.pulls,
        );
    }
    h.push_str("</table>");
}
