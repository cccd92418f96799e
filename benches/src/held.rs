//! The memory cost of held requests (issue 5): the gateway's resident memory with N requests
//! held open for approval, compared with its memory idle, and the latency of releasing one
//! held request once a person approves it.
//!
//! Everything runs on loopback: the origin (in this process), the release `tollgate` binary
//! as a child process (one Review-mode agent; a policy directory that permits reads and
//! approved writes; approvals that neither time out nor run into the per-agent limit during
//! the run) and N clients written here, each one connection sending one `POST` that the
//! gateway records durably (fsync'd) and holds.
//!
//! 1. Idle: after start-up, a few reads and one held-then-approved write, the gateway's
//!    `VmRSS`.
//! 2. Held: N clients send their POST (at most `--connect-concurrency` connecting at once).
//!    Once the gateway has logged every one as held ("request held for approval", written
//!    after the record is durable; the log is read as it grows, ten times a second), `VmRSS`
//!    again. Only then is the admin API asked (`GET /v1/approvals?state=pending`, once a
//!    second until it lists all N): answering that listing makes the gateway's RSS grow (by
//!    some 8 KiB per approval listed, kept by the allocator afterwards), which is reported on
//!    its own row rather than mixed into the cost of holding.
//! 3. Release: M of them, oldest first, one at a time: `POST /v1/approvals/{id}/approve` on a
//!    connection opened beforehand, timed from sending it until the admin API answered and
//!    until the held client had read its whole 200 response (which the gateway sends once it
//!    has forwarded the request to the origin and read the answer).
//!
//! The gateway is killed at the end, with the rest still held; then the clients close.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};
use tollgate_benches::gateway::AdminApi;
use tollgate_benches::http::read_response;
use tollgate_benches::origin::start_origin;
use tollgate_benches::{procfs, Gateway, TempDir};

/// Measure the gateway's memory with requests held for approval, and release latency.
#[derive(Parser)]
struct Args {
    /// The `tollgate` binary to benchmark.
    #[arg(long)]
    gateway: PathBuf,
    /// Also write the Markdown table here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Requests to hold open at once (one client connection each).
    #[arg(long, default_value_t = 10_000)]
    held: usize,
    /// Held requests to approve one at a time, timing each release.
    #[arg(long, default_value_t = 200)]
    releases: usize,
    /// Clients connecting and sending their request at the same time.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Give up if the gateway has not held every request after this long (seconds).
    #[arg(long, default_value_t = 900)]
    hold_timeout_secs: u64,
    /// Worker threads of the gateway (0: one per CPU, the gateway's default).
    #[arg(long, default_value_t = 0)]
    gateway_threads: usize,
    /// A smoke run: 1,000 held, 50 released.
    #[arg(long)]
    quick: bool,
}

/// How often the admin API is asked how many requests are pending (listing thousands of
/// approvals takes a while).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often the gateway's log is read for new held requests.
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// What the gateway logs once a request's approval record is durable and the request held.
const HELD_LOG_LINE: &str = "request held for approval";
/// The target: this many held requests …
const TARGET_HELD: u64 = 10_000;
/// … within this many MiB above idle.
const TARGET_MIB: f64 = 200.0;
/// Open files a process needs besides one socket per held request (listeners, the
/// runtime's, the store's files, upstream connections, the log), with room to spare.
const SPARE_FILES: u64 = 256;
/// The policy directory's one file: reads are permitted, writes once a person approved them.
const POLICIES: &str = "@id(\"reads\")\npermit (principal, action == Action::\"read\", resource);\n\
                        @id(\"approved-writes\")\npermit (principal, action == Action::\"write\", resource) when { context.approved };\n";

/// What was measured.
struct Measured {
    held: usize,
    idle_kib: u64,
    held_kib: u64,
    peak_kib: u64,
    /// The gateway's threads when `held_kib` was read.
    held_threads: Option<u64>,
    /// From the first client starting until the last approval record's `requested_at`.
    last_recorded: Duration,
    /// From the first client starting until the gateway had logged all of them as held.
    all_logged: Duration,
    /// How long the listing of all N pending took.
    listing: Duration,
    /// The gateway's RSS after it answered that listing, in KiB.
    listed_kib: u64,
    /// From sending the approve request until the admin API answered, in µs.
    approve_us: Histogram<u64>,
    /// From sending the approve request until the held client had its whole response, in µs.
    release_us: Histogram<u64>,
    gateway_files_limit: Option<u64>,
    data_fs: String,
}

