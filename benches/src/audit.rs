//! What the audit trail costs the store to write, all of it: the records' encoding and
//! hashing, fjall's journal, and the flushes and compactions its worker threads run after.
//!
//! For each trail length asked for, a fresh store (in a temporary directory on the same disk
//! as `TMPDIR`) takes that many records of one agent, in batches as the gateway's audit writer
//! sends them; then the bench waits until the disk has been quiet for a second (fjall's
//! workers done). It reports, per 10,000 records: this process's CPU time (every thread,
//! fjall's included) and the bytes it wrote to disk (`/proc/self/io`), and what is left on
//! disk. A trail whose every write re-merged what was written before shows as bytes written
//! growing faster than the trail. With `--approval-every N`, one approval record is stored
//! (durably, as the gateway does when it holds a request) after every N batches.
//!
//!   cargo run --release -p tollgate-benches --bin tollgate-audit-bench -- --records 100000,500000

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;
use tollgate_benches::procfs;
use tollgate_storage::{ApprovalKind, ApprovalRecord, ApprovalState, AuditRecord, Store};

/// The gateway's allocator (`gateway/src/allocator.rs`), so that the records' encoding costs
/// here what it costs in the gateway's audit writer (with glibc's, `malloc` and `free` were a
/// sixth of this bench's samples, and the CPU per record 17% more).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(about = "The audit trail's cost to the store: CPU and bytes written per 10k records")]
struct Args {
    /// Trail lengths to write, each into a fresh store.
    #[arg(long, value_delimiter = ',', default_value = "100000,500000")]
    records: Vec<u64>,
    /// Records per write (the gateway's audit writer sends up to 512 at a time).
    #[arg(long, default_value_t = 256)]
    batch: u64,
    /// Store an approval record after every this many batches (0: none).
    #[arg(long, default_value_t = 0)]
    approval_every: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pid = std::process::id();
    println!(
        "| records | append s | CPU s / 10k records | MiB written / 10k records | MiB on disk |"
    );
    println!("|---|---|---|---|---|");
    for &records in &args.records {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path()).map_err(|e| anyhow!("{e}"))?;
        let cpu = procfs::cpu_time(pid).context("/proc/self/stat")?;
        let written = written_bytes()?;
        let started = Instant::now();
        let mut seq = 0;
        while seq < records {
            let batch = (seq..records.min(seq + args.batch)).map(record).collect();
            store
                .append_audit_batch(batch)
                .map_err(|e| anyhow!("{e}"))?;
            seq += args.batch;
            if args.approval_every > 0 && (seq / args.batch) % args.approval_every == 0 {
                store
                    .insert_approval(&approval(seq))
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }
        let appended = started.elapsed();
        settle()?;
        let per_10k = 10_000.0 / records as f64;
        let cpu = procfs::cpu_time(pid).context("/proc/self/stat")? - cpu;
        let written = (written_bytes()? - written) as f64 / MIB;
        println!(
            "| {records} | {:.2} | {:.3} | {:.1} | {:.1} |",
            appended.as_secs_f64(),
            cpu.as_secs_f64() * per_10k,
            written * per_10k,
            disk_bytes(dir.path()) as f64 / MIB
        );
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

/// One request's record, as the gateway writes it for an allowed GET in a tool call.
fn record(n: u64) -> AuditRecord {
    AuditRecord {
        seq: 0,
        at: 1_700_000_000_000 + n,
        agent: "agent-1".into(),
        tool_call: Some("tc-0123456789abcdef".into()),
        session: None,
        method: "GET".into(),
        host: "origin.test".into(),
        path: "/bench/1024".into(),
        decision: "allow".into(),
        policies: vec!["default-allow-reads".into()],
        approval: None,
        approval_wait_ms: None,
        credential: None,
        status: 200,
        error: None,
        bytes_in: 0,
        bytes_out: 1024,
        latency_us: 900,
        upgrade: None,
        trace_id: format!("{n:032x}"),
        prev_hash: String::new(),
        hash: String::new(),
    }
}

/// A request held for approval, as the gateway stores it.
fn approval(n: u64) -> ApprovalRecord {
    ApprovalRecord {
        id: format!("ap-{n:016x}"),
        agent: "agent-1".into(),
        tool_call: Some("tc-0123456789abcdef".into()),
        session: None,
        run_mode: Some("Review".into()),
        command: None,
        kind: ApprovalKind::Request,
        method: "POST".into(),
        url: "https://origin.test/bench/write".into(),
        body_sha256: "00".repeat(32),
        body_bytes: 0,
        credential: None,
        policies: vec!["review-approved-writes".into()],
        requested_at: 1_700_000_000_000 + n,
        expires_at: 1_700_000_600_000 + n,
        state: ApprovalState::Pending,
        decided_at: None,
        approver: None,
        reason: None,
        sealed_obo_token: None,
        obo_audience: None,
        not_sent: None,
    }
}

/// Bytes this process has caused to be written to disk so far.
fn written_bytes() -> anyhow::Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io").context("/proc/self/io")?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no write_bytes in /proc/self/io")
}

/// Waits until nothing has been written for a second (at most a minute).
fn settle() -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = written_bytes()?;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        let now = written_bytes()?;
        if now == last {
            return Ok(());
        }
        last = now;
    }
    Ok(())
}

/// Bytes of the files under `path`.
fn disk_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
