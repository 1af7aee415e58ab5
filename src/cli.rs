//! Command line: `pharox serve`, `pharox check`, `pharox --version`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// pharox: a local forward proxy that leases an upstream proxy per connection.
#[derive(Debug, Parser)]
#[command(name = "pharox", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// Config file (default: $PHAROX_CONFIG, else config/pharox.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config and print a summary; exit non-zero listing every problem.
    Check {
        /// Config file (default: $PHAROX_CONFIG, else config/pharox.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Also connect to the storage (PostgreSQL) and check its schema, the node id and
        /// the shared inventory; nothing is written.
        #[arg(long)]
        connect: bool,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The config path: the flag, else `PHAROX_CONFIG`, else the default.
pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(crate::config::PATH_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH))
}
