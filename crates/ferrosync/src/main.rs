//! `ferrosync`: a PowerSync-compatible sync service.
//!
//! Subcommands: `serve` (replication + sync API), `validate` (config, sync rules and the
//! source tables they read), `explain` (a user's buckets and why), `compact` (bucket
//! histories, once), `storage stats` (sizes per table, per sync-config version, largest
//! buckets), `migrate` (storage schema), `demo` (a local Postgres with a sample todo app, then
//! serve).

mod allocator;
mod compact;
mod demo;
mod explain;
mod logging;
mod metrics;
mod otlp;
mod replicator;
mod serve;
mod storage_stats;
mod token;
mod validate;

use clap::{Parser, Subcommand};

// glibc malloc showed up as ~12% of replication CPU (many small row/op allocations) and holds
// on to freed memory; mimalloc is faster for this pattern and returns memory more readily.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ferrosync", version, about = "PowerSync-compatible sync service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run replication and the sync API.
    Serve {
        /// PowerSync service config (YAML or JSON).
        #[arg(long, short, env = "POWERSYNC_CONFIG_PATH")]
        config: PathBuf,
        /// Override the listen address (default: `bind_address` from config, else 0.0.0.0).
        #[arg(long)]
        bind: Option<String>,
    },
    /// Check the config file and its sync rules, print problems, exit non-zero on errors.
    Validate {
        #[arg(long, short, env = "POWERSYNC_CONFIG_PATH")]
        config: PathBuf,
    },
    /// Which buckets a user would sync, why, and how many ops and rows each holds.
    Explain {
        #[arg(long, short, env = "POWERSYNC_CONFIG_PATH")]
        config: PathBuf,
        /// A JWT, verified with the config's `client_auth` keys.
        #[arg(long, required_unless_present = "claims", conflicts_with = "claims")]
        token: Option<String>,
        /// A JWT payload as JSON, used without verification.
        #[arg(long)]
        claims: Option<String>,
        /// Client connection parameters (JSON object).
        #[arg(long)]
        params: Option<String>,
        /// The request's `streams` object: `{"include_defaults":true,"subscriptions":[...]}`.
        #[arg(long)]
        streams: Option<String>,
    },
    /// Print a development token for a user, signed with the config's shared-secret key.
    Token {
        #[arg(long, short, env = "POWERSYNC_CONFIG_PATH")]
        config: PathBuf,
        /// The token's subject (`sub`): the user id rules see as `request.user_id()`.
        #[arg(long)]
        user: String,
        /// Lifetime in seconds (at most one day).
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
        /// Extra claims, a JSON object (e.g. `{"team_id":"t1"}` for `auth.parameter('team_id')`).
        #[arg(long)]
        claims: Option<String>,
    },
    /// Compact bucket histories once (superseded ops to MOVE, leading runs to CLEAR) and exit.
    Compact {
        #[arg(long, short, env = "POWERSYNC_CONFIG_PATH")]
        config: PathBuf,
    },
    /// Inspect bucket storage.
    Storage {
        #[command(subcommand)]
        command: StorageCommand,
    },
    /// Apply storage schema migrations and exit.
    Migrate {
        #[arg(long, short, env = "POWERSYNC_CONFIG_PATH")]
        config: PathBuf,
    },
    /// Start a local Postgres with a sample todo database (in `--dir`) and serve it.
    Demo {
        #[arg(long, default_value = ".ferrosync-demo")]
        dir: PathBuf,
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum StorageCommand {
    /// Sizes per storage table and per sync-config version, and the largest buckets.
    Stats {
        #[arg(long, short, env = "POWERSYNC_CONFIG_PATH")]
        config: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// How many of the largest buckets to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
}

fn main() -> ExitCode {
    allocator::tune();
    let cli = Cli::parse();
    logging::init(match &cli.command {
        Command::Serve { config, .. } => logging::settings(config),
        _ => Default::default(),
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config, bind } => serve::serve(&config, bind).await,
            Command::Validate { config } => validate::validate(&config).await,
            Command::Explain {
                config,
                token,
                claims,
                params,
                streams,
            } => {
                let args = explain::ExplainArgs {
                    token,
                    claims,
                    params,
                    streams,
                };
                explain::explain(&config, args).await
            }
            Command::Token {
                config,
                user,
                expires_in,
                claims,
            } => token::run(&config, &user, expires_in, claims.as_deref()),
            Command::Compact { config } => compact::run_once(&config).await,
            Command::Storage {
                command: StorageCommand::Stats { config, json, top },
            } => storage_stats::run(&config, json, top).await,
            Command::Migrate { config } => serve::migrate(&config).await,
            Command::Demo { dir, port } => demo::run(&dir, port).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
