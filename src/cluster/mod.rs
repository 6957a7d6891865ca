//! Replicas that cooperate: every blob digest has an owner among the live peers by
//! rendezvous hashing, and a replica that misses a blob locally and in the bucket asks
//! the owner, which does the one upstream fetch for the whole cluster and streams it to
//! every replica that asked.
//!
//! Rendezvous (highest random weight) hashing: each peer's score for a key is a hash of
//! (peer, key); the ranking is the peers by score. Adding or removing a peer moves only
//! the keys it wins or held, and every replica with the same view of who is live ranks
//! the same way, without talking to the others. A request is forwarded only to a peer
//! that scores higher than the forwarder, so even replicas with different views never
//! forward in a cycle; a peer request is never forwarded again.

mod peer;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;

pub use peer::{PeerBody, PeerManifest, PEER_SECRET_HEADER};

/// How often peers are health-checked (and DNS re-resolved).
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// A health check that takes longer than this counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Cluster {
    me: String,
    secret: String,
    /// Every known replica (from the static list or the last DNS answer), self included.
    known: RwLock<Vec<String>>,
    /// The known replicas that answered their last health check, self included.
    live: RwLock<Vec<String>>,
    dns: Option<String>,
    metrics: Arc<Metrics>,
    /// Response-header timeout of a peer request (the owner may be waiting on its upstream).
    pub timeout: Duration,
    /// How peer requests leave the machine (see [`crate::egress`]).
    egress: Arc<crate::egress::Proxies>,
}

fn normal(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

impl Cluster {
    pub fn new(
        cfg: &ClusterConfig,
        metrics: Arc<Metrics>,
        timeout: Duration,
        egress: Arc<crate::egress::Proxies>,
    ) -> Result<Cluster, crate::config::ConfigError> {
        let me = normal(&cfg.self_url);
        let mut known: Vec<String> = cfg.peers.iter().map(|p| normal(p)).collect();
        if !known.contains(&me) {
            known.push(me.clone());
        }
        known.sort();
        known.dedup();
        let c = Cluster {
            secret: cfg.resolve_secret()?,
            live: RwLock::new(known.clone()),
            known: RwLock::new(known),
            dns: cfg.peers_dns.clone(),
            me,
            metrics,
            timeout,
            egress,
        };
        c.publish();
        Ok(c)
    }

    /// This replica's URL.
    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn is_me(&self, peer: &str) -> bool {
        peer == self.me
    }

    /// Whether `given` is the cluster secret (constant time).
    pub fn admits(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| {
            !self.secret.is_empty() && bool::from(g.as_bytes().ct_eq(self.secret.as_bytes()))
        })
    }

    /// The live replicas ranked for `key`, best first (self always among them).
    pub fn rank(&self, key: &str) -> Vec<String> {
        let live = self.live.read().map(|l| l.clone()).unwrap_or_default();
        rank(&live, key)
    }

    /// Whether this replica is the owner of `key` (e.g. the eviction pass).
    pub fn leads(&self, key: &str) -> bool {
        self.rank(key).first().is_some_and(|p| self.is_me(p))
    }

    /// Health-checks the peers (and re-resolves DNS) forever.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tick.tick().await;
            if let Some(name) = &self.dns {
                self.resolve(name).await;
            }
            let known = self.known.read().map(|k| k.clone()).unwrap_or_default();
            let mut live = Vec::new();
            for p in known {
                if self.is_me(&p) || self.healthy(&p).await {
                    live.push(p);
                }
            }
            if let Ok(mut l) = self.live.write() {
                if *l != live {
                    tracing::info!(live = ?live, "cluster membership changed");
                }
                *l = live;
            }
            self.publish();
        }
    }

    /// Replaces the known replicas with the addresses `name` resolves to.
    async fn resolve(&self, name: &str) {
        let scheme = if self.me.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        match tokio::net::lookup_host(name).await {
            Ok(addrs) => {
                let mut found: Vec<String> = addrs.map(|a| format!("{scheme}://{a}")).collect();
                if !found.contains(&self.me) {
                    found.push(self.me.clone());
                }
                found.sort();
                found.dedup();
                if let Ok(mut k) = self.known.write() {
                    *k = found;
                }
            }
            Err(e) => tracing::warn!(peers_dns = name, error = %e, "cannot resolve the peers"),
        }
    }

    /// A client for peer requests: through the egress proxy unless `NO_PROXY` lists the
    /// peers (it usually should: replicas talk inside the cluster).
    fn client(&self, timeout: Duration) -> awc::Client {
        crate::egress::plain_client(self.egress.clone(), timeout)
    }

    async fn healthy(&self, peer: &str) -> bool {
        let req = self
            .client(CHECK_TIMEOUT)
            .get(format!("{peer}/_entrepot/peer/health"))
            .insert_header((PEER_SECRET_HEADER, self.secret.as_str()));
        matches!(req.send().await, Ok(r) if r.status().is_success())
    }

    fn publish(&self) {
        let known = self.known.read().map(|k| k.len()).unwrap_or(0);
        let live = self.live.read().map(|l| l.len()).unwrap_or(0);
        let g = &self.metrics.cluster_peers;
        g.with_label_values(&["up"]).set(live as i64);
        g.with_label_values(&["down"])
            .set(known.saturating_sub(live) as i64);
    }
}

/// `peers` ranked for `key` by rendezvous score, best first.
fn rank(peers: &[String], key: &str) -> Vec<String> {
    let mut scored: Vec<(u64, &String)> = peers.iter().map(|p| (score(p, key), p)).collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, p)| p.clone()).collect()
}

/// The weight of `peer` for `key`: the first 8 bytes of sha256(peer "\n" key).
pub fn score(peer: &str, key: &str) -> u64 {
    let h = Sha256::new()
        .chain_update(peer.as_bytes())
        .chain_update(b"\n")
        .chain_update(key.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_is_stable_and_moves_little_when_a_peer_leaves() {
        let peers: Vec<String> = (0..5).map(|i| format!("http://10.0.0.{i}:5000")).collect();
        let keys: Vec<String> = (0..1000).map(|i| format!("sha256:{i:064x}")).collect();
        let owners: Vec<String> = keys.iter().map(|k| rank(&peers, k)[0].clone()).collect();
        // Every peer owns some keys.
        for p in &peers {
            assert!(owners.iter().filter(|o| *o == p).count() > 100);
        }
        // Without peer 2, only its keys move, each to its second choice.
        let fewer: Vec<String> = peers
            .iter()
            .filter(|p| !p.ends_with(".2:5000"))
            .cloned()
            .collect();
        for (k, o) in keys.iter().zip(&owners) {
            let now = rank(&fewer, k)[0].clone();
            if o.ends_with(".2:5000") {
                assert_eq!(now, rank(&peers, k)[1]);
            } else {
                assert_eq!(&now, o);
            }
        }
    }
}
