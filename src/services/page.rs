//! `n`/`last` pagination shared by `tags/list` and `_catalog`.

/// One page of a sorted list.
pub struct Page {
    pub items: Vec<String>,
    /// The `last` value for the next page, when there is one.
    pub next: Option<String>,
}

/// Items after `last` (exclusive), at most `n` of them; only the page is copied.
pub fn paginate(sorted: &[String], n: Option<usize>, last: Option<&str>) -> Page {
    let start = last.map_or(0, |l| sorted.partition_point(|x| x.as_str() <= l));
    let rest = &sorted[start..];
    let take = n.map_or(rest.len(), |n| n.min(rest.len()));
    let items = rest[..take].to_vec();
    let next = (take < rest.len()).then(|| items.last().cloned()).flatten();
    Page { items, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let all: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let p = paginate(&all, Some(2), None);
        assert_eq!(
            (p.items, p.next.as_deref()),
            (vec!["a".to_string(), "b".into()], Some("b"))
        );
        let p = paginate(&all, Some(2), Some("b"));
        assert_eq!((p.items, p.next), (vec!["c".to_string(), "d".into()], None));
        let p = paginate(&all, None, Some("zz"));
        assert!(p.items.is_empty());
        let p = paginate(&all, Some(0), None);
        assert!(p.items.is_empty());
    }
}
