//! The export side: where OTLP goes (resolved once from the config and the `OTEL_*`
//! environment), the queues' processors, and the `tollgate-otlp` thread that sends.
//!
//! Spans over http/protobuf are the gateway's own: encoded by the request
//! ([`super::protobuf`]), framed here and sent with the gateway's HTTP client, to the
//! endpoint, headers and timeout the SDK's exporter would have used ([`HttpTraces`]). Spans
//! over gRPC, metrics and logs go through the SDK's exporters.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::logs::{LogBatch, LogExporter as _, LogProcessor, SdkLogRecord};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter as _;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::watch;

use super::http::OtlpHttp;
use super::protobuf::Frame;
use super::sampler::Sampler;
use super::{Queues, TelemetryError};
use crate::config::{Config, OtlpProtocol};
use crate::egress::credentials::provider::read_secret;
use crate::observe::metrics::{GaugeSources, Metrics, SCALARS};
use crate::observe::queue::DropQueue;

/// Spans or log events handed to one export call at most.
const BATCH: usize = 512;

/// The three OpenTelemetry signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// A span per request.
    Traces,
    /// The gateway's counters and gauges, read every metrics interval.
    Metrics,
    /// The gateway's log events (info and above).
    Logs,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }
    fn env(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
            Signal::Logs => "LOGS",
        }
    }
}

/// Which signals are exported.
#[derive(Debug, Clone, Copy)]
pub(super) struct Signals {
    pub traces: bool,
    pub metrics: bool,
    pub logs: bool,
}

/// Everything export needs, resolved and checked before anything starts.
#[derive(Clone)]
pub(super) struct Plan {
    pub signals: Signals,
    protocol: OtlpProtocol,
    /// From the config; `None` leaves the endpoint to the `OTEL_*` variables.
    endpoint: Option<String>,
    headers: HashMap<String, String>,
    timeout: Option<Duration>,
    flush_interval: Duration,
    metrics_interval: Duration,
    /// Where spans go when the gateway sends them itself (traces on, over http/protobuf).
    pub traces_http: Option<HttpTraces>,
    /// Which requests' spans are exported.
    pub sampler: Sampler,
}

/// Where the gateway's own span export sends, resolved as the SDK's HTTP exporter resolves
/// it for the other signals.
#[derive(Clone)]
pub(super) struct HttpTraces {
    /// The config's endpoint with `/v1/traces`; else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as
    /// it is; else `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces`.
    url: String,
    /// The config's headers, then `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (or, without it,
    /// `OTEL_EXPORTER_OTLP_HEADERS`) over them.
    headers: Vec<(String, String)>,
    /// The config's timeout; else `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, then
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (ms); else 10 s.
    timeout: Duration,
}

