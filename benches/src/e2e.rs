//! End-to-end load comparison: a client talking to an origin directly, and through the
//! `tollgate` gateway (plain HTTP: identity, the default Cedar policies' allow path, SSRF
//! guard, forwarding), measured side by side in one run on the same machine.
//!
//! Everything runs on loopback: an origin server that answers every request with a fixed
//! body, the gateway as a child process (the release binary users run, logging at its
//! default level), and a closed-loop load generator written here (N keep-alive HTTP/1.1
//! connections, each sending its next request as soon as the previous response is read).
//! Configurations are measured in interleaved rounds so that drift on a shared machine hits
//! both alike; the table reports the median round of each.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_benches::http::{content_length, find_head_end};
use tollgate_benches::origin::{connections_accepted, start_origin};
use tollgate_benches::{Gateway, TempDir};

/// Compare direct and through-Tollgate request rates and latencies (also with OpenTelemetry
/// export on and its collector unreachable).
#[derive(Parser)]
struct Args {
    /// The `tollgate` binary to benchmark.
    #[arg(long)]
    gateway: PathBuf,
    /// Also write the Markdown table here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Seconds per measured round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds per configuration (interleaved; the two gateway routes alternate their order).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Worker threads of the gateway (0: one per CPU, the gateway's default).
    #[arg(long, default_value_t = 0)]
    gateway_threads: usize,
    /// A one-round, one-second smoke run.
    #[arg(long)]
    quick: bool,
}

/// One measured round.
#[derive(Clone)]
struct Round {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    gateway_cpu: Option<Duration>,
}

impl Round {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.seconds = 1;
        args.rounds = 1;
    }
    // The origin gets one thread of its own, the load generator two; the gateway process
    // uses its default (one worker per CPU). All of them share the machine's cores.
    let origin_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let body = vec![b'x'; args.body_bytes];
    let origin = origin_rt.block_on(start_origin(body))?;
    let dir = TempDir::new("tollgate-bench")?;
    let config = gateway_config(dir.path(), args.gateway_threads)?;
    let mut gateway = Gateway::start(&args.gateway, dir, &config)?;
    // The same gateway with OpenTelemetry export on (spans, metrics, logs), once with a
    // collector that answers (a loopback sink that takes every export and answers 200) and
    // once with its collector unreachable (a loopback port nobody listens on): a collector
    // that is down must not cost requests anything.
    // The sink has a thread of its own: on the origin's, exports would queue behind the load.
    let sink_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let sink = sink_rt.block_on(start_origin(Vec::new()))?;
    let exporting_to = |name: &str, collector: SocketAddr| -> anyhow::Result<Gateway> {
        let dir = TempDir::new(name)?;
        let config = format!(
            "{}\n[telemetry]\nendpoint = \"http://{collector}\"\n",
            gateway_config(dir.path(), args.gateway_threads)?
        );
        Gateway::start(&args.gateway, dir, &config)
    };
    let mut gateway_up = exporting_to("tollgate-bench-otel-up", sink)?;
    let mut gateway_down = exporting_to("tollgate-bench-otel-down", unreachable_address()?)?;
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let direct_req = format!("GET /bench HTTP/1.1\r\nHost: {origin}\r\n\r\n");
    // Through the gateway the origin is named api.github.com (pinned to the loopback origin),
    // so the request is decided by the shipped default policies' allow path.
    let github = format!("api.github.com:{}", origin.port());
    let proxied_req = format!("GET http://{github}/bench HTTP/1.1\r\nHost: {github}\r\n\r\n");
    let duration = Duration::from_secs(args.seconds);
    // Warm up both paths (connections, pools, caches) before measuring.
    load_rt.block_on(run_load(
        origin,
        &direct_req,
        args.connections,
        Duration::from_millis(500),
    ))?;
    for warm in [&gateway, &gateway_up, &gateway_down] {
        load_rt.block_on(run_load(
            warm.egress,
            &proxied_req,
            args.connections,
            Duration::from_millis(500),
        ))?;
    }

    // The same route to a host a credential rule covers, inside an open tool call: the token
    // injection hit path (the token is fetched once, in the warm-up).
    let graph = format!("graph.microsoft.com:{}", origin.port());
    let injected_req = format!("GET http://{graph}/bench HTTP/1.1\r\nHost: {graph}\r\n\r\n");
    open_tool_call(&gateway)?;
    load_rt.block_on(run_load(
        gateway.egress,
        &injected_req,
        args.connections,
        Duration::from_millis(500),
    ))?;

    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    let mut injected = Vec::new();
    let mut collector_up = Vec::new();
    let mut collector_down = Vec::new();
    let routes = [
        (&gateway, &proxied_req),
        (&gateway, &injected_req),
        (&gateway_up, &proxied_req),
        (&gateway_down, &proxied_req),
    ];
    for round in 0..args.rounds {
        direct.push(load_rt.block_on(run_load(origin, &direct_req, args.connections, duration))?);
        // The gateway route measured first in a round comes out slower on this kind of
        // machine; rotating the order keeps that out of the comparison.
        for turn in 0..routes.len() {
            let route = (round + turn) % routes.len();
            let (through, request) = routes[route];
            let measured = measure(through, &load_rt, request, args.connections, duration)?;
            [
                &mut proxied,
                &mut injected,
                &mut collector_up,
                &mut collector_down,
            ][route]
                .push(measured);
        }
    }
    let direct = median(direct);
    let proxied = median(proxied);
    let injected = median(injected);
    let collector_up = median(collector_up);
    let collector_down = median(collector_down);
    let rss = gateway.peak_rss_kib();
    let dropped_up = spans_dropped(&gateway_up)?;
    let dropped_down = spans_dropped(&gateway_down)?;
    gateway.stop();
    gateway_up.stop();
    gateway_down.stop();

    let measured = Measured {
        direct,
        proxied,
        injected,
        collector_up,
        collector_down,
        dropped_up,
        dropped_down,
    };
    let table = render(&args, &measured, rss);
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    let m = &measured;
    if [
        &m.direct,
        &m.proxied,
        &m.injected,
        &m.collector_up,
        &m.collector_down,
    ]
    .iter()
    .any(|r| r.requests == 0)
    {
        bail!("a configuration completed no requests");
    }
    Ok(())
}

