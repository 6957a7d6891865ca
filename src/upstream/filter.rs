//! Per-upstream allow/deny globs on repository names.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// `*` stays within one path component (`library/*` is `library/alpine`, not
/// `library/a/b`); `**` crosses components. An empty allow list allows everything;
/// deny wins over allow.
#[derive(Debug, Default)]
pub struct RepoFilter {
    allow: Vec<String>,
    allow_set: Option<GlobSet>,
    deny: Vec<String>,
    deny_set: Option<GlobSet>,
}

fn compile(patterns: &[String]) -> Result<Option<GlobSet>, globset::Error> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob: Glob = GlobBuilder::new(p).literal_separator(true).build()?;
        b.add(glob);
    }
    b.build().map(Some)
}

impl RepoFilter {
    pub fn new(allow: &[String], deny: &[String]) -> Result<RepoFilter, globset::Error> {
        Ok(RepoFilter {
            allow_set: compile(allow)?,
            allow: allow.to_vec(),
            deny_set: compile(deny)?,
            deny: deny.to_vec(),
        })
    }

    /// `Err` names the rule that keeps `repo` out.
    pub fn check(&self, repo: &str) -> Result<(), String> {
        if let Some(set) = &self.deny_set {
            if let Some(&i) = set.matches(repo).first() {
                return Err(format!(
                    "repository {repo:?} matches deny rule {:?}",
                    self.deny[i]
                ));
            }
        }
        match &self.allow_set {
            Some(set) if !set.is_match(repo) => Err(format!(
                "repository {repo:?} matches no allow rule (allow = {:?})",
                self.allow
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_and_star_stays_in_a_component() {
        let f = RepoFilter::new(
            &["library/*".into(), "bitnami/**".into()],
            &["library/redis".into()],
        )
        .expect("globs");
        assert!(f.check("library/alpine").is_ok());
        assert!(f.check("bitnami/a/b").is_ok());
        assert!(f
            .check("library/redis")
            .unwrap_err()
            .contains("deny rule \"library/redis\""));
        assert!(f.check("library/a/b").is_err());
        assert!(f.check("evil/x").unwrap_err().contains("no allow rule"));
        assert!(RepoFilter::default().check("anything/at/all").is_ok());
    }
}
