//! The `pharox` binary: parse the command line, load the config, run.

use anyhow::Context as _;
use clap::Parser as _;
use pharox::cli::{Cli, Command, LogFormat, config_path};
use pharox::config::{Config, StorageKind};
use tokio::signal::unix::{SignalKind, signal};

fn main() {
    if let Err(e) = run() {
        eprintln!("pharox: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, connect } => check(&config_path(config), connect),
        Command::Serve { config, log_format } => {
            init_tracing(log_format);
            // Every tunnel holds two sockets: take the whole hard limit of descriptors.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(n) => tracing::debug!(limit = n, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
            }
            let path = config_path(config);
            let config = Config::load(&path)?;
            pharox::app::runtime(&config)?.block_on(serve(config, path))
        }
    }
}

fn check(path: &std::path::Path, connect: bool) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!("{}: ok", path.display());
    println!("listen {}  admin {}", config.listen, config.admin.listen);
    let st = &config.storage;
    match st.kind {
        StorageKind::Memory => println!("storage: memory"),
        StorageKind::Postgres => println!(
            "storage: postgres {} (node {}, {} connections, statement timeout {} ms, migrate {}, \
             released leases kept {})",
            st.url
                .as_ref()
                .map_or_else(|| "?".into(), |u| pharox::config::mask_url(u.expose())),
            st.node(),
            st.pool_size,
            st.statement_timeout_ms,
            st.migrate,
            match st.keep_released_hours {
                0 => "for good".to_string(),
                h => format!("{h} h"),
            }
        ),
    }
    if !config.api.keys.is_empty() {
        let names: Vec<&str> = config.api.keys.iter().map(|k| k.name.as_str()).collect();
        println!("lease API keys: {}", names.join(", "));
    }
    for pool in &config.pools {
        println!(
            "pool {} ({}, {} upstreams)",
            pool.name,
            pool.selector,
            pool.proxies.len()
        );
    }
    let names: Vec<&str> = config.consumers.iter().map(|c| c.name.as_str()).collect();
    println!(
        "consumers: {}",
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(", ")
        }
    );
    if connect && st.kind == StorageKind::Postgres {
        check_database(&config)?;
    }
    Ok(())
}

/// `check --connect`: the database's own report; an error when the daemon could not start
/// on it (schema missing without `migrate`, or the node id held by a live daemon).
fn check_database(config: &Config) -> anyhow::Result<()> {
    let settings = pharox::app::pg_settings(&config.storage)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(pharox::storage::postgres::PostgresStorage::check(&settings))?;
    println!("{report}");
    if !report.schema_ok() && !config.storage.migrate {
        anyhow::bail!("the schema is incomplete and storage.migrate is false");
    }
    if let Some(holder) = &report.node_holder {
        anyhow::bail!(
            "node id `{}` is held by a live daemon ({holder})",
            report.node_id
        );
    }
    Ok(())
}

async fn serve(config: Config, path: std::path::PathBuf) -> anyhow::Result<()> {
    let proxy = pharox::app::bind(config.listen, config.limits.listen_backlog)
        .with_context(|| format!("listen {}", config.listen))?;
    let admin = pharox::app::bind(config.admin.listen, 128)
        .with_context(|| format!("admin.listen {}", config.admin.listen))?;
    let (daemon, runner) =
        pharox::app::Daemon::start(config, Some(path.clone()), proxy, admin).await?;
    tracing::info!(proxy = %daemon.proxy_addr, admin = %daemon.admin_addr, "listening");
    let state = daemon.state.clone();
    let hup = tokio::spawn(async move {
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        while hup.recv().await.is_some() {
            tracing::info!(path = %path.display(), "SIGHUP: reloading the configuration");
            let _ = pharox::reload::reload_from(&state, &path).await;
        }
    });
    runner.run(shutdown_signal()).await;
    hup.abort();
    Ok(())
}

async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
