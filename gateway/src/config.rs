//! The gateway's configuration: one TOML file, every key optional.
//!
//! `tollgate serve` without `--config` runs on [`EMBEDDED_DEFAULT`]. Every key, its default and
//! its meaning is documented in `config.example.toml` at the repository root; the structs here
//! are the single source of truth for the defaults and reject unknown keys, so a typo in a
//! config file is an error instead of a silently ignored setting.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::agent::Agent;

/// The configuration `tollgate serve` uses when no `--config` is given: egress proxy on
/// 127.0.0.1:3128, admin API on 127.0.0.1:9901, data in `./tollgate-data`, and a demo agent
/// `local` (Review mode) for peer address 127.0.0.1.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-config.toml");

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The TOML did not parse or had keys or values of the wrong kind.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// The file name, or "(embedded default)".
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The values parsed but do not make sense together.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the gateway keeps its CA, admin token and (later) durable state.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The listener sandboxes send their traffic to.
    #[serde(default)]
    pub egress: EgressConfig,
    /// The host-only, authenticated control listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The gateway CA and the leaf certificates it mints for intercepted TLS.
    #[serde(default)]
    pub tls: TlsConfig,
    /// How the gateway talks to origins.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Sizes, timeouts and worker threads.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Where the Cedar policies are read from, and how often they are reloaded.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The format of the gateway's own log on stderr.
    #[serde(default)]
    pub log: LogConfig,
    /// OpenTelemetry export (traces, metrics, logs) over OTLP.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Where tokens come from: `[[identity_providers]]`.
    #[serde(default)]
    pub identity_providers: Vec<IdentityProviderConfig>,
    /// Which destinations get which token: `[[credential_rules]]`.
    #[serde(default)]
    pub credential_rules: Vec<CredentialRuleConfig>,
    /// How tokens are cached, refreshed and fetched (timeouts, back-off).
    #[serde(default)]
    pub credentials: CredentialsConfig,
    /// Held requests: how long they wait, how many, how large.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// The durable store and how long it keeps history.
    #[serde(default)]
    pub storage: StorageConfig,
    /// The agents known at start-up (the admin API can add more): `[[agents]]`, the same
    /// record the admin API takes, plus an optional listener of the agent's own.
    #[serde(default)]
    pub agents: Vec<Agent>,
}

/// `[egress]`: the shared sandbox-facing listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Address of the shared egress listener; agents are told apart by peer address.
    #[serde(default = "default_egress_listen")]
    pub listen: SocketAddr,
}

/// `[admin]`: the control-plane listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin API. Keep it host-only: it is never meant for sandboxes.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// File holding the admin bearer token; created (mode 0600) if missing.
    /// Default: `<data_dir>/admin-token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// People who may approve or deny held requests, each with a token of their own:
    /// `[[admin.approvers]]`. Their tokens open the approval routes and page only; the admin
    /// token opens everything and approves as "admin".
    #[serde(default)]
    pub approvers: Vec<ApproverConfig>,
}

/// `[[admin.approvers]]`: one named approver.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    /// The name recorded on the approvals this person settles.
    pub name: String,
    /// Where the approver's bearer token is read from.
    pub token: SecretSource,
}

/// `[log]`: the gateway's own log (stderr).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (for people) or `json` (one object per line, for log shippers). `RUST_LOG`
    /// sets the level (default info).
    #[serde(default)]
    pub format: LogFormat,
}

