//! OpenTelemetry: one span per request, the gateway's metrics and its log events, exported
//! over OTLP (HTTP/protobuf or gRPC) to a collector.
//!
//! Exporting never slows a request. A finished span (or log event) is pushed into a bounded
//! [`DropQueue`] with one short lock; one thread of its own (`tollgate-otlp`, with a small
//! single-threaded runtime) takes the queues every `flush_interval_ms`, or as soon as a full
//! batch (512) is waiting, and exports them; it collects and exports the metrics every
//! metrics interval. A collector that is slow or down only keeps that thread waiting: the
//! queues fill, further spans and events are dropped and counted
//! (`tollgate_telemetry_{spans,logs}_dropped_total`), and requests go on as before.
//!
//! Every request gets a trace id, exported or not: the per-request log line and the audit
//! record carry it, so a trace, a log line and an audit record can be joined.

mod export;
mod http;
mod log_writer;
mod protobuf;
mod request_line;
mod sampler;

pub use log_writer::{dropped as log_lines_dropped, StderrLog};
pub use request_line::{write_request_lines_directly, LineFormat, RequestLine};

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::trace::{
    Span as _, SpanId, SpanKind, Status, TraceId, Tracer as _, TracerProvider as _,
};
use opentelemetry::KeyValue;
use opentelemetry_sdk::logs::{SdkLogRecord, SdkLoggerProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData};
use opentelemetry_sdk::Resource;
use parking_lot::Mutex;
use tollgate_storage::AuditRecord;

use crate::config::{Config, OtlpProtocol, TelemetryConfig};
use crate::observe::metrics::{GaugeSources, Metrics, TelemetryDrops};
use crate::observe::queue::DropQueue;

/// The `tracing` target of the one log line per request. Its fields are the span's, so it is
/// exported as an OTLP log record only when `telemetry.request_logs` asks for it (or spans
/// are not exported): a backend would otherwise ingest every request twice.
pub const REQUEST_LOG_TARGET: &str = "tollgate_gateway::request";

/// The instrumentation scope of the gateway's spans and metrics.
const SCOPE: &str = "tollgate";

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An exporter could not be built from the configuration or the environment.
    #[error("telemetry: cannot set up the OTLP {signal} exporter: {reason}")]
    Exporter {
        /// traces, metrics or logs.
        signal: &'static str,
        /// What was wrong (never a header value).
        reason: String,
    },
    /// A `[telemetry.headers]` value could not be read.
    #[error("telemetry.headers: {0}")]
    Header(String),
    /// A setting is out of range.
    #[error("telemetry: {0}")]
    Invalid(String),
    /// The export thread could not start.
    #[error("telemetry: cannot start the export thread: {0}")]
    Thread(std::io::Error),
}

/// The gateway's OpenTelemetry pipeline (or its absence, when export is off).
pub struct Telemetry {
    spans: Spans,
    duration: Option<Histogram<f64>>,
    providers: Option<Providers>,
    queues: Arc<Queues>,
    exporter: Mutex<Option<export::Handle>>,
    summary: String,
    /// Whether the per-request log lines are exported as log records.
    export_request_lines: bool,
}

/// The SDK providers, kept for as long as telemetry runs.
struct Providers {
    traces: Option<SdkTracerProvider>,
    logs: Option<SdkLoggerProvider>,
    meters: Option<SdkMeterProvider>,
}

/// How requests' spans are made.
enum Spans {
    /// Not exported (requests still get trace ids).
    Off,
    /// Encoded by the request, sent by the export thread over http/protobuf.
    Encoded(sampler::Sampler),
    /// The SDK's spans, for its gRPC exporter.
    Sdk(SdkTracer),
}

/// What the data path hands to the export thread.
pub(crate) struct Queues {
    /// The SDK's spans (gRPC).
    spans: DropQueue<SpanData>,
    /// Encoded spans (http/protobuf).
    encoded_spans: DropQueue<Vec<u8>>,
    logs: DropQueue<(SdkLogRecord, opentelemetry::InstrumentationScope)>,
    /// Woken when a full export batch of spans is waiting (so a busy gateway exports as
    /// fast as batches fill, not only on the flush interval).
    spans_ready: tokio::sync::Notify,
    /// Woken when a full export batch of log events is waiting.
    logs_ready: tokio::sync::Notify,
}

