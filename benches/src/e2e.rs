//! What does Tollgate cost? One run, side by side on the same machine and loopback: a client
//! talking to an origin directly, through a bare pingora pass-through proxy (the framework
//! alone), through Squid (what users would otherwise run), and through Tollgate — plain
//! HTTP, and HTTPS via `CONNECT` with interception and upstream TLS.
//!
//! - **Origins**: one plain and one TLS origin per response size, in this process (one
//!   thread), answering every request with the same 200.
//! - **Tollgate**: the release `tollgate` binary with its default policies; agent `bench`
//!   (Autonomous) inside an open tool call, so every request goes through identity, the
//!   policy decision (allow path) and telemetry (OpenTelemetry export of spans, metrics and
//!   logs to a loopback sink on a thread of its own), and is audited. HTTPS also gets token
//!   injection (a static provider; a cache hit) and the scan of the answer for the token:
//!   a token never travels over plain HTTP, so the plain row goes to a host no credential
//!   rule covers. HTTPS: the client trusts the gateway's CA, the gateway verifies the origin
//!   against the benchmark's origin CA; leaf certificates are warm (the warm-up minted them).
//! - **Bare pass-through**: `tollgate-passthrough` (`src/passthrough.rs`), pingora's
//!   `ProxyHttp` with nothing but forwarding; plain HTTP only.
//! - **Squid**: Debian's `squid-openssl`, configured by [`tollgate_benches::squid`] with the
//!   same allowlist, no caching, and `ssl_bump` for HTTPS; skipped with a note if missing.
//! - **Load**: the closed-loop generator in [`tollgate_benches::load`], N keep-alive HTTP/1.1
//!   connections, on two threads of this process.
//!
//! Each cell (response size × connections) measures every configuration in interleaved
//! rounds, rotating the order each round so drift hits all alike; the table reports each
//! configuration's median round, and the ratios are computed within the run.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rustls::pki_types::ServerName;
use tollgate_benches::load::{run_load, runtime, Round, Target};
use tollgate_benches::origin::{start_origin, start_tls_origin};
use tollgate_benches::scale::{self, Scale};
use tollgate_benches::squid::{self, Squid};
use tollgate_benches::tls::{client_trusting, BenchCa};
use tollgate_benches::{procfs, Gateway, TempDir};

/// Compare direct, bare pingora, Squid and Tollgate, plain HTTP and intercepted HTTPS.
#[derive(Parser)]
struct Args {
    /// The `tollgate` binary.
    #[arg(long)]
    gateway: PathBuf,
    /// The bare pass-through proxy (`tollgate-passthrough`).
    #[arg(long)]
    passthrough: PathBuf,
    /// Squid (built with OpenSSL, for ssl_bump); its rows are skipped if it is missing.
    #[arg(long, default_value = "/usr/sbin/squid")]
    squid: PathBuf,
    /// Also write the Markdown tables here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Response body sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "1024,16384")]
    body_bytes: Vec<usize>,
    /// Concurrent keep-alive connections.
    #[arg(long, value_delimiter = ',', default_value = "32,256")]
    connections: Vec<usize>,
    /// Seconds per measured round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds per configuration and cell (interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// A smoke run: 1 KB, 32 connections, one round of one second.
    #[arg(long)]
    quick: bool,
    /// Only the plain-HTTP rows (direct, the bare pass-through, Tollgate): for profiling the
    /// gateway's plain path alone, side by side with the pass-through.
    #[arg(long)]
    plain_only: bool,
    /// Pace the load at this many requests per second (all connections together) instead of
    /// as fast as each proxy answers: every proxy that keeps up serves the same requests, and
    /// its CPU time per request is its own work, not its share of a saturated machine (the
    /// measure for comparing two builds of the gateway; the median round is then the one of
    /// median CPU per request).
    #[arg(long)]
    rate: Option<u32>,
    /// Leave out the rows of the gateway at scale (a second gateway holding
    /// [`Scale::LARGE`]'s agents, policies, credential rules and open tool calls).
    #[arg(long)]
    no_scale: bool,
}

