//! Garage (a distributed S3-API object store in Rust) as a 3-node cluster on loopback,
//! replication factor 3: the shared store that several entrepot replicas use (the S3
//! store issue). Built once with `cargo install garage --locked` (see `.ci/run`); the
//! binary is looked up as `garage` on PATH or under `/opt/garage/bin`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::{free_port, run, wait_port, wait_until, Proc};

/// Where `.ci/run` installs the binary when it is not on PATH.
const INSTALLED: &str = "/opt/garage/bin/garage";

pub fn garage_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| Some(PathBuf::from(INSTALLED)).filter(|p| p.is_file()))
}

/// The binary; `None` (the caller skips) on a laptop without it, a failure under CI.
pub fn require_garage() -> Option<PathBuf> {
    let bin = garage_bin();
    if bin.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "garage is not installed (.ci/run builds it into /opt/garage)"
        );
        eprintln!("SKIP: garage not installed (cargo install garage --locked)");
    }
    bin
}

/// A running 3-node cluster with one bucket and one key allowed on it.
pub struct Garage {
    _dir: TempDir,
    nodes: Vec<Node>,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

struct Node {
    config: PathBuf,
    rpc_port: u16,
    pub s3_port: u16,
    proc: Option<Proc>,
}

impl Garage {
    pub fn start(bin: &Path) -> Garage {
        let dir = TempDir::new().expect("tempdir");
        let secret = hex::encode(rand_bytes());
        let nodes: Vec<Node> = (0..3)
            .map(|n| {
                let (rpc, s3, admin) = (free_port(), free_port(), free_port());
                let d = dir.path().join(format!("n{n}"));
                let config = dir.path().join(format!("node{n}.toml"));
                let toml = format!(
                    "metadata_dir = \"{m}\"\ndata_dir = \"{data}\"\ndb_engine = \"lmdb\"\nreplication_factor = 3\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
                     [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\nadmin_token = \"{secret}\"\n",
                    m = d.join("meta").display(),
                    data = d.join("data").display(),
                );
                std::fs::write(&config, toml).expect("garage config");
                let mut node = Node {
                    config,
                    rpc_port: rpc,
                    s3_port: s3,
                    proc: None,
                };
                node.start(bin, dir.path(), n);
                node
            })
            .collect();
        let g = |node: &Node, args: &[&str]| {
            run(Command::new(bin).arg("-c").arg(&node.config).args(args))
        };
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| {
                let mut id = String::new();
                wait_until("garage node id", Duration::from_secs(30), || {
                    let out = Command::new(bin)
                        .arg("-c")
                        .arg(&n.config)
                        .args(["node", "id", "-q"])
                        .output();
                    match out {
                        Ok(o) if o.status.success() => {
                            id = String::from_utf8_lossy(&o.stdout).trim().to_string();
                            true
                        }
                        _ => false,
                    }
                });
                id
            })
            .collect();
        // `node id` reads the key file: it answers before the node listens.
        for n in &nodes {
            wait_port(n.rpc_port);
            wait_port(n.s3_port);
        }
        for id in &ids[1..] {
            g(&nodes[0], &["node", "connect", id]);
        }
        for (n, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or(id);
            g(
                &nodes[0],
                &[
                    "layout",
                    "assign",
                    "-z",
                    &format!("dc{n}"),
                    "-c",
                    "2G",
                    short,
                ],
            );
        }
        g(&nodes[0], &["layout", "apply", "--version", "1"]);
        let bucket = "entrepot".to_string();
        g(&nodes[0], &["bucket", "create", &bucket]);
        let created = g(&nodes[0], &["key", "create", "entrepot-key"]);
        let field = |name: &str| {
            created
                .lines()
                .find_map(|l| {
                    l.split_once(name)
                        .map(|(_, v)| v.trim_start_matches(':').trim().to_string())
                })
                .unwrap_or_default()
        };
        let (key_id, secret_key) = (field("Key ID"), field("Secret key"));
        g(
            &nodes[0],
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                &bucket,
                "--key",
                "entrepot-key",
            ],
        );
        Garage {
            _dir: dir,
            nodes,
            bucket,
            key_id,
            secret: secret_key,
        }
    }

    /// The S3 endpoint of node `n` (path-style, region "garage").
    pub fn endpoint(&self, n: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[n].s3_port)
    }

    /// entrepot's `[server.s3]` section for node `n`'s endpoint, keys under `prefix`.
    pub fn s3_section(&self, n: usize, prefix: &str) -> String {
        format!(
            "[server.s3]\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprefix = \"{prefix}\"\n",
            self.endpoint(n),
            self.bucket,
            self.key_id,
            self.secret
        )
    }

    /// An S3 client of this cluster's bucket through node 0 (to list, tamper or presign).
    pub fn client(&self) -> object_store::aws::AmazonS3 {
        let _ = rustls::crypto::ring::default_provider().install_default();
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint(0))
            .with_bucket_name(&self.bucket)
            .with_region("garage")
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("s3 client")
    }

    /// The process ids of the running nodes (for CPU accounting in benches).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.proc.as_ref().map(|p| p.child.id()))
            .collect()
    }

    /// Stops node `n` (the cluster keeps reading and writing with two of three).
    pub fn stop(&mut self, n: usize) {
        if let Some(mut p) = self.nodes[n].proc.take() {
            p.kill();
        }
    }
}

impl Node {
    fn start(&mut self, bin: &Path, dir: &Path, n: usize) {
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&self.config).arg("server");
        self.proc = Some(Proc::spawn(
            "garage",
            cmd,
            &dir.join(format!("garage{n}.log")),
        ));
    }
}

fn rand_bytes() -> [u8; 32] {
    use sha2::Digest as _;
    let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
    sha2::Sha256::digest(seed.as_bytes()).into()
}

/// The `[cluster]` secret the test replicas share.
pub const CLUSTER_SECRET: &str = "cluster-secret-for-tests";

/// `n` replicas on ports chosen first, each naming all of them as peers, each on its own
/// key prefix-free share of `g`'s bucket (node `i % 3`), with `upstream_url` as
/// `docker.io` and `extra` lines in that upstream's table.
pub fn replicas(g: &Garage, n: usize, upstream_url: &str, extra: &str) -> Vec<super::Mirror> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let peers: Vec<String> = ports
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}\""))
        .collect();
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            super::Mirror::start_at(
                *p,
                &g.s3_section(i % 3, ""),
                &format!(
                    "[cluster]\nself = \"http://127.0.0.1:{p}\"\npeers = [{}]\nsecret = \"{CLUSTER_SECRET}\"\n\
                     [upstreams.\"docker.io\"]\nurl = \"{upstream_url}\"\n{extra}\n",
                    peers.join(", ")
                ),
            )
        })
        .collect()
}