fn median(mut rounds: Vec<Round>) -> Round {
    rounds.sort_by(|a, b| a.rps().total_cmp(&b.rps()));
    rounds.swap_remove(rounds.len() / 2)
}

/// The median rounds of one run.
struct Measured {
    direct: Round,
    proxied: Round,
    injected: Round,
    /// Plain HTTP through a gateway exporting to a collector that answers.
    collector_up: Round,
    /// Plain HTTP through a gateway exporting to an unreachable collector.
    collector_down: Round,
    /// Spans each of those two dropped over the whole run.
    dropped_up: u64,
    dropped_down: u64,
}

fn render(args: &Args, m: &Measured, gateway_rss_kib: Option<u64>) -> String {
    let (direct, proxied, injected) = (&m.direct, &m.proxied, &m.injected);
    let ms = |r: &Round, q: f64| r.latency_us.value_at_quantile(q) as f64 / 1000.0;
    let row = |name: &str, r: &Round| {
        let cpu = r
            .gateway_cpu
            .map(|c| {
                format!(
                    "{:.2}",
                    c.as_secs_f64() / r.requests.max(1) as f64 * 10_000.0
                )
            })
            .unwrap_or_else(|| "–".into());
        format!(
            "| {name} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {cpu} | {:.0}% |",
            r.rps(),
            ms(r, 0.5),
            ms(r, 0.99),
            r.latency_us.max() as f64 / 1000.0,
            r.errors,
            r.rps() / direct.rps() * 100.0,
        )
    };
    let mut t = String::new();
    t.push_str(&format!(
        "HTTP/1.1, {} connections, {} B responses, {} round(s) of {} s each (median round shown)\n\n",
        args.connections, args.body_bytes, args.rounds, args.seconds
    ));
    t.push_str("| configuration | req/s | p50 ms | p99 ms | max ms | errors | gateway CPU s / 10k req | of direct |\n");
    t.push_str("|---|---|---|---|---|---|---|---|\n");
    t.push_str(&row("direct (client → origin)", direct));
    t.push('\n');
    t.push_str(&row(
        "Tollgate plain HTTP (identity + default Cedar policies + SSRF guard + forward)",
        proxied,
    ));
    t.push('\n');
    t.push_str(&row(
        "Tollgate plain HTTP + token injection (cache hit, in a tool call)",
        injected,
    ));
    t.push('\n');
    t.push_str(&row(
        "Tollgate plain HTTP, OpenTelemetry export on, collector up",
        &m.collector_up,
    ));
    t.push('\n');
    t.push_str(&row(
        "Tollgate plain HTTP, OpenTelemetry export on, collector unreachable",
        &m.collector_down,
    ));
    t.push('\n');
    t.push_str(&format!(
        "\nToken injection: {:.1}% of the throughput without it (same run).\n",
        injected.rps() / proxied.rps() * 100.0
    ));
    t.push_str(&format!(
        "\nOpenTelemetry export on: {:.1}% of the throughput without it with the collector up \
         ({} spans dropped), {:.1}% with it unreachable ({} spans dropped and counted); \
         unreachable vs. up: {:.1}% (same run).\n",
        m.collector_up.rps() / proxied.rps() * 100.0,
        m.dropped_up,
        m.collector_down.rps() / proxied.rps() * 100.0,
        m.dropped_down,
        m.collector_down.rps() / m.collector_up.rps() * 100.0,
    ));
    t.push_str(&format!(
        "\nOrigin connections accepted in the whole run: {}\n",
        connections_accepted()
    ));
    if let Some(kib) = gateway_rss_kib {
        t.push_str(&format!(
            "\nTollgate peak RSS: {:.1} MiB\n",
            kib as f64 / 1024.0
        ));
    }
    t
}

