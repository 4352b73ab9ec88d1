use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

use fhir_cdc::config::Config;
use fhir_cdc::{api, capture, check, delivery, queue, store};

/// FHIR topic-based Subscription notifications from a Postgres store's WAL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture, delivery and the API in one process.
    Run(CaptureArgs),
    /// Only the CDC stage (one active instance per slot; more wait as standbys).
    Capture(CaptureArgs),
    /// Only delivery and the API (any number of instances).
    Deliver(Args),
    /// Validate the config file and the database; print what to fix.
    Check(Args),
    /// Create an empty store of a profile's layout (demo, tests; never on a real store).
    InitStore(InitArgs),
    /// List or requeue events that could not be delivered.
    DeadLetters(DeadArgs),
    /// The slot, capture, topics, subscriptions and dead letters, read from the databases
    /// (works while the daemon is down). Exit 0 healthy, 1 degraded, 2 cannot connect.
    Status(StatusArgs),
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    args: Args,
    /// Print the report as JSON (stable field names, see docs/operations.md).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DeadArgs {
    #[command(flatten)]
    args: Args,
    #[command(subcommand)]
    action: DeadAction,
}

#[derive(Subcommand)]
enum DeadAction {
    /// Print the dead letters (subscription, eventNumber, resource, when, why).
    List {
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Send dead letters again, with their original eventNumbers.
    Requeue {
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        subscription: Option<String>,
        /// Every dead letter of every subscription.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args)]
struct InitArgs {
    /// aidbox | hapi | helios | medplum
    #[arg(long, value_enum)]
    profile: ProfileArg,
    /// The database to create the tables in.
    #[arg(long, env = "FHIR_CDC_SOURCE_URL")]
    url: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProfileArg {
    Aidbox,
    Hapi,
    Helios,
    Medplum,
}

impl From<ProfileArg> for fhir_cdc::config::ProfileKind {
    fn from(p: ProfileArg) -> Self {
        use fhir_cdc::config::ProfileKind as K;
        match p {
            ProfileArg::Aidbox => K::Aidbox,
            ProfileArg::Hapi => K::Hapi,
            ProfileArg::Helios => K::Helios,
            ProfileArg::Medplum => K::Medplum,
        }
    }
}

#[derive(clap::Args)]
struct Args {
    /// Path of the TOML configuration.
    #[arg(long, short, env = "FHIR_CDC_CONFIG")]
    config: PathBuf,
}

#[derive(clap::Args)]
struct CaptureArgs {
    #[command(flatten)]
    args: Args,
    /// The replication slot was lost (invalidated or dropped): make a new one and capture
    /// from now on. Store changes since the last checkpoint are then never captured; the
    /// gap is logged. Without this flag capture stops and says so.
    #[arg(long)]
    resync_from_now: bool,
    /// `capture` only: serve `/livez`, `/healthz`, `/readyz` and `/metrics` on this address
    /// (for an orchestrator's probes and Prometheus). `run` serves them with the API.
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<std::net::SocketAddr>,
}

fn init_logging(cfg: Option<&Config>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FHIR_CDC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = cfg
        .and_then(|c| c.log.format.as_deref())
        .is_some_and(|f| f == "json");
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

/// mimalloc: capture allocates and frees many small JSON values per row; with glibc's
/// allocator that was about a fifth of its CPU (`BENCH_PERF` in scripts/bench.sh).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let args = match &cli.command {
        Command::Run(a) | Command::Capture(a) => &a.args,
        Command::Deliver(a) | Command::Check(a) => a,
        Command::DeadLetters(a) => &a.args,
        Command::Status(a) => &a.args,
        Command::InitStore(a) => return init_store(a).await,
    };
    let cfg = match Config::load(&args.config) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("fhir-cdc: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(Some(&cfg));
    match run(cli.command, cfg.clone()).await {
        Ok(code) => code,
        Err(e) => {
            let fatal = e.downcast_ref::<fhir_cdc::error::Fatal>();
            let remedy = fatal.and_then(|f| f.remedy.clone());
            tracing::error!(
                error = format!("{e:#}"),
                remedy = remedy.as_deref().unwrap_or("-"),
                "fatal"
            );
            if let Some(f) = fatal {
                record_fatal(&cfg, f).await;
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Leaves why the process stopped, and what to do, where `fhir-cdc status` reads it. Best
/// effort: the queue may be what failed.
async fn record_fatal(cfg: &Config, f: &fhir_cdc::error::Fatal) {
    let write = async {
        let c = queue::connect(cfg.queue_url()).await?;
        queue::fatal::record(&c, f).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the fatal error could not be recorded for status")
        }
        Err(_) => tracing::warn!("the fatal error could not be recorded for status: timed out"),
    }
}

async fn init_store(a: &InitArgs) -> std::process::ExitCode {
    init_logging(None);
    match store::init::run(&a.url, a.profile.into()).await {
        Ok(()) => {
            println!("created an empty store of the requested layout");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fhir-cdc init-store: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command, cfg: Arc<Config>) -> anyhow::Result<std::process::ExitCode> {
    if let Command::DeadLetters(a) = &cmd {
        return dead_letters(&cfg, &a.action).await;
    }
    if let Command::Status(a) = &cmd {
        return Ok(status(&cfg, a.json).await);
    }
    if let Command::Check(_) = cmd {
        return Ok(check_command(&cfg).await);
    }
    // Subscribers' secrets are sealed with this key wherever this process writes them.
    fhir_cdc::queue::sealed::install(fhir_cdc::queue::sealed::load_key(&cfg.security)?);
    let prom = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    fhir_cdc::metrics::describe();
    let shutdown = shutdown_signal();
    let mut tasks = tokio::task::JoinSet::new();
    let with_capture = matches!(cmd, Command::Run(_) | Command::Capture(_));
    let parts = Parts {
        // One FHIRPath engine and search-parameter index for the whole process.
        searcher: Arc::new(capture::searcher(&cfg).await?),
        // The store profile, shared: capture decodes through it, delivery and the API read.
        profile: store::from_config(&cfg.source, queue::pool(&cfg.source.url, 4)?),
        cfg,
        prom,
        shutdown,
    };
    if !with_capture {
        // Capture prepares it before streaming; a delivery-only process does it here.
        if let Err(e) = parts.profile.prepare().await {
            tracing::warn!(error = %e, "store profile not prepared (Aidbox Attributes); extensions stay as the store keeps them");
        }
    }
    let health = match &cmd {
        Command::Run(a) | Command::Capture(a) => {
            let options = capture::Options {
                resync_from_now: a.resync_from_now,
            };
            // `run` serves the probes on the API; only a capture-only process needs its own.
            let listen = a
                .health_listen
                .filter(|_| matches!(cmd, Command::Capture(_)));
            Some(spawn_capture(&parts, &mut tasks, options, listen))
        }
        _ => None,
    };
    if matches!(cmd, Command::Run(_) | Command::Deliver(_)) {
        spawn_delivery(parts, &mut tasks, health).await?;
    }
    while let Some(r) = tasks.join_next().await {
        r.context("task panicked")??;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// What the stages of one process share.
struct Parts {
    cfg: Arc<Config>,
    searcher: Arc<fhir_cdc::fhir::search::Searcher>,
    profile: Arc<dyn store::StoreProfile>,
    prom: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: watch::Receiver<bool>,
}

type Tasks = tokio::task::JoinSet<anyhow::Result<()>>;

/// Capture, its lag monitor, and (`capture --health-listen`) its probes; returns its health.
fn spawn_capture(
    p: &Parts,
    tasks: &mut Tasks,
    options: capture::Options,
    health_listen: Option<std::net::SocketAddr>,
) -> Arc<capture::lag::Health> {
    let h = Arc::new(capture::lag::Health::default());
    let done = capture_thread(p, h.clone(), options);
    tasks.spawn(async move {
        done.await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the capture thread stopped without a result (it panicked or could not start; see the log)")))
    });
    let monitor = capture::lag::monitor(p.cfg.clone(), h.clone(), p.shutdown.clone());
    tasks.spawn(async move {
        monitor.await;
        Ok(())
    });
    if let Some(addr) = health_listen {
        // The full API serves these with delivery; a capture-only process on request.
        tasks.spawn(api::health::serve(
            addr,
            h.clone(),
            Some(p.prom.clone()),
            p.shutdown.clone(),
        ));
    }
    h
}

/// Runs capture on an OS thread of its own with a single-threaded runtime; its result comes
/// back on the returned channel (dropped unsent if the thread panicked).
///
/// Capture is one pipeline (socket → decode → match → COPY), each row handed from task to
/// task. On the shared multi-threaded runtime those tasks ran on either core, so a row's
/// bytes crossed between the cores' caches at every hand-off; on one thread they stay in one
/// cache, and Postgres (walsender, queue backend) has the other core anyway. Measured with
/// `TOKIO_WORKER_THREADS=1` against 2, interleaved `BENCH_ONLY=capture` runs: 7.5–8.1 against
/// 8.8–12.1 µs of daemon CPU per row with 1 topic, the same with 20 (11.9 against 10.9–15.9).
fn capture_thread(
    p: &Parts,
    health: Arc<capture::lag::Health>,
    options: capture::Options,
) -> tokio::sync::oneshot::Receiver<anyhow::Result<()>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (cfg, profile, searcher, shutdown) = (
        p.cfg.clone(),
        p.profile.clone(),
        p.searcher.clone(),
        p.shutdown.clone(),
    );
    let spawned = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("capture runtime")
                .and_then(|rt| {
                    rt.block_on(capture::run(
                        cfg, profile, searcher, health, options, shutdown,
                    ))
                });
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        // The sender went with the closure: the receiver reads this as a failed start.
        tracing::error!(error = %e, "could not start the capture thread");
    }
    rx
}

/// Delivery, the websocket sweeper and the API (with capture's health when it runs here).
async fn spawn_delivery(
    p: Parts,
    tasks: &mut Tasks,
    health: Option<Arc<capture::lag::Health>>,
) -> anyhow::Result<()> {
    let cfg = &p.cfg;
    let payloads = delivery::payload::Payloads::new(p.profile.clone(), p.searcher.clone());
    let topics = Arc::new(fhir_cdc::topic_registry::TopicRegistry::new(
        cfg,
        queue::pool(cfg.queue_url(), 2)?,
    ));
    let hub = Arc::new(fhir_cdc::channel::websocket::Hub::new(cfg.queue_url()));
    let journal = Arc::new(delivery::journal::Journal::default());
    tasks.spawn(delivery::run(
        cfg.clone(),
        payloads.clone(),
        fhir_cdc::channel::Channels::standard(cfg, hub.clone())?,
        topics.clone(),
        journal.clone(),
        p.shutdown.clone(),
    ));
    tasks.spawn(sweep_sockets(hub.clone(), p.shutdown.clone()));
    let with = api::WithDelivery {
        payloads,
        topics,
        hub,
        journal,
    };
    let state = api::state(cfg.clone(), Some(p.prom), health, p.searcher, with).await?;
    tasks.spawn(api::serve(state, p.shutdown.clone()));
    Ok(())
}

/// `check`: prints each finding (ok, WARN, FIX with its remedy); fails when one needs a fix.
async fn check_command(cfg: &Config) -> std::process::ExitCode {
    let findings = check::run(cfg).await;
    let mut failed = false;
    for f in &findings {
        let tag = match (f.ok, f.warning) {
            (true, false) => "ok  ",
            (true, true) => "WARN",
            (false, _) => "FIX ",
        };
        failed |= !f.ok;
        println!("{tag}  {}", f.what);
        if !f.ok || f.warning {
            if let Some(fix) = &f.fix {
                println!("      -> {fix}");
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// Closes websockets of subscriptions deleted or turned off anywhere, every 2 s.
async fn sweep_sockets(
    hub: Arc<fhir_cdc::channel::websocket::Hub>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => hub.sweep().await,
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// `status [--json]`: 0 healthy, 1 degraded, 2 a database did not answer.
async fn status(cfg: &Config, json: bool) -> std::process::ExitCode {
    match fhir_cdc::status::report(cfg).await {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", fhir_cdc::status::table(&r));
            }
            std::process::ExitCode::from(if r.healthy { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("fhir-cdc status: cannot connect to the {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// `dead-letters list|requeue`: one line per dead letter (references only, never content).
async fn dead_letters(cfg: &Config, action: &DeadAction) -> anyhow::Result<std::process::ExitCode> {
    let mut c = queue::connect(cfg.queue_url()).await?;
    queue::migrate::run(&mut c).await?;
    match action {
        DeadAction::List { subscription } => {
            let rows = queue::dead::list(&c, subscription.as_deref()).await?;
            println!("subscription\tevent_number\tresource\tinteraction\tdead_at\tstate\treason");
            for d in &rows {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    d.subscription_id,
                    d.event_number,
                    d.resource,
                    d.interaction,
                    d.dead_at.to_rfc3339(),
                    if d.requeued { "requeued" } else { "dead" },
                    d.reason
                );
            }
            eprintln!("{} dead letter(s)", rows.len());
        }
        DeadAction::Requeue { subscription, .. } => {
            let done = queue::dead::requeue(&mut c, subscription.as_deref()).await?;
            for (sub, n) in &done {
                println!("{sub}\t{n} event(s) requeued");
                let row = queue::subscriptions::get(&c, sub).await?;
                if row.is_some_and(|r| r.status == fhir_cdc::fhir::subscription::Status::Off) {
                    eprintln!("subscription {sub} is off: its requeued events go out once it is turned back on (PUT with status requested)");
                }
            }
            eprintln!(
                "{} event(s) requeued",
                done.iter().map(|(_, n)| n).sum::<i64>()
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
