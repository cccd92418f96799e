//! OpenTelemetry end to end: the real gateway exports to real OTLP receivers on loopback —
//! an HTTP/protobuf one (a pingora HTTP server) and a gRPC one (a tonic server) — whose
//! payloads are decoded with the OpenTelemetry protobuf types and checked field by field.
//! A collector that never answers must cost requests nothing: they succeed and the spans that
//! do not fit the queue are counted as dropped.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::Response;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prost::Message;
use support::*;

/// One OTLP request as the receiver got it.
#[derive(Clone)]
struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// An OTLP/HTTP receiver: stores every POST and answers 200 with an empty (valid) response.
#[derive(Clone, Default)]
struct HttpReceiver {
    received: Arc<Mutex<Vec<Received>>>,
}

#[async_trait]
impl ServeHttp for HttpReceiver {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body.extend_from_slice(&chunk);
        }
        let req = session.req_header();
        let headers = header_map(req);
        self.received.lock().expect("received").push(Received {
            path: req.uri.path().to_string(),
            headers,
            body,
        });
        let mut r = Response::new(Vec::new());
        r.headers_mut().insert(
            "content-type",
            "application/x-protobuf".parse().expect("header value"),
        );
        r.headers_mut().insert("content-length", 0.into());
        r
    }
}

impl HttpReceiver {
    fn start() -> (HttpReceiver, u16, tokio::sync::watch::Sender<bool>) {
        let receiver = HttpReceiver::default();
        let socket =
            tollgate_gateway::egress::listener::bind("127.0.0.1:0".parse().expect("addr"), None)
                .expect("bind receiver");
        let port = socket.local_addr().expect("addr").port();
        let (stop, watch) = tokio::sync::watch::channel(false);
        tollgate_gateway::egress::listener::serve("otlp", socket, receiver.clone(), None, watch);
        (receiver, port, stop)
    }

    fn bodies(&self, path: &str) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .expect("received")
            .iter()
            .filter(|r| r.path == path)
            .map(|r| r.body.clone())
            .collect()
    }

    fn all(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }

    fn spans(&self) -> Vec<ResourceSpan> {
        self.bodies("/v1/traces")
            .iter()
            .flat_map(|b| spans_of(ExportTraceServiceRequest::decode(&b[..]).expect("traces")))
            .collect()
    }
}

/// Every span with its resource's attributes.
fn spans_of(request: ExportTraceServiceRequest) -> Vec<ResourceSpan> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| r.attributes)
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push((resource.clone(), span));
            }
        }
    }
    out
}

fn value(attributes: &[KeyValue], key: &str) -> Option<any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v: AnyValue| v.value)
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    match value(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s),
        other => panic!("{key} is not a string: {other:?}"),
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match value(attributes, key)? {
        any_value::Value::IntValue(i) => Some(i),
        other => panic!("{key} is not an integer: {other:?}"),
    }
}

