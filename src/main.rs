//! The `cdc-egress` command line (README.md, "Running it"). Exit codes: 0 ok, 1 runtime error, 2
//! usage or configuration error (including credentials the server rejects).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use cdc_egress::config::Config;
use cdc_egress::error::{Component, Error};

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
        /// With --wait: give up (exit 1) after this long, e.g. 10m; the reloads themselves go on.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "wait")]
        timeout: Option<std::time::Duration>,
    },
    /// Show tables, modes, last batches, confirmed LSN, slot lag and reloads.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drop the replication slot (stops WAL retention; the next `run` starts afresh with a full export).
    DropSlot {
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Release the claim of a slot on the registry, the output prefix and the subject prefix of this
    /// configuration, so another slot may use them (README "Running several daemons"). Stop the
    /// daemon that owns them first.
    ReleaseOwner {
        /// Required: releasing lets another slot's daemon clean up this one's files.
        #[arg(long)]
        yes: bool,
    },
    /// Apply the files to tables in a target PostgreSQL by the consumer rule, incrementally and
    /// exactly once (README "Loading into PostgreSQL: apply").
    Apply {
        /// The target database, e.g. postgres://user@host/warehouse.
        #[arg(long, value_name = "URL")]
        into: String,
        /// Only these tables (schema.table; default: every table of the source).
        #[arg(value_name = "SCHEMA.TABLE")]
        tables: Vec<String>,
        /// Keep applying new files as they are registered, until Ctrl-C.
        #[arg(long)]
        follow: bool,
        /// With --follow: how often the registry is polled.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
        poll: std::time::Duration,
        /// Where the target keeps its progress.
        #[arg(long, value_name = "SCHEMA", default_value = "cdc_egress_apply")]
        state_schema: String,
        /// Put each table into the schema `<prefix><schema>` of the target.
        #[arg(long, value_name = "PREFIX", default_value = "")]
        schema_prefix: String,
    },
    /// Prove that the files equal the source: rebuild each table from its files at a consistent
    /// position of the source and compare row by row (README "Verifying").
    /// Exit 0 equal, 1 different, 2 usage, 3 could not verify (not caught up, a server down).
    Verify {
        /// Only these tables (schema.table; default: every published table).
        #[arg(value_name = "SCHEMA.TABLE")]
        tables: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Differing keys shown per table and kind.
        #[arg(long, default_value_t = 5)]
        samples: usize,
        /// How long to wait for the daemon to confirm the position.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
        wait: std::time::Duration,
        /// The PostgreSQL for the scratch schemas (default: the registry's database).
        #[arg(long, value_name = "URL")]
        scratch: Option<String>,
        /// Leave the scratch schemas for inspection.
        #[arg(long)]
        keep_scratch: bool,
        /// Request a reload of each table that differs (through the WAL marker, like `reload`).
        #[arg(long)]
        repair: bool,
    },
    /// Print the newest JetStream notices of the configured stream.
    Notices {
        /// How many messages, newest last.
        #[arg(long, default_value_t = 10)]
        limit: u64,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 10m)"))
}

/// The exit code the error's type gives ([`Error::exit_code`]): 2 for configuration problems,
/// rejected credentials included; 1 for everything else.
fn exit_for(e: &Error) -> ExitCode {
    ExitCode::from(e.exit_code() as u8)
}

