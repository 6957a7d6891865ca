use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use entrepot::cli::integrate::{self, Style};
use entrepot::cli::{self, ImageArgs};
use entrepot::config::Config;

/// `RUST_LOG` (default `info`), with actix's HTTP/1 dispatcher silenced: it logs every
/// malformed request, TLS probe and reset connection from any client at ERROR, which lets
/// anyone fill the disk (`RUST_LOG=...,actix_http::h1::dispatcher=debug` shows them).
fn log_filter() -> EnvFilter {
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let quiet = if base.contains("actix_http") {
        base
    } else {
        format!("{base},actix_http::h1::dispatcher=off")
    };
    EnvFilter::try_new(&quiet).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// A multi-upstream OCI/Docker registry mirror.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); default ./upstreams.toml if present, else built-in defaults.
    /// ENTREPOT_* env vars override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Images {
    /// References like docker.io/library/alpine:3.20 or quay.io/x/y@sha256:...
    images: Vec<String>,
    /// A file with one reference per line (# comments).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Only this platform of multi-platform images (os/arch[/variant]); default: all.
    #[arg(long)]
    platform: Option<String>,
}

impl From<Images> for ImageArgs {
    fn from(i: Images) -> Self {
        ImageArgs {
            images: i.images,
            file: i.file,
            platform: i.platform,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API.
    Serve,
    /// Run the eviction once and print what it freed.
    Gc {
        /// Print what would be evicted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash every stored object; report (and with --repair remove) bad ones and temp leftovers.
    Verify {
        /// Remove the bad objects and the temp leftovers found (safe beside a live server:
        /// upload sessions younger than upload_ttl are never touched).
        #[arg(long)]
        repair: bool,
    },
    /// Warm the cache with whole images.
    Prefetch(Images),
    /// Write images as an OCI image layout (for air-gapped sites).
    Export {
        /// Output directory: new, empty, or an earlier export (its references are kept;
        /// one of the same name is replaced).
        #[arg(long)]
        out: PathBuf,
        /// Copy objects instead of hard-linking them to the store's files (a hard link
        /// takes no space, but the store's gc cannot free it while the export exists).
        #[arg(long)]
        copy: bool,
        #[command(flatten)]
        images: Images,
    },
    /// Load an OCI image layout written by `export` into the store.
    Import {
        /// The layout directory.
        dir: PathBuf,
    },
    /// Write containerd hosts.toml files (config_path layout) for every upstream.
    Hosts {
        /// The mirror as nodes reach it, e.g. http://mirror.internal:5000
        #[arg(long)]
        mirror: String,
        /// Output directory (e.g. /etc/containerd/certs.d).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "ns")]
        style: Style,
        /// CA certificate file for an https mirror (written as `ca =`).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Print a Kind cluster config whose nodes pull through the mirror.
    KindConfig {
        /// The mirror as Kind nodes reach it (on the `kind` network: http://entrepot:5000).
        #[arg(long)]
        mirror: String,
        /// Where to write the hosts files that the nodes mount.
        #[arg(long, default_value = "entrepot-hosts")]
        hosts_dir: PathBuf,
        /// Use the older inline `registry.mirrors` patch instead of a hosts directory.
        #[arg(long)]
        inline: bool,
    },
    /// Print registries.conf mirror entries for podman, CRI-O and skopeo.
    RegistriesConf {
        /// The mirror, e.g. http://mirror.internal:5000
        #[arg(long)]
        mirror: String,
    },
    /// List what the store holds: repositories with their tags, size and last pull.
    Ls {
        /// Only repositories whose name starts with this, e.g. docker.io/library
        prefix: Option<String>,
    },
    /// Policies (`[[policy]]`): `entrepot policy check IMAGE` prints the verdict and why.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print a shell completion script: `entrepot completions bash > /etc/bash_completion.d/entrepot`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Whether IMAGE (e.g. docker.io/myorg/app:1) would be served under its policy, and
    /// why not; exits non-zero when it would be refused.
    Check {
        /// The image as clients name it through the mirror: <prefix>/<repository>[:tag|@digest].
        image: String,
    },
}

/// Caps glibc's malloc arenas at two. glibc gives each thread that allocates an arena of
/// its own (up to 8 per core); with tokio's blocking pool (every store read and fill write
/// runs there, on threads that come and go) the freed memory stays spread over those
/// arenas: measured over 3 minutes of mixed load, RSS went 12 -> 26 MiB and stayed there
/// at idle; capped, 12 -> 17 MiB (and 10% more requests served). Must run before any
/// thread starts.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    // Access lines skip tracing's per-event work (see access_log::write_direct).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if !ansi {
        entrepot::routes::access_log::write_direct();
    }
    tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_env_filter(log_filter())
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let matches = Cli::command()
        .after_long_help(entrepot::config::env_help())
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "entrepot",
            &mut std::io::stdout(),
        );
        return Ok(true);
    }
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => {
            actix_web::rt::System::new().block_on(entrepot::server::serve(cfg))?;
            Ok(true)
        }
        Command::Gc { dry_run } => cli::gc(&cfg, dry_run).map(|_| true),
        Command::Verify { repair } => cli::verify(&cfg, repair),
        Command::Prefetch(i) => cli::prefetch(&cfg, &i.into()).map(|_| true),
        Command::Export { out, copy, images } => {
            cli::export(&cfg, &out, copy, &images.into()).map(|_| true)
        }
        Command::Import { dir } => cli::import(&cfg, &dir),
        Command::Hosts {
            mirror,
            out,
            style,
            ca,
        } => {
            for f in integrate::hosts(&cfg, &mirror, &out, style, ca.as_deref())? {
                println!("wrote {}", f.display());
            }
            Ok(true)
        }
        Command::KindConfig {
            mirror,
            hosts_dir,
            inline,
        } => {
            if integrate::is_loopback(&mirror) {
                eprintln!("warning: --mirror {mirror} names this machine: Kind nodes are containers and cannot reach it there; give an address they reach (on the `kind` network: http://entrepot:5000, or this host's LAN address)");
            }
            print!(
                "{}",
                integrate::kind_config(&cfg, &mirror, &hosts_dir, inline)?
            );
            if !inline {
                eprintln!(
                    "wrote containerd hosts files under {} (mounted into the nodes by this config)",
                    std::path::absolute(&hosts_dir)
                        .unwrap_or(hosts_dir)
                        .display()
                );
            }
            Ok(true)
        }
        Command::RegistriesConf { mirror } => {
            print!("{}", integrate::registries_conf(&cfg, &mirror)?);
            Ok(true)
        }
        Command::Completions { .. } => Ok(true),
        Command::Ls { prefix } => cli::ls(&cfg, prefix.as_deref()).map(|_| true),
        Command::Policy(PolicyCommand::Check { image }) => cli::policy_check(&cfg, &image),
    }
}
