//! What OpenTelemetry costs a request, piece by piece: its span (start and finish, with the
//! summary's attributes; encoded by the gateway over http/protobuf, the SDK's over gRPC — the
//! SDK's also costs its conversion on the export thread, not measured here) and its log line (as a `tracing` event through the `fmt` layer alone
//! and through the OTLP log bridge as well, and written directly as the gateway writes it);
//! and, beside them, the hand-off of a writer interval's audit records.
//! Export runs against a loopback port nobody listens on, so the queues fill and drop — the
//! work a request does is the same whether or not the collector answers. Run: `cargo bench -p tollgate-gateway --bench telemetry`.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tollgate_gateway::config::Config;
use tollgate_gateway::observe::queue::DropQueue;
use tollgate_gateway::observe::telemetry::{LineFormat, RequestLine, SpanExtras, Telemetry};
use tollgate_storage::AuditRecord;
use tracing_subscriber::layer::SubscriberExt as _;

fn summary() -> AuditRecord {
    AuditRecord {
        seq: 0,
        at: 0,
        agent: "bench".into(),
        tool_call: Some("tc-1".into()),
        session: None,
        method: "GET".into(),
        host: "api.github.com:443".into(),
        path: "/repos/x/y".into(),
        decision: "allow".into(),
        policies: vec!["allowlist".into(), "readonly-reads".into()],
        approval: None,
        approval_wait_ms: None,
        credential: Some("dev".into()),
        status: 200,
        error: None,
        bytes_in: 0,
        bytes_out: 1024,
        latency_us: 900,
        upgrade: None,
        trace_id: String::new(),
        prev_hash: String::new(),
        hash: String::new(),
    }
}

/// Telemetry exporting everything to a closed loopback port, over `protocol`.
fn exporting_over(protocol: &str) -> Telemetry {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let config = Config::from_toml(
        &format!(
            "[telemetry]\nendpoint = \"http://127.0.0.1:{port}\"\nprotocol = \"{protocol}\"\n"
        ),
        "bench",
    )
    .expect("config");
    Telemetry::start(&config).expect("telemetry")
}

/// Telemetry exporting everything over http/protobuf (the gateway's own span encoding).
fn exporting() -> Telemetry {
    exporting_over("http/protobuf")
}

fn request_span(c: &mut Criterion) {
    let record = summary();
    let extras = || SpanExtras {
        run_mode: Some("Autonomous"),
        decision: "allow",
        latency: Duration::from_micros(900),
    };
    let mut group = c.benchmark_group("request span");
    let off = Telemetry::off();
    group.bench_function("export off (trace id only)", |b| {
        b.iter(|| {
            let trace = off.start_request();
            let _ = trace.id();
            off.finish_request(trace, &record, extras());
        })
    });
    let on = exporting();
    group.bench_function("exported", |b| {
        b.iter(|| {
            let trace = on.start_request();
            let _ = trace.id();
            on.finish_request(trace, &record, extras());
        })
    });
    // Over gRPC, spans are the SDK's: made as spans, converted on the export thread.
    let sdk = exporting_over("grpc");
    group.bench_function("exported, the SDK's span (gRPC)", |b| {
        b.iter(|| {
            let trace = sdk.start_request();
            let _ = trace.id();
            sdk.finish_request(trace, &record, extras());
        })
    });
    group.finish();
}

/// A request's log line with the summary's fields.
fn line(record: &AuditRecord) -> RequestLine<'_> {
    RequestLine {
        agent: &record.agent,
        tool_call: record.tool_call.as_deref().unwrap_or("-"),
        method: &record.method,
        host: &record.host,
        path: &record.path,
        decision: &record.decision,
        credential: record.credential.as_deref().unwrap_or("-"),
        policies: "allowlist,readonly-reads",
        approval: "-",
        status: record.status,
        elapsed_us: 2_181,
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        refusal: None,
        error: None,
    }
}

fn request_log_line(c: &mut Criterion) {
    let record = summary();
    let line = line(&record);
    let mut group = c.benchmark_group("request log line");
    // This process never installs the direct writer: `log` makes a `tracing` event.
    let fmt = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_ansi(false)
    };
    let plain = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(fmt());
    tracing::subscriber::with_default(plain, || {
        group.bench_function("tracing fmt layer", |b| b.iter(|| line.log()));
    });
    let telemetry = Arc::new(exporting());
    let bridged = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(fmt())
        .with(telemetry.log_layer());
    tracing::subscriber::with_default(bridged, || {
        group.bench_function("tracing fmt layer + OTLP log bridge", |b| {
            b.iter(|| line.log())
        });
    });
    // What the gateway does when the line is not exported: formatted straight into a buffer
    // (appending it to the stderr writer's buffer is one short lock more).
    let mut buf = Vec::with_capacity(1024);
    group.bench_function("written directly", |b| {
        b.iter(|| {
            buf.clear();
            line.write(&mut buf, LineFormat::Text);
        })
    });
    group.finish();
}

/// The audit records of one writer interval handed off: pushed one by one, as requests do,
/// then taken by the writer. The batch is dropped outside the measurement.
fn audit_hand_off(c: &mut Criterion) {
    const BATCH: usize = 500;
    let queue = DropQueue::new(65_536);
    let record = summary();
    let mut group = c.benchmark_group("audit hand-off");
    group.bench_function("500 records pushed, then taken", |b| {
        b.iter_batched(
            || vec![record.clone(); BATCH],
            |records| {
                for record in records {
                    let _ = queue.push(record);
                }
                queue.take()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, request_span, request_log_line, audit_hand_off);
criterion_main!(benches);