impl TelemetryDrops for Queues {
    fn spans(&self) -> u64 {
        self.spans.dropped() + self.encoded_spans.dropped()
    }
    fn logs(&self) -> u64 {
        self.logs.dropped()
    }
}

/// A request's trace: its id from arrival, and its span while it is being exported.
#[derive(Default)]
pub struct RequestTrace {
    trace_id: Option<TraceId>,
    span: Option<RequestSpan>,
}

/// The span of a request whose span is exported.
enum RequestSpan {
    /// To be encoded when the request ends.
    Encoded { span_id: SpanId, start: SystemTime },
    /// The SDK's (boxed: it is large, and every request's context holds this).
    Sdk(Box<opentelemetry_sdk::trace::Span>),
}

impl RequestTrace {
    /// The trace id as 32 lowercase hex digits (W3C trace context's form), written without
    /// the formatting machinery: every request's summary carries it.
    pub fn id(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = self.trace_id.unwrap_or(TraceId::INVALID).to_bytes();
        let mut id = String::with_capacity(2 * bytes.len());
        for byte in bytes {
            id.push(char::from(HEX[usize::from(byte >> 4)]));
            id.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        id
    }
}

/// What the summary of a request does not carry but its span should.
pub struct SpanExtras<'a> {
    /// The agent's run mode, if the agent is known.
    pub run_mode: Option<&'a str>,
    /// The decision as metrics label it (`none` when the request never reached one).
    pub decision: &'static str,
    /// Time from arrival to the end of the answer.
    pub latency: Duration,
}

impl Telemetry {
    /// Telemetry that exports nothing; requests still get trace ids.
    pub fn off() -> Telemetry {
        Telemetry {
            spans: Spans::Off,
            duration: None,
            providers: None,
            queues: Arc::new(Queues::new(0)),
            exporter: Mutex::new(None),
            summary: "off".into(),
            export_request_lines: false,
        }
    }

    /// Starts export as `config.telemetry` and the `OTEL_*` environment say; off when no
    /// endpoint is named anywhere or `OTEL_SDK_DISABLED=true`.
    pub fn start(config: &Config) -> Result<Telemetry, TelemetryError> {
        let settings = &config.telemetry;
        let Some(plan) = export::Plan::resolve(config)? else {
            return Ok(Telemetry::off());
        };
        let queues = Arc::new(Queues::new(settings.queue_size));
        let resource = resource(settings);
        let exporter = export::Handle::spawn(plan.clone(), queues.clone(), resource.clone())?;
        let traces = (plan.signals.traces && plan.traces_http.is_none()).then(|| {
            SdkTracerProvider::builder()
                .with_resource(resource.clone())
                .with_span_processor(export::SpanQueue(queues.clone()))
                .build()
        });
        let logs = plan.signals.logs.then(|| {
            SdkLoggerProvider::builder()
                .with_resource(resource.clone())
                .with_log_processor(export::LogQueue(queues.clone()))
                .build()
        });
        let meters = exporter.reader().map(|reader| {
            SdkMeterProvider::builder()
                .with_resource(resource.clone())
                .with_reader(reader)
                .build()
        });
        let spans = match (&traces, plan.traces_http.is_some()) {
            (Some(provider), _) => Spans::Sdk(provider.tracer(SCOPE)),
            (None, true) => Spans::Encoded(plan.sampler),
            (None, false) => Spans::Off,
        };
        let duration = meters.as_ref().map(|p| {
            p.meter(SCOPE)
                .f64_histogram("tollgate.request.duration")
                .with_unit("s")
                .with_description(
                    "Time from a request's arrival to the end of its answer, approval waits included.",
                )
                .with_boundaries(crate::observe::metrics::LATENCY_BUCKETS.to_vec())
                .build()
        });
        Ok(Telemetry {
            summary: format!(
                "OTLP over {} (traces {}, metrics {}, logs {})",
                plan.protocol_name(),
                on_off(plan.signals.traces),
                on_off(plan.signals.metrics),
                on_off(plan.signals.logs)
            ),
            spans,
            duration,
            providers: Some(Providers {
                traces,
                logs,
                meters,
            }),
            queues,
            exporter: Mutex::new(Some(exporter)),
            export_request_lines: settings.request_logs || !plan.signals.traces,
        })
    }