/// `[log] format`: how each line on stderr is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[telemetry]`: OpenTelemetry export over OTLP. Off unless an endpoint is named here or in
/// the standard `OTEL_EXPORTER_OTLP_*ENDPOINT` variables; `OTEL_SDK_DISABLED=true` turns it
/// off whatever this says. Values set here win over the environment.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector: for `http/protobuf` its base URL (`/v1/traces`, `/v1/metrics`,
    /// `/v1/logs` are appended), for `grpc` its URL.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `http/protobuf` or `grpc`; unset: `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    #[serde(default)]
    pub protocol: Option<OtlpProtocol>,
    /// Headers sent with every export (e.g. a collector's API key), each from a file or an
    /// environment variable. `OTEL_EXPORTER_OTLP_HEADERS` adds to these.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretSource>,
    /// The `service.name` resource attribute; `OTEL_SERVICE_NAME` when unset, else `tollgate`.
    #[serde(default)]
    pub service_name: Option<String>,
    /// Export a span per request.
    #[serde(default = "yes")]
    pub traces: bool,
    /// Export the gateway's metrics.
    #[serde(default = "yes")]
    pub metrics: bool,
    /// Export the gateway's log events (info and above).
    #[serde(default = "yes")]
    pub logs: bool,
    /// Export the one log line per request as a log record too. Off by default while spans
    /// are exported: the span carries the same fields, and a backend would ingest (and bill)
    /// every request twice.
    #[serde(default)]
    pub request_logs: bool,
    /// Spans, and log events, waiting for export at most (each); more are dropped and
    /// counted in `tollgate_telemetry_dropped_total`.
    #[serde(default = "default_telemetry_queue")]
    pub queue_size: usize,
    /// How often queued spans and log events are sent.
    #[serde(default = "default_telemetry_flush_ms")]
    pub flush_interval_ms: u64,
    /// How often metrics are sent; unset: `OTEL_METRIC_EXPORT_INTERVAL` (ms), else 60 s.
    #[serde(default)]
    pub metrics_interval_secs: Option<u64>,
    /// How long one export may take before it is abandoned; unset:
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (ms), else 10 s.
    #[serde(default)]
    pub export_timeout_secs: Option<u64>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            endpoint: None,
            protocol: None,
            headers: BTreeMap::new(),
            service_name: None,
            traces: true,
            metrics: true,
            logs: true,
            request_logs: false,
            queue_size: default_telemetry_queue(),
            flush_interval_ms: default_telemetry_flush_ms(),
            metrics_interval_secs: None,
            export_timeout_secs: None,
        }
    }
}

/// `[telemetry] protocol`: how exports reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP POST (port 4318 by convention).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// gRPC (port 4317 by convention).
    #[serde(rename = "grpc")]
    Grpc,
}

fn default_telemetry_queue() -> usize {
    4096
}
fn default_telemetry_flush_ms() -> u64 {
    1000
}

/// `[approvals]`: requests held for a person.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// How long a held request waits for a decision before it is refused as expired.
    #[serde(default = "default_approval_timeout")]
    pub timeout_secs: u64,
    /// How many requests of one agent may wait at once; more get 429.
    #[serde(default = "default_max_pending")]
    pub max_pending_per_agent: usize,
    /// Largest request body a held request may have: the body is kept in memory (and its
    /// SHA-256 recorded) so that exactly those bytes are sent once approved. Larger: 413.
    #[serde(default = "default_max_held_body")]
    pub max_body_bytes: usize,
    /// How much of a held body approvers are shown (API, CLI, page), from memory only:
    /// JSON pretty-printed, text as it is, marked when cut short; binary bodies are named,
    /// not shown. Never stored, logged or exported. 0: no preview.
    #[serde(default = "default_preview_bytes")]
    pub preview_bytes: usize,
    /// How many of the latest approval events the live feed (`GET /v1/approvals/events`)
    /// keeps, so that a listener reconnecting with `Last-Event-ID` gets what it missed.
    #[serde(default = "default_feed_events")]
    pub feed_events: usize,
    /// The most bytes those events may take together (older ones are dropped first).
    #[serde(default = "default_feed_bytes")]
    pub feed_bytes: usize,
    /// How many listeners the live feed takes at once; more are refused (503).
    #[serde(default = "default_feed_listeners")]
    pub feed_listeners: usize,
    /// URLs every approval event is also `POST`ed to, signed (`[[approvals.webhooks]]`).
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// How long a token an approver lent (on-behalf-of) may be used, within its tool call;
    /// it is deleted when the tool call closes or this time has passed.
    #[serde(default = "default_obo_lifetime")]
    pub obo_token_lifetime_secs: u64,
    /// The key sealing lent tokens at rest (64 hex characters). Default:
    /// `<data_dir>/obo-key`, created (mode 0600) if missing; the `TOLLGATE_OBO_KEY`
    /// environment variable overrides both.
    #[serde(default)]
    pub obo_key_file: Option<PathBuf>,
}