/// The configurations compared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Direct,
    Passthrough,
    Squid,
    Tollgate,
    DirectTls,
    TollgateTls,
    SquidTls,
    TollgateScale,
    TollgateScaleTls,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Direct => "direct (client → origin)",
            Config::Passthrough => "bare pingora pass-through",
            Config::Squid => "Squid forward proxy (allowlist)",
            Config::Tollgate => "Tollgate plain HTTP (identity + policy + telemetry + audit)",
            Config::DirectTls => "direct HTTPS (client → origin)",
            Config::TollgateTls => {
                "Tollgate HTTPS: CONNECT + interception + upstream TLS (+ token injection and scan)"
            }
            Config::SquidTls => "Squid HTTPS: CONNECT + ssl_bump + upstream TLS",
            Config::TollgateScale => "Tollgate plain HTTP, at scale (see below)",
            Config::TollgateScaleTls => "Tollgate HTTPS, at scale (see below)",
        }
    }

    /// The direct configuration its "of direct" ratio is taken against.
    fn direct(self) -> Config {
        match self {
            Config::DirectTls
            | Config::TollgateTls
            | Config::SquidTls
            | Config::TollgateScaleTls => Config::DirectTls,
            _ => Config::Direct,
        }
    }
}

const GITHUB: &str = "api.github.com";
const GRAPH: &str = "graph.microsoft.com";

/// The bare pass-through proxy, as a child process.
struct Passthrough {
    child: Child,
    addr: SocketAddr,
}

