//! `tags/list`: asked upstream (tags are the upstream's truth), answered from the tags
//! cached in the store when the upstream is unreachable.

use std::sync::Arc;

use actix_web::http::{header, Method};
use serde::{Deserialize, Serialize};

use super::{ServiceError, Services, Source};
use crate::auth::Caller;
use crate::services::private;
use crate::upstream::{UpRequest, Upstream};

#[derive(Serialize, Deserialize)]
pub struct TagList {
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

pub struct TagsReply {
    pub list: TagList,
    /// Pagination `Link` header, rewritten to the client's repository name.
    pub link: Option<String>,
    pub source: Source,
}

impl Services {
    /// `name` is the repository as the client named it (prefix included), `query` the
    /// raw `n`/`last` query string to pass on.
    pub async fn tags(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        name: &str,
        query: &str,
        caller: &Caller,
    ) -> Result<TagsReply, ServiceError> {
        let up = &private::upstream_for(
            self,
            up,
            repo,
            caller,
            private::ProbePath("tags/list?n=1", &""),
        )
        .await?;
        let what = if query.is_empty() {
            "tags/list".to_string()
        } else {
            format!("tags/list?{query}")
        };
        let req = UpRequest {
            method: Method::GET,
            repo,
            what: &what,
            accept: Some("application/json"),
            range_from: None,
            range_to: None,
            primary_only: false,
        };
        match self.upstream_tags(up, repo, req).await {
            Ok((mut list, link)) => {
                list.name = name.to_string();
                let link =
                    link.map(|l| l.replace(&format!("/v2/{repo}/"), &format!("/v2/{name}/")));
                Ok(TagsReply {
                    list,
                    link,
                    source: Source::Upstream,
                })
            }
            Err(e) if e.allows_stale() => {
                let tags = self.store().list_tags(&up.name, repo).await?;
                if tags.is_empty() {
                    return Err(e);
                }
                self.metrics()
                    .stale_serves
                    .with_label_values(&[&up.name])
                    .inc();
                Ok(TagsReply {
                    list: TagList {
                        name: name.to_string(),
                        tags,
                    },
                    link: None,
                    source: Source::Stale,
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn upstream_tags(
        &self,
        up: &Upstream,
        repo: &str,
        req: UpRequest<'_>,
    ) -> Result<(TagList, Option<String>), ServiceError> {
        let mut resp = self
            .upstream_ok(up, "tags", req, || ServiceError::NameUnknown(repo.into()))
            .await?;
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let list: TagList =
            resp.json()
                .limit(16 << 20)
                .await
                .map_err(|e| ServiceError::BadUpstream {
                    upstream: up.name.clone(),
                    msg: format!("tags/list: {e}"),
                })?;
        Ok((list, link))
    }
}
