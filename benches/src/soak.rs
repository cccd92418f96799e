//! Does Tollgate leak? A soak run: mixed load against the release `tollgate` binary for a
//! long time (10 minutes by default), sampling the gateway's resident memory and open file
//! descriptors as it goes, and fitting a line through the second half of the samples (after
//! warm-up): a slope that stays positive over a long run is a leak.
//!
//! - **Origins**: a plain and a TLS origin in this process (one thread), answering 1 KB.
//! - **Tollgate**: the release binary with its default policies and telemetry export to a
//!   loopback sink; agent `bench` (Autonomous, in an open tool call: token injection) on
//!   127.0.0.1, agent `reviewer` (Review: its writes wait for a person) on 127.0.0.2.
//! - **Load**, in rounds of `--sample-seconds`: `--connections` closed-loop keep-alive
//!   clients in plain HTTP and as many HTTPS through `CONNECT` with interception (the load
//!   generator of [`tollgate_benches::load`]). Every round opens new connections, so
//!   connection set-up and tear-down (and a TLS handshake per tunnel) are part of the soak.
//! - **Approvals**: meanwhile, one `reviewer` write at a time is held and approved over the
//!   admin API, so held requests, approval records and releases are exercised too.
//!
//! After each round the gateway's `VmRSS`, its open file descriptors (`/proc/<pid>/fd`),
//! its threads and its store's memory (the `tollgate_storage_*` gauges of `/metrics`:
//! memtables, block cache, pinned index and filter blocks) are sampled, so that the store's
//! share of the memory is told from the rest. The output is a Markdown table of the samples,
//! the slopes, and the totals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_benches::gateway::AdminApi;
use tollgate_benches::http::status_code;
use tollgate_benches::load::{run_load, runtime, Target};
use tollgate_benches::origin::{start_origin, start_tls_origin};
use tollgate_benches::tls::{client_trusting, BenchCa};
use tollgate_benches::{Gateway, TempDir};

/// Run mixed load against the gateway for a long time and watch its memory and descriptors.
#[derive(Parser)]
struct Args {
    /// The `tollgate` binary.
    #[arg(long)]
    gateway: PathBuf,
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds between samples (each a round of load with fresh connections).
    #[arg(long, default_value_t = 10)]
    sample_seconds: u64,
    /// Keep-alive connections per kind of load (plain HTTP, HTTPS through CONNECT).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// A smoke run: 20 seconds, a sample every 2 seconds.
    #[arg(long)]
    quick: bool,
    /// Also write the Markdown output here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// An allowlisted host (default policies), pinned to the TLS origin on loopback: its requests
/// get a token.
const HOST: &str = "api.github.com";
/// An allowlisted host no credential rule covers (a token never travels over plain HTTP),
/// pinned to the plain origin on loopback.
const PLAIN_HOST: &str = "uploads.github.com";

/// One sample, taken after a round of load.
struct Sample {
    /// Since the start, in seconds.
    at: f64,
    rss_kib: u64,
    /// The store's memtables, block cache and pinned blocks (its `/metrics` gauges).
    store_kib: u64,
    /// The store's tables on disk.
    tables: u64,
    /// The most audit records that waited for the writer at once, so far.
    audit_queue_peak: u64,
    fds: u64,
    threads: u64,
    requests: u64,
    errors: u64,
    approvals: u64,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.minutes = 20.0 / 60.0;
        args.sample_seconds = 2;
    }
    let origin_ca = BenchCa::new("Tollgate soak origin CA")?;
    let certs = TempDir::new("tollgate-soak-certs")?;
    let (origin_ca_file, _) = origin_ca.write(certs.path(), "origin-ca")?;
    let origin_rt = runtime(1)?;
    let body = vec![b'x'; 1024];
    let plain = origin_rt.block_on(start_origin(body.clone()))?;
    let tls = origin_rt.block_on(start_tls_origin(body, origin_ca.server_config(&[HOST])?))?;
    let sink = origin_rt.block_on(start_origin(Vec::new()))?;

