//! The live feed of approvals under load: how late events reach their listeners, and what a
//! listener costs the gateway.
//!
//! Everything runs on loopback: the release `tollgate` binary as a child process (one
//! Review-mode agent; writes need approval), an origin nobody reaches (every held request
//! is denied), and, in this process, the listeners and the load.
//!
//! Two rounds, each `--seconds` long at `--rate` held requests a second:
//!
//! 1. one listener (the baseline);
//! 2. `--listeners` listeners (`GET /v1/approvals/events`, the admin token, one connection
//!    each).
//!
//! In a round, a request is sent every 1/rate s, each on a connection of its own: a `POST`
//! the gateway records (fsync'd), holds and publishes as `pending`. One listener is also the
//! decider: as soon as it reads a `pending` event it denies that approval
//! (`POST /v1/approvals/{id}/deny`, a connection of its own), which the gateway records
//! (fsync'd) and publishes as `denied`. Every listener times every event it reads:
//!
//! - `pending`: from the driver sending the request to the listener reading the event (the
//!   gateway's admission, the durable record, the fan-out);
//! - `denied`: from the decider sending the denial to the listener reading the event (the
//!   admin API, the durable settlement, the fan-out).
//!
//! Memory per listener is the gateway's `VmRSS` with the listeners connected (and idle)
//! minus before, divided by their number. The gateway's CPU time over the round is divided
//! by the events it delivered. The driver's own work (parsing 2 × rate × listeners events a
//! second) shares the machine with the gateway, and is part of what the latencies show.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tollgate_benches::http::{find_head_end, read_response, status_code};
use tollgate_benches::origin::start_origin;
use tollgate_benches::{Gateway, TempDir};

/// Measure the live feed of approvals with many listeners.
#[derive(Parser)]
struct Args {
    /// The `tollgate` binary to benchmark.
    #[arg(long)]
    gateway: PathBuf,
    /// Also write the Markdown table here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Listeners connected in the second round.
    #[arg(long, default_value_t = 1000)]
    listeners: usize,
    /// Held requests a second (each denied as soon as it is seen).
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// How long each round sends requests.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// A smoke run: 100 listeners, 3 s.
    #[arg(long)]
    quick: bool,
}

/// The policy directory's one file: writes need a person's approval.
const POLICIES: &str = "@id(\"approved-writes\")\npermit (principal, action == Action::\"write\", resource) when { context.approved };\n";

/// How long a round waits, after its last request, for every event to arrive.
const DRAIN: Duration = Duration::from_secs(10);

/// What one round measured.
struct Round {
    listeners: usize,
    sent: u64,
    /// Events read, over all listeners.
    delivered: u64,
    /// Events each listener should have read (a pending and a denied per request).
    expected: u64,
    pending_us: Histogram<u64>,
    denied_us: Histogram<u64>,
    /// The gateway's RSS growth per connected listener, in KiB.
    kib_per_listener: f64,
    /// The gateway's CPU time over the round.
    cpu: Duration,
}

/// When each request of a round was sent and its denial sent (ns since `base`; 0: not yet).
struct Clock {
    base: Instant,
    sent: Vec<AtomicU64>,
    denied: Vec<AtomicU64>,
}