impl std::fmt::Debug for HttpTraces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are secrets (API keys): never printed; nor is the URL's userinfo
        // or query.
        f.debug_struct("HttpTraces")
            .field("url", &tollgate_policy::target::redacted(&self.url))
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The SDK's default export timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpTraces {
    fn resolve(
        plan_endpoint: Option<String>,
        config_headers: &HashMap<String, String>,
        config_timeout: Option<Duration>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<HttpTraces, TelemetryError> {
        let url = plan_endpoint
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").map(|e| e.trim().to_string()))
            .or_else(|| {
                env("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .map(|e| format!("{}/v1/traces", e.trim().trim_end_matches('/')))
            })
            .ok_or_else(|| TelemetryError::Invalid("no endpoint for traces".into()))?;
        if tollgate_policy::target::Target::from_url(&url).is_err() {
            return Err(TelemetryError::Exporter {
                signal: Signal::Traces.name(),
                reason: format!(
                    "invalid endpoint {:?} (an absolute http or https URL)",
                    tollgate_policy::target::redacted(&url)
                ),
            });
        }
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ] {
            if env(name).is_some_and(|v| !v.trim().eq_ignore_ascii_case("none")) {
                return Err(TelemetryError::Invalid(format!(
                    "{name}: payloads are sent uncompressed (unset it or use none)"
                )));
            }
        }
        let mut headers: Vec<(String, String)> = Vec::with_capacity(config_headers.len());
        for (name, value) in config_headers {
            // Checked once here rather than failing every export; the value is not shown.
            if http::HeaderValue::from_str(value).is_err() {
                return Err(TelemetryError::Header(format!(
                    "{name}: the value is not a valid HTTP header value"
                )));
            }
            headers.push((name.to_ascii_lowercase(), value.clone()));
        }
        let from_env = env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
            .unwrap_or_default();
        for (name, value) in parse_headers(&from_env) {
            headers.retain(|(n, _)| *n != name);
            headers.push((name, value));
        }
        let env_ms = |name: &str| {
            env(name)
                .and_then(|ms| ms.trim().parse().ok())
                .map(Duration::from_millis)
        };
        let timeout = config_timeout
            .or_else(|| env_ms("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"))
            .or_else(|| env_ms("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .unwrap_or(DEFAULT_TIMEOUT);
        Ok(HttpTraces {
            url,
            headers,
            timeout,
        })
    }

    /// Sends one export body; an answer other than 2xx is a failure.
    async fn send(&self, client: &OtlpHttp, body: Vec<u8>) -> OTelSdkResult {
        let request = crate::client::Request {
            method: "POST",
            url: &self.url,
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (std::borrow::Cow::Owned(n.clone()), v.clone()))
                .collect(),
            body: Some(("application/x-protobuf".into(), body.into())),
        };
        match client.send(request, self.timeout).await {
            Ok(status) if (200..300).contains(&status) => Ok(()),
            Ok(status) => Err(OTelSdkError::InternalFailure(format!(
                "the collector answered {status}"
            ))),
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        }
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `name=value` pairs split by commas, values percent-decoded;
/// pairs that are not valid header names and values are left out, as the SDK leaves them.
fn parse_headers(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let (name, value) = (name.trim(), value.trim());
            let value = percent_decode(value).unwrap_or_else(|| value.to_string());
            let valid = !name.is_empty()
                && !value.is_empty()
                && http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && http::HeaderValue::from_str(&value).is_ok();
            valid.then(|| (name.to_ascii_lowercase(), value))
        })
        .collect()
}

/// `%XX` sequences decoded; `None` if one is malformed or the result is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Refuses an export of `signal` that would send a secret — a header (a collector's API key,
/// from the config or `OTEL_EXPORTER_OTLP_{,<SIGNAL>_}HEADERS`) or the endpoint URL's user
/// information — over plain `http://` to a host other than this one. Like approval webhooks,
/// plain http is for a collector on loopback.
fn refuse_secrets_in_the_clear(
    signal: Signal,
    config_endpoint: Option<&str>,
    config_headers: &HashMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), TelemetryError> {
    let Some(endpoint) = config_endpoint
        .map(str::to_string)
        .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", signal.env())))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
    else {
        return Ok(());
    };
    let endpoint = endpoint.trim();
    let env_headers = env(&format!("OTEL_EXPORTER_OTLP_{}_HEADERS", signal.env()))
        .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
        .unwrap_or_default();
    let parsed = tollgate_policy::target::Target::from_url(endpoint);
    // User information whatever the scheme: gRPC's client takes `grpc://user:key@host` or a
    // bare `user:key@host` (made `http://` by OTEL_EXPORTER_OTLP_INSECURE), which the
    // gateway's own parser refuses before it looks for an `@`.
    let after_scheme = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let user_info = after_scheme
        .split('/')
        .next()
        .is_some_and(|authority| authority.contains('@'));
    // Any header the environment names counts, even one the SDK might leave out.
    let secrets = !config_headers.is_empty() || !env_headers.trim().is_empty();
    let in_the_clear = match &parsed {
        Ok((target, _)) => {
            target.scheme == tollgate_policy::target::Scheme::Http && !target.host.is_loopback()
        }
        // Not a URL the gateway can read: only https is known to be safe.
        Err(_) => !endpoint.to_ascii_lowercase().starts_with("https://"),
    };
    if (secrets || user_info) && in_the_clear {
        return Err(TelemetryError::Exporter {
            signal: signal.name(),
            reason: format!(
                "{} would be sent in the clear to {}: use an https endpoint (plain http is \
                 accepted for a collector on loopback only)",
                if user_info {
                    "the endpoint's user information"
                } else {
                    "its headers (a collector's API key)"
                },
                tollgate_policy::target::redacted(endpoint)
            ),
        });
    }
    Ok(())
}

/// A non-empty environment variable of the process.
fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Plan {
    /// `None` when nothing is to be exported.
    pub fn resolve(config: &Config) -> Result<Option<Plan>, TelemetryError> {
        Plan::resolve_in(config, &process_env)
    }

    /// [`Plan::resolve`] with `env` for the environment (tests pass their own).
    fn resolve_in(
        config: &Config,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Plan>, TelemetryError> {
        let t = &config.telemetry;
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let generic = t.endpoint.is_some() || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
        // A signal is exported when it is on, not turned off by OTEL_<SIGNAL>_EXPORTER=none,
        // and some endpoint names where it goes.
        let on = |signal: Signal, configured: bool| {
            configured
                && env(&format!("OTEL_{}_EXPORTER", signal.env()))
                    .is_none_or(|v| !v.trim().eq_ignore_ascii_case("none"))
                && (generic
                    || env(&format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", signal.env())).is_some())
        };
        let signals = Signals {
            traces: on(Signal::Traces, t.traces),
            metrics: on(Signal::Metrics, t.metrics),
            logs: on(Signal::Logs, t.logs),
        };
        if !(signals.traces || signals.metrics || signals.logs) {
            return Ok(None);
        }
        let protocol = match (t.protocol, env("OTEL_EXPORTER_OTLP_PROTOCOL")) {
            (Some(p), _) => p,
            (None, None) => OtlpProtocol::HttpProtobuf,
            (None, Some(p)) => match p.trim() {
                "http/protobuf" => OtlpProtocol::HttpProtobuf,
                "grpc" => OtlpProtocol::Grpc,
                other => {
                    return Err(TelemetryError::Invalid(format!(
                        "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported (use http/protobuf or grpc)"
                    )))
                }
            },
        };
        let mut headers = HashMap::new();
        for (name, source) in &t.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(TelemetryError::Header(format!(
                    "{name:?} is not a valid header name"
                )));
            }
            let value = read_secret(source, &format!("telemetry.headers.{name}"))
                .map_err(TelemetryError::Header)?;
            headers.insert(name.clone(), value.expose().to_string());
        }
        if t.queue_size == 0 || t.flush_interval_ms == 0 {
            return Err(TelemetryError::Invalid(
                "queue_size and flush_interval_ms must be at least 1".into(),
            ));
        }
        let metrics_interval = match t.metrics_interval_secs {
            Some(secs) => Duration::from_secs(secs),
            None => env("OTEL_METRIC_EXPORT_INTERVAL")
                .and_then(|ms| ms.trim().parse().ok())
                .map_or(Duration::from_secs(60), Duration::from_millis),
        };
        if metrics_interval.is_zero() {
            return Err(TelemetryError::Invalid(
                "the metrics interval must be at least 1 s".into(),
            ));
        }
        for signal in [Signal::Traces, Signal::Metrics, Signal::Logs] {
            let on = match signal {
                Signal::Traces => signals.traces,
                Signal::Metrics => signals.metrics,
                Signal::Logs => signals.logs,
            };
            if on {
                refuse_secrets_in_the_clear(signal, t.endpoint.as_deref(), &headers, env)?;
            }
        }
        let mut plan = Plan {
            signals,
            protocol,
            endpoint: t.endpoint.clone(),
            headers,
            timeout: t.export_timeout_secs.map(Duration::from_secs),
            flush_interval: Duration::from_millis(t.flush_interval_ms),
            metrics_interval,
            traces_http: None,
            sampler: Sampler::from_env(env),
        };
        if signals.traces && protocol == OtlpProtocol::HttpProtobuf {
            plan.traces_http = Some(HttpTraces::resolve(
                plan.endpoint(Signal::Traces),
                &plan.headers,
                plan.timeout,
                env,
            )?);
        }
        Ok(Some(plan))
    }

    pub fn protocol_name(&self) -> &'static str {
        self.protocol.name()
    }

    /// The endpoint to give the exporter of `signal`, if the config names one.
    fn endpoint(&self, signal: Signal) -> Option<String> {
        let base = self.endpoint.as_deref()?;
        Some(match self.protocol {
            OtlpProtocol::HttpProtobuf => {
                format!("{}/v1/{}", base.trim_end_matches('/'), signal.name())
            }
            OtlpProtocol::Grpc => base.to_string(),
        })
    }

    /// Whether the gRPC channel needs TLS (an `https` endpoint, from the config or env).
    fn grpc_tls(&self, signal: Signal) -> bool {
        self.endpoint
            .clone()
            .or_else(|| process_env(&format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", signal.env())))
            .or_else(|| process_env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("https://"))
    }
}

/// Builds one signal's exporter from the plan, over HTTP or gRPC. The `http` and `grpc`
/// builders differ in type only, so the shared settings are applied by this macro.
macro_rules! exporter {
    ($plan:expr, $signal:expr, $builder:expr) => {{
        let plan: &Plan = $plan;
        let signal: Signal = $signal;
        let built = match plan.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut b = $builder
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_http_client(super::http::OtlpHttp::new(
                        plan.timeout.unwrap_or(Duration::from_secs(10)),
                    ))
                    .with_headers(plan.headers.clone());
                if let Some(endpoint) = plan.endpoint(signal) {
                    b = b.with_endpoint(endpoint);
                }
                if let Some(timeout) = plan.timeout {
                    b = b.with_timeout(timeout);
                }
                b.build()
            }
            OtlpProtocol::Grpc => {
                let mut metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::new();
                for (name, value) in &plan.headers {
                    let name = tonic::metadata::MetadataKey::from_bytes(name.as_bytes());
                    let value = tonic::metadata::MetadataValue::try_from(value.as_str());
                    if let (Ok(name), Ok(value)) = (name, value) {
                        metadata.insert(name, value);
                    }
                }
                let mut b = $builder.with_tonic().with_metadata(metadata);
                if plan.grpc_tls(signal) {
                    b = b.with_tls_config(
                        opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                            .with_native_roots(),
                    );
                }
                if let Some(endpoint) = plan.endpoint(signal) {
                    b = b.with_endpoint(endpoint);
                }
                if let Some(timeout) = plan.timeout {
                    b = b.with_timeout(timeout);
                }
                b.build()
            }
        };
        built.map_err(|e| TelemetryError::Exporter {
            signal: signal.name(),
            reason: e.to_string(),
        })
    }};
}

/// The exporters, built on the export thread (gRPC channels need its runtime).
struct Exporters {
    spans: Option<opentelemetry_otlp::SpanExporter>,
    logs: Option<opentelemetry_otlp::LogExporter>,
    metrics: Option<opentelemetry_otlp::MetricExporter>,
}

impl Exporters {
    fn build(plan: &Plan, resource: &Resource) -> Result<Exporters, TelemetryError> {
        let mut spans = match plan.signals.traces && plan.traces_http.is_none() {
            true => Some(exporter!(
                plan,
                Signal::Traces,
                opentelemetry_otlp::SpanExporter::builder()
            )?),
            false => None,
        };
        let mut logs = match plan.signals.logs {
            true => Some(exporter!(
                plan,
                Signal::Logs,
                opentelemetry_otlp::LogExporter::builder()
            )?),
            false => None,
        };
        let metrics = match plan.signals.metrics {
            true => Some(exporter!(
                plan,
                Signal::Metrics,
                opentelemetry_otlp::MetricExporter::builder()
            )?),
            false => None,
        };
        if let Some(spans) = &mut spans {
            spans.set_resource(resource);
        }
        if let Some(logs) = &mut logs {
            logs.set_resource(resource);
        }
        Ok(Exporters {
            spans,
            logs,
            metrics,
        })
    }
}

/// The export thread (`tollgate-otlp`), kept to stop it: [`Handle::stop`] sends what is queued.
pub(super) struct Handle {
    stop: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    reader: Option<Arc<ManualReader>>,
}

impl Handle {
    /// Starts the thread; returns once its exporters are built (or could not be).
    pub fn spawn(
        plan: Plan,
        queues: Arc<Queues>,
        resource: Resource,
    ) -> Result<Handle, TelemetryError> {
        let reader = plan
            .signals
            .metrics
            .then(|| Arc::new(ManualReader::builder().build()));
        let (stop, stopped) = watch::channel(false);
        let (built_tx, built_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let thread_reader = reader.clone();
        std::thread::Builder::new()
            .name("tollgate-otlp".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = built_tx.send(Err(TelemetryError::Thread(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let exporters = match Exporters::build(&plan, &resource) {
                        Ok(exporters) => {
                            let _ = built_tx.send(Ok(()));
                            exporters
                        }
                        Err(e) => {
                            let _ = built_tx.send(Err(e));
                            return;
                        }
                    };
                    run(exporters, &plan, &queues, thread_reader, resource, stopped).await;
                });
                let _ = done_tx.send(());
            })
            .map_err(TelemetryError::Thread)?;
        match built_rx.recv() {
            Ok(Ok(())) => Ok(Handle { stop, done, reader }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TelemetryError::Thread(std::io::Error::other(
                "the export thread ended while starting",
            ))),
        }
    }

    /// The metric reader the meter provider registers with (collected by this thread).
    pub fn reader(&self) -> Option<SharedReader> {
        self.reader.clone().map(SharedReader)
    }

    /// Asks the thread to send what is queued and end; waits for it at most `grace`.
    pub fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = self.done.recv_timeout(grace);
    }
}

/// Waits `interval`, or until `ready` says a full batch is waiting; true when export is
/// stopping instead.
async fn tick(
    interval: Duration,
    ready: Option<&tokio::sync::Notify>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    if *stop.borrow() {
        return true;
    }
    let batch_full = async {
        match ready {
            Some(ready) => ready.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(interval) => false,
        _ = batch_full => false,
        _ = stop.changed() => true,
    }
}

async fn run(
    exporters: Exporters,
    plan: &Plan,
    queues: &Queues,
    reader: Option<Arc<ManualReader>>,
    resource: Resource,
    stop: watch::Receiver<bool>,
) {
    let spans = async {
        let Some(exporter) = &exporters.spans else {
            return;
        };
        let send = async |batch: Vec<SpanData>| exporter.export(batch).await;
        let health = Health::new(Signal::Traces);
        drain(
            &queues.spans,
            &queues.spans_ready,
            plan,
            health,
            stop.clone(),
            send,
        )
        .await;
    };
    let encoded_spans = async {
        let Some(target) = &plan.traces_http else {
            return;
        };
        let frame = Frame::new(&resource, super::SCOPE);
        let client = OtlpHttp::new(target.timeout);
        let send =
            async |batch: Vec<Vec<u8>>| target.send(&client, frame.export_body(&batch)).await;
        let health = Health::new(Signal::Traces);
        drain(
            &queues.encoded_spans,
            &queues.spans_ready,
            plan,
            health,
            stop.clone(),
            send,
        )
        .await;
    };
    let logs = async {
        let Some(exporter) = &exporters.logs else {
            return;
        };
        let send = async |events: Vec<(SdkLogRecord, opentelemetry::InstrumentationScope)>| {
            let refs: Vec<_> = events
                .iter()
                .map(|(record, scope)| (record, scope))
                .collect();
            exporter.export(LogBatch::new(&refs)).await
        };
        let health = Health::new(Signal::Logs);
        drain(
            &queues.logs,
            &queues.logs_ready,
            plan,
            health,
            stop.clone(),
            send,
        )
        .await;
    };
    let metrics = async {
        let (Some(exporter), Some(reader)) = (&exporters.metrics, &reader) else {
            return;
        };
        let mut stop = stop.clone();
        let mut health = Health::new(Signal::Metrics);
        loop {
            let last = tick(plan.metrics_interval, None, &mut stop).await;
            let mut collected = ResourceMetrics::default();
            let _ = match reader.collect(&mut collected) {
                Ok(()) => health.report(exporter.export(&collected).await),
                Err(e) => health.report(Err(e)),
            };
            if last {
                return;
            }
        }
    };
    tokio::join!(spans, encoded_spans, logs, metrics);
    drop(resource);
}

/// Logs an export failure when it starts and when it ends, not on every attempt.
struct Health {
    signal: Signal,
    failing: bool,
    /// While the collector fails, how long to wait before trying again (doubling).
    backoff: Duration,
    /// No export is tried before this.
    next_try: Option<Instant>,
}

/// The first wait after a failed export, and the longest.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

impl Health {
    fn new(signal: Signal) -> Health {
        Health {
            signal,
            failing: false,
            backoff: Duration::ZERO,
            next_try: None,
        }
    }

    /// Whether an export may be tried now (not while backing off from a failure).
    fn may_try(&self) -> bool {
        self.next_try.is_none_or(|at| Instant::now() >= at)
    }

    /// Notes an export's outcome; true if it succeeded.
    fn report(&mut self, result: OTelSdkResult) -> bool {
        match result {
            Ok(()) => {
                if self.failing {
                    tracing::info!(signal = self.signal.name(), "telemetry export recovered");
                }
                self.failing = false;
                self.backoff = Duration::ZERO;
                self.next_try = None;
                true
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(
                        signal = self.signal.name(),
                        error = %e,
                        "telemetry export failed; requests are unaffected, data is dropped until the collector answers"
                    );
                }
                self.failing = true;
                self.backoff = (self.backoff * 2).clamp(BACKOFF.0, BACKOFF.1);
                self.next_try = Some(Instant::now() + self.backoff);
                false
            }
        }
    }
}

/// Exports `queue` in batches, every flush interval or when a full batch waits, until
/// export stops (then once more). While the collector fails, exports are not tried (backing
/// off up to 30 s): the queue fills and further items are dropped as they come, so a dead
/// collector costs no encoding or connection attempts per batch. Items taken but not
/// delivered count as dropped too.
async fn drain<T>(
    queue: &DropQueue<T>,
    ready: &tokio::sync::Notify,
    plan: &Plan,
    mut health: Health,
    mut stop: watch::Receiver<bool>,
    mut send: impl AsyncFnMut(Vec<T>) -> OTelSdkResult,
) {
    loop {
        let last = tick(plan.flush_interval, Some(ready), &mut stop).await;
        if !last && !health.may_try() {
            continue;
        }
        let mut batch = queue.take();
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(BATCH));
            let tried = batch.len();
            if !health.report(send(batch).await) {
                queue.count_dropped(tried + rest.len());
                break;
            }
            batch = rest;
        }
        if last {
            return;
        }
    }
}

