//! The `tollgate` command: a thin clap layer over the gateway library.

mod allocator;
mod cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tollgate_gateway::config::LogFormat;
use tollgate_gateway::observe::telemetry::{
    fmt_layer, write_request_lines_directly, LineFormat, StderrLog, Telemetry,
};
use tollgate_gateway::{Config, RunningGateway};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Tollgate: the egress gateway for AI-agent sandboxes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (egress proxy + admin API).
    Serve {
        /// TOML configuration file; without it the embedded default is used
        /// (proxy 127.0.0.1:3128, admin 127.0.0.1:9901, demo agent `local` for 127.0.0.1).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory (CA, admin token); overrides `data_dir` in the config.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Tools for policy authors: validate, test, explain.
    #[command(subcommand)]
    Policy(cli::policy::PolicyCommand),
    /// For approvers: list, show, approve and deny held requests (through the admin API).
    #[command(subcommand)]
    Approvals(cli::approvals::ApprovalsCommand),
    /// An agent's audit trail: print it, or verify its hash chain (through the admin API).
    #[command(subcommand)]
    Audit(cli::audit::AuditCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, data_dir } => match serve(config, data_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::DefaultConfig => {
            print!("{}", tollgate_gateway::config::EMBEDDED_DEFAULT);
            ExitCode::SUCCESS
        }
        Command::Policy(command) => cli::policy::run(command),
        Command::Approvals(command) => cli::approvals::run(command),
        Command::Audit(command) => cli::audit::run(command),
    }
}

fn serve(config_path: Option<PathBuf>, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    // pingora dumps whole request headers at debug and trace level — with the credentials
    // the gateway injects. Those log targets stay at info whatever RUST_LOG says.
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for quiet in ["pingora_proxy=info", "pingora_core::protocols=info"] {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let mut config = match &config_path {
        Some(path) => Config::from_file(path)?,
        None => Config::embedded_default()?,
    };
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    // Telemetry starts first, so that the gateway's own log events are exported too.
    let telemetry = Arc::new(Telemetry::start(&config)?);
    // Log lines go to stderr in batches, written by a thread of their own.
    let stderr_log = StderrLog::start().context("cannot start the log writer")?;
    // A panic's message too, so that a panicking request's thread never waits for stderr.
    let panics_log = stderr_log.clone();
    std::panic::set_hook(Box::new(move |info| panics_log.panicked(info)));
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = match config.log.format {
        LogFormat::Text => LineFormat::Text,
        LogFormat::Json => LineFormat::Json,
    };
    let logs = fmt_layer(stderr_log.clone(), format, colours);
    // The per-request line skips `tracing`'s formatter unless something must see it as an
    // event (colours, or its export as an OTLP log record).
    let coloured = colours && format == LineFormat::Text;
    if !coloured && !telemetry.exports_request_lines() {
        write_request_lines_directly(stderr_log.clone(), format);
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(telemetry.log_layer())
        .init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // The blocking pool runs store writes (each fsync'd) and name lookups. fjall commits
    // one journal write at a time, so hundreds of threads waiting on it (tokio's default
    // allows 512) only cost memory: a burst of held requests would start one each.
    runtime
        .enable_all()
        .thread_name("tollgate")
        .max_blocking_threads(32);
    if config.limits.worker_threads > 0 {
        runtime.worker_threads(config.limits.worker_threads);
    }
    let runtime = runtime.build().context("cannot start the async runtime")?;
    let served = runtime.block_on(async {
        let gateway = tollgate_gateway::start(&config, telemetry.clone()).await?;
        print_banner(&gateway, &config, &telemetry);
        wait_for_signal().await;
        tracing::info!("shutting down");
        gateway.shutdown(Duration::from_secs(5)).await;
        // What is still queued goes to the collector if it answers soon.
        telemetry.shutdown(Duration::from_secs(2));
        Ok(())
    });
    // The last lines, before `main` prints an error, if there was one (not waiting long for
    // a stderr that takes nothing).
    stderr_log.flush_within(Duration::from_secs(2));
    served
}

fn print_banner(g: &RunningGateway, config: &Config, telemetry: &Telemetry) {
    let created = |yes: bool| if yes { " (created)" } else { "" };
    println!("Tollgate is running.");
    println!("  egress proxy: http://{}", g.egress);
    for (agent, addr) in &g.agent_listeners {
        println!("  agent listener: {agent} http://{addr}");
    }
    println!(
        "  admin API: http://{}  (token in {}{})",
        g.admin,
        g.admin_token.display(),
        created(g.admin_token_created)
    );
    println!("  telemetry: {}", telemetry.summary());
    println!(
        "  gateway CA: {}{}",
        g.ca_cert.display(),
        created(g.ca_created)
    );
    for agent in &config.agents {
        for peer in &agent.peers {
            println!("  agent {} ({:?}) from {peer}", agent.id, agent.run_mode);
        }
    }
    println!("Try it:");
    println!(
        "  curl -x http://{} --cacert {} https://example.com/",
        g.egress,
        g.ca_cert.display()
    );
    println!("ready");
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
}