/// Polls `check` for up to 15 s.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Denies one domain outright, beside the approval policies (reads allowed, writes held).
const BLOCKED: (&str, &str) = (
    "blocked.cedar",
    "@id(\"blocked-domain\")\nforbid (principal, action, resource) when { resource in Domain::\"blocked.test\" };\n",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_metrics_and_logs_reach_an_otlp_http_collector_without_secrets() {
    if no_curl() {
        return;
    }
    let (collector, port, _stop) = HttpReceiver::start();
    let origin = Origin::http();
    let protected = Origin::protected_by(
        "api.otel.test",
        issued("static-agent-token-6f1e", "otel"),
        "otel",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("static-token");
    std::fs::write(&token, "static-agent-token-6f1e\n").expect("token");
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}resolve = {{ \"api.otel.test\" = \"127.0.0.1\", \"blocked.test\" = \"127.0.0.1\" }}\n\
         [telemetry]\nendpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"tollgate-e2e\"\n\
         flush_interval_ms = 100\nmetrics_interval_secs = 1\nrequest_logs = true\n\
         headers = {{ \"x-collector-key\" = {{ env = \"E2E_COLLECTOR_KEY\" }} }}\n\
         [[identity_providers]]\nname = \"dev\"\nkind = \"static\"\ntoken = {{ file = {token:?} }}\n\
         [[credential_rules]]\nhosts = [\"api.otel.test\"]\nports = [{protected_port}]\naudience = \"api://otel\"\n\
         [[agents]]\nid = \"a\"\nrun_mode = \"Review\"\nidentity = \"dev\"\npeers = [\"127.0.0.1\"]\n",
        loopback_upstream(Some(&origin_ca().cert_path())),
        protected_port = protected.port(),
    );
    let gw = Gateway::start_with_env(
        &config,
        &[APPROVAL_POLICIES, BLOCKED],
        "",
        &[("E2E_COLLECTOR_KEY", "collector-key-93b2")],
    );
    assert!(
        gw.banner
            .iter()
            .any(|l| l.contains("telemetry: OTLP over http/protobuf")),
        "{:?}",
        gw.banner
    );
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc-1"}"#))
            .status,
        201
    );

    // Allowed, with the agent's token injected; the query must not be exported.
    let allowed = format!(
        "https://api.otel.test:{}/read/me?sig=query-secret-77",
        protected.port()
    );
    let mut args = via(&gw, &allowed);
    args.extend(args!["-H", "tollgate-tool-call: tc-1"]);
    let r = curl_async(args).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Denied by policy.
    let denied = format!("http://blocked.test:{}/nope", origin.port());
    let r = curl_async(args!["-x", gw.proxy_url(), &denied]).await;
    assert_eq!(r.status, 403, "{r:?}");
    // Held, then approved after a while; its body is previewed to approvers (and on the
    // feed), never exported.
    let mut feed = FeedListener::open(&gw, &gw.admin_token(), "", None).await;
    feed.expect("synced", None).await;
    let held = post_in_background(
        &gw,
        &format!("http://127.0.0.1:{}/write", origin.port()),
        "{\"n\":\"held-body-marker-4e2a\"}",
        &[],
    );
    let approval = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let shown = gw.admin_call("GET", &format!("/v1/approvals/{approval}"), None);
    assert!(shown.body.contains("held-body-marker-4e2a"), "{shown:?}");
    let pending = feed.expect("pending", Some(&approval)).await;
    assert!(pending.data["body_preview"]["text"]
        .as_str()
        .is_some_and(|t| t.contains("held-body-marker-4e2a")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let approved = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{approval}/approve"),
        Some("{}"),
    );
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(held.await.expect("curl").status, 200);

    let spans = eventually("three request spans", || {
        let spans = collector.spans();
        (spans.len() >= 3).then_some(spans)
    });
    let find = |path: &str| {
        spans
            .iter()
            .find(|(_, s)| text(&s.attributes, "url.path").as_deref() == Some(path))
            .unwrap_or_else(|| panic!("no span for {path}"))
    };

    let (resource, span) = find("/read/me");
    assert_eq!(
        text(resource, "service.name").as_deref(),
        Some("tollgate-e2e")
    );
    assert_eq!(
        text(resource, "service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(text(resource, "host.name").is_some_and(|h| !h.is_empty()));
    assert_eq!(span.name, "GET");
    let a = &span.attributes;
    assert_eq!(text(a, "tollgate.agent").as_deref(), Some("a"));
    assert_eq!(text(a, "tollgate.tool_call").as_deref(), Some("tc-1"));
    assert_eq!(text(a, "tollgate.run_mode").as_deref(), Some("Review"));
    assert_eq!(text(a, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        text(a, "server.address"),
        Some(format!("api.otel.test:{}", protected.port()))
    );
    assert_eq!(text(a, "tollgate.decision").as_deref(), Some("allow"));
    assert_eq!(
        text(a, "tollgate.credential.provider").as_deref(),
        Some("dev")
    );
    assert_eq!(int(a, "http.response.status_code"), Some(200));
    assert!(int(a, "http.response.body.size").is_some_and(|n| n > 0));
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);
    match value(a, "tollgate.policies") {
        Some(any_value::Value::ArrayValue(list)) => assert!(!list.values.is_empty()),
        other => panic!("policies: {other:?}"),
    }
    // The audit record carries the span's trace id.
    let trace_id = hex::encode(&span.trace_id);
    let audit = gw.admin_call("GET", "/v1/agents/a/audit", None).json();
    let records = audit["records"].as_array().expect("records").clone();
    assert!(
        records
            .iter()
            .any(|r| r["path"] == "/read/me" && r["trace_id"] == trace_id.as_str()),
        "no audit record with trace id {trace_id}: {records:?}"
    );
    assert!(gw.log_contains(&trace_id), "the log line names the trace");

    let (_, span) = find("/nope");
    let a = &span.attributes;
    assert_eq!(text(a, "tollgate.decision").as_deref(), Some("deny"));
    assert_eq!(int(a, "http.response.status_code"), Some(403));
    assert_eq!(text(a, "error.type").as_deref(), Some("denied"));
    match value(a, "tollgate.policies") {
        Some(any_value::Value::ArrayValue(list)) => assert_eq!(
            list.values[0].value,
            Some(any_value::Value::StringValue("blocked-domain".into()))
        ),
        other => panic!("policies: {other:?}"),
    }

    let (_, span) = find("/write");
    let a = &span.attributes;
    assert_eq!(span.name, "POST");
    assert_eq!(
        text(a, "tollgate.approval.id").as_deref(),
        Some(approval.as_str())
    );
    assert!(
        int(a, "tollgate.approval.wait_ms").is_some_and(|ms| ms >= 300),
        "{a:?}"
    );
    assert_eq!(int(a, "http.response.status_code"), Some(200));
    assert_eq!(int(a, "http.request.body.size"), Some(29));

    // Metrics: the request counter by agent, decision and status, and the duration
    // histogram. Exports are cumulative and periodic: wait for one made after the held
    // request ended.
    eventually(
        "exported request metrics that count all three requests",
        || {
            let names: Vec<(String, String)> = collector
                .bodies("/v1/metrics")
                .iter()
                .flat_map(|b| {
                    let request = ExportMetricsServiceRequest::decode(&b[..]).expect("metrics");
                    request
                        .resource_metrics
                        .into_iter()
                        .flat_map(|r| r.scope_metrics)
                        .flat_map(|s| s.metrics)
                        .map(|m| (m.name.clone(), format!("{:?}", m.data)))
                        .collect::<Vec<_>>()
                })
                .collect();
            let has = |n: &str| names.iter().any(|(name, _)| name == n);
            let requests = names
                .iter()
                .rev()
                .find(|(n, _)| n == "tollgate.requests")
                .map(|(_, data)| data.as_str())
                .unwrap_or("");
            (has("tollgate.request.duration")
                && has("tollgate.telemetry.spans_dropped")
                && requests.contains("\"allow\"")
                && requests.contains("\"deny\"")
                && requests.contains("\"needs_approval\""))
            .then_some(())
        },
    );

    // Logs: the per-request line, with its fields.
    eventually("the exported request log line", || {
        collector.bodies("/v1/logs").iter().find_map(|b| {
            let request = ExportLogsServiceRequest::decode(&b[..]).expect("logs");
            request
                .resource_logs
                .into_iter()
                .flat_map(|r| r.scope_logs)
                .flat_map(|s| s.log_records)
                .find(|l| {
                    text(&l.attributes, "trace_id").as_deref() == Some(trace_id.as_str())
                        && text(&l.attributes, "agent").as_deref() == Some("a")
                })
        })
    });

    // The configured header reached the collector; no secret reached any payload or the log.
    let received = collector.all();
    assert!(received.iter().all(
        |r| r.headers.get("x-collector-key").map(String::as_str) == Some("collector-key-93b2")
    ));
    for r in &received {
        let body = String::from_utf8_lossy(&r.body);
        for secret in [
            "static-agent-token-6f1e",
            "query-secret-77",
            "collector-key-93b2",
            "held-body-marker-4e2a",
        ] {
            assert!(!body.contains(secret), "{secret} exported to {}", r.path);
        }
    }
    assert!(!gw.log_contains("collector-key-93b2"));
    assert!(!gw.log_contains("static-agent-token-6f1e"));
    assert!(!gw.log_contains("held-body-marker-4e2a"));
}

/// A span with its resource's attributes.
type ResourceSpan = (Vec<KeyValue>, Span);

/// A gRPC collector (tonic) that keeps the spans and the metadata it was sent.
#[derive(Clone, Default)]
struct GrpcReceiver {
    spans: Arc<Mutex<Vec<ResourceSpan>>>,
    keys: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Some(key) = request.metadata().get("x-env-key") {
            self.keys
                .lock()
                .expect("keys")
                .push(key.to_str().unwrap_or("").to_string());
        }
        self.spans
            .lock()
            .expect("spans")
            .extend(spans_of(request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_is_configured_by_the_standard_environment_variables() {
    if no_curl() {
        return;
    }
    let receiver = GrpcReceiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let origin = Origin::http();
    // No [telemetry] section at all: everything comes from OTEL_* variables.
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}{REVIEW_AGENT}",
        loopback_upstream(None)
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let gw = Gateway::start_with_env(
        &config,
        &[APPROVAL_POLICIES],
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-env-key=env-key-5d"),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_LOGS_EXPORTER", "none"),
        ],
    );
    assert!(
        gw.banner
            .iter()
            .any(|l| l.contains("telemetry: OTLP over grpc (traces on, metrics off, logs off)")),
        "{:?}",
        gw.banner
    );
    let url = format!("http://127.0.0.1:{}/over-grpc", origin.port());
    let r = curl_async(args!["-x", gw.proxy_url(), &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let (resource, span) = eventually("a span over gRPC", || {
        receiver.spans.lock().expect("spans").first().cloned()
    });
    assert_eq!(
        text(&span.attributes, "url.path").as_deref(),
        Some("/over-grpc")
    );
    assert_eq!(
        text(&span.attributes, "tollgate.agent").as_deref(),
        Some("a")
    );
    assert_eq!(text(&resource, "service.name").as_deref(), Some("from-env"));
    assert_eq!(
        text(&resource, "deployment.environment").as_deref(),
        Some("e2e")
    );
    assert_eq!(
        receiver
            .keys
            .lock()
            .expect("keys")
            .first()
            .map(String::as_str),
        Some("env-key-5d")
    );
    server.abort();
}

/// The gateway sends its spans over http/protobuf itself: to the endpoint, with the headers,
/// the SDK's exporter would have used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_span_export_is_configured_by_the_standard_environment_variables() {
    if no_curl() {
        return;
    }
    let (collector, port, stop) = HttpReceiver::start();
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}{REVIEW_AGENT}",
        loopback_upstream(None)
    );
    let endpoint = format!("http://127.0.0.1:{port}/custom/traces");
    let gw = Gateway::start_with_env(
        &config,
        &[APPROVAL_POLICIES],
        "",
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-generic=not-used"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "x-env-key=env%20key%2C9c, x-other = two",
            ),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_LOGS_EXPORTER", "none"),
        ],
    );
    assert!(
        gw.banner
            .iter()
            .any(|l| l
                .contains("telemetry: OTLP over http/protobuf (traces on, metrics off, logs off)")),
        "{:?}",
        gw.banner
    );
    let url = format!("http://127.0.0.1:{}/over-http", origin.port());
    let r = curl_async(args!["-x", gw.proxy_url(), &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let span = eventually("a span at the endpoint named", || {
        let bodies = collector.bodies("/custom/traces");
        bodies
            .iter()
            .flat_map(|b| spans_of(ExportTraceServiceRequest::decode(&b[..]).expect("traces")))
            .next()
    });
    assert_eq!(
        text(&span.1.attributes, "url.path").as_deref(),
        Some("/over-http")
    );
    let received = collector.all();
    let headers = &received[0].headers;
    // The signal's own variable wins over the generic one; values are percent-decoded.
    assert_eq!(
        headers.get("x-env-key").map(String::as_str),
        Some("env key,9c")
    );
    assert_eq!(headers.get("x-other").map(String::as_str), Some("two"));
    assert_eq!(headers.get("x-generic"), None);
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_requests_nothing_and_drops_are_counted() {
    if no_curl() {
        return;
    }
    // Accepts connections (the kernel does, into the backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}[telemetry]\nendpoint = \"http://127.0.0.1:{port}\"\n\
         queue_size = 4\nflush_interval_ms = 50\nexport_timeout_secs = 60\nlogs = false\n{REVIEW_AGENT}",
        loopback_upstream(None)
    );
    let gw = Gateway::start_with_policies(&config, &[APPROVAL_POLICIES]);
    let url = format!("http://127.0.0.1:{}/x", origin.port());
    // Let the first export start and hang on the silent collector.
    let r = curl_async(args!["-x", gw.proxy_url(), &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..20 {
        let r = curl_async(args!["-x", gw.proxy_url(), &url]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let dropped = gw.metric("tollgate_telemetry_spans_dropped_total");
    // 20 spans met a queue of 4 that the stuck exporter never drained.
    assert!(dropped >= 16, "{dropped} spans dropped");
    assert!(gw.log_contains("spans were dropped"), "{}", gw.log());
    drop(silent);
}

/// Sends `GET url` through the proxy at `proxy` on the keep-alive connection `conn` and reads
/// its answer: the status.
fn keep_alive_get(conn: &mut std::net::TcpStream, url: &str) -> u16 {
    use std::io::{Read, Write};
    let authority = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .expect("an http:// URL");
    let request = format!("GET {url} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    conn.write_all(request.as_bytes())
        .expect("send the request");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = conn
            .read(&mut chunk)
            .expect("the answer, within the read timeout");
        assert!(n > 0, "the gateway closed the connection");
        answer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a content-length");
    while answer.len() < head_end + length {
        let n = conn.read(&mut chunk).expect("the body");
        assert!(n > 0, "the gateway closed the connection mid-body");
        answer.extend_from_slice(&chunk[..n]);
    }
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_costs_requests_nothing_and_drops_are_counted() {
    if no_curl() {
        return;
    }
    // The gateway's stderr is a pipe that is not read (a log shipper that stopped): once its
    // 64 KiB fill, every write to it blocks.
    let (mut reader, writer) = std::io::pipe().expect("pipe");
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}{REVIEW_AGENT}",
        loopback_upstream(None)
    );
    let gw = Gateway::start_with_stderr(&config, &[APPROVAL_POLICIES], writer.into());
    // Request lines of about 4 KiB (the path is in each), 3,000 of them: past the pipe, the
    // gateway's 4 MiB buffer and a batch as large being written.
    let long = "a".repeat(4000);
    let mut conn = std::net::TcpStream::connect(gw.egress).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    for n in 0..3000 {
        let status = keep_alive_get(
            &mut conn,
            &format!("http://127.0.0.1:{}/{long}/{n}", origin.port()),
        );
        assert_eq!(status, 200, "request {n}");
    }
    let dropped = gw.metric("tollgate_log_lines_dropped_total");
    assert!(dropped >= 500, "{dropped} lines dropped");
    // Every request is in the audit trail all the same.
    eventually("the last request's audit record", || {
        let records = gw
            .admin_call("GET", "/v1/agents/a/audit?since=2990&limit=100", None)
            .json()["records"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let last = records.last()?["path"].as_str()?.to_string();
        last.ends_with("/2999").then_some(())
    });
    // Once stderr is read again, what was kept arrives in whole lines, in order, and new
    // lines follow (the first after the stall may still find the buffer full: ask again).
    let read = Arc::new(Mutex::new(Vec::new()));
    let into = read.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut chunk = [0u8; 65536];
        while let Ok(n) = reader.read(&mut chunk) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&chunk[..n]);
        }
    });
    let mut after = 0;
    let text = eventually("a line after the stall on stderr", || {
        after += 1;
        let url = format!("http://127.0.0.1:{}/after-the-stall/{after}", origin.port());
        assert_eq!(keep_alive_get(&mut conn, &url), 200);
        std::thread::sleep(Duration::from_millis(100));
        let read = read.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&read).to_string();
        text.contains("/after-the-stall/").then_some(text)
    });
    let numbers: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("/aaaaaaaa"))
        .map(|line| {
            let (_, rest) = line
                .split_once(&format!("/{long}/"))
                .unwrap_or_else(|| panic!("a line cut short: {line}"));
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().expect("the request's number")
        })
        .collect();
    assert!(!numbers.is_empty());
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "lines out of order: {numbers:?}"
    );
    assert!(
        numbers.len() + dropped as usize <= 3000,
        "{} lines written, {dropped} dropped",
        numbers.len()
    );
}
