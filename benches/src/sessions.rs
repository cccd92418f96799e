//! The sandbox service's cost (issues 19 and 20), per backend, with 1 and with 4 sessions at
//! once:
//!
//! - **cold start**: from `PUT /v1/sessions/{agent}/{thread}` to the end of the session's
//!   first execution, `true` (the sandbox booted, its guest agent ready, the tool call
//!   opened and closed); then the session's first Python call, `1+1` (its interpreter
//!   started);
//! - **warm execution**: the round trip of `POST …/exec {"command": "true"}` in a running
//!   session — tool call opened on the gateway, the command run by the guest agent, the tool
//!   call closed — p50 and p99 over every session's executions (each session runs its own
//!   executions one after another, all sessions at once);
//! - **resume**: the first execution after the session was stopped for being idle (its
//!   sandbox started again, its workspace kept);
//! - **Python**: the warm round trip of `1+1`, and the first `import pandas` (where the
//!   sandbox has pandas: the microVM image has; the netns backend runs the host's Python);
//! - **memory**: the resident set of each session's sandbox (QEMU; or the guest agent of the
//!   netns backend and its user's processes, the Python interpreter among them) after the
//!   warm executions and the pandas import.
//!
//! The release `tollgate` runs on loopback with its default policies, the release
//! `tollgate-launcher serve` beside it (its data under /var/tmp: sandboxes replace /tmp).
//! Needs root; the qemu backend needs QEMU and a guest image (`tollgate-launcher image build`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use tollgate_benches::http::Response;
use tollgate_benches::{Gateway, TempDir};