/// Queues `item` for export and wakes the exporter each time another full batch waits; on
/// a drop, returns how many this queue has dropped.
fn enqueue<T>(queue: &DropQueue<T>, ready: &tokio::sync::Notify, item: T) -> Result<(), u64> {
    match queue.push(item) {
        Ok(queued) => {
            if queued % BATCH == 0 {
                ready.notify_one();
            }
            Ok(())
        }
        Err((_, dropped)) => Err(dropped),
    }
}

/// Queues a finished span (either form) for export; a drop is counted, and warned about at
/// every power of two.
pub(super) fn queue_span<T>(queue: &DropQueue<T>, ready: &tokio::sync::Notify, span: T) {
    if let Err(dropped) = enqueue(queue, ready, span) {
        if dropped.is_power_of_two() {
            tracing::warn!(
                dropped,
                "the telemetry exporter is behind; spans were dropped"
            );
        }
    }
}

/// Puts finished spans in the export queue.
#[derive(Debug)]
pub(super) struct SpanQueue(pub Arc<Queues>);

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queues")
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        queue_span(&self.0.spans, &self.0.spans_ready, span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Puts log events in the export queue (drops are counted, not logged: that would feed
/// this queue again).
#[derive(Debug)]
pub(super) struct LogQueue(pub Arc<Queues>);

impl LogProcessor for LogQueue {
    fn emit(&self, record: &mut SdkLogRecord, scope: &opentelemetry::InstrumentationScope) {
        let _ = enqueue(
            &self.0.logs,
            &self.0.logs_ready,
            (record.clone(), scope.clone()),
        );
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
}

/// The manual reader, shared between the meter provider and the export thread.
#[derive(Debug)]
pub(super) struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// The exported metrics: the same numbers as `/metrics`, read when collected (the request
/// duration histogram is recorded per request instead).
pub(super) fn register_instruments(
    meter: &Meter,
    metrics: Arc<Metrics>,
    gauges: Arc<GaugeSources>,
) {
    meter
        .u64_observable_counter("tollgate.requests")
        .with_description("Requests by agent, policy decision and the status sent.")
        .with_callback(move |observer| {
            metrics.request_counts(|agent, decision, status, count| {
                observer.observe(
                    count,
                    &[
                        KeyValue::new("agent", agent.to_string()),
                        KeyValue::new("decision", decision),
                        KeyValue::new("status", i64::from(status)),
                    ],
                )
            })
        })
        .build();
    for scalar in SCALARS {
        let gauges = gauges.clone();
        let read = scalar.read;
        if scalar.counter {
            meter
                .u64_observable_counter(scalar.otel_name)
                .with_description(scalar.help)
                .with_callback(move |o| o.observe(read(&gauges.read()), &[]))
                .build();
        } else {
            meter
                .u64_observable_gauge(scalar.otel_name)
                .with_description(scalar.help)
                .with_callback(move |o| o.observe(read(&gauges.read()), &[]))
                .build();
        }
    }
    let policy = gauges;
    meter
        .u64_observable_gauge("tollgate.policy.info")
        .with_description("The policy set in force (its content hash).")
        .with_callback(move |o| {
            o.observe(1, &[KeyValue::new("version", policy.read().policy_version)])
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(telemetry: &str) -> Config {
        Config::from_toml(&format!("[telemetry]\n{telemetry}"), "test").expect("config")
    }

    fn plan(telemetry: &str, vars: &[(&str, &str)]) -> Result<Option<Plan>, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Plan::resolve_in(&config(telemetry), &move |name| vars.get(name).cloned())
    }

    #[test]
    fn export_is_off_without_an_endpoint_or_when_disabled() {
        assert!(plan("", &[]).expect("plan").is_none());
        assert!(plan(
            "endpoint = \"http://c:4318\"",
            &[("OTEL_SDK_DISABLED", "true")]
        )
        .expect("plan")
        .is_none());
        let on = plan("endpoint = \"http://c:4318\"", &[])
            .expect("plan")
            .expect("on");
        assert!(on.signals.traces && on.signals.metrics && on.signals.logs);
        assert_eq!(on.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            on.endpoint(Signal::Metrics).as_deref(),
            Some("http://c:4318/v1/metrics")
        );
    }

    #[test]
    fn the_environment_turns_signals_on_and_off_and_picks_the_protocol() {
        // Only a traces endpoint: only traces.
        let p = plan(
            "",
            &[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces",
            )],
        )
        .expect("plan")
        .expect("on");
        assert!(p.signals.traces && !p.signals.metrics && !p.signals.logs);
        assert_eq!(
            p.endpoint(Signal::Traces),
            None,
            "left to the exporter's env handling"
        );
        let p = plan(
            "",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_LOGS_EXPORTER", "none"),
                ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
            ],
        )
        .expect("plan")
        .expect("on");
        assert_eq!(p.protocol, OtlpProtocol::Grpc);
        assert!(p.signals.traces && p.signals.metrics && !p.signals.logs);
        assert_eq!(p.metrics_interval, Duration::from_secs(5));
        // The config wins over the environment.
        let p = plan(
            "endpoint = \"http://c:4318\"\nprotocol = \"http/protobuf\"\nmetrics_interval_secs = 2",
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
            ],
        )
        .expect("plan")
        .expect("on");
        assert_eq!(p.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(p.metrics_interval, Duration::from_secs(2));
    }

    #[test]
    fn the_gateways_own_span_export_goes_where_the_sdks_would() {
        let traces = |telemetry: &str, vars: &[(&str, &str)]| {
            plan(telemetry, vars)
                .expect("plan")
                .expect("on")
                .traces_http
                .expect("http traces")
        };
        // The config's endpoint and headers; env headers over them; the config's timeout.
        let t = traces(
            "endpoint = \"https://c:4318/\"\nexport_timeout_secs = 3",
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://ignored:1/x"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "bad name=x,x-k=%41%42,novalue=",
                ),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
            ],
        );
        assert_eq!(t.url, "https://c:4318/v1/traces");
        assert_eq!(t.headers, vec![("x-k".to_string(), "AB".to_string())]);
        assert_eq!(t.timeout, Duration::from_secs(3));
        // Without them: the signal's endpoint as it is, then the generic one with the path.
        let t = traces(
            "",
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c/custom"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "250"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
            ],
        );
        assert_eq!(
            (t.url.as_str(), t.timeout),
            ("https://c/custom", Duration::from_millis(250))
        );
        let t = traces("", &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]);
        assert_eq!(
            (t.url.as_str(), t.timeout),
            ("http://c:4318/v1/traces", DEFAULT_TIMEOUT)
        );
        // Over gRPC the SDK's exporter sends them.
        let p = plan("endpoint = \"http://c:4317\"\nprotocol = \"grpc\"", &[]);
        assert!(p.expect("plan").expect("on").traces_http.is_none());
        // What the gateway cannot do is refused at start, with the variable named.
        let e = plan(
            "",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ],
        );
        assert!(e
            .err()
            .is_some_and(|e| e.to_string().contains("OTEL_EXPORTER_OTLP_COMPRESSION")));
        let e = plan("", &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "c:4318")]);
        assert!(e
            .err()
            .is_some_and(|e| e.to_string().contains("invalid endpoint")));
        // Neither the endpoint's userinfo nor its query reaches the message.
        let e = plan(
            "",
            &[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://user:key-3f9@c/x?token=q-77",
            )],
        )
        .err()
        .map(|e| e.to_string())
        .expect("refused");
        assert!(e.contains("invalid endpoint"), "{e}");
        assert!(!e.contains("key-3f9") && !e.contains("q-77"), "{e}");
        // A configured header value that HTTP cannot carry is refused at start, unshown.
        let secret = tempfile::NamedTempFile::new().expect("file");
        std::fs::write(secret.path(), "ab\u{1}cd-secret").expect("write");
        let e = plan(
            &format!(
                "endpoint = \"https://c:4318\"\nheaders = {{ \"x-key\" = {{ file = {:?} }} }}",
                secret.path()
            ),
            &[],
        )
        .err()
        .map(|e| e.to_string())
        .expect("refused");
        assert!(e.contains("x-key") && !e.contains("cd-secret"), "{e}");
    }

    #[test]
    fn secrets_never_go_to_a_collector_in_the_clear_off_this_host() {
        let key = tempfile::NamedTempFile::new().expect("file");
        std::fs::write(key.path(), "key-5e1").expect("write");
        let with_key = |endpoint: &str, protocol: &str| {
            format!(
                "endpoint = {endpoint:?}\nprotocol = {protocol:?}\nheaders = {{ \"x-key\" = {{ file = {:?} }} }}",
                key.path()
            )
        };
        let refused = |telemetry: &str, vars: &[(&str, &str)]| {
            let e = plan(telemetry, vars)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| panic!("accepted: {telemetry} {vars:?}"));
            assert!(e.contains("in the clear") && e.contains("https"), "{e}");
            assert!(!e.contains("key-5e1") && !e.contains("pw-9"), "{e}");
        };
        // The config's headers, over http/protobuf or gRPC, to another host.
        refused(
            &with_key("http://collector.internal:4318", "http/protobuf"),
            &[],
        );
        refused(&with_key("http://10.1.2.3:4317", "grpc"), &[]);
        // Headers from the environment, for every signal or for one.
        let off_host = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
        refused(
            "",
            &[off_host[0], ("OTEL_EXPORTER_OTLP_HEADERS", "x-key=k")],
        );
        refused(
            "traces = false\nlogs = false",
            &[
                off_host[0],
                ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-key=k"),
            ],
        );
        // Credentials in the URL, whatever its scheme or none.
        refused("endpoint = \"http://u:pw-9@c:4318\"", &[]);
        refused(
            "endpoint = \"grpc://u:pw-9@c:4317\"\nprotocol = \"grpc\"",
            &[],
        );
        refused("endpoint = \"u:pw-9@c:4317\"\nprotocol = \"grpc\"", &[]);
        refused("endpoint = \"http://u:p#w-9@c:4318\"", &[]);
        // Accepted: https, plain http on loopback, or nothing secret to send.
        for endpoint in [
            "https://collector.internal:4318",
            "http://127.0.0.1:4318",
            "http://[::1]:4318",
            "http://localhost:4318",
        ] {
            let p = plan(&with_key(endpoint, "http/protobuf"), &[]);
            assert!(p.is_ok_and(|p| p.is_some()), "{endpoint}");
        }
        assert!(plan("", &off_host).is_ok_and(|p| p.is_some()));
        // A header for a signal that is not exported does not matter.
        assert!(plan(
            "metrics = false",
            &[
                off_host[0],
                ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-key=k")
            ]
        )
        .is_ok_and(|p| p.is_some()));
    }

    #[test]
    fn the_exporter_is_woken_by_every_full_batch_not_only_by_its_timer() {
        let queue = DropQueue::new(2 * BATCH + 1);
        let ready = tokio::sync::Notify::new();
        let woken = |ready: &tokio::sync::Notify| ready_at_first_poll(ready.notified());
        for n in 0..BATCH - 1 {
            assert_eq!(enqueue(&queue, &ready, n), Ok(()));
        }
        assert!(!woken(&ready), "not before a batch is full");
        assert_eq!(enqueue(&queue, &ready, BATCH), Ok(()));
        assert!(woken(&ready), "a full batch wakes the exporter");
        for n in 0..BATCH {
            assert_eq!(enqueue(&queue, &ready, n), Ok(()));
        }
        assert!(woken(&ready), "and so does the next one");
        assert_eq!(enqueue(&queue, &ready, 0), Ok(()));
        assert_eq!(
            enqueue(&queue, &ready, 0),
            Err(1),
            "beyond capacity: dropped, counted"
        );
    }

    #[tokio::test]
    async fn a_failing_collector_is_backed_off_from_and_what_it_missed_is_counted() {
        let plan = plan("endpoint = \"http://c:4318\"\nflush_interval_ms = 10", &[])
            .expect("plan")
            .expect("on");
        let queue = DropQueue::new(100);
        let ready = tokio::sync::Notify::new();
        for n in 0..10 {
            assert_eq!(enqueue(&queue, &ready, n), Ok(()));
        }
        let (stop, stopped) = watch::channel(false);
        let attempts = std::cell::Cell::new(0);
        let send = async |_batch: Vec<i32>| {
            attempts.set(attempts.get() + 1);
            Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                "down".into(),
            ))
        };
        let health = Health::new(Signal::Traces);
        let drained = drain(&queue, &ready, &plan, health, stopped, send);
        let later = async {
            // Several flush intervals pass within the first 1 s back-off.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(queue.dropped(), 10, "the failed batch counts as dropped");
            for n in 0..5 {
                assert_eq!(enqueue(&queue, &ready, n), Ok(()));
            }
            let _ = stop.send(true);
        };
        tokio::join!(drained, later);
        assert_eq!(
            attempts.get(),
            2,
            "one try, then only the last one at shutdown"
        );
        assert_eq!(queue.dropped(), 15);
    }

    /// Whether `future` is ready at its first poll.
    fn ready_at_first_poll(future: impl std::future::Future<Output = ()>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        future.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let endpoint = "endpoint = \"http://c:4318\"\n";
        let e = plan(
            "",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ],
        );
        assert!(e.err().is_some_and(|e| e.to_string().contains("http/json")));
        let e = plan(&format!("{endpoint}queue_size = 0"), &[]);
        assert!(e
            .err()
            .is_some_and(|e| e.to_string().contains("queue_size")));
        let e = plan(
            &format!("{endpoint}headers = {{ \"bad name\" = {{ env = \"X\" }} }}"),
            &[],
        );
        assert!(e.err().is_some_and(|e| e.to_string().contains("bad name")));
        let e = plan(
            &format!(
                "{endpoint}headers = {{ \"x-key\" = {{ env = \"TOLLGATE_TEST_UNSET_KEY\" }} }}"
            ),
            &[],
        );
        assert!(e
            .err()
            .is_some_and(|e| e.to_string().contains("TOLLGATE_TEST_UNSET_KEY")));
        assert!(Config::from_toml("[telemetry]\nprotocol = \"http/json\"", "t").is_err());
    }
}