impl Clock {
    fn new(n: usize) -> Clock {
        Clock {
            base: Instant::now(),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            denied: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now(&self) -> u64 {
        (self.base.elapsed().as_nanos() as u64).max(1)
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.listeners = 100;
        args.seconds = 3;
    }
    if args.listeners == 0 || args.rate == 0 || args.seconds == 0 {
        bail!("--listeners, --rate and --seconds must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let origin = rt.block_on(start_origin(b"ok".to_vec()))?;

    let dir = TempDir::new("tollgate-feed-bench")?;
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(policy_dir.join("bench.cedar"), POLICIES)?;
    let per_round = (args.rate * args.seconds) as usize;
    let config = format!(
        "[upstream]\nallow_networks = [\"127.0.0.1/32\"]\n\
         [policy]\ndir = {policy_dir:?}\n\
         [approvals]\ntimeout_secs = 3600\nmax_pending_per_agent = {pending}\n\
         [[agents]]\nid = \"bench\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n\
         limits = {{ connections = {pending} }}\n",
        pending = per_round + 16,
    );
    let mut gateway = Gateway::start(&args.gateway, dir, &config)?;
    let admin = gateway.admin;
    let token = std::fs::read_to_string(gateway.dir().join("data/admin-token"))
        .context("the gateway's admin token")?
        .trim()
        .to_string();
    let result = rt.block_on(async {
        let baseline = round(&gateway, admin, &token, origin, 1, &args, 0).await?;
        let loaded = round(&gateway, admin, &token, origin, args.listeners, &args, 1).await?;
        anyhow::Ok([baseline, loaded])
    });
    gateway.keep_log_if(result.is_err());
    gateway.stop();
    rt.shutdown_background();
    let rounds = result?;
    let table = render(&args, &rounds);
    tollgate_benches::report(&table, args.out.as_deref())?;
    Ok(())
}

/// One round: `listeners` listeners, `rate × seconds` requests held and denied.
async fn round(
    gateway: &Gateway,
    admin: SocketAddr,
    token: &str,
    origin: SocketAddr,
    listeners: usize,
    args: &Args,
    tag: u32,
) -> anyhow::Result<Round> {
    let n = (args.rate * args.seconds) as usize;
    let clock = Arc::new(Clock::new(n));
    let (stop_tx, stop) = watch::channel(false);
    let before_kib = gateway.rss_kib().context("the gateway's VmRSS")?;
    let read = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(listeners);
    for i in 0..listeners {
        let stream = open_listener(admin, token).await?;
        let listener = Listener {
            clock: clock.clone(),
            tag,
            decider: (i == 0).then(|| (admin, token.to_string())),
            read: read.clone(),
        };
        tasks.push(tokio::spawn(listener.run(stream, stop.clone())));
    }
    wait_listeners(admin, token, listeners).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listening_kib = gateway.rss_kib().context("the gateway's VmRSS")?;
    let cpu_before = gateway.cpu_time().context("the gateway's CPU time")?;

    // The load: one request every 1/rate s, each on its own connection.
    let interval = Duration::from_nanos(1_000_000_000 / args.rate);
    let started = tokio::time::Instant::now();
    let mut requests = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(started + interval * i as u32).await;
        clock.sent[i].store(clock.now(), Ordering::Relaxed);
        requests.push(tokio::spawn(held_request(
            gateway.egress,
            origin,
            format!("/feed/{tag}/{i}"),
        )));
    }
    let mut failed = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        match tokio::time::timeout(DRAIN, request).await {
            Ok(Ok(Ok(403))) => {}
            Ok(Ok(Ok(status))) => failed.push(format!("request {i}: status {status}")),
            Ok(Ok(Err(e))) => failed.push(format!("request {i}: {e}")),
            Ok(Err(e)) => failed.push(format!("request {i}: {e}")),
            Err(_) => failed.push(format!("request {i}: not denied within {DRAIN:?}")),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {n} held requests were not denied: {}",
            failed.len(),
            failed
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let expected = 2 * n as u64;
    let deadline = Instant::now() + DRAIN;
    while (read.load(Ordering::Relaxed) as u64) < expected * listeners as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = gateway
        .cpu_time()
        .context("the gateway's CPU time")?
        .saturating_sub(cpu_before);
    let _ = stop_tx.send(true);

    let mut pending_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut denied_us = pending_us.clone();
    let mut delivered = 0;
    for task in tasks {
        let heard = task.await.context("a listener panicked")??;
        if heard.pending.len() + heard.denied.len() != expected {
            bail!(
                "a listener read {} pending and {} denied events of {n} requests",
                heard.pending.len(),
                heard.denied.len()
            );
        }
        delivered += expected;
        pending_us.add(&heard.pending)?;
        denied_us.add(&heard.denied)?;
    }
    Ok(Round {
        listeners,
        sent: n as u64,
        delivered,
        expected,
        pending_us,
        denied_us,
        kib_per_listener: listening_kib.saturating_sub(before_kib) as f64 / listeners as f64,
        cpu,
    })
}

/// Connects to the feed and reads its head (which must be 200).
async fn open_listener(admin: SocketAddr, token: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(admin)
        .await
        .context("connecting a listener")?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /v1/approvals/events HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte up to the end of the head, so no event is read with it.
    while find_head_end(&head).is_none() {
        if stream.read(&mut byte).await? == 0 {
            bail!("the feed closed before its head");
        }
        head.push(byte[0]);
    }
    match status_code(&head) {
        Some(200) => Ok(stream),
        other => bail!("the feed answered {other:?}"),
    }
}

/// Waits until the gateway counts `n` listeners (its `/metrics`).
async fn wait_listeners(admin: SocketAddr, token: &str, n: usize) -> anyhow::Result<()> {
    let wanted = format!("tollgate_approval_feed_listeners {n}\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = admin_call(admin, token, "GET", "/metrics", None).await?;
        if status == 200 && body.contains(&wanted) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway does not count {n} feed listeners");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One held request: `POST` through the gateway; its status once settled.
async fn held_request(egress: SocketAddr, origin: SocketAddr, path: String) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(egress).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "POST http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    Ok(read_response(&mut stream, &mut buf).await?.status)
}

/// One admin API call on a connection of its own: status and body.
async fn admin_call(
    admin: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(admin).await?;
    stream.set_nodelay(true)?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let response = read_response(&mut stream, &mut buf).await?;
    Ok((
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    ))
}

/// A listener: reads the stream, times each event of this round.
struct Listener {
    clock: Arc<Clock>,
    /// The round's tag in request paths (`/feed/{tag}/{i}`).
    tag: u32,
    /// Set for the decider: the admin API and token to deny with.
    decider: Option<(SocketAddr, String)>,
    /// Events read, over all listeners.
    read: Arc<AtomicUsize>,
}

/// What a listener timed, in µs.
struct Heard {
    pending: Histogram<u64>,
    denied: Histogram<u64>,
}

impl Listener {
    async fn run(
        self,
        mut stream: TcpStream,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Heard> {
        let mut heard = Heard {
            pending: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            denied: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        };
        let mut body = Chunked::default();
        let mut buf = vec![0u8; 16 * 1024];
        let marker = format!("/feed/{}/", self.tag);
        loop {
            let n = tokio::select! {
                read = stream.read(&mut buf) => read?,
                _ = stop.changed() => return Ok(heard),
            };
            if n == 0 {
                bail!("the feed closed");
            }
            let now = self.clock.now();
            body.push(&buf[..n])?;
            while let Some(frame) = body.next_frame() {
                let Some((event, index, id)) = parse(&frame, &marker) else {
                    continue;
                };
                let Some(index) = index.filter(|i| *i < self.clock.sent.len()) else {
                    continue;
                };
                match event {
                    "pending" => {
                        let sent = self.clock.sent[index].load(Ordering::Relaxed);
                        heard.pending.record(now.saturating_sub(sent) / 1000)?;
                        if let Some((admin, token)) = &self.decider {
                            self.clock.denied[index].store(self.clock.now(), Ordering::Relaxed);
                            let (admin, token, id) = (*admin, token.clone(), id.to_string());
                            tokio::spawn(async move {
                                let path = format!("/v1/approvals/{id}/deny");
                                let reason = Some(r#"{"reason":"benchmark"}"#);
                                if let Ok((status, body)) =
                                    admin_call(admin, &token, "POST", &path, reason).await
                                {
                                    if status != 200 {
                                        eprintln!("denying {id}: {status} {body}");
                                    }
                                }
                            });
                        }
                    }
                    "denied" => {
                        let denied = self.clock.denied[index].load(Ordering::Relaxed);
                        heard.denied.record(now.saturating_sub(denied) / 1000)?;
                    }
                    _ => continue,
                }
                self.read.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// An event's name, the index of its request in this round (from its URL) and its approval
/// id; `None` for what is not an event (the `retry:` line, comments).
fn parse<'a>(frame: &'a str, marker: &str) -> Option<(&'a str, Option<usize>, &'a str)> {
    let mut event = None;
    let mut data = None;
    for line in frame.lines() {
        if let Some(name) = line.strip_prefix("event: ") {
            event = Some(name);
        } else if let Some(value) = line.strip_prefix("data: ") {
            data = Some(value);
        }
    }
    let (event, data) = (event?, data?);
    let index = data.find(marker).and_then(|at| {
        let digits: String = data[at + marker.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    });
    let id = data
        .find("\"id\":\"")
        .and_then(|at| data[at + 6..].split('"').next())
        .unwrap_or("");
    Some((event, index, id))
}

/// A chunked body, decoded as it arrives, cut into Server-Sent Events frames.
#[derive(Default)]
struct Chunked {
    raw: Vec<u8>,
    text: String,
}

impl Chunked {
    fn push(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.raw.extend_from_slice(bytes);
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return Ok(());
            };
            let size_text = std::str::from_utf8(&self.raw[..line_end])?;
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("a chunk size {size_text:?}"))?;
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return Ok(());
            }
            self.text
                .push_str(std::str::from_utf8(&self.raw[start..start + size])?);
            self.raw.drain(..start + size + 2);
            if size == 0 {
                bail!("the feed ended");
            }
        }
    }

    fn next_frame(&mut self) -> Option<String> {
        let end = self.text.find("\n\n")?;
        let frame = self.text[..end].to_string();
        self.text.drain(..end + 2);
        Some(frame)
    }
}

fn render(args: &Args, rounds: &[Round]) -> String {
    let mut out = format!(
        "Live feed of approvals: {} held requests a second for {} s per round, each denied \
         as soon as the decider (listener 1) reads it; release build, loopback.\n\n\
         | listeners | requests | events read | `pending` p50 / p99 (from the request) | \
         `denied` p50 / p99 (from the denial) | gateway CPU in the round | gateway RSS per listener |\n\
         |---|---|---|---|---|---|---|\n",
        args.rate, args.seconds
    );
    for r in rounds {
        out.push_str(&format!(
            "| {} | {} | {} of {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} s | {} |\n",
            r.listeners,
            r.sent,
            r.delivered,
            r.expected * r.listeners as u64,
            ms(r.pending_us.value_at_quantile(0.5)),
            ms(r.pending_us.value_at_quantile(0.99)),
            ms(r.denied_us.value_at_quantile(0.5)),
            ms(r.denied_us.value_at_quantile(0.99)),
            r.cpu.as_secs_f64(),
            // One listener's share is lost in the noise of the gateway's RSS.
            if r.listeners >= 10 {
                format!("{:.1} KiB", r.kib_per_listener)
            } else {
                "—".to_string()
            },
        ));
    }
    if let [one, many] = rounds {
        let events = many.delivered.saturating_sub(one.delivered);
        let cpu = many.cpu.saturating_sub(one.cpu);
        out.push_str(&format!(
            "\nWhat the fan-out costs: {:.2} µs of gateway CPU per further event delivered \
             ((CPU of round 2 − round 1) ÷ (events of round 2 − round 1)).\n",
            cpu.as_secs_f64() * 1e6 / events.max(1) as f64
        ));
    }
    out
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}