/// `[[approvals.webhooks]]`: a URL each approval event is `POST`ed to, for platforms that
/// prefer a push to reading the live feed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where events go: `https://…` (plain `http://` for loopback only).
    pub url: String,
    /// The key each event's signature (`tollgate-signature`, HMAC-SHA256) is made with; never
    /// sent.
    pub secret: SecretSource,
    /// How many times one event is tried before it is given up.
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// How long one try may take.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
}

/// `[storage]`: the durable store under the data directory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Audit records and settled approvals older than this are deleted (checked hourly).
    #[serde(default = "default_retention_days")]
    pub retention_days: u64,
}

/// `[tls]`: interception.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The gateway CA certificate (PEM). Default: `<data_dir>/ca.pem`, created if missing.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// The gateway CA private key (PEM, mode 0600). Default: `<data_dir>/ca-key.pem`.
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// How many minted leaf certificates are kept in memory.
    #[serde(default = "default_leaf_cache_capacity")]
    pub leaf_cache_capacity: u64,
    /// How long a minted leaf certificate is valid (and cached), in hours.
    #[serde(default = "default_leaf_validity_hours")]
    pub leaf_validity_hours: u64,
}

/// `[upstream]`: connections to origins.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Trust the operating system's root certificates for origin TLS.
    #[serde(default = "yes")]
    pub system_roots: bool,
    /// An extra PEM bundle of CAs trusted for origin TLS, in addition to (or, with
    /// `system_roots = false`, instead of) the system roots.
    #[serde(default)]
    pub extra_ca_file: Option<PathBuf>,
    /// Networks that origins may resolve to although the SSRF guard refuses them by default:
    /// the ranges the IANA special-purpose registries call not globally reachable (loopback,
    /// private, link-local, unique-local, benchmarking, Teredo, ...), multicast and reserved.
    #[serde(default)]
    pub allow_networks: Vec<IpNet>,
    /// Time allowed to establish a TCP connection (and, separately, the TLS handshake).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the next read from an origin before the request fails with 504.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// Longest wait for a write to an origin before the request fails.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Fixed addresses for host names, used instead of DNS (like /etc/hosts, but only for
    /// the gateway): for pinning internal services, and for tests. The SSRF guard still
    /// applies to these addresses.
    #[serde(default)]
    pub resolve: BTreeMap<String, IpAddr>,
    /// Idle upstream connections kept for reuse.
    #[serde(default = "default_pool_size")]
    pub keepalive_pool_size: usize,
    /// Request headers removed before a request goes to its origin: those with which a client
    /// speaks for another address or hop (`Forwarded`, `X-Forwarded-For`, `Via`, …), so a
    /// sandbox cannot pass itself off to origins that trust them. `[]` passes them on.
    #[serde(default = "default_strip_request_headers")]
    pub strip_request_headers: Vec<String>,
}