/// How one held client's request ended: when, and its status code or what went wrong.
struct Outcome {
    done: Instant,
    result: Result<u16, String>,
}

/// One pending approval, as the admin API lists it.
struct Pending {
    id: String,
    url: String,
    requested_at: u64,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.held = 1000;
        args.releases = 50;
    }
    if args.held == 0 || args.connect_concurrency == 0 {
        bail!("--held and --connect-concurrency must be at least 1");
    }
    args.releases = args.releases.min(args.held);
    check_files_limit(
        "this driver",
        procfs::open_files_limit(std::process::id()),
        &args,
    )?;

    // The origin gets one thread of its own, the clients two; the gateway process uses its
    // default (one worker per CPU).
    let origin_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let origin = origin_rt.block_on(start_origin(b"ok".to_vec()))?;
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let dir = TempDir::new("tollgate-held-bench")?;
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(policy_dir.join("bench.cedar"), POLICIES)?;
    // Room for every held request (and one spare), and no expiry during the run.
    let config = format!(
        "[limits]\nworker_threads = {threads}\n\
         [upstream]\nallow_networks = [\"127.0.0.1/32\"]\n\
         [policy]\ndir = {policy_dir:?}\n\
         [approvals]\ntimeout_secs = 86400\nmax_pending_per_agent = {max_pending}\n\
         [[agents]]\nid = \"bench\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n\
         limits = {{ connections = {connections} }}\n",
        threads = args.gateway_threads,
        connections = args.held + 16,
        max_pending = args.held + 1,
    );
    let mut gateway = Gateway::start(&args.gateway, dir, &config)?;
    let result = measure(&args, &gateway, &clients_rt, origin);
    gateway.keep_log_if(result.is_err());
    // Kill the gateway first (closing the clients first would have it abandon every held
    // request, each with an fsync'd write), then drop the clients.
    gateway.stop();
    clients_rt.shutdown_background();
    let measured = result?;

    let table = render(&args, &measured);
    tollgate_benches::report(&table, args.out.as_deref())?;
    Ok(())
}

/// Refuses to start when a process's open-files limit is too low for one socket per held
/// request (plus spares).
fn check_files_limit(who: &str, limit: Option<u64>, args: &Args) -> anyhow::Result<()> {
    let needed = args.held as u64 + SPARE_FILES;
    match limit {
        Some(limit) if limit < needed => bail!(
            "{who} may open {limit} files (soft limit), but holding {} requests needs about \
             {needed} (one socket each, plus {SPARE_FILES}); raise it (`ulimit -n {needed}`, up \
             to the hard limit `ulimit -Hn`; benches/held.sh raises it to the hard limit) or \
             hold fewer (--held)",
            args.held
        ),
        _ => Ok(()),
    }
}

