//! Progress for long CLI work: a bar (bytes and items) on a terminal, plain log lines
//! otherwise (CI logs, cron jobs).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    items: u64,
    bytes: u64,
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
            seen: Default::default(),
        }
    }

    /// One item done (`name`, `bytes` long).
    pub fn item(&mut self, name: &str, bytes: u64) {
        if !self.seen.insert(name.to_string()) {
            return;
        }
        self.items += 1;
        self.bytes += bytes;
        match &self.bar {
            Some(b) => {
                b.inc(1);
                b.set_prefix(bytesize::ByteSize(self.bytes).to_string());
            }
            None => tracing::info!(
                what = self.what,
                item = name,
                bytes,
                total_items = self.items,
                total_bytes = self.bytes,
                "progress"
            ),
        }
    }

    pub fn finish(self) -> (u64, u64) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        (self.items, self.bytes)
    }
}