    /// What is exported, for the start-up banner: "off", or the protocol and signals.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// The `tracing` layer that exports log events (info and above), if logs are exported.
    /// The export path's own events are never fed back into it.
    pub fn log_layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S> + Send + Sync>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let provider = self.providers.as_ref()?.logs.as_ref()?;
        Some(ExportedEvents {
            bridge: opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(
                provider,
            ),
            request_lines: self.export_request_lines,
        })
    }

    /// Whether the per-request log lines are exported as OTLP log records (then they must
    /// go through `tracing`, see [`RequestLine`]).
    pub fn exports_request_lines(&self) -> bool {
        self.export_request_lines && self.providers.as_ref().is_some_and(|p| p.logs.is_some())
    }

    /// Exports the gateway's metrics: the request counts and the values `/metrics` reads.
    pub fn observe(&self, metrics: Arc<Metrics>, gauges: Arc<GaugeSources>) {
        let Some(provider) = self.providers.as_ref().and_then(|p| p.meters.as_ref()) else {
            return;
        };
        export::register_instruments(&provider.meter(SCOPE), metrics, gauges);
    }

    /// How much telemetry was dropped (for the gauges).
    pub fn dropped(&self) -> Arc<dyn TelemetryDrops> {
        self.queues.clone()
    }

    /// Begins a request's trace (its span starts now, when spans are exported).
    pub fn start_request(&self) -> RequestTrace {
        let random_id = || TraceId::from_bytes(rand::random::<[u8; 16]>());
        match &self.spans {
            Spans::Sdk(tracer) => {
                let span = tracer
                    .span_builder("request")
                    .with_kind(SpanKind::Server)
                    .start(tracer);
                RequestTrace {
                    trace_id: Some(span.span_context().trace_id()),
                    span: Some(RequestSpan::Sdk(Box::new(span))),
                }
            }
            Spans::Encoded(sampler) => {
                let trace_id = random_id();
                let span = sampler.samples(trace_id).then(|| RequestSpan::Encoded {
                    span_id: SpanId::from_bytes(rand::random::<[u8; 8]>()),
                    start: SystemTime::now(),
                });
                RequestTrace {
                    trace_id: Some(trace_id),
                    span,
                }
            }
            Spans::Off => RequestTrace {
                trace_id: Some(random_id()),
                span: None,
            },
        }
    }

    /// Ends a request's span with what the request came to (its audit summary, which holds
    /// no body, query or header value), and records its duration.
    pub fn finish_request(&self, trace: RequestTrace, request: &AuditRecord, extras: SpanExtras) {
        if let Some(duration) = &self.duration {
            duration.record(
                extras.latency.as_secs_f64(),
                &[KeyValue::new("decision", extras.decision)],
            );
        }
        let error = match &request.error {
            Some(error) => Some(std::borrow::Cow::Borrowed(error.as_str())),
            None if request.status >= 500 => Some(format!("status {}", request.status).into()),
            None => None,
        };
        match trace.span {
            None => {}
            Some(RequestSpan::Encoded { span_id, start }) => {
                let head = protobuf::SpanHead {
                    trace_id: trace.trace_id.unwrap_or(TraceId::INVALID),
                    span_id,
                    name: &request.method,
                    start,
                    end: SystemTime::now(),
                    error: error.as_deref(),
                };
                let span = protobuf::span(&head, |out| span_attributes(request, &extras, out));
                export::queue_span(&self.queues.encoded_spans, &self.queues.spans_ready, span);
            }
            Some(RequestSpan::Sdk(mut span)) => {
                if !span.is_recording() {
                    return;
                }
                span.update_name(request.method.clone());
                let mut attributes = KeyValues(Vec::with_capacity(16));
                span_attributes(request, &extras, &mut attributes);
                span.set_attributes(attributes.0);
                if let Some(error) = error {
                    span.set_status(Status::error(error.into_owned()));
                }
                span.end();
            }
        }
    }

    /// Stops exporting: what is queued is sent if the collector answers within `grace`.
    pub fn shutdown(&self, grace: Duration) {
        if let Some(exporter) = self.exporter.lock().take() {
            exporter.stop(grace);
        }
        if let Some(providers) = &self.providers {
            // Export has ended: the SDK may stop recording.
            if let Some(traces) = &providers.traces {
                let _ = traces.shutdown();
            }
            if let Some(logs) = &providers.logs {
                let _ = logs.shutdown();
            }
            if let Some(meters) = &providers.meters {
                let _ = meters.shutdown();
            }
        }
    }
}