fn measure(
    args: &Args,
    gateway: &Gateway,
    clients_rt: &tokio::runtime::Runtime,
    origin: SocketAddr,
) -> anyhow::Result<Measured> {
    let gateway_files_limit = gateway.open_files_limit();
    check_files_limit("the gateway", gateway_files_limit, args)?;
    let admin = gateway.admin_api()?;
    let egress = gateway.egress;
    let permits = Arc::new(Semaphore::new(args.connect_concurrency));
    let finished = Arc::new(AtomicUsize::new(0));
    let hold = |path: &str| {
        let request = format!(
            "POST http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        let (tx, rx) = oneshot::channel();
        clients_rt.spawn(held_client(
            egress,
            request.into_bytes(),
            permits.clone(),
            finished.clone(),
            tx,
        ));
        rx
    };

    // Warm up: reads, and one write held and approved (which also checks the set-up).
    let read = format!("GET http://{origin}/warm-up HTTP/1.1\r\nHost: {origin}\r\n\r\n");
    clients_rt.block_on(async {
        let mut socket = TcpStream::connect(egress).await?;
        let mut buf = Vec::new();
        for _ in 0..20 {
            socket.write_all(read.as_bytes()).await?;
            let response = read_response(&mut socket, &mut buf).await?;
            if response.status != 200 {
                bail!("a warm-up read got {}", response.status_line);
            }
        }
        anyhow::Ok(())
    })?;
    let warm_up = hold("/warm-up");
    let (pending, _) = wait_pending(&admin, 1, Duration::from_secs(30), || Ok(()))?;
    let id = &pending.first().context("no pending warm-up approval")?.id;
    approve(&admin, id)?;
    let outcome = clients_rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), warm_up).await })
        .context("the approved warm-up request got no answer within 30 s")?
        .context("the warm-up client vanished")?;
    match outcome.result {
        Ok(200) => {}
        Ok(status) => bail!("the approved warm-up request got status {status}"),
        Err(e) => bail!("the approved warm-up request failed: {e}"),
    }
    finished.store(0, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    let idle_kib = gateway.rss_kib().context("reading the gateway's VmRSS")?;

    // Hold N.
    let mut log = LogWatch::new(gateway.log_path());
    let warm_up_logged = log.count_new()?;
    if warm_up_logged != 1 {
        bail!(
            "the gateway's log has {warm_up_logged} lines {HELD_LOG_LINE:?} for the one held \
             warm-up request (this driver counts them to know when all are held)"
        );
    }
    let started = Instant::now();
    let started_ms = now_millis();
    let mut clients: Vec<Option<oneshot::Receiver<Outcome>>> = (0..args.held)
        .map(|i| Some(hold(&format!("/held/{i}"))))
        .collect();
    wait_logged(
        &mut log,
        args.held,
        Duration::from_secs(args.hold_timeout_secs),
        || early_end(&finished, &mut clients),
    )?;
    let all_logged = started.elapsed();
    let held_kib = gateway.rss_kib().context("reading the gateway's VmRSS")?;
    let held_threads = gateway.threads();
    // The admin API's word for it (and the approvals' ids).
    let (pending, listing) = wait_pending(&admin, args.held, Duration::from_secs(120), || {
        early_end(&finished, &mut clients)
    })?;
    let listed_kib = gateway.rss_kib().context("reading the gateway's VmRSS")?;
    let last_recorded = pending.iter().map(|p| p.requested_at).max().unwrap_or(0);
    let last_recorded = Duration::from_millis(last_recorded.saturating_sub(started_ms));

    // Release M, oldest first, one at a time.
    let mut approve_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut release_us = approve_us.clone();
    let to_release = pending
        .iter()
        .filter_map(|p| Some((client_index(&p.url)?, &p.id)))
        .take(args.releases);
    for (index, id) in to_release {
        let client = clients
            .get_mut(index)
            .and_then(Option::take)
            .with_context(|| format!("approval {id} names no waiting client ({index})"))?;
        let connection = admin.connect()?;
        let sent = Instant::now();
        let answer = connection.call("POST", &format!("/v1/approvals/{id}/approve"), None)?;
        let answered = sent.elapsed();
        if answer.status != 200 {
            bail!(
                "approving {id}: {} {}",
                answer.status_line,
                String::from_utf8_lossy(&answer.body)
            );
        }
        let outcome = clients_rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), client).await })
            .with_context(|| {
                format!("held request {index} got no answer within 60 s of its approval")
            })?
            .context("a held client vanished")?;
        match outcome.result {
            Ok(200) => {}
            Ok(status) => bail!("released request {index} got status {status}"),
            Err(e) => bail!("released request {index} failed: {e}"),
        }
        approve_us.record(micros(answered))?;
        release_us.record(micros(outcome.done.saturating_duration_since(sent)))?;
    }
    let peak_kib = gateway.peak_rss_kib().unwrap_or(listed_kib);
    if (release_us.len() as usize) < args.releases {
        bail!(
            "only {} of the listed approvals name a held client",
            release_us.len()
        );
    }

    Ok(Measured {
        held: args.held,
        idle_kib,
        held_kib,
        peak_kib,
        held_threads,
        last_recorded,
        all_logged,
        listing,
        listed_kib,
        approve_us,
        release_us,
        gateway_files_limit,
        data_fs: filesystem_of(gateway.dir()),
    })
}

/// One client: connects, sends its request, and waits for the answer (which comes once its
/// approval is decided), reporting when it had it whole.
async fn held_client(
    egress: SocketAddr,
    request: Vec<u8>,
    permits: Arc<Semaphore>,
    finished: Arc<AtomicUsize>,
    outcome: oneshot::Sender<Outcome>,
) {
    let result = async {
        let permit = permits.acquire().await.map_err(|e| e.to_string())?;
        let mut socket = TcpStream::connect(egress)
            .await
            .map_err(|e| format!("connecting to the gateway: {e}"))?;
        let _ = socket.set_nodelay(true);
        socket
            .write_all(&request)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        drop(permit);
        let mut buf = Vec::new();
        let response = read_response(&mut socket, &mut buf)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        Ok(response.status)
    }
    .await;
    let done = Instant::now();
    finished.fetch_add(1, Ordering::Relaxed);
    let _ = outcome.send(Outcome { done, result });
}

