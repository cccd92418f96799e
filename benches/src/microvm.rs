//! The sandbox launcher's cost (issue 7): how long `tollgate-launcher up` takes until the
//! sandbox's first request reaches the gateway, and how much memory each microVM holds, for
//! one VM alone and for two started at once.
//!
//! The release `tollgate` binary runs on loopback with its default policies; each round starts
//! VMs with the release `tollgate-launcher` (its default accelerator choice: KVM only if a
//! probe boot works, else software emulation), each VM's workload sending one request through
//! its own gateway listener (to a host the default allowlist denies, so nothing is resolved
//! or leaves the machine) and then idling (after one uncounted VM, whose `up` may have run
//! the KVM probe). Timed from starting `up` to the moment the
//! gateway's `/metrics` counts the agent's request (polled every 10 ms); the memory is each
//! QEMU's resident set and its proportional share (`Pss`: the kernel image is mapped by every
//! VM and counted once between them) once all requests have arrived. Everything is taken
//! down after each round. Needs root, QEMU and a guest image (`tollgate-launcher image
//! build`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tollgate_benches::{Gateway, TempDir};

/// Measure microVM start-up (up → first request) and memory per VM.
#[derive(Parser)]
struct Args {
    /// The `tollgate` binary.
    #[arg(long)]
    gateway: PathBuf,
    /// The `tollgate-launcher` binary.
    #[arg(long)]
    launcher: PathBuf,
    /// The guest image.
    #[arg(long, default_value = "/var/lib/tollgate-launcher/image")]
    image: PathBuf,
    /// Rounds (each: one VM, then two at once); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Also write the Markdown table here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One VM's figures in one round.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ready: Duration,
    first_request: Duration,
    rss_kib: u64,
    pss_kib: u64,
}

const WORKLOAD: &str =
    "curl -s -o /dev/null http://launcher-bench.invalid/; while :; do sleep 3600; done";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = TempDir::new("tollgate-microvm-bench")?;
    let gateway = Gateway::start(&args.gateway, TempDir::new("tollgate-microvm-gw")?, "")?;
    let admin = gateway.admin_api()?;
    let state = dir.path().join("state");
    let mut accel = String::from("?");
    let mut alone = Vec::new();
    let mut together = Vec::new();
    // Not counted: the first `up` may probe KVM (up to 10 s, once per host boot).
    let warm_up = ["bench-warm-up".to_string()];
    let run = start_vms(&args, &gateway, &state, &warm_up, &admin);
    let _ = launcher(&args, &state).args(["down", &warm_up[0]]).output();
    run?;
    for round in 0..args.rounds {
        for (count, samples) in [(1, &mut alone), (2, &mut together)] {
            let agents: Vec<String> = (0..count)
                .map(|i| format!("bench-r{round}-n{count}-{i}"))
                .collect();
            let run = start_vms(&args, &gateway, &state, &agents, &admin);
            for agent in &agents {
                let _ = launcher(&args, &state).args(["down", agent]).output();
            }
            let (found, used) = run?;
            accel = used;
            samples.extend(found);
        }
        eprintln!("round {} of {} done", round + 1, args.rounds);
    }
    let table = table(&args, &accel, &alone, &together);
    tollgate_benches::report(&table, args.out.as_deref())?;
    Ok(())
}

fn launcher(args: &Args, state: &Path) -> Command {
    let mut command = Command::new(&args.launcher);
    command.env("TOLLGATE_LAUNCHER_STATE", state);
    command
}

/// Starts `agents`' VMs at once; returns each one's sample and the accelerator used.
fn start_vms(
    args: &Args,
    gateway: &Gateway,
    state: &Path,
    agents: &[String],
    admin: &tollgate_benches::gateway::AdminApi,
) -> anyhow::Result<(Vec<Sample>, String)> {
    let started = Instant::now();
    let data = gateway.dir().join("data");
    let ups: Vec<_> = agents
        .iter()
        .map(|agent| {
            let mut command = launcher(args, state);
            command
                .args(["up", "--agent", agent, "--admin"])
                .arg(format!("http://{}", gateway.admin))
                .arg("--token-file")
                .arg(data.join("admin-token"))
                .arg("--ca")
                .arg(data.join("ca.pem"))
                .arg("--image")
                .arg(&args.image)
                .args([
                    "--memory",
                    &args.memory.to_string(),
                    "--",
                    "sh",
                    "-c",
                    WORKLOAD,
                ]);
            std::thread::spawn(move || {
                let out = command.output();
                (out, started.elapsed())
            })
        })
        .collect();
    let mut ready = Vec::new();
    for (agent, up) in agents.iter().zip(ups) {
        let (out, elapsed) = up
            .join()
            .map_err(|_| anyhow::anyhow!("up thread panicked"))?;
        let out = out.context("running tollgate-launcher")?;
        if !out.status.success() {
            bail!(
                "up {agent} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ready.push(elapsed);
    }
    let mut first = vec![None; agents.len()];
    let deadline = Instant::now() + Duration::from_secs(120);
    while first.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            bail!("no request from every VM within 120 s");
        }
        let metrics = admin.call("GET", "/metrics", None)?;
        let text = String::from_utf8_lossy(&metrics.body).to_string();
        for (i, agent) in agents.iter().enumerate() {
            if first[i].is_none()
                && text.contains(&format!("tollgate_requests_total{{agent=\"{agent}\""))
            {
                first[i] = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut samples = Vec::new();
    let mut accel = String::new();
    for ((agent, ready), first) in agents.iter().zip(ready).zip(first) {
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(state.join(agent).join("sandbox.json")).context("sandbox record")?,
        )?;
        accel = record["accel"].as_str().unwrap_or("?").to_string();
        let pid = record["pid"].as_u64().context("pid")?;
        let (rss_kib, pss_kib) = memory(pid).context("the VM's memory")?;
        samples.push(Sample {
            ready,
            first_request: first.unwrap_or_default(),
            rss_kib,
            pss_kib,
        });
    }
    Ok((samples, accel))
}

/// `Rss` and `Pss` of `pid` in KiB.
fn memory(pid: u64) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn table(args: &Args, accel: &str, alone: &[Sample], together: &[Sample]) -> String {
    let mut out = format!(
        "MicroVM start-up and memory ({} rounds, medians; accelerator {accel}, {} MiB guests)\n\n\
         | VMs started at once | up → ready | up → first request at the gateway | RSS per VM | PSS per VM |\n\
         |---|---|---|---|---|\n",
        args.rounds, args.memory
    );
    for (label, samples) in [("1", alone), ("2", together)] {
        let secs = |f: fn(&Sample) -> Duration| {
            median(samples.iter().map(|s| f(s).as_secs_f64()).collect())
        };
        let mib =
            |f: fn(&Sample) -> u64| median(samples.iter().map(|s| f(s) as f64 / 1024.0).collect());
        out.push_str(&format!(
            "| {label} | {:.2} s | {:.2} s | {:.0} MiB | {:.0} MiB |\n",
            secs(|s| s.ready),
            secs(|s| s.first_request),
            mib(|s| s.rss_kib),
            mib(|s| s.pss_kib),
        ));
    }
    out
}