/// `[limits]`: sizes, timeouts and threads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest CONNECT request head accepted, in bytes.
    #[serde(default = "default_connect_head_bytes")]
    pub max_connect_head_bytes: usize,
    /// Time allowed for a new connection to send its first request line or CONNECT head and
    /// to complete the intercepted TLS handshake.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Time a request head may take from its first byte to its last (slowloris): a client
    /// slower than this is disconnected. The body and keep-alive idle time are not counted.
    #[serde(default = "default_request_head_timeout_ms")]
    pub request_head_timeout_ms: u64,
    /// Worker threads of the gateway's runtime; 0 means one per CPU.
    #[serde(default)]
    pub worker_threads: usize,
    /// Client connections one agent may have open at once; more get 429 and are closed.
    /// An agent's own `limits.connections` overrides it.
    #[serde(default = "default_agent_connections")]
    pub agent_connections: usize,
    /// Requests per second one agent may start (bursts of up to one second's worth); more
    /// get 429 with `Retry-After`. 0: no limit. Per agent: `limits.requests_per_second`.
    #[serde(default)]
    pub agent_requests_per_second: u32,
    /// Largest request body one agent may send, in bytes; larger gets 413. 0: no limit.
    /// Per agent: `limits.request_body_bytes`.
    #[serde(default)]
    pub agent_request_body_bytes: u64,
    /// Tool calls one agent may have open at once; opening another gets 429. Per agent:
    /// `limits.open_tool_calls`.
    #[serde(default = "default_agent_open_tool_calls")]
    pub agent_open_tool_calls: usize,
}

/// `[policy]`: where the Cedar policies come from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A directory of `*.cedar` files; without it, the default set compiled into the gateway
    /// (`policies/default/`) is used.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// How often the directory is checked for changes, in ms; 0 turns the watch off
    /// (`POST /v1/policies/reload` still reloads).
    #[serde(default = "default_policy_watch_ms")]
    pub watch_interval_ms: u64,
}

/// Where a secret comes from: a file (first line, trimmed) or an environment variable. The
/// value itself is never in the config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// Read the secret from this file.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Read the secret from this environment variable.
    #[serde(default)]
    pub env: Option<String>,
}

/// `[[identity_providers]]`: one source of tokens, by the protocol it speaks (`kind`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdentityProviderConfig {
    /// OAuth 2.0 client credentials (RFC 6749 §4.4), e.g. Microsoft Entra ID.
    ClientCredentials {
        /// The name agents (`identity`) and credential rules (`provider`) refer to.
        name: String,
        /// Where tokens are asked for (POST, form-encoded).
        token_url: String,
        /// The gateway's application (client) id at the token endpoint.
        client_id: String,
        /// Where the gateway's client secret is read from; it is sent only to `token_url`.
        client_secret: SecretSource,
        /// The form parameter the audience is sent as: `scope` (Entra v2, default) or
        /// `resource` (Entra v1).
        #[serde(default = "default_audience_param")]
        audience_param: String,
    },
    /// The Azure managed-identity endpoint (IMDS, or App Service's IDENTITY_ENDPOINT).
    ManagedIdentity {
        /// The name agents (`identity`) and credential rules (`provider`) refer to.
        name: String,
        /// The endpoint; default: `$IDENTITY_ENDPOINT` if set, else the instance metadata
        /// service `http://169.254.169.254/metadata/identity/oauth2/token`.
        #[serde(default)]
        endpoint: Option<String>,
        /// The `api-version`; default `2019-08-01` with IDENTITY_ENDPOINT, else `2018-02-01`.
        #[serde(default)]
        api_version: Option<String>,
        /// A user-assigned identity's client id.
        #[serde(default)]
        client_id: Option<String>,
        /// The `X-IDENTITY-HEADER` secret; default: `$IDENTITY_HEADER` when IDENTITY_ENDPOINT
        /// is used. IMDS takes `Metadata: true` instead.
        #[serde(default)]
        identity_header: Option<SecretSource>,
    },
    /// A fixed token, for development and tests.
    Static {
        /// The name agents (`identity`) and credential rules (`provider`) refer to.
        name: String,
        /// Where the fixed token is read from; every request for a token gets this one.
        token: SecretSource,
        /// How long each handed-out token is treated as valid, in seconds.
        #[serde(default = "default_static_ttl")]
        expires_in_secs: u64,
    },
}