/// The `tracing` layer that writes the gateway's log lines to `writer` in `format`, with
/// colours only for text on a terminal (`colours`). The request line written directly
/// ([`RequestLine`]) is tested against this very layer.
pub fn fmt_layer<S, W>(
    writer: W,
    format: LineFormat,
    colours: bool,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer as _;
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LineFormat::Text => layer.with_ansi(colours).boxed(),
        // One JSON object per line, the event's fields flattened beside time and level.
        LineFormat::Json => layer.json().flatten_event(true).boxed(),
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(1));
    }
}

/// Passes the events worth exporting to the OpenTelemetry bridge: info and above, and none
/// from the export path itself (which would feed the queue it drains). The `RUST_LOG` filter
/// in front of every layer still decides what is logged at all.
struct ExportedEvents<L> {
    bridge: L,
    /// Whether the per-request lines ([`REQUEST_LOG_TARGET`]) are exported too.
    request_lines: bool,
}

/// Targets whose events are never exported.
const NOT_EXPORTED: [&str; 6] = [
    "tollgate_gateway::observe::telemetry",
    "opentelemetry",
    "tonic",
    "h2",
    "hyper",
    "tower",
];

impl<S, L> tracing_subscriber::Layer<S> for ExportedEvents<L>
where
    S: tracing::Subscriber,
    L: tracing_subscriber::Layer<S>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let metadata = event.metadata();
        if exported(metadata.level(), metadata.target(), self.request_lines) {
            self.bridge.on_event(event, ctx);
        }
    }
}

/// Whether an event of `level` from `target` is exported as an OTLP log record.
fn exported(level: &tracing::Level, target: &str, request_lines: bool) -> bool {
    *level <= tracing::Level::INFO
        && (request_lines || target != REQUEST_LOG_TARGET)
        && !NOT_EXPORTED.iter().any(|t| target.starts_with(t))
}

impl Queues {
    fn new(capacity: usize) -> Queues {
        Queues {
            spans: DropQueue::new(capacity),
            encoded_spans: DropQueue::new(capacity),
            logs: DropQueue::new(capacity),
            spans_ready: tokio::sync::Notify::new(),
            logs_ready: tokio::sync::Notify::new(),
        }
    }
}

/// The span's attributes: OpenTelemetry's HTTP names where they exist, `tollgate.*` for the
/// gateway's own. The path never has its query; no header value or body is ever set. The one
/// list of them, for both kinds of span.
fn span_attributes(r: &AuditRecord, extras: &SpanExtras, out: &mut dyn protobuf::Attributes) {
    use protobuf::Any::{Float, Int, Str, Strs};
    let int = |n: u64| Int(i64::try_from(n).unwrap_or(i64::MAX));
    out.put("http.request.method", Str(&r.method));
    out.put("server.address", Str(&r.host));
    out.put("url.path", Str(&r.path));
    out.put("http.response.status_code", Int(i64::from(r.status)));
    out.put("http.request.body.size", int(r.bytes_in));
    out.put("http.response.body.size", int(r.bytes_out));
    out.put("tollgate.agent", Str(&r.agent));
    out.put(
        "tollgate.latency_ms",
        Float(extras.latency.as_secs_f64() * 1e3),
    );
    if let Some(run_mode) = extras.run_mode {
        out.put("tollgate.run_mode", Str(run_mode));
    }
    if let Some(tool_call) = &r.tool_call {
        out.put("tollgate.tool_call", Str(tool_call));
    }
    if !r.decision.is_empty() {
        out.put("tollgate.decision", Str(&r.decision));
        out.put("tollgate.policies", Strs(&r.policies));
    }
    if let Some(approval) = &r.approval {
        out.put("tollgate.approval.id", Str(approval));
        out.put(
            "tollgate.approval.wait_ms",
            int(r.approval_wait_ms.unwrap_or(0)),
        );
    }
    if let Some(provider) = &r.credential {
        out.put("tollgate.credential.provider", Str(provider));
    }
    if let Some(error) = &r.error {
        out.put("error.type", Str(error));
    }
}

/// The SDK's form of the attributes.
struct KeyValues(Vec<KeyValue>);