/// Runs `connections` closed-loop clients against `addr` for `duration`.
async fn run_load(
    addr: SocketAddr,
    request: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Round> {
    let stop = Arc::new(AtomicBool::new(false));
    let request: Arc<[u8]> = request.as_bytes().into();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stop = stop.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(
            async move { client(addr, &request, &stop).await },
        ));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut errors) = (0, 0);
    for task in tasks {
        let (hist, ok, failed) = task.await?;
        latency_us.add(&hist)?;
        requests += ok;
        errors += failed;
    }
    Ok(Round {
        requests,
        errors,
        elapsed: started.elapsed(),
        latency_us,
        gateway_cpu: None,
    })
}

/// One keep-alive connection; reconnects after an error. Returns (latencies, ok, errors).
async fn client(addr: SocketAddr, request: &[u8], stop: &AtomicBool) -> (Histogram<u64>, u64, u64) {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds are valid");
    let (mut ok, mut errors) = (0, 0);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    'connections: while !stop.load(Ordering::Relaxed) {
        let Ok(mut socket) = TcpStream::connect(addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = socket.set_nodelay(true);
        buf.clear();
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            if socket.write_all(request).await.is_err() {
                errors += 1;
                continue 'connections;
            }
            // Read one response: head, then content-length bytes of body.
            let (head_end, body_len) = loop {
                if let Some(end) = find_head_end(&buf) {
                    match content_length(&buf[..end]) {
                        Some(len) => break (end, len),
                        None => {
                            errors += 1;
                            continue 'connections;
                        }
                    }
                }
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        errors += 1;
                        continue 'connections;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            while buf.len() < head_end + body_len {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        errors += 1;
                        continue 'connections;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let status_ok = buf.starts_with(b"HTTP/1.1 200");
            buf.drain(..head_end + body_len);
            if status_ok {
                ok += 1;
                let _ = hist.record(start.elapsed().as_micros().max(1) as u64);
            } else {
                errors += 1;
            }
        }
    }
    (hist, ok, errors)
}

/// The bench agent's configuration: token injection for graph.microsoft.com (a static
/// provider), both bench hosts pinned to the loopback origin.
fn gateway_config(dir: &Path, threads: usize) -> anyhow::Result<String> {
    let token_file = dir.join("static-token");
    std::fs::write(&token_file, "bench-static-token\n")?;
    Ok(format!(
        "[limits]\nworker_threads = {threads}\n\
         [upstream]\nallow_networks = [\"127.0.0.1/32\"]\n\
         resolve = {{ \"api.github.com\" = \"127.0.0.1\", \"graph.microsoft.com\" = \"127.0.0.1\" }}\n\
         [[identity_providers]]\nname = \"dev\"\nkind = \"static\"\ntoken = {{ file = {token_file:?} }}\n\
         [[credential_rules]]\nhosts = [\"graph.microsoft.com\"]\naudience = \"https://graph.microsoft.com/.default\"\n\
         [[agents]]\nid = \"bench\"\nrun_mode = \"Autonomous\"\nidentity = \"dev\"\npeers = [\"127.0.0.1\"]\n"
    ))
}

/// A loopback address nothing listens on (bound, then closed).
fn unreachable_address() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// `tollgate_telemetry_spans_dropped_total` from the gateway's `/metrics`.
fn spans_dropped(gateway: &Gateway) -> anyhow::Result<u64> {
    let answer = gateway.admin_api()?.call("GET", "/metrics", None)?;
    String::from_utf8_lossy(&answer.body)
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_telemetry_spans_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("no tollgate_telemetry_spans_dropped_total in /metrics")
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

/// One round of load through the gateway, with the gateway's CPU time for it.
fn measure(
    gateway: &Gateway,
    runtime: &tokio::runtime::Runtime,
    request: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Round> {
    let before = gateway.cpu_time();
    let mut round = runtime.block_on(run_load(gateway.egress, request, connections, duration))?;
    round.gateway_cpu = match (before, gateway.cpu_time()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    Ok(round)
}