/// `[[credential_rules]]`: destinations that get a token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRuleConfig {
    /// Host patterns: `api.example.com` (that host) or `*.example.com` (its sub-domains).
    pub hosts: Vec<String>,
    /// The audience / scope the token is for, e.g. `https://management.azure.com/.default`.
    pub audience: String,
    /// The identity provider; default: the agent's own `identity`.
    #[serde(default)]
    pub provider: Option<String>,
    /// The header the token goes in.
    #[serde(default = "default_credential_header")]
    pub header: String,
    /// The header value; `{token}` is replaced by the token.
    #[serde(default = "default_credential_format")]
    pub format: String,
    /// More headers to strip from the sandbox's request (API keys), besides Authorization
    /// and Proxy-Authorization.
    #[serde(default)]
    pub strip_headers: Vec<String>,
    /// The origin ports a token may be sent to, always over TLS with a verified certificate:
    /// a request to a covered host over plain HTTP or to another port is refused (403
    /// `credential_requires_tls`), so a token never travels in clear text or to another
    /// service on the same host.
    #[serde(default = "default_credential_ports")]
    pub ports: Vec<u16>,
}

/// `[credentials]`: the token cache and fetching.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    /// A cached token is dropped this long before it expires, in seconds.
    #[serde(default = "default_refresh_margin")]
    pub refresh_margin_secs: u64,
    /// Time allowed for one token request, in ms.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_ms: u64,
    /// After a failed token request, the first wait before the next attempt, in ms; it
    /// doubles with every failure up to `backoff_max_ms`.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    /// The longest wait between attempts, in ms.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Tokens kept in memory at most.
    #[serde(default = "default_token_cache")]
    pub cache_capacity: u64,
    /// How much of an answer to a request that carries a token is read and scanned for that
    /// token before anything of it is relayed, in bytes (after the header, which is always
    /// scanned). A match there is `502 credential_reflected`; the rest of the body is scanned
    /// as it is relayed and the answer cut short at a match.
    #[serde(default = "default_reflection_scan_bytes")]
    pub reflection_scan_bytes: usize,
}

impl IdentityProviderConfig {
    /// The name agents and credential rules use for this provider, whatever its kind.
    pub fn name(&self) -> &str {
        match self {
            Self::ClientCredentials { name, .. }
            | Self::ManagedIdentity { name, .. }
            | Self::Static { name, .. } => name,
        }
    }
}

fn default_audience_param() -> String {
    "scope".into()
}
fn default_static_ttl() -> u64 {
    3600
}
fn default_credential_header() -> String {
    "authorization".into()
}
fn default_credential_format() -> String {
    "Bearer {token}".into()
}
fn default_credential_ports() -> Vec<u16> {
    vec![443]
}
fn default_refresh_margin() -> u64 {
    60
}
fn default_fetch_timeout() -> u64 {
    5_000
}
fn default_backoff_initial() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    30_000
}
fn default_token_cache() -> u64 {
    10_000
}
fn default_reflection_scan_bytes() -> usize {
    64 * 1024
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        Self {
            refresh_margin_secs: default_refresh_margin(),
            fetch_timeout_ms: default_fetch_timeout(),
            backoff_initial_ms: default_backoff_initial(),
            backoff_max_ms: default_backoff_max(),
            cache_capacity: default_token_cache(),
            reflection_scan_bytes: default_reflection_scan_bytes(),
        }
    }
}