/// Measure sessions: cold start, warm execution, resume after idle stop, memory.
#[derive(Parser)]
struct Args {
    /// The `tollgate` binary.
    #[arg(long)]
    gateway: PathBuf,
    /// The `tollgate-launcher` binary (its `tollgate-guest-agent` beside it).
    #[arg(long)]
    launcher: PathBuf,
    /// The backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "netns,qemu")]
    backends: Vec<String>,
    /// The guest image (qemu).
    #[arg(long, default_value = "/var/lib/tollgate-launcher/image")]
    image: PathBuf,
    /// Warm executions per session.
    #[arg(long, default_value_t = 200)]
    executions: usize,
    /// Also write the Markdown table here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Seconds of idleness after which the service stops a session, for the resume figure.
const IDLE_STOP_SECS: u64 = 3;

/// One backend's figures for one number of sessions.
struct Figures {
    backend: String,
    sessions: usize,
    accel: String,
    /// Create → the first execution's end (the sandbox started).
    cold: Vec<Duration>,
    /// The first Python call's round trip (the interpreter started).
    python_first: Vec<Duration>,
    warm: Histogram<u64>,
    /// Warm `1+1` round trips in the session's interpreter.
    python_warm: Histogram<u64>,
    /// The first `import pandas` in a session, where the sandbox has pandas.
    pandas: Option<Vec<Duration>>,
    resume: Vec<Duration>,
    rss_kib: Vec<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let gateway = Gateway::start(&args.gateway, TempDir::new("tollgate-sessions-gw")?, "")?;
    let admin = gateway.admin_api()?;
    let mut rows = Vec::new();
    for backend in &args.backends {
        let mut service = Service::start(&args, &gateway, backend)?;
        for count in [1, 4] {
            let agent = format!("bench-{backend}-{count}");
            let answer = admin.call(
                "PUT",
                &format!("/v1/agents/{agent}"),
                Some(r#"{"run_mode":"Autonomous"}"#),
            )?;
            if answer.status != 201 && answer.status != 200 {
                bail!("registering {agent}: {}", answer.status_line);
            }
            rows.push(measure(&args, &service, backend, &agent, count)?);
            eprintln!("{backend}: {count} session(s) done");
        }
        service.stop();
    }
    let table = table(&rows);
    tollgate_benches::report(&table, args.out.as_deref())?;
    Ok(())
}

/// Cold starts `count` sessions at once, runs the warm executions in all of them at once,
/// lets them go idle, and resumes them at once.
fn measure(
    args: &Args,
    service: &Service,
    backend: &str,
    agent: &str,
    count: usize,
) -> anyhow::Result<Figures> {
    let threads: Vec<String> = (0..count).map(|i| format!("t{i}")).collect();
    let cold = at_once(service, agent, &threads, |service, path| {
        let started = Instant::now();
        service.expect("PUT", path, None, &[200, 201])?;
        service.exec_true(path)?;
        Ok(vec![started.elapsed()])
    })?;
    let python_first = at_once(service, agent, &threads, |service, path| {
        let started = Instant::now();
        service.python_one_plus_one(path)?;
        Ok(vec![started.elapsed()])
    })?;
    // Warm round trips: each session runs `executions` of `call` one after another, all
    // sessions at once.
    let warm_round_trips = |call: fn(&Service, &str) -> anyhow::Result<()>| {
        let executions = args.executions;
        let samples = at_once(service, agent, &threads, move |service, path| {
            (0..executions)
                .map(|_| {
                    let started = Instant::now();
                    call(service, path)?;
                    Ok(started.elapsed())
                })
                .collect()
        })?;
        histogram(&samples)
    };
    let warm = warm_round_trips(Service::exec_true)?;
    let python_warm = warm_round_trips(Service::python_one_plus_one)?;
    // Each session's memory is read as soon as its import is done: once it has been idle
    // for IDLE_STOP_SECS it is stopped, and the others may take longer than that.
    let rss = std::sync::Mutex::new(Vec::new());
    let pandas = at_once(service, agent, &threads, |service, path| {
        let started = Instant::now();
        let imported = service.import_pandas(path)?;
        let took = started.elapsed();
        let thread = path.rsplit('/').next().unwrap_or_default();
        let kib = session_rss_kib(&service.record(agent, thread)?)?;
        rss.lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(kib);
        Ok(if imported { vec![took] } else { Vec::new() })
    })?;
    let pandas = (pandas.len() == threads.len()).then_some(pandas);
    let rss_kib = rss.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let accel = match backend {
        "qemu" => service.accel(),
        _ => String::from("-"),
    };
    // Idle past the cool-down: every session stops; then all resume at once.
    let deadline = Instant::now() + Duration::from_secs(IDLE_STOP_SECS + 60);
    for thread in &threads {
        let path = format!("/v1/sessions/{agent}/{thread}");
        loop {
            let answer = service.call("GET", &path, None)?;
            let session: serde_json::Value = serde_json::from_slice(&answer.body)?;
            if session["state"] == "stopped" {
                break;
            }
            if Instant::now() > deadline {
                bail!("{path} was not stopped for being idle");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let resume = at_once(service, agent, &threads, |service, path| {
        let started = Instant::now();
        service.exec_true(path)?;
        Ok(vec![started.elapsed()])
    })?;
    for thread in &threads {
        service.expect(
            "DELETE",
            &format!("/v1/sessions/{agent}/{thread}"),
            None,
            &[204],
        )?;
    }
    Ok(Figures {
        backend: backend.to_string(),
        sessions: count,
        accel,
        cold,
        python_first,
        warm,
        python_warm,
        pandas,
        resume,
        rss_kib,
    })
}

/// Runs `work` for every thread's session at once, one OS thread each; all samples.
/// A running session's memory: its sandbox's process, and every process of the session's
/// user besides it (the Python interpreter, under netns; under qemu QEMU is the user's only
/// process).
fn session_rss_kib(record: &serde_json::Value) -> anyhow::Result<u64> {
    let pid = record["process"]["pid"]
        .as_u64()
        .context("a running session's pid")?;
    let uid = record["uid"].as_u64().context("the session's user")?;
    let own = status_kib(pid, "VmRSS:").context("the sandbox's memory")?;
    let others: u64 = user_processes(uid)
        .into_iter()
        .filter(|p| *p != pid)
        .filter_map(|p| status_kib(p, "VmRSS:"))
        .sum();
    Ok(own + others)
}

fn at_once(
    service: &Service,
    agent: &str,
    threads: &[String],
    work: impl Fn(&Service, &str) -> anyhow::Result<Vec<Duration>> + Sync,
) -> anyhow::Result<Vec<Duration>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = threads
            .iter()
            .map(|thread| {
                let path = format!("/v1/sessions/{agent}/{thread}");
                let work = &work;
                scope.spawn(move || work(service, &path))
            })
            .collect();
        let mut samples = Vec::new();
        for handle in handles {
            let found = handle
                .join()
                .map_err(|_| anyhow::anyhow!("a session's thread panicked"))??;
            samples.extend(found);
        }
        Ok(samples)
    })
}

/// The running `tollgate-launcher serve`.
struct Service {
    child: Child,
    addr: SocketAddr,
    token: String,
    data: PathBuf,
}

impl Service {
    fn start(args: &Args, gateway: &Gateway, backend: &str) -> anyhow::Result<Service> {
        // Not under /tmp: every session's sandbox gets a private one.
        let data = PathBuf::from(format!(
            "/var/tmp/tollgate-sessions-bench-{}-{backend}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&data);
        let gateway_data = gateway.dir().join("data");
        let mut child = Command::new(&args.launcher)
            .args(["serve", "--listen", "127.0.0.1:0", "--backend", backend])
            .arg("--data-dir")
            .arg(&data)
            .arg("--admin")
            .arg(format!("http://{}", gateway.admin))
            .arg("--admin-token-file")
            .arg(gateway_data.join("admin-token"))
            .arg("--ca")
            .arg(gateway_data.join("ca.pem"))
            .arg("--image")
            .arg(&args.image)
            .args(["--idle-stop-secs", &IDLE_STOP_SECS.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.launcher.display()))?;
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        std::io::BufRead::read_line(&mut stdout, &mut line)?;
        let Some(addr) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://"))
            .and_then(|a| a.parse().ok())
        else {
            let _ = child.kill();
            bail!("the service did not start ({backend}): {line:?}");
        };
        let token = std::fs::read_to_string(data.join("service-token"))?
            .trim()
            .to_string();
        Ok(Service {
            child,
            addr,
            token,
            data,
        })
    }

    /// One call on a connection of its own; the whole answer.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Response> {
        let mut stream = TcpStream::connect(self.addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        let body = body.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        )?;
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes)?;
        Ok(Response::parse(&bytes)?)
    }

    fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        ok: &[u16],
    ) -> anyhow::Result<Response> {
        let answer = self.call(method, path, body)?;
        if !ok.contains(&answer.status) {
            bail!(
                "{method} {path}: {} {}",
                answer.status_line,
                String::from_utf8_lossy(&answer.body)
            );
        }
        Ok(answer)
    }

    fn exec_true(&self, session: &str) -> anyhow::Result<()> {
        let answer = self.expect(
            "POST",
            &format!("{session}/exec"),
            Some(r#"{"command":"true"}"#),
            &[200],
        )?;
        let result: serde_json::Value = serde_json::from_slice(&answer.body)?;
        if result["exit_code"] != 0 {
            bail!("`true` did not exit 0: {result}");
        }
        Ok(())
    }

    /// Imports pandas in the session's interpreter; `false` where the sandbox has none.
    fn import_pandas(&self, session: &str) -> anyhow::Result<bool> {
        let answer = self.expect(
            "POST",
            &format!("{session}/python"),
            Some(r#"{"code":"import pandas","timeout_secs":300}"#),
            &[200],
        )?;
        let result: serde_json::Value = serde_json::from_slice(&answer.body)?;
        match result["error"]["type"].as_str() {
            None => Ok(true),
            Some("ModuleNotFoundError") => Ok(false),
            Some(_) => bail!("import pandas failed: {result}"),
        }
    }

    fn python_one_plus_one(&self, session: &str) -> anyhow::Result<()> {
        let answer = self.expect(
            "POST",
            &format!("{session}/python"),
            Some(r#"{"code":"1+1"}"#),
            &[200],
        )?;
        let result: serde_json::Value = serde_json::from_slice(&answer.body)?;
        if result["result"] != "2" {
            bail!("1+1 was not 2: {result}");
        }
        Ok(())
    }

    /// A session's record, as the service keeps it.
    fn record(&self, agent: &str, thread: &str) -> anyhow::Result<serde_json::Value> {
        for entry in std::fs::read_dir(&self.data)?.flatten() {
            let path = entry.path().join("session.json");
            if let Ok(bytes) = std::fs::read(&path) {
                let record: serde_json::Value = serde_json::from_slice(&bytes)?;
                if record["agent"] == agent && record["thread"] == thread {
                    return Ok(record);
                }
            }
        }
        bail!("no record of session {agent}/{thread}")
    }

    /// The accelerator the service chose (its probe's record).
    fn accel(&self) -> String {
        let text = std::fs::read_to_string(self.data.join("accel.json")).unwrap_or_default();
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if v["kvm"] == true => "kvm".into(),
            Ok(_) => "tcg".into(),
            Err(_) => "kvm (not probed)".into(),
        }
    }

    fn stop(&mut self) {
        // Its sessions first (a run that failed half-way leaves some): their sandboxes and
        // processes do not outlive the benchmark.
        if let Ok(answer) = self.call("GET", "/v1/sessions", None) {
            let listed: serde_json::Value =
                serde_json::from_slice(&answer.body).unwrap_or_default();
            for session in listed["sessions"].as_array().into_iter().flatten() {
                if let (Some(agent), Some(thread)) =
                    (session["agent"].as_str(), session["thread"].as_str())
                {
                    let _ = self.call("DELETE", &format!("/v1/sessions/{agent}/{thread}"), None);
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status_kib(pid: u64, field: &str) -> Option<u64> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The pids of `uid`'s processes.
fn user_processes(uid: u64) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                == Some(uid)
        })
        .collect()
}

/// The samples as a histogram of microseconds.
fn histogram(samples: &[Duration]) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3)?;
    for sample in samples {
        histogram.record(sample.as_micros() as u64)?;
    }
    Ok(histogram)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn table(rows: &[Figures]) -> String {
    let mut out = String::from(
        "Sandbox sessions (release builds; medians over the sessions but the warm percentiles, over every execution)\n\n\
         | backend | sessions at once | cold start (create → first `true` done) | first Python `1+1` | warm `true` p50 | warm `true` p99 | warm Python `1+1` p50 | warm `1+1` p99 | first `import pandas` | resume after idle stop | RSS per session (after pandas) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let secs = |v: &[Duration]| median(v.iter().map(Duration::as_secs_f64).collect());
        let python = format!(
            "{:.1} ms | {:.1} ms | {}",
            row.python_warm.value_at_quantile(0.5) as f64 / 1000.0,
            row.python_warm.value_at_quantile(0.99) as f64 / 1000.0,
            match &row.pandas {
                Some(times) => format!("{:.2} s", secs(times)),
                None => "no pandas".to_string(),
            }
        );
        out.push_str(&format!(
            "| {}{} | {} | {:.2} s | {:.2} s | {:.1} ms | {:.1} ms | {python} | {:.2} s | {:.0} MiB |\n",
            row.backend,
            if row.backend == "qemu" {
                format!(" ({})", row.accel)
            } else {
                String::new()
            },
            row.sessions,
            secs(&row.cold),
            secs(&row.python_first),
            row.warm.value_at_quantile(0.5) as f64 / 1000.0,
            row.warm.value_at_quantile(0.99) as f64 / 1000.0,
            secs(&row.resume),
            median(row.rss_kib.iter().map(|k| *k as f64 / 1024.0).collect()),
        ));
    }
    out
}