impl Passthrough {
    fn start(binary: &Path) -> anyhow::Result<Passthrough> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut child = Command::new(binary)
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--resolve", &format!("{GITHUB}=127.0.0.1")])
            .args(["--resolve", &format!("{GRAPH}=127.0.0.1")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        if let Some(out) = child.stdout.take() {
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line)?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("the pass-through proxy did not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Passthrough { child, addr })
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process behind a configuration, for its CPU time and memory.
enum Proxy<'a> {
    None,
    Gateway(&'a Gateway),
    Passthrough(&'a Passthrough),
    Squid(&'a Squid),
}

impl Proxy<'_> {
    fn cpu_time(&self) -> Option<Duration> {
        match self {
            Proxy::None => None,
            Proxy::Gateway(g) => g.cpu_time(),
            Proxy::Passthrough(p) => procfs::cpu_time(p.child.id()),
            Proxy::Squid(s) => s.cpu_time(),
        }
    }

    fn rss_kib(&self) -> Option<u64> {
        match self {
            Proxy::None => None,
            Proxy::Gateway(g) => g.rss_kib(),
            Proxy::Passthrough(p) => procfs::status_kib(p.child.id(), "VmRSS"),
            Proxy::Squid(s) => s.rss_kib(),
        }
    }
}

/// One cell's medians.
struct Cell {
    body_bytes: usize,
    connections: usize,
    rows: Vec<(Config, Round)>,
}

impl Cell {
    fn get(&self, config: Config) -> Option<&Round> {
        self.rows.iter().find(|(c, _)| *c == config).map(|(_, r)| r)
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.seconds = 1;
        args.rounds = 1;
        args.body_bytes = vec![1024];
        args.connections = vec![32];
    }
    let origin_ca = BenchCa::new("Tollgate bench origin CA")?;
    let certs = TempDir::new("tollgate-bench-certs")?;
    let (origin_ca_file, _) = origin_ca.write(certs.path(), "origin-ca")?;
    let origin_tls = origin_ca.server_config(&[GITHUB, GRAPH])?;

    // The origins have one thread of their own, the telemetry sink another, the load
    // generator two; the proxies their defaults (one worker per CPU; Squid one process).
    let origin_rt = runtime(1)?;
    let mut origins = Vec::new();
    for &size in &args.body_bytes {
        let body = vec![b'x'; size];
        let plain = origin_rt.block_on(start_origin(body.clone()))?;
        let tls = origin_rt.block_on(start_tls_origin(body, origin_tls.clone()))?;
        origins.push((size, plain, tls));
    }
    let sink_rt = runtime(1)?;
    let sink = sink_rt.block_on(start_origin(Vec::new()))?;
    let load_rt = runtime(2)?;

    let dir = TempDir::new("tollgate-bench")?;
    let tls_ports: Vec<u16> = origins.iter().map(|(_, _, tls)| tls.port()).collect();
    let config = gateway_config(dir.path(), &origin_ca_file, &tls_ports, sink)?;
    let mut gateway = Gateway::start(&args.gateway, dir, &config)?;
    open_tool_call(&gateway)?;
    let gateway_ca = std::fs::read(gateway.dir().join("data/ca.pem"))?;
    let mut at_scale = match args.no_scale {
        true => None,
        false => Some(start_at_scale(
            &args.gateway,
            &origin_ca_file,
            &tls_ports,
            sink,
        )?),
    };
    let scale_ca = match &at_scale {
        Some(g) => Some(client_trusting(&std::fs::read(
            g.dir().join("data/ca.pem"),
        )?)?),
        None => None,
    };
    let passthrough = Passthrough::start(&args.passthrough)?;
    let (squid, squid_note) = match squid::unavailable(&args.squid) {
        Some(why) => (None, Some(why)),
        None => match Squid::start(&args.squid, &[GITHUB, GRAPH], &origin_ca_file) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
    };

    let origin_client = client_trusting(origin_ca.cert_pem().as_bytes())?;
    let gateway_client = client_trusting(&gateway_ca)?;
    let squid_client = match &squid {
        Some(s) => Some(client_trusting(s.bump_ca.cert_pem().as_bytes())?),
        None => None,
    };
    let name = |host: &'static str| ServerName::try_from(host).context("server name");

    let started = Instant::now();
    let mut cells = Vec::new();
    for &(size, plain, tls) in &origins {
        let get = |target: String, host: String| -> Arc<[u8]> {
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n")
                .into_bytes()
                .into()
        };
        let github = format!("{GITHUB}:{}", plain.port());
        let (github_tls, graph_tls) = (
            format!("{GITHUB}:{}", tls.port()),
            format!("{GRAPH}:{}", tls.port()),
        );
        let mut targets: Vec<(Config, Target, Proxy)> = vec![
            (
                Config::Direct,
                Target {
                    connect: plain,
                    tunnel: None,
                    tls: None,
                    request: get("/bench".into(), plain.to_string()),
                },
                Proxy::None,
            ),
            (
                Config::Passthrough,
                Target {
                    connect: passthrough.addr,
                    tunnel: None,
                    tls: None,
                    request: get(format!("http://{github}/bench"), github.clone()),
                },
                Proxy::Passthrough(&passthrough),
            ),
            (
                Config::Tollgate,
                Target {
                    connect: gateway.egress,
                    tunnel: None,
                    tls: None,
                    request: get(format!("http://{github}/bench"), github.clone()),
                },
                Proxy::Gateway(&gateway),
            ),
            (
                Config::DirectTls,
                Target {
                    connect: tls,
                    tunnel: None,
                    tls: Some((origin_client.clone(), name(GITHUB)?)),
                    request: get("/bench".into(), github_tls.clone()),
                },
                Proxy::None,
            ),
            (
                Config::TollgateTls,
                Target {
                    connect: gateway.egress,
                    tunnel: Some(graph_tls.clone()),
                    tls: Some((gateway_client.clone(), name(GRAPH)?)),
                    request: get("/bench".into(), graph_tls.clone()),
                },
                Proxy::Gateway(&gateway),
            ),
        ];
        if let (Some(scaled), Some(client)) = (&at_scale, &scale_ca) {
            targets.push((
                Config::TollgateScale,
                Target {
                    connect: scaled.egress,
                    tunnel: None,
                    tls: None,
                    request: get(format!("http://{github}/bench"), github.clone()),
                },
                Proxy::Gateway(scaled),
            ));
            targets.push((
                Config::TollgateScaleTls,
                Target {
                    connect: scaled.egress,
                    tunnel: Some(graph_tls.clone()),
                    tls: Some((client.clone(), name(GRAPH)?)),
                    request: get("/bench".into(), graph_tls.clone()),
                },
                Proxy::Gateway(scaled),
            ));
        }
        if let (Some(squid), Some(client)) = (&squid, &squid_client) {
            targets.push((
                Config::Squid,
                Target {
                    connect: squid.addr,
                    tunnel: None,
                    tls: None,
                    request: get(format!("http://{github}/bench"), github.clone()),
                },
                Proxy::Squid(squid),
            ));
            targets.push((
                Config::SquidTls,
                Target {
                    connect: squid.addr,
                    tunnel: Some(github_tls.clone()),
                    tls: Some((client.clone(), name(GITHUB)?)),
                    request: get("/bench".into(), github_tls.clone()),
                },
                Proxy::Squid(squid),
            ));
        }
        if args.plain_only {
            targets.retain(|(config, _, _)| {
                matches!(
                    config,
                    Config::Direct | Config::Passthrough | Config::Tollgate | Config::TollgateScale
                )
            });
        }
        for &connections in &args.connections {
            // Warm every path: connections, pools, the token cache, leaf certificates.
            for (_, target, _) in &targets {
                let warm = Duration::from_millis(500);
                load_rt.block_on(run_load(target, connections, warm, None))?;
            }
            let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); targets.len()];
            for round in 0..args.rounds {
                for turn in 0..targets.len() {
                    let i = (round + turn) % targets.len();
                    let (_, target, proxy) = &targets[i];
                    let round = measure(&load_rt, target, proxy, connections, &args)?;
                    rounds[i].push(round);
                }
            }
            let rows = targets
                .iter()
                .zip(rounds)
                .map(|((config, _, _), r)| (*config, median(r, args.rate.is_some())))
                .collect();
            let cell = Cell {
                body_bytes: size,
                connections,
                rows,
            };
            eprintln!(
                "{} B × {} connections done ({:.0} s so far)",
                size,
                connections,
                started.elapsed().as_secs_f64()
            );
            cells.push(cell);
        }
    }
    let peaks = [
        ("Tollgate", gateway.peak_rss_kib()),
        (
            "bare pass-through",
            procfs::status_kib(passthrough.child.id(), "VmHWM"),
        ),
        ("Squid", squid.as_ref().and_then(Squid::peak_rss_kib)),
        (
            "Tollgate at scale",
            at_scale.as_ref().and_then(Gateway::peak_rss_kib),
        ),
    ];
    gateway.stop();
    if let Some(g) = &mut at_scale {
        g.stop();
    }
    let table = render(&args, &cells, &peaks, squid_note.as_deref());
    tollgate_benches::report(&table, args.out.as_deref())?;
    if cells
        .iter()
        .flat_map(|c| c.rows.iter())
        .any(|(_, r)| r.requests == 0)
    {
        bail!("a configuration completed no requests");
    }
    Ok(())
}

/// The median round: by req/s, or, paced (when all serve the same), by CPU per request.
fn median(mut rounds: Vec<Round>, paced: bool) -> Round {
    match paced {
        true => rounds.sort_by(|a, b| {
            let cost = |r: &Round| r.cpu_per_request().unwrap_or_default();
            cost(a).total_cmp(&cost(b))
        }),
        false => rounds.sort_by(|a, b| a.rps().total_cmp(&b.rps())),
    }
    rounds.swap_remove(rounds.len() / 2)
}

/// One round of load, with the proxy's CPU time for it and its memory after.
fn measure(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    proxy: &Proxy,
    connections: usize,
    args: &Args,
) -> anyhow::Result<Round> {
    let before = proxy.cpu_time();
    let duration = Duration::from_secs(args.seconds);
    let mut round = runtime.block_on(run_load(target, connections, duration, args.rate))?;
    round.proxy_cpu = match (before, proxy.cpu_time()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    round.proxy_rss_kib = proxy.rss_kib();
    Ok(round)
}

fn render(
    args: &Args,
    cells: &[Cell],
    peaks: &[(&str, Option<u64>)],
    squid_note: Option<&str>,
) -> String {
    let pace = match args.rate {
        Some(rate) => format!("paced at {rate} req/s (the median round by CPU per request)"),
        None => "closed loop (the median round by req/s)".into(),
    };
    let mut t = format!(
        "HTTP/1.1 keep-alive, {} round(s) of {} s per configuration and cell, interleaved, {pace}; {} CPUs\n\n",
        args.rounds,
        args.seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    t.push_str("| body | conns | configuration | req/s | p50 ms | p99 ms | max ms | errors | proxy CPU s / 10k req | proxy RSS MiB | of direct |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for cell in cells {
        for (config, r) in &cell.rows {
            let cpu = r
                .cpu_per_request()
                .map(|c| format!("{:.2}", c * 10_000.0))
                .unwrap_or_else(|| "–".into());
            let rss = r
                .proxy_rss_kib
                .map(|k| format!("{:.0}", k as f64 / 1024.0))
                .unwrap_or_else(|| "–".into());
            let of_direct = cell
                .get(config.direct())
                .map(|d| format!("{:.0}%", r.rps() / d.rps() * 100.0))
                .unwrap_or_default();
            t.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {cpu} | {rss} | {of_direct} |\n",
                size_label(cell.body_bytes),
                cell.connections,
                config.label(),
                r.rps(),
                r.ms(0.5),
                r.ms(0.99),
                r.latency_us.max() as f64 / 1000.0,
                r.errors,
            ));
        }
    }
    t.push_str("\nTollgate's ratios, same run (targets: plain ≥ 85% of the bare pass-through's req/s at ≤ 1.25× its CPU per request, ≥ 1.8× Squid; HTTPS ≥ 2× Squid with ssl_bump; p99 ≤ Squid's at 32 connections; at scale ≥ 95% of the one-agent gateway's):\n\n");
    t.push_str("| body | conns | plain ÷ direct | plain ÷ bare pingora | plain CPU/req ÷ bare pingora's | plain ÷ Squid | plain p99 ÷ Squid's | HTTPS ÷ direct HTTPS | HTTPS ÷ Squid ssl_bump | HTTPS p99 ÷ Squid's | plain at scale ÷ one agent | HTTPS at scale ÷ one agent |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for cell in cells {
        let ratio = |a: Config, b: Config, percent: bool| match (cell.get(a), cell.get(b)) {
            (Some(a), Some(b)) if percent => format!("{:.0}%", a.rps() / b.rps() * 100.0),
            (Some(a), Some(b)) => format!("{:.2}×", a.rps() / b.rps()),
            _ => "–".into(),
        };
        let cpu = match (
            cell.get(Config::Tollgate).and_then(Round::cpu_per_request),
            cell.get(Config::Passthrough)
                .and_then(Round::cpu_per_request),
        ) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "–".into(),
        };
        let p99 = |a: Config, b: Config| match (cell.get(a), cell.get(b)) {
            (Some(a), Some(b)) => format!("{:.2}×", a.ms(0.99) / b.ms(0.99)),
            _ => "–".into(),
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {cpu} | {} | {} | {} | {} | {} | {} | {} |\n",
            size_label(cell.body_bytes),
            cell.connections,
            ratio(Config::Tollgate, Config::Direct, true),
            ratio(Config::Tollgate, Config::Passthrough, true),
            ratio(Config::Tollgate, Config::Squid, false),
            p99(Config::Tollgate, Config::Squid),
            ratio(Config::TollgateTls, Config::DirectTls, true),
            ratio(Config::TollgateTls, Config::SquidTls, false),
            p99(Config::TollgateTls, Config::SquidTls),
            ratio(Config::TollgateScale, Config::Tollgate, true),
            ratio(Config::TollgateScaleTls, Config::TollgateTls, true),
        ));
    }
    t.push('\n');
    for (name, peak) in peaks {
        if let Some(kib) = peak {
            t.push_str(&format!(
                "{name} peak RSS over the run: {:.1} MiB. ",
                *kib as f64 / 1024.0
            ));
        }
    }
    t.push('\n');
    if !args.no_scale {
        t.push_str(&format!(
            "\nAt scale: a second gateway, the same configuration plus {} (generated, none applying to the load's requests), under the same load.\n",
            Scale::LARGE.describe()
        ));
    }
    if let Some(note) = squid_note {
        t.push_str(&format!("\nSquid rows skipped: {note}\n"));
    }
    t
}

fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes & 1023 == 0 {
        format!("{} KB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// The bench agent: token injection for graph.microsoft.com over TLS on `tls_ports` (a static
/// provider), both bench hosts pinned to loopback, the origin CA trusted, telemetry to `sink`.
fn gateway_config(
    dir: &Path,
    origin_ca: &Path,
    tls_ports: &[u16],
    sink: SocketAddr,
) -> anyhow::Result<String> {
    let token_file = dir.join("static-token");
    std::fs::write(&token_file, "bench-static-token\n")?;
    Ok(format!(
        "[upstream]\nallow_networks = [\"127.0.0.1/32\"]\n\
         extra_ca_file = {origin_ca:?}\n\
         resolve = {{ \"{GITHUB}\" = \"127.0.0.1\", \"{GRAPH}\" = \"127.0.0.1\" }}\n\
         [[identity_providers]]\nname = \"dev\"\nkind = \"static\"\ntoken = {{ file = {token_file:?} }}\n\
         [[credential_rules]]\nhosts = [\"{GRAPH}\"]\nports = {tls_ports:?}\naudience = \"https://graph.microsoft.com/.default\"\n\
         [[agents]]\nid = \"bench\"\nrun_mode = \"Autonomous\"\nidentity = \"dev\"\npeers = [\"127.0.0.1\"]\n\
         limits = {{ connections = 100000 }}\n\
         [telemetry]\nendpoint = \"http://{sink}\"\n"
    ))
}

/// A second gateway like the first, holding [`Scale::LARGE`] besides the bench agent: its
/// tool calls open, ready for load. Prints how long that took.
fn start_at_scale(
    binary: &Path,
    origin_ca: &Path,
    tls_ports: &[u16],
    sink: SocketAddr,
) -> anyhow::Result<Gateway> {
    let scale = Scale::LARGE;
    let dir = TempDir::new("tollgate-bench-scale")?;
    let policy_dir = dir.path().join("policies");
    scale::write_policies(&policy_dir, &scale)?;
    let mut config = gateway_config(dir.path(), origin_ca, tls_ports, sink)?;
    config.push_str(&scale::config(&scale, &policy_dir, "dev")?);
    let started = Instant::now();
    let gateway = Gateway::start(binary, dir, &config)?;
    let ready = started.elapsed();
    open_tool_call(&gateway)?;
    scale::open_tool_calls(&gateway, &scale)?;
    eprintln!(
        "gateway at scale ({}): started in {:.1} s, tool calls opened in {:.1} s more",
        scale.describe(),
        ready.as_secs_f64(),
        (started.elapsed() - ready).as_secs_f64()
    );
    Ok(gateway)
}

/// Opens tool call "bench" for the bench agent on the admin API.
fn open_tool_call(gateway: &Gateway) -> anyhow::Result<()> {
    let answer = gateway.admin_api()?.call(
        "POST",
        "/v1/agents/bench/tool-calls",
        Some(r#"{"id":"bench"}"#),
    )?;
    if answer.status != 201 {
        bail!("opening the bench tool call failed: {}", answer.status_line);
    }
    Ok(())
}