impl protobuf::Attributes for KeyValues {
    fn put(&mut self, key: &'static str, value: protobuf::Any<'_>) {
        use protobuf::Any;
        let value = match value {
            Any::Str(s) => opentelemetry::Value::from(s.to_string()),
            Any::Int(i) => i.into(),
            Any::Float(f) => f.into(),
            Any::Bool(b) => b.into(),
            Any::Strs(list) => opentelemetry::Value::Array(
                list.iter()
                    .map(|p| opentelemetry::StringValue::from(p.clone()))
                    .collect::<Vec<_>>()
                    .into(),
            ),
        };
        self.0.push(KeyValue::new(key, value));
    }
}

/// `service.name` (config, then `OTEL_SERVICE_NAME`, then `tollgate`), `service.version`,
/// `host.name`, `process.pid`, and whatever `OTEL_RESOURCE_ATTRIBUTES` adds.
fn resource(settings: &TelemetryConfig) -> Resource {
    let name = settings
        .service_name
        .clone()
        .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "tollgate".to_string());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut builder = Resource::builder()
        .with_service_name(name)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())));
    if !host.is_empty() {
        builder = builder.with_attribute(KeyValue::new("host.name", host));
    }
    builder.build()
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

impl OtlpProtocol {
    fn name(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::Grpc => "grpc",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            seq: 0,
            at: 0,
            agent: "a1".into(),
            tool_call: Some("tc".into()),
            session: None,
            method: "POST".into(),
            host: "api.example".into(),
            path: "/v1/x".into(),
            decision: "allow".into(),
            policies: vec!["p1".into()],
            approval: Some("ap".into()),
            approval_wait_ms: Some(1500),
            credential: Some("entra".into()),
            status: 201,
            error: None,
            bytes_in: 3,
            bytes_out: 4,
            latency_us: 9,
            upgrade: None,
            trace_id: String::new(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn spans_carry_the_request_summary_under_semantic_names() {
        let extras = SpanExtras {
            run_mode: Some("Review"),
            decision: "allow",
            latency: Duration::from_millis(2),
        };
        let mut attributes = KeyValues(Vec::new());
        span_attributes(&record(), &extras, &mut attributes);
        let attributes = attributes.0;
        let get = |key: &str| {
            attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(get("http.request.method").as_deref(), Some("POST"));
        assert_eq!(get("url.path").as_deref(), Some("/v1/x"));
        assert_eq!(get("http.response.status_code").as_deref(), Some("201"));
        assert_eq!(get("tollgate.run_mode").as_deref(), Some("Review"));
        assert_eq!(get("tollgate.approval.wait_ms").as_deref(), Some("1500"));
        assert_eq!(
            get("tollgate.credential.provider").as_deref(),
            Some("entra")
        );
        assert_eq!(get("error.type"), None);
    }

    #[test]
    fn request_lines_are_exported_as_logs_only_when_asked_and_the_export_path_never() {
        use tracing::Level;
        assert!(exported(
            &Level::WARN,
            "tollgate_gateway::egress::upstream",
            false
        ));
        assert!(exported(&Level::INFO, "pingora_core::services", false));
        assert!(!exported(
            &Level::DEBUG,
            "tollgate_gateway::egress::upstream",
            true
        ));
        assert!(!exported(&Level::INFO, REQUEST_LOG_TARGET, false));
        assert!(exported(&Level::INFO, REQUEST_LOG_TARGET, true));
        assert!(!exported(
            &Level::WARN,
            "tollgate_gateway::observe::telemetry::export",
            true
        ));
        assert!(!exported(&Level::ERROR, "h2::proto", true));
    }

    #[test]
    fn without_export_requests_still_get_distinct_trace_ids() {
        let telemetry = Telemetry::off();
        let a = telemetry.start_request().id();
        let b = telemetry.start_request().id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_ne!(a, TraceId::INVALID.to_string());
    }

    #[test]
    fn a_trace_id_reads_as_the_sdk_writes_it() {
        for bytes in [
            [0u8; 16],
            [0xff; 16],
            *b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10",
        ] {
            let trace = RequestTrace {
                trace_id: Some(TraceId::from_bytes(bytes)),
                span: None,
            };
            assert_eq!(trace.id(), TraceId::from_bytes(bytes).to_string());
        }
        let trace = Telemetry::off().start_request();
        assert_eq!(trace.id(), trace.trace_id.expect("an id").to_string());
        assert_eq!(RequestTrace::default().id(), "0".repeat(32));
    }
}