    let dir = TempDir::new("tollgate-soak")?;
    let config = gateway_config(dir.path(), &origin_ca_file, tls.port(), sink)?;
    let mut gateway = Gateway::start(&args.gateway, dir, &config)?;
    let admin = gateway.admin_api()?;
    let answer = admin.call(
        "POST",
        "/v1/agents/bench/tool-calls",
        Some(r#"{"id":"soak"}"#),
    )?;
    if answer.status != 201 {
        bail!("opening the soak tool call failed: {}", answer.status_line);
    }
    let gateway_client = client_trusting(&std::fs::read(gateway.dir().join("data/ca.pem"))?)?;
    let get = |host: &str| -> Arc<[u8]> {
        format!("GET /soak HTTP/1.1\r\nHost: {host}\r\n\r\n")
            .into_bytes()
            .into()
    };
    let plain_authority = format!("{PLAIN_HOST}:{}", plain.port());
    let tls_authority = format!("{HOST}:{}", tls.port());
    let plain_target = Target {
        connect: gateway.egress,
        tunnel: None,
        tls: None,
        request: format!(
            "GET http://{plain_authority}/soak HTTP/1.1\r\nHost: {plain_authority}\r\n\r\n"
        )
        .into_bytes()
        .into(),
    };
    let tunnel_target = Target {
        connect: gateway.egress,
        tunnel: Some(tls_authority.clone()),
        tls: Some((
            gateway_client,
            ServerName::try_from(HOST).context("server name")?,
        )),
        request: get(&tls_authority),
    };

    let load_rt = runtime(2)?;
    let stop = Arc::new(AtomicBool::new(false));
    let approvals = Arc::new(AtomicU64::new(0));
    let approval_errors = Arc::new(AtomicU64::new(0));
    let reviewer = load_rt.spawn(reviewer_writes(
        gateway.egress,
        format!("http://{plain_authority}/approved"),
        plain_authority.clone(),
        stop.clone(),
        approvals.clone(),
        approval_errors.clone(),
    ));
    let approver = {
        let stop = stop.clone();
        let errors = approval_errors.clone();
        std::thread::spawn(move || approve_all(&admin, &stop, &errors))
    };

    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let round = Duration::from_secs(args.sample_seconds);
    let started = Instant::now();
    let metrics = gateway.admin_api()?;
    let mut samples = vec![sample(&gateway, &metrics, started, 0, 0, 0)?];
    eprintln!(
        "soak: {:.1} min, {} + {} connections, a sample every {} s",
        args.minutes, args.connections, args.connections, args.sample_seconds
    );
    while started.elapsed() < total {
        let (a, b) = load_rt.block_on(async {
            tokio::join!(
                run_load(&plain_target, args.connections, round, None),
                run_load(&tunnel_target, args.connections, round, None)
            )
        });
        let (a, b) = (a?, b?);
        let s = sample(
            &gateway,
            &metrics,
            started,
            a.requests + b.requests,
            a.errors + b.errors,
            approvals.load(Ordering::Relaxed),
        )?;
        eprintln!(
            "  {:>6.0} s: RSS {:.1} MiB (store {:.1} MiB, {} tables, audit queue peak {}), {} fds, {} threads, {} requests, {} errors",
            s.at,
            s.rss_kib as f64 / 1024.0,
            s.store_kib as f64 / 1024.0,
            s.tables,
            s.audit_queue_peak,
            s.fds,
            s.threads,
            s.requests,
            s.errors
        );
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = approver.join();
    reviewer.abort();
    let approval_errors = approval_errors.load(Ordering::Relaxed);
    let report = render(&args, &samples, approval_errors);
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    if samples.iter().skip(1).all(|s| s.requests == 0) {
        gateway.keep_dir();
        bail!(
            "no request succeeded; see the gateway's log, {}",
            gateway.log_path().display()
        );
    }
    Ok(())
}

fn sample(
    gateway: &Gateway,
    metrics: &AdminApi,
    started: Instant,
    requests: u64,
    errors: u64,
    approvals: u64,
) -> anyhow::Result<Sample> {
    let answer = metrics.call("GET", "/metrics", None)?;
    let text = String::from_utf8_lossy(&answer.body);
    Ok(Sample {
        at: started.elapsed().as_secs_f64(),
        rss_kib: gateway.rss_kib().context("reading the gateway's VmRSS")?,
        store_kib: (gauge(&text, "tollgate_storage_write_buffer_bytes")?
            + gauge(&text, "tollgate_storage_block_cache_bytes")?
            + gauge(&text, "tollgate_storage_pinned_bytes")?)
            / 1024,
        tables: gauge(&text, "tollgate_storage_tables")?,
        audit_queue_peak: gauge(&text, "tollgate_audit_queue_peak_records")?,
        fds: gateway.open_fds().context("counting the gateway's fds")?,
        threads: gateway.threads().unwrap_or(0),
        requests,
        errors,
        approvals,
    })
}

/// A gauge's value in the gateway's `/metrics` text.
fn gauge(metrics: &str, name: &str) -> anyhow::Result<u64> {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {name} in the gateway's /metrics"))
}

/// Agent `reviewer` (127.0.0.2): one write at a time, each held until approved, until
/// `stop`. Counts the released (200) and the failed.
async fn reviewer_writes(
    egress: SocketAddr,
    url: String,
    host: String,
    stop: Arc<AtomicBool>,
    released: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    let request = format!(
        "POST {url} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    while !stop.load(Ordering::Relaxed) {
        let outcome = async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind("127.0.0.2:0".parse().map_err(std::io::Error::other)?)?;
            let mut stream = socket.connect(egress).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            std::io::Result::Ok(status_code(&answer))
        }
        .await;
        match outcome {
            Ok(Some(200)) => released.fetch_add(1, Ordering::Relaxed),
            _ => errors.fetch_add(1, Ordering::Relaxed),
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A person approving every pending request, looking once a second, until `stop`.
fn approve_all(admin: &AdminApi, stop: &AtomicBool, errors: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        match admin.pending_ids() {
            Ok(ids) => {
                for id in ids {
                    if admin.approve(&id).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The soak's agents, the origin CA trusted, the soak hosts pinned to loopback, a token for
/// `HOST` over TLS on `tls_port`, telemetry to `sink`.
fn gateway_config(
    dir: &Path,
    origin_ca: &Path,
    tls_port: u16,
    sink: SocketAddr,
) -> anyhow::Result<String> {
    let token_file = dir.join("static-token");
    std::fs::write(&token_file, "soak-static-token\n")?;
    Ok(format!(
        "[upstream]\nallow_networks = [\"127.0.0.1/32\"]\n\
         extra_ca_file = {origin_ca:?}\n\
         resolve = {{ \"{HOST}\" = \"127.0.0.1\", \"{PLAIN_HOST}\" = \"127.0.0.1\" }}\n\
         [[identity_providers]]\nname = \"dev\"\nkind = \"static\"\ntoken = {{ file = {token_file:?} }}\n\
         [[credential_rules]]\nhosts = [\"{HOST}\"]\nports = [{tls_port}]\naudience = \"https://github.example/.default\"\n\
         [[agents]]\nid = \"bench\"\nrun_mode = \"Autonomous\"\nidentity = \"dev\"\npeers = [\"127.0.0.1\"]\n\
         [[agents]]\nid = \"reviewer\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.2\"]\n\
         [telemetry]\nendpoint = \"http://{sink}\"\n"
    ))
}

/// Least-squares slope of `value` over `at` (seconds), per minute.
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var * 60.0
    }
}

fn render(args: &Args, samples: &[Sample], approval_errors: u64) -> String {
    let mut out = format!(
        "Soak: {:.1} min, {} plain + {} CONNECT/TLS keep-alive connections (new ones every {} s), \
         one held-and-approved write at a time.\n\n\
         | t (s) | RSS MiB | store MiB | RSS − store MiB | tables | fds | threads | requests (round) | errors (round) | approved (total) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        args.minutes, args.connections, args.connections, args.sample_seconds
    );
    for s in samples {
        out.push_str(&format!(
            "| {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |\n",
            s.at,
            s.rss_kib as f64 / 1024.0,
            s.store_kib as f64 / 1024.0,
            s.rss_kib.saturating_sub(s.store_kib) as f64 / 1024.0,
            s.tables,
            s.fds,
            s.threads,
            s.requests,
            s.errors,
            s.approvals
        ));
    }
    let end = samples.last().map(|s| s.at).unwrap_or(0.0);
    let second_half: Vec<&Sample> = samples.iter().filter(|s| s.at >= end / 2.0).collect();
    let rss: Vec<(f64, f64)> = second_half
        .iter()
        .map(|s| (s.at, s.rss_kib as f64 / 1024.0))
        .collect();
    let rest: Vec<(f64, f64)> = second_half
        .iter()
        .map(|s| (s.at, s.rss_kib.saturating_sub(s.store_kib) as f64 / 1024.0))
        .collect();
    let fds: Vec<(f64, f64)> = second_half.iter().map(|s| (s.at, s.fds as f64)).collect();
    let requests: u64 = samples.iter().map(|s| s.requests).sum();
    let errors: u64 = samples.iter().map(|s| s.errors).sum();
    let (first, last) = (samples.first(), samples.last());
    let field = |s: Option<&Sample>, f: fn(&Sample) -> String| s.map(f).unwrap_or_default();
    out.push_str(&format!(
        "\nRSS {} → {} MiB, fds {} → {}; over the second half ({} samples): RSS {:+.3} MiB/min \
         (RSS − store {:+.3} MiB/min), fds {:+.3}/min.\nRequests {requests} ({:.0}/s), errors {errors}; writes approved and \
         released {}, approval errors {approval_errors}; at most {} audit records waited for \
         the writer at once.\n",
        field(first, |s| format!("{:.1}", s.rss_kib as f64 / 1024.0)),
        field(last, |s| format!("{:.1}", s.rss_kib as f64 / 1024.0)),
        field(first, |s| s.fds.to_string()),
        field(last, |s| s.fds.to_string()),
        second_half.len(),
        slope_per_minute(&rss),
        slope_per_minute(&rest),
        slope_per_minute(&fds),
        requests as f64 / end.max(1.0),
        field(last, |s| s.approvals.to_string()),
        field(last, |s| s.audit_queue_peak.to_string()),
    ));
    out
}