impl Config {
    /// Parses a configuration from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses [`EMBEDDED_DEFAULT`], the configuration `tollgate serve` runs without `--config`.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_toml(EMBEDDED_DEFAULT, "(embedded default)")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.tls.leaf_cache_capacity == 0 {
            return invalid("tls.leaf_cache_capacity must be at least 1".into());
        }
        if self.tls.leaf_validity_hours == 0 || self.tls.leaf_validity_hours > 24 * 90 {
            return invalid("tls.leaf_validity_hours must be between 1 and 2160".into());
        }
        if self.limits.agent_connections == 0 {
            return invalid("limits.agent_connections must be at least 1".into());
        }
        if self.limits.max_connect_head_bytes < 256 {
            return invalid("limits.max_connect_head_bytes must be at least 256".into());
        }
        for (name, ms) in [
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            ("upstream.read_timeout_ms", self.upstream.read_timeout_ms),
            ("upstream.write_timeout_ms", self.upstream.write_timeout_ms),
            (
                "limits.handshake_timeout_ms",
                self.limits.handshake_timeout_ms,
            ),
            (
                "limits.request_head_timeout_ms",
                self.limits.request_head_timeout_ms,
            ),
        ] {
            if ms == 0 {
                return invalid(format!("{name} must be greater than 0"));
            }
        }
        if !self.upstream.system_roots && self.upstream.extra_ca_file.is_none() {
            return invalid(
                "upstream.system_roots = false needs upstream.extra_ca_file: \
                 otherwise no origin certificate could be trusted"
                    .into(),
            );
        }
        for name in self.upstream.resolve.keys() {
            if !matches!(
                crate::target::Host::parse(name),
                Ok(crate::target::Host::Name(_))
            ) {
                return invalid(format!("upstream.resolve: {name:?} is not a host name"));
            }
        }
        for name in &self.upstream.strip_request_headers {
            if http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err() {
                return invalid(format!(
                    "upstream.strip_request_headers: {name:?} is not a header name"
                ));
            }
        }
        if self.approvals.timeout_secs == 0 || self.approvals.max_pending_per_agent == 0 {
            return invalid(
                "approvals.timeout_secs and approvals.max_pending_per_agent must be at least 1"
                    .into(),
            );
        }
        if self.storage.retention_days == 0 {
            return invalid("storage.retention_days must be at least 1".into());
        }
        let mut approvers = std::collections::HashSet::new();
        for approver in &self.admin.approvers {
            if approver.name.is_empty()
                || approver.name == "admin"
                || !approvers.insert(&approver.name)
            {
                return invalid(format!(
                    "admin.approvers: name {:?} is empty, reserved or used twice",
                    approver.name
                ));
            }
            if approver.token.file.is_some() == approver.token.env.is_some() {
                return invalid(format!(
                    "admin.approvers {:?}: the token needs exactly one of file or env",
                    approver.name
                ));
            }
        }
        self.validate_credentials()?;
        let mut ids = std::collections::HashSet::new();
        let mut peers = std::collections::HashMap::new();
        for agent in &self.agents {
            if let Err(e) = crate::agent::validate_agent_id(&agent.id) {
                return invalid(format!("agents: {e}"));
            }
            if !ids.insert(agent.id.as_str()) {
                return invalid(format!("agents: id {:?} appears twice", agent.id));
            }
            for peer in &agent.peers {
                if let Some(other) = peers.insert(*peer, agent.id.as_str()) {
                    return invalid(format!(
                        "agents: peer address {peer} is given to both {other:?} and {:?}",
                        agent.id
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_credentials(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut names = std::collections::HashSet::new();
        for p in &self.identity_providers {
            if p.name().is_empty() || !names.insert(p.name()) {
                return invalid(format!(
                    "identity_providers: name {:?} is empty or used twice",
                    p.name()
                ));
            }
            let sources: Vec<&SecretSource> = match p {
                IdentityProviderConfig::ClientCredentials {
                    client_secret,
                    audience_param,
                    ..
                } => {
                    if audience_param != "scope" && audience_param != "resource" {
                        return invalid(format!(
                            "identity provider {:?}: audience_param must be \"scope\" or \"resource\"",
                            p.name()
                        ));
                    }
                    vec![client_secret]
                }
                IdentityProviderConfig::ManagedIdentity {
                    identity_header, ..
                } => identity_header.iter().collect(),
                IdentityProviderConfig::Static { token, .. } => vec![token],
            };
            for source in sources {
                if source.file.is_some() == source.env.is_some() {
                    return invalid(format!(
                        "identity provider {:?}: a secret needs exactly one of file or env",
                        p.name()
                    ));
                }
            }
        }
        for (n, rule) in self.credential_rules.iter().enumerate() {
            let at = format!("credential_rules[{n}]");
            if rule.hosts.is_empty() {
                return invalid(format!("{at}: hosts is empty"));
            }
            for host in &rule.hosts {
                let name = host.strip_prefix("*.").unwrap_or(host);
                if !matches!(
                    crate::target::Host::parse(name),
                    Ok(crate::target::Host::Name(_))
                ) {
                    return invalid(format!("{at}: {host:?} is not a host name or *.domain"));
                }
            }
            if let Some(provider) = &rule.provider {
                if !names.contains(provider.as_str()) {
                    return invalid(format!("{at}: no identity provider named {provider:?}"));
                }
            }
            if !rule.format.contains("{token}") {
                return invalid(format!("{at}: format must contain {{token}}"));
            }
            if rule.ports.is_empty() || rule.ports.contains(&0) {
                return invalid(format!(
                    "{at}: ports must list the origin ports (1-65535) a token may go to"
                ));
            }
            for header in std::iter::once(&rule.header).chain(&rule.strip_headers) {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return invalid(format!("{at}: {header:?} is not a header name"));
                }
            }
        }
        for agent in &self.agents {
            if let Some(identity) = &agent.identity {
                if !names.contains(identity.as_str()) {
                    return invalid(format!(
                        "agent {:?}: no identity provider named {identity:?}",
                        agent.id
                    ));
                }
            }
        }
        Ok(())
    }

    /// The admin token file, defaulted into the data directory.
    pub fn admin_token_path(&self) -> PathBuf {
        self.admin
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin-token"))
    }

    /// The key file sealing lent (on-behalf-of) tokens, defaulted into the data directory.
    pub fn obo_key_path(&self) -> PathBuf {
        self.approvals
            .obo_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("obo-key"))
    }

    /// The CA certificate file, defaulted into the data directory.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.tls
            .ca_cert
            .clone()
            .unwrap_or_else(|| self.data_dir.join("ca.pem"))
    }

    /// The CA key file, defaulted into the data directory.
    pub fn ca_key_path(&self) -> PathBuf {
        self.tls
            .ca_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("ca-key.pem"))
    }
}

