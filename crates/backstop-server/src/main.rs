//! The `backstop` binary: parse the command line, load the config, serve.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use backstop_server::{run, App, Config, ConfigSource};
use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's malloc: a kept stream's buffers are made on
/// the serving threads and freed on the store's writer, which glibc pays
/// for in arena locks and consolidation (`benches/README.md`, "jemalloc,
/// shipped").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// An OpenAI-compatible failover router for LLM completions.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (see config/backstop.toml). Without one, OPENAI_API_KEY
    /// and OPENAI_BASE_URL define the upstream.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, env = "BACKSTOP_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address of the admin endpoints, e.g. 127.0.0.1:9091 (loopback unless
    /// an admin token is configured).
    #[arg(long, env = "BACKSTOP_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Serve every request from the local model, whatever the config or keys.
    #[arg(long)]
    offline: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and name the first bad field.
    CheckConfig {
        /// The file to check.
        path: PathBuf,
    },
    /// Download a Hugging Face model from the catalogue (with progress and a
    /// sha256 check) and print its path; `models/fetch` handles every source.
    FetchModel {
        /// Catalogue name, e.g. llama-2-7b-chat.
        name: String,
        /// The catalogue file.
        #[arg(long, default_value = "models/catalogue.toml")]
        catalogue: PathBuf,
    },
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn main() -> anyhow::Result<()> {
    backstop_local::settle_thread_count();
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { path }) = &cli.command {
        return match Config::load(path, env) {
            Ok(config) => {
                println!(
                    "{}: ok ({} targets, {} routes)",
                    path.display(),
                    config.targets.len(),
                    config.routes.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                std::process::exit(1);
            }
        };
    }
    if let Some(Command::FetchModel { name, catalogue }) = &cli.command {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let path = runtime.block_on(backstop_server::catalogue::fetch(catalogue, name))?;
        println!("{}", path.display());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKSTOP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // A file is read again on each reload, with the same flags applied.
    let (offline, listen, admin_listen) = (cli.offline, cli.listen, cli.admin_listen);
    let overrides = move |mut config: Config| {
        config.listen = listen.unwrap_or(config.listen);
        config.admin_listen = admin_listen.unwrap_or(config.admin_listen);
        config
    };
    let source = cli.config.clone().map(|path| {
        ConfigSource::new(path, move |path| {
            match offline {
                false => Config::load(path, env),
                true => Config::load_offline(path, env),
            }
            .map(overrides)
        })
    });
    let mut config = match (&source, offline) {
        (Some(source), _) => source.read(),
        (None, false) => Config::from_env(env).map(overrides),
        (None, true) => {
            Config::from_env(|name| (name != "OPENAI_API_KEY").then(|| env(name)).flatten())
                .map(overrides)
        }
    }
    .context("configuration")?;
    if source.is_none() && config.local.is_none() {
        // Configured from the environment, with a key: the local model
        // would be the last resort, and its file is not where it is looked
        // for (relative to the working directory).
        tracing::warn!(
            "no local model behind the upstream: {} is not in {} (run models/fetch there, or set \
             BACKSTOP_MODEL); when the upstream fails, clients get its failure",
            backstop_config::DEFAULT_MODEL,
            std::env::current_dir().map_or_else(
                |_| "the working directory".into(),
                |d| d.display().to_string()
            )
        );
    }
    if admin_listen.is_some()
        && !config.admin_listen.ip().is_loopback()
        && config.admin_token.is_none()
    {
        anyhow::bail!(
            "--admin-listen {} is not a loopback address: set server.admin_token_env too",
            config.admin_listen
        );
    }
    let nofile = config.limits.fit_descriptors();
    tracing::debug!("file-descriptor limit: {nofile:?}");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(config, source))
}

async fn serve(config: Config, source: Option<ConfigSource>) -> anyhow::Result<()> {
    if let Some(local) = &config.local {
        if config.is_offline() {
            tracing::info!(
                "offline: every request is served by the local model `{}` ({})",
                local.name,
                local.model.display()
            );
        } else {
            tracing::info!(model = %local.model.display(), "local model target `{}`", local.target);
        }
    }
    for t in &config.targets {
        let key = match t.api_keys.len() {
            0 => "without an API key".to_string(),
            1 => "with an API key".to_string(),
            n => format!("with {n} API keys, used in turn"),
        };
        tracing::info!(target = %t.name, base_url = %t.base_url, "upstream target, {key}");
    }
    let mut app = App::new(config).await?;
    if let Some(source) = source {
        tracing::info!(
            path = %source.path().display(),
            "the configuration reloads on SIGHUP, on POST /admin/reload, and when the file changes"
        );
        app = app.with_source(source);
    }
    let running = run(app, shutdown_signal()).await?;
    tracing::info!("backstop listening on http://{}", running.addr);
    tracing::info!("admin endpoints on http://{}", running.admin_addr);
    running.wait().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