/// Fails if a held request ended before anyone decided it (refused, failed, or forwarded
/// without approval).
fn early_end(
    finished: &AtomicUsize,
    clients: &mut [Option<oneshot::Receiver<Outcome>>],
) -> anyhow::Result<()> {
    if finished.load(Ordering::Relaxed) == 0 {
        return Ok(());
    }
    let ended = clients.iter_mut().enumerate().find_map(|(i, client)| {
        let outcome = client.as_mut()?.try_recv().ok()?;
        Some((i, outcome))
    });
    let count = finished.load(Ordering::Relaxed);
    match ended {
        Some((i, outcome)) => Err(anyhow!(
            "{count} held request(s) ended before they were approved; request {i}: {}",
            match outcome.result {
                Ok(status) => format!("answered with status {status}"),
                Err(e) => e,
            }
        )),
        None => Err(anyhow!(
            "{count} held request(s) ended before they were approved"
        )),
    }
}

/// The gateway's log, read as it grows: counts the lines saying a request is held.
struct LogWatch {
    path: PathBuf,
    /// Bytes read and counted so far (complete lines only).
    offset: u64,
}

impl LogWatch {
    fn new(path: PathBuf) -> Self {
        LogWatch { path, offset: 0 }
    }

    /// How many complete lines saying a request is held were added since the last call.
    fn count_new(&mut self) -> anyhow::Result<usize> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut added = Vec::new();
        file.read_to_end(&mut added)?;
        let complete = added.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        self.offset += complete as u64;
        Ok(String::from_utf8_lossy(&added[..complete])
            .lines()
            .filter(|line| line.contains(HELD_LOG_LINE))
            .count())
    }
}

/// Reads the gateway's log ten times a second until it says `want` more requests are held.
/// `check` runs before each read and ends the wait with its error.
fn wait_logged(
    log: &mut LogWatch,
    want: usize,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut held = 0;
    let mut reported = Instant::now();
    loop {
        check()?;
        held += log.count_new()?;
        if held >= want {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "after {} s the gateway has logged {held} of {want} requests as held",
                timeout.as_secs()
            );
        }
        if reported.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "held: {held} of {want} after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            reported = Instant::now();
        }
        std::thread::sleep(LOG_POLL_INTERVAL);
    }
}

/// Polls the admin API once a second until it lists at least `want` pending approvals;
/// returns them (oldest first) and how long the last listing took. `check` runs before each
/// poll and ends the wait with its error.
fn wait_pending(
    admin: &AdminApi,
    want: usize,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<Pending>, Duration)> {
    let started = Instant::now();
    let mut last_count = None;
    loop {
        check()?;
        let asked = Instant::now();
        let pending = list_pending(admin)?;
        let listing = asked.elapsed();
        if pending.len() >= want {
            return Ok((pending, listing));
        }
        if started.elapsed() > timeout {
            bail!(
                "after {} s the gateway lists {} of {want} requests as pending",
                timeout.as_secs(),
                pending.len()
            );
        }
        if want > 1 && last_count != Some(pending.len()) {
            eprintln!(
                "held: {} of {want} pending after {:.1} s",
                pending.len(),
                started.elapsed().as_secs_f64()
            );
            last_count = Some(pending.len());
        }
        std::thread::sleep(POLL_INTERVAL.saturating_sub(listing));
    }
}

/// `GET /v1/approvals?state=pending`: every pending approval, oldest first.
fn list_pending(admin: &AdminApi) -> anyhow::Result<Vec<Pending>> {
    let answer = admin.call("GET", "/v1/approvals?state=pending", None)?;
    if answer.status != 200 {
        bail!("listing pending approvals: {}", answer.status_line);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&answer.body).context("the pending approvals' JSON")?;
    let approvals = json
        .get("approvals")
        .and_then(serde_json::Value::as_array)
        .context("no \"approvals\" array in the listing")?;
    approvals
        .iter()
        .map(|a| {
            let text = |key: &str| {
                a.get(key)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
                    .with_context(|| format!("an approval without {key:?}"))
            };
            Ok(Pending {
                id: text("id")?,
                url: text("url")?,
                requested_at: a
                    .get("requested_at")
                    .and_then(serde_json::Value::as_u64)
                    .context("an approval without \"requested_at\"")?,
            })
        })
        .collect()
}

/// Approves `id` and checks the answer.
fn approve(admin: &AdminApi, id: &str) -> anyhow::Result<()> {
    admin.approve(id)
}