impl UpstreamConfig {
    /// `connect_timeout_ms` as a duration; the TLS handshake may take as long again.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// `read_timeout_ms` as a duration: the longest wait for the next read from an origin.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
    /// `write_timeout_ms` as a duration: the longest wait for a write to an origin.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

impl LimitsConfig {
    /// Every agent's limits where its own record sets none (held requests come from
    /// `[approvals] max_pending_per_agent`).
    pub fn agent_defaults(&self, approvals: &ApprovalsConfig) -> crate::agent::Effective {
        crate::agent::Effective {
            connections: self.agent_connections,
            requests_per_second: self.agent_requests_per_second,
            request_body_bytes: self.agent_request_body_bytes,
            pending_approvals: approvals.max_pending_per_agent,
            open_tool_calls: self.agent_open_tool_calls,
        }
    }

    /// `handshake_timeout_ms` as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// `request_head_timeout_ms` as a duration (slowloris guard).
    pub fn request_head_timeout(&self) -> Duration {
        Duration::from_millis(self.request_head_timeout_ms)
    }
}

fn default_approval_timeout() -> u64 {
    600
}
fn default_max_pending() -> usize {
    16
}
fn default_max_held_body() -> usize {
    1024 * 1024
}
fn default_preview_bytes() -> usize {
    4096
}
fn default_feed_events() -> usize {
    1024
}
fn default_feed_bytes() -> usize {
    8 << 20
}
fn default_feed_listeners() -> usize {
    4096
}
fn default_webhook_attempts() -> u32 {
    8
}
fn default_webhook_timeout_ms() -> u64 {
    5000
}
fn default_obo_lifetime() -> u64 {
    3600
}
fn default_retention_days() -> u64 {
    30
}
fn default_policy_watch_ms() -> u64 {
    2_000
}
fn yes() -> bool {
    true
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./tollgate-data")
}
fn default_egress_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3128))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_leaf_cache_capacity() -> u64 {
    10_000
}
fn default_leaf_validity_hours() -> u64 {
    24
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_read_timeout_ms() -> u64 {
    60_000
}
fn default_write_timeout_ms() -> u64 {
    60_000
}
fn default_pool_size() -> usize {
    128
}
fn default_strip_request_headers() -> Vec<String> {
    [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "via",
        // Path overrides some servers honour (the path the policies judged would not be the
        // one the origin acts on).
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-prefix",
    ]
    .map(String::from)
    .to_vec()
}
fn default_connect_head_bytes() -> usize {
    8 * 1024
}
fn default_agent_connections() -> usize {
    256
}
fn default_agent_open_tool_calls() -> usize {
    1024
}

fn default_request_head_timeout_ms() -> u64 {
    10_000
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            listen: default_egress_listen(),
        }
    }
}
impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token_file: None,
            approvers: Vec::new(),
        }
    }
}
impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            timeout_secs: default_approval_timeout(),
            max_pending_per_agent: default_max_pending(),
            max_body_bytes: default_max_held_body(),
            preview_bytes: default_preview_bytes(),
            feed_events: default_feed_events(),
            feed_bytes: default_feed_bytes(),
            feed_listeners: default_feed_listeners(),
            webhooks: Vec::new(),
            obo_token_lifetime_secs: default_obo_lifetime(),
            obo_key_file: None,
        }
    }
}
impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            retention_days: default_retention_days(),
        }
    }
}
impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca_cert: None,
            ca_key: None,
            leaf_cache_capacity: default_leaf_cache_capacity(),
            leaf_validity_hours: default_leaf_validity_hours(),
        }
    }
}
impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            system_roots: true,
            extra_ca_file: None,
            allow_networks: Vec::new(),
            resolve: BTreeMap::new(),
            connect_timeout_ms: default_connect_timeout_ms(),
            read_timeout_ms: default_read_timeout_ms(),
            write_timeout_ms: default_write_timeout_ms(),
            keepalive_pool_size: default_pool_size(),
            strip_request_headers: default_strip_request_headers(),
        }
    }
}
impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: None,
            watch_interval_ms: default_policy_watch_ms(),
        }
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connect_head_bytes: default_connect_head_bytes(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            request_head_timeout_ms: default_request_head_timeout_ms(),
            agent_connections: default_agent_connections(),
            agent_requests_per_second: 0,
            agent_request_body_bytes: 0,
            agent_open_tool_calls: default_agent_open_tool_calls(),
            worker_threads: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_has_the_documented_values() {
        let c = Config::embedded_default().expect("embedded default parses");
        assert_eq!(c.egress.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./tollgate-data"));
        assert_eq!(c.agents.len(), 1);
        assert_eq!(c.agents[0].id, "local");
        assert_eq!(c.agents[0].run_mode, crate::agent::RunMode::Review);
        assert_eq!(
            c.agents[0].peers,
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.ca_cert_path(), PathBuf::from("./tollgate-data/ca.pem"));
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config.example.toml");
        Config::from_toml(text, "config.example.toml").expect("example config parses");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml("[egress]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn a_peer_address_cannot_belong_to_two_agents() {
        let text = r#"
            [[agents]]
            id = "a"
            run_mode = "Review"
            peers = ["127.0.0.2"]
            [[agents]]
            id = "b"
            run_mode = "ReadOnly"
            peers = ["127.0.0.2"]
        "#;
        let err = Config::from_toml(text, "t").unwrap_err().to_string();
        assert!(err.contains("127.0.0.2"), "{err}");
    }

    #[test]
    fn an_unknown_run_mode_is_rejected() {
        let text = "[[agents]]\nid = \"a\"\nrun_mode = \"Yolo\"\n";
        let err = Config::from_toml(text, "t").unwrap_err().to_string();
        assert!(err.contains("Yolo") || err.contains("run_mode"), "{err}");
    }

    #[test]
    fn no_trust_at_all_is_rejected() {
        let err = Config::from_toml("[upstream]\nsystem_roots = false\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra_ca_file"), "{err}");
    }
}
