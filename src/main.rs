//! The `cdc-egress` command line (PRODUCT.md §2). Exit codes: 0 ok, 1 runtime error, 2 usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use cdc_egress::config::Config;
use cdc_egress::error::Error;

#[derive(Parser)]
#[command(
    name = "cdc-egress",
    version,
    about = "Stream PostgreSQL row changes into gzipped CSV batches on object storage, with NATS JetStream notices",
    after_help = "Configuration: --config FILE (default ./cdc-egress.yml if present), then CDC_EGRESS_<SECTION>_<KEY> \
environment variables, then --set section.key=value flags."
)]
struct Cli {
    /// YAML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one configuration key, e.g. --set batch.interval=10s (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install or upgrade the registry schema (idempotent).
    Migrate,
    /// Run the daemon: replication → batches → registry → notices → acknowledgement.
    Run,
    /// Request a consistent re-export of tables, through a marker in the WAL (the daemon does the work).
    Reload {
        /// Tables as schema.table (a bare name means public.name).
        #[arg(required = true, value_name = "SCHEMA.TABLE")]
        tables: Vec<String>,
        /// Wait until the reloads are done, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Show tables, modes, last batches, confirmed LSN, slot lag and reloads.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drop the replication slot (stops WAL retention; the next `run` starts afresh).
    DropSlot,
    /// Print the newest JetStream notices of the configured stream.
    Notices {
        /// How many messages, newest last.
        #[arg(long, default_value_t = 10)]
        limit: u64,
    },
}

fn exit_for(e: &Error) -> ExitCode {
    if e.component() == "config" {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), &cli.set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cdc-egress: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    // One-shot commands print their result on stdout; their logs default to warnings only.
    let level = match cli.command {
        Command::Run => config.log.level.as_str(),
        _ => "warn",
    };
    cdc_egress::observe::init_logging(&config.log.format, level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cdc-egress: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Migrate => migrate(&config).await,
            Command::Run => run(config).await,
            Command::Status { json } => {
                let s = cdc_egress::status::collect(&config).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&s).expect("status serializes")
                    );
                } else {
                    print!("{}", cdc_egress::status::render_text(&s));
                }
                Ok(())
            }
            Command::DropSlot => drop_slot(&config).await,
            Command::Reload { tables, wait } => {
                let requests = cdc_egress::reload::request::request(&config, &tables).await?;
                for (t, id) in &requests {
                    println!("reload of {t} requested (request {id})");
                }
                if wait {
                    cdc_egress::reload::request::wait(&config, &requests).await?;
                }
                Ok(())
            }
            Command::Notices { limit } => notices(&config, limit).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            eprintln!("cdc-egress: {e}");
            exit_for(&e)
        }
    }
}

async fn migrate(config: &Config) -> Result<(), Error> {
    let info = cdc_egress::source::conninfo::ConnInfo::parse(config.registry.url.expose())?;
    let mut c = info.connect().await?;
    let applied = cdc_egress::register::migrate(&mut c, &config.registry.schema).await?;
    if applied.is_empty() {
        println!("registry schema {} is up to date", config.registry.schema);
    } else {
        println!(
            "registry schema {}: applied migrations {applied:?}",
            config.registry.schema
        );
    }
    let source = cdc_egress::source::conninfo::ConnInfo::parse(config.source.url.expose())?;
    let src = source.connect().await?;
    let installed = cdc_egress::register::migrate::install_reload_marker(
        &src,
        &config.registry.schema,
        &config.source.publication,
    )
    .await?;
    if installed {
        println!(
            "reload-marker event trigger {} installed in the source database",
            cdc_egress::register::migrate::marker_trigger_name(&config.registry.schema)
        );
    } else {
        eprintln!(
            "warning: the source role is not a superuser, so the reload-marker event trigger was not installed; \
             `cdc-egress reload` needs it: run `cdc-egress migrate` once as a superuser"
        );
    }
    Ok(())
}

async fn notices(config: &Config, limit: u64) -> Result<(), Error> {
    let Some(n) = cdc_egress::notify::Notifier::connect(&config.nats).await? else {
        return Err(Error::definite(
            "config",
            "nats.url is empty: notices are disabled",
        ));
    };
    for (seq, subject, payload) in n.recent(limit).await? {
        println!("#{seq} {subject}\n{}\n", String::from_utf8_lossy(&payload));
    }
    Ok(())
}

async fn drop_slot(config: &Config) -> Result<(), Error> {
    let info = cdc_egress::source::conninfo::ConnInfo::parse(config.source.url.expose())?;
    let c = info.connect().await?;
    let n = c
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.source.slot],
        )
        .await
        .map_err(|e| Error::transient("source", format!("drop slot: {e}")))?;
    println!(
        "{}",
        if n > 0 {
            "replication slot dropped"
        } else {
            "no such replication slot"
        }
    );
    Ok(())
}

async fn run(config: Config) -> Result<(), Error> {
    let metrics = Arc::new(cdc_egress::observe::Metrics::default());
    if let Some(addr) = config.http.listen {
        let listener = cdc_egress::observe::http::bind(addr).await?;
        tokio::spawn(cdc_egress::observe::http::serve(listener, metrics.clone()));
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested: finishing in-flight batches");
        let _ = shutdown_tx.send(true);
    });
    cdc_egress::daemon::run(config, metrics, shutdown_rx).await
}
