//! Progress for long CLI work: a bar (bytes and items) on a terminal, plain log lines
//! otherwise (CI logs, cron jobs).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    items: u64,
    bytes: u64,
    /// Of those, items (and bytes) that were there already (nothing downloaded).
    cached_items: u64,
    cached_bytes: u64,
    /// Items already counted (a blob shared by two images counts once).
    seen: std::collections::HashSet<String>,
}

impl Progress {
    pub fn new(what: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style =
                ProgressStyle::with_template("{spinner} {msg} {pos} items, {prefix} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner());
            let b = ProgressBar::new_spinner().with_style(style);
            b.set_message(what);
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        });
        Progress {
            bar,
            what,
            items: 0,
            bytes: 0,
            cached_items: 0,
            cached_bytes: 0,
            seen: Default::default(),
        }
    }

    /// One item done: `name` (a digest) of `image` (what a person asked for, or `-`),
    /// `bytes` long.
    pub fn item(&mut self, image: &str, name: &str, bytes: u64) {
        self.add(image, name, bytes, false);
    }

    /// One item that was already there (counted apart: "downloaded" vs "cached").
    pub fn cached(&mut self, image: &str, name: &str, bytes: u64) {
        self.add(image, name, bytes, true);
    }

    fn add(&mut self, image: &str, name: &str, bytes: u64, cached: bool) {
        if !self.seen.insert(name.to_string()) {
            return;
        }
        self.items += 1;
        self.bytes += bytes;
        if cached {
            self.cached_items += 1;
            self.cached_bytes += bytes;
        }
        match &self.bar {
            Some(b) => {
                b.inc(1);
                b.set_message(format!("{} {image}", self.what));
                b.set_prefix(bytesize::ByteSize(self.bytes).to_string());
            }
            None => tracing::info!(
                what = self.what,
                image,
                item = name,
                bytes,
                cached,
                total_items = self.items,
                total_bytes = self.bytes,
                "progress"
            ),
        }
    }

    /// Items and bytes that were already there.
    pub fn cached_totals(&self) -> (u64, u64) {
        (self.cached_items, self.cached_bytes)
    }

    pub fn finish(self) -> (u64, u64) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        (self.items, self.bytes)
    }
}