/// The client a held request's URL names (`…/held/<index>`).
fn client_index(url: &str) -> Option<usize> {
    url.rsplit_once("/held/")?.1.parse().ok()
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The type and device of the file system `path` is on (from `/proc/mounts`), for the
/// report: approvals are fsync'd there.
fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, mount, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount)
                .then(|| (mount.len(), format!("{kind} ({device})")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
        .unwrap_or_else(|| "unknown".into())
}

fn render(args: &Args, m: &Measured) -> String {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let grown_kib = m.held_kib.saturating_sub(m.idle_kib);
    let per_held_kib = grown_kib as f64 / m.held as f64;
    // The target: 10,000 held within 200 MiB above idle.
    let target_mib = per_held_kib * TARGET_HELD as f64 / 1024.0;
    let verdict = if target_mib <= TARGET_MIB {
        "met"
    } else {
        "missed"
    };
    let n = thousands(m.held as u64);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let latency_row = |name: &str, h: &Histogram<u64>| {
        format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        )
    };
    let threads = if args.gateway_threads == 0 {
        "one per CPU".to_string()
    } else {
        args.gateway_threads.to_string()
    };
    let files = match m.gateway_files_limit {
        Some(u64::MAX) => "unlimited".to_string(),
        Some(n) => thousands(n),
        None => "unknown".to_string(),
    };
    let mut t = String::new();
    t.push_str(&format!(
        "Held requests: {n} POSTs (2 B bodies) from one Review-mode agent held open for approval, \
         one connection each; gateway worker threads: {threads}; approvals fsync'd on {}; \
         gateway open-files limit {files}\n\n",
        m.data_fs
    ));
    t.push_str("| measure | value |\n|---|---|\n");
    t.push_str(&format!(
        "| gateway RSS idle (after warm-up) | {:.1} MiB |\n",
        mib(m.idle_kib)
    ));
    t.push_str(&format!(
        "| gateway RSS with {n} held (before anything lists them) | {:.1} MiB |\n",
        mib(m.held_kib)
    ));
    t.push_str(&format!("| difference | {:.1} MiB |\n", mib(grown_kib)));
    t.push_str(&format!("| per held request | {per_held_kib:.1} KiB |\n"));
    t.push_str(&format!(
        "| {} held at that cost (target: ≤ {TARGET_MIB:.0} MiB above idle) | {target_mib:.0} MiB: {verdict} |\n",
        thousands(TARGET_HELD)
    ));
    t.push_str(&format!(
        "| gateway peak RSS in the whole run (VmHWM) | {:.1} MiB |\n",
        mib(m.peak_kib)
    ));
    if let Some(threads) = m.held_threads {
        t.push_str(&format!(
            "| gateway threads then (workers, and blocking-pool threads from the fsync'd writes until they idle out) | {threads} |\n"
        ));
    }
    t.push_str(&format!(
        "| time to hold all {n} (until the last approval was recorded) | {:.2} s = {:.0} requests/s |\n",
        m.last_recorded.as_secs_f64(),
        m.held as f64 / m.last_recorded.as_secs_f64().max(0.001)
    ));
    t.push_str(&format!(
        "| until the gateway had logged all {n} as held (log read every {} ms) | {:.2} s |\n",
        LOG_POLL_INTERVAL.as_millis(),
        m.all_logged.as_secs_f64()
    ));
    t.push_str(&format!(
        "| listing the {n} pending approvals once (GET /v1/approvals?state=pending) | {:.0} ms; gateway RSS after it {:.1} MiB (+{:.1} MiB) |\n",
        m.listing.as_secs_f64() * 1000.0,
        mib(m.listed_kib),
        mib(m.listed_kib.saturating_sub(m.held_kib))
    ));
    t.push_str(&format!(
        "\nRelease latency: {} held requests approved one at a time, oldest first (the rest still held), \
         timed from sending POST /v1/approvals/{{id}}/approve\n\n",
        m.release_us.len()
    ));
    t.push_str("| until | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|\n");
    t.push_str(&latency_row("the admin API answered 200", &m.approve_us));
    t.push_str(&latency_row(
        "the held client had read its whole 200 response",
        &m.release_us,
    ));
    t
}

/// `12345` → `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .map(|group| std::str::from_utf8(group).unwrap_or_default())
        .collect();
    groups.reverse();
    groups.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(client_index("http://127.0.0.1:9/held/42"), Some(42));
        assert_eq!(client_index("http://127.0.0.1:9/warm-up"), None);
    }
}