/// Fixes glibc malloc's mmap threshold at 64 KiB (ARCHITECTURE.md, invariant 4).
///
/// glibc raises the threshold to the size of every mmap-backed block it frees (up to 32 MiB): after
/// the first whole spool file read for an upload or the first large read buffer is freed, every
/// later block of that size comes from the heaps of the malloc arenas, which keep what is freed in
/// their middle. Measured with `benches/throughput.sh` (1.49M changes, TCP): peak RSS 36 → 25 MiB
/// with the threshold fixed, the same throughput. A fixed threshold also keeps the trim threshold at
/// its default, so freed memory at the top of a heap goes back to the system.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    cdc_egress::pg::install_default_provider();
    let config = match Config::load(cli.config.as_deref(), &cli.set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cdc-egress: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    // One-shot commands print their result on stdout; their logs default to warnings only.
    let is_daemon = matches!(cli.command, Command::Run);
    let level = if is_daemon {
        config.log.level.as_str()
    } else {
        "warn"
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
        let done = |r: Result<(), Error>| r.map(|()| ExitCode::SUCCESS);
        match cli.command {
            Command::Apply {
                into,
                tables,
                follow,
                poll,
                state_schema,
                schema_prefix,
            } => {
                let naming = cdc_egress::consume::target::Naming {
                    state_schema,
                    schema_prefix,
                    unlogged: false,
                };
                done(apply(&config, &into, &tables, follow, poll, naming).await)
            }
            Command::Verify {
                tables,
                json,
                samples,
                wait,
                scratch,
                keep_scratch,
                repair,
            } => {
                let opts = cdc_egress::consume::verify::VerifyOptions {
                    tables: parse_tables(&tables)?,
                    samples,
                    wait,
                    keep_scratch,
                    progress: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                };
                // 0 equal, 1 different, 2 usage, 3 could not verify (README "Verifying").
                match verify(&config, scratch.as_deref(), &opts, json, repair).await {
                    Err(e) if !e.is_config() => {
                        eprintln!("cdc-egress: {e}");
                        Ok(ExitCode::from(3))
                    }
                    other => other,
                }
            }
            other => done(one_shot(&config, other).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // Once: the daemon's log is its stderr; one-shot commands print the error themselves.
            if is_daemon {
                tracing::error!(error = %e, "exiting");
            } else {
                eprintln!("cdc-egress: {e}");
            }
            exit_for(&e)
        }
    }
}

/// The commands that either succeed or fail.
async fn one_shot(config: &Config, command: Command) -> Result<(), Error> {
    let config = config.clone();
    {
        match command {
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
            Command::DropSlot { yes } => drop_slot(&config, yes).await,
            Command::Reload {
                tables,
                wait,
                timeout,
            } => {
                let requests = cdc_egress::reload::request::request(&config, &tables).await?;
                for (t, id) in &requests {
                    println!("reload of {t} requested (request {id})");
                }
                if wait {
                    cdc_egress::reload::request::wait(&config, &requests, timeout).await?;
                }
                Ok(())
            }
            Command::Notices { limit } => notices(&config, limit).await,
            Command::ReleaseOwner { yes } => release_owner(&config, yes).await,
            Command::Apply { .. } | Command::Verify { .. } => unreachable!("handled by main"),
        }
    }
}

fn parse_tables(tables: &[String]) -> Result<Vec<cdc_egress::table::TableName>, Error> {
    tables
        .iter()
        .map(|t| {
            cdc_egress::table::TableName::parse(t).ok_or_else(|| {
                Error::definite(
                    Component::Config,
                    format!("{t:?} is not a table name (schema.table, or a bare name for public)"),
                )
            })
        })
        .collect()
}

/// The registry listing and the objects of this configuration's source.
async fn consumer_inputs(
    config: &Config,
) -> Result<
    (
        cdc_egress::consume::listing::Listing,
        cdc_egress::consume::listing::Objects,
    ),
    Error,
> {
    let registry = config.registry_conninfo()?.connect().await?;
    let listing = cdc_egress::consume::listing::Listing::open(
        registry,
        &config.registry.schema,
        Some(&config.source.name),
    )
    .await?;
    let store =
        cdc_egress::sink::store::Store::open(&config.output.url, &config.output.options_exposed())?;
    Ok((listing, cdc_egress::consume::listing::Objects::new(store)))
}

async fn apply(
    config: &Config,
    into: &str,
    tables: &[String],
    follow: bool,
    poll: std::time::Duration,
    naming: cdc_egress::consume::target::Naming,
) -> Result<(), Error> {
    use cdc_egress::consume::apply::{Applier, ApplyOptions};
    let target = cdc_egress::pg::conninfo::ConnInfo::parse(into)
        .map_err(|e| e.context("--into"))?
        .connect()
        .await?;
    let (listing, objects) = consumer_inputs(config).await?;
    let options = ApplyOptions {
        tables: parse_tables(tables)?,
        until: None,
        strict: true,
        ignore_reloads: false,
    };
    let mut applier = Applier::open(listing, objects, target, naming, options).await?;
    let report = if follow {
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        applier.follow(poll, stop).await?
    } else {
        applier.catch_up().await?
    };
    println!(
        "applied {} streaming files ({} rows), {} schema changes, {} reloads; at file {}",
        report.streaming_files,
        report.rows_applied,
        report.ddl_records,
        report.reloads_loaded,
        report.last_file_id
    );
    Ok(())
}

async fn verify(
    config: &Config,
    scratch: Option<&str>,
    opts: &cdc_egress::consume::verify::VerifyOptions,
    json: bool,
    repair: bool,
) -> Result<ExitCode, Error> {
    use cdc_egress::consume::verify::{verify, VerifyInputs};
    let scratch = match scratch {
        Some(url) => {
            cdc_egress::pg::conninfo::ConnInfo::parse(url).map_err(|e| e.context("--scratch"))?
        }
        None => config.registry_conninfo()?,
    };
    let (listing, objects) = consumer_inputs(config).await?;
    let source = config.source_conninfo()?;
    let report = verify(
        VerifyInputs {
            source: &source,
            slot: &config.source.slot,
            publication: &config.source.publication,
            listing,
            objects,
            scratch: &scratch,
            registry_schema: &config.registry.schema,
        },
        opts,
    )
    .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serializes")
        );
    } else {
        print!("{}", cdc_egress::consume::verify::render_text(&report));
    }
    let differing: Vec<String> = report
        .tables
        .iter()
        .filter(|t| !t.equal())
        .map(|t| t.table.clone())
        .collect();
    if repair && !differing.is_empty() {
        for (t, id) in cdc_egress::reload::request::request(config, &differing).await? {
            eprintln!("reload of {t} requested (request {id})");
        }
    }
    Ok(if report.equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn migrate(config: &Config) -> Result<(), Error> {
    // The source first, so an unsupported server is refused before the registry is changed.
    let src = cdc_egress::pg::slot::connect_source(&config.source_conninfo()?).await?;
    let mut c = config.registry_conninfo()?.connect().await?;
    let applied = cdc_egress::sink::registry::migrate(&mut c, &config.registry.schema).await?;
    if applied.is_empty() {
        println!("registry schema {} is up to date", config.registry.schema);
    } else {
        println!(
            "registry schema {}: applied migrations {applied:?}",
            config.registry.schema
        );
    }
    let trigger = cdc_egress::sink::registry::migrate::marker_trigger_name(&config.registry.schema);
    use cdc_egress::sink::registry::migrate::MarkerTrigger;
    match cdc_egress::sink::registry::migrate::install_reload_marker(
        &src,
        &config.registry.schema,
    )
    .await?
    {
        MarkerTrigger::Installed => println!(
            "reload-marker event trigger {trigger} and the DDL-capture event triggers (schema {}) \
             installed in the source database",
            cdc_egress::sink::registry::migrate::capture_schema(&config.registry.schema)
        ),
        MarkerTrigger::AlreadyInstalled => println!(
            "reload-marker event trigger {trigger} is installed in the source database \
             (left as it is: refreshing it needs a superuser)"
        ),
        MarkerTrigger::Missing => eprintln!(
            "warning: the reload-marker event trigger {trigger} is not installed and the source role is not a \
             superuser; `cdc-egress reload` needs it: run `cdc-egress migrate` once as a superuser"
        ),
    }
    Ok(())
}

async fn release_owner(config: &Config, yes: bool) -> Result<(), Error> {
    use cdc_egress::sink::owner::Owner;
    if !yes {
        return Err(Error::definite(
            Component::Config,
            "release-owner lets another slot's daemon take over (and clean up) this source name in the \
             registry, its output directory and its subjects: stop the daemon that owns them, then add --yes",
        ));
    }
    let say = |what: &str, owner: Option<Owner>| match owner {
        Some(o) => println!("{what}: released (it belonged to {o})"),
        None => println!("{what}: not claimed"),
    };
    let registry_client = config.registry_conninfo()?.connect().await?;
    let installed = cdc_egress::sink::registry::migrate::installed_version(
        &registry_client,
        &config.registry.schema,
    )
    .await?;
    let registry = format!(
        "source {:?} in the registry schema {:?}",
        config.source.name, config.registry.schema
    );
    match installed {
        0 => say(&registry, None),
        v if v < cdc_egress::sink::registry::migrate::LATEST => {
            return Err(Error::definite(
                Component::Config,
                format!(
                    "the registry schema {:?} is at version {v}: run `cdc-egress migrate` first",
                    config.registry.schema
                ),
            ))
        }
        _ => say(&registry, config.open_registry(1)?.release_owner().await?),
    }
    let store =
        cdc_egress::sink::store::Store::open(&config.output.url, &config.output.options_exposed())?;
    let layout = cdc_egress::sink::layout::Namespace::new(store.root(), &config.source.name);
    say(
        &format!("output directory {}", store.url_of(&layout.dir())),
        cdc_egress::sink::owner::release_prefix(&store, &layout).await?,
    );
    let subjects = format!(
        "subjects {}.{}.>",
        config.nats.subject_prefix, config.source.name
    );
    match cdc_egress::sink::notify::Notifier::open_if_exists(&config.nats).await? {
        Some(Ok(n)) => say(&subjects, n.release_subject_prefix().await?),
        Some(Err(_missing_stream)) => say(&subjects, None),
        None => {}
    }
    Ok(())
}

async fn notices(config: &Config, limit: u64) -> Result<(), Error> {
    let Some(n) = cdc_egress::sink::notify::Notifier::open_existing(&config.nats).await? else {
        return Err(Error::definite(
            Component::Config,
            "nats.url is empty: notices are disabled",
        ));
    };
    for (seq, subject, payload) in n.recent(limit).await? {
        println!("#{seq} {subject}\n{}\n", String::from_utf8_lossy(&payload));
    }
    Ok(())
}

async fn drop_slot(config: &Config, yes: bool) -> Result<(), Error> {
    use std::io::{BufRead, IsTerminal, Write};
    let info = config.source_conninfo()?;
    let slot = &config.source.slot;
    let where_ = format!("{} on {}", info.dbname(), info.host_description());
    let c = cdc_egress::pg::slot::connect_source(&info).await?;
    // The registry learns that the drop is deliberate, so the next `run` starts afresh instead of
    // taking the slot for lost (README "Slot lifecycle").
    let registry = match cdc_egress::sink::registry::migrate::installed_version(
        &config.registry_conninfo()?.connect().await?,
        &config.registry.schema,
    )
    .await?
    {
        0..=2 => None,
        v if v < cdc_egress::sink::registry::migrate::LATEST => {
            return Err(Error::definite(
                Component::Config,
                format!(
                "the registry schema {:?} is at version {v}: run `cdc-egress migrate` first, so \
                     the drop is recorded for source {:?}",
                config.registry.schema, config.source.name
            ),
            ))
        }
        _ => Some(config.open_registry(1)?),
    };
    let last_event = match &registry {
        Some(r) => r.last_slot_event(slot).await?,
        None => None,
    };
    let existing = cdc_egress::pg::slot::slot_info(&c, slot).await?;
    // A slot lost earlier (dropped by someone else) is missing, but the registry still expects it:
    // recording the drop is what lets the next run start afresh.
    let expected = matches!(last_event.as_deref(), Some("created") | Some("lost"));
    if existing.is_none() && !expected {
        println!("no replication slot {slot} in {where_}: nothing to drop");
        return Ok(());
    }
    if let Some(pid) = existing.as_ref().and_then(|s| s.active_pid) {
        return Err(Error::definite(
            Component::Slot,
            format!(
                "replication slot {slot} in {where_} is in use by a running daemon (pid {pid}): stop it first"
            ),
        ));
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Error::definite(
                Component::Config,
                format!(
                    "dropping replication slot {slot} in {where_} needs confirmation: pass --yes"
                ),
            ));
        }
        eprint!(
            "Drop replication slot {slot} in {where_}? The WAL it retains is released; the next `run` \
             starts afresh and re-exports every table. Type the slot name to confirm: "
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if answer.trim() != slot {
            return Err(Error::definite(
                Component::Config,
                "not confirmed: nothing dropped",
            ));
        }
    }
    if let Some(r) = &registry {
        r.record_slot_event(slot, "dropped", None, Some("cdc-egress drop-slot"))
            .await?;
    }
    if existing.is_some() {
        c.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(|e| {
            cdc_egress::pg::conninfo::pg_error(e).context(format!("drop slot {slot}"))
        })?;
        println!("replication slot {slot} dropped in {where_}");
    } else {
        println!(
            "replication slot {slot} was already gone from {where_}; recorded as dropped, so the next run starts afresh"
        );
    }
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
