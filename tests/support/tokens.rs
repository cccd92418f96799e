//! Token endpoints on loopback: an OAuth2 client-credentials endpoint and an Azure
//! managed-identity endpoint, each recording what it issued, and the configuration that
//! points the gateway at them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use tokio::sync::watch;

use super::*;

/// Tokens a protected origin accepts: just `token`, for `audience`.
pub fn issued(token: &str, audience: &str) -> Issued {
    Arc::new(std::sync::Mutex::new(HashMap::from([(
        token.to_string(),
        audience.to_string(),
    )])))
}

/// Tokens a [`TokenEndpoint`] issued: token → audience.
pub type Issued = Arc<std::sync::Mutex<HashMap<String, String>>>;

/// How a [`TokenEndpoint`] behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// Issue tokens.
    Normal,
    /// Answer 500.
    Failing,
    /// Answer 200 with a body that is not JSON (an HTML error page).
    NotJson,
    /// Answer 200 with JSON that has no `access_token`.
    NoAccessToken,
    /// Answer 200 with 1 MiB of JSON (a usable token at its very end).
    Huge,
}

/// A token-like value the garbage [`TokenMode`]s carry: it must never be used or shown.
pub const GARBAGE_TOKEN: &str = "garbage-token-3c9d41";

/// A real OAuth 2.0 client-credentials token endpoint (RFC 6749 §4.4) on loopback: it checks
/// the client id and secret, and issues random tokens with a short `expires_in`.
pub struct TokenEndpoint {
    pub addr: SocketAddr,
    pub issued: Issued,
    requests: Arc<AtomicUsize>,
    mode: Arc<std::sync::Mutex<TokenMode>>,
    _stop: watch::Sender<bool>,
}

struct TokenApp {
    client_id: String,
    client_secret: String,
    expires_in: u64,
    delay: Duration,
    issued: Issued,
    requests: Arc<AtomicUsize>,
    mode: Arc<std::sync::Mutex<TokenMode>>,
}

#[async_trait]
impl ServeHttp for TokenApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body.extend_from_slice(&chunk);
        }
        tokio::time::sleep(self.delay).await;
        let reply = |status: u16, json: serde_json::Value| {
            let mut r = Response::new(json.to_string().into_bytes());
            *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
            r.headers_mut()
                .insert("content-type", "application/json".parse().expect("hv"));
            let len = r.body().len();
            r.headers_mut().insert("content-length", len.into());
            r
        };
        let mode = *self.mode.lock().expect("mode");
        match mode {
            TokenMode::Normal => {}
            TokenMode::Failing => {
                return reply(
                    500,
                    serde_json::json!({"error": "temporarily_unavailable", "secret_detail": "endpoint-internal-text"}),
                )
            }
            TokenMode::NotJson => {
                let mut r = Response::new(
                    format!("<html>endpoint-internal-text access_token={GARBAGE_TOKEN}</html>")
                        .into_bytes(),
                );
                r.headers_mut()
                    .insert("content-type", "text/html".parse().expect("hv"));
                let len = r.body().len();
                r.headers_mut().insert("content-length", len.into());
                return r;
            }
            TokenMode::NoAccessToken => {
                return reply(
                    200,
                    serde_json::json!({"token_type": "Bearer", "expires_in": 3600, "token": GARBAGE_TOKEN}),
                )
            }
            TokenMode::Huge => {
                return reply(
                    200,
                    serde_json::json!({"padding": "x".repeat(1 << 20), "expires_in": 3600, "access_token": GARBAGE_TOKEN}),
                )
            }
        }
        let form: HashMap<String, String> = String::from_utf8_lossy(&body)
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| {
                let decode = |x: &str| {
                    percent_encoding::percent_decode_str(x)
                        .decode_utf8_lossy()
                        .to_string()
                };
                (decode(k), decode(v))
            })
            .collect();
        let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        if session.req_header().method != http::Method::POST
            || get("grant_type") != "client_credentials"
        {
            return reply(400, serde_json::json!({"error": "unsupported_grant_type"}));
        }
        if get("client_id") != self.client_id || get("client_secret") != self.client_secret {
            return reply(401, serde_json::json!({"error": "invalid_client"}));
        }
        let token = format!("tok-{}", hex_token());
        self.issued
            .lock()
            .expect("issued")
            .insert(token.clone(), get("scope").to_string());
        reply(
            200,
            serde_json::json!({"token_type": "Bearer", "expires_in": self.expires_in, "access_token": token}),
        )
    }
}

fn hex_token() -> String {
    use std::fmt::Write;
    let bytes: [u8; 16] = rand::random();
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl TokenEndpoint {
    /// Starts an endpoint for `client_id` / `client_secret` issuing tokens valid for
    /// `expires_in` seconds, answering after `delay`.
    pub fn start(
        client_id: &str,
        client_secret: &str,
        expires_in: u64,
        delay: Duration,
    ) -> TokenEndpoint {
        let socket =
            tollgate_gateway::egress::listener::bind("127.0.0.1:0".parse().expect("addr"), None)
                .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let issued: Issued = Default::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let mode = Arc::new(std::sync::Mutex::new(TokenMode::Normal));
        let (stop, watch) = watch::channel(false);
        let app = TokenApp {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            expires_in,
            delay,
            issued: issued.clone(),
            requests: requests.clone(),
            mode: mode.clone(),
        };
        tollgate_gateway::egress::listener::serve("token-endpoint", socket, app, None, watch);
        TokenEndpoint {
            addr,
            issued,
            requests,
            mode,
            _stop: stop,
        }
    }

    /// How many token requests arrived.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Switches between issuing and failing.
    pub fn set_mode(&self, mode: TokenMode) {
        *self.mode.lock().expect("mode") = mode;
    }

    /// The token endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}/oauth2/v2.0/token", self.addr)
    }

    /// Every token issued so far.
    pub fn tokens(&self) -> Vec<String> {
        self.issued
            .lock()
            .expect("issued")
            .keys()
            .cloned()
            .collect()
    }
}

/// The Azure managed-identity token protocol on loopback: `GET …?api-version=…&resource=…`
/// with `Metadata: true` (IMDS), or with `X-IDENTITY-HEADER: <secret>` (the
/// IDENTITY_ENDPOINT variant) when started with one. Tokens are issued for the resource.
pub struct ManagedIdentityEndpoint {
    pub addr: SocketAddr,
    pub issued: Issued,
    requests: Arc<AtomicUsize>,
    _stop: watch::Sender<bool>,
}

struct ManagedIdentityApp {
    identity_header: Option<String>,
    issued: Issued,
    requests: Arc<AtomicUsize>,
}

#[async_trait]
impl ServeHttp for ManagedIdentityApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let req = session.req_header();
        let header = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let query: HashMap<String, String> = req
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .to_string(),
                )
            })
            .collect();
        let authorized = match &self.identity_header {
            Some(secret) => header("x-identity-header").as_deref() == Some(secret.as_str()),
            None => header("metadata").as_deref() == Some("true"),
        };
        let (status, body) = match (
            req.method == http::Method::GET,
            authorized,
            query.get("resource"),
            query.get("api-version"),
        ) {
            (true, true, Some(resource), Some(_)) => {
                let token = format!("mi-{}", hex_token());
                self.issued
                    .lock()
                    .expect("issued")
                    .insert(token.clone(), resource.clone());
                (
                    200,
                    serde_json::json!({"access_token": token, "expires_in": "3599", "resource": resource, "token_type": "Bearer"}),
                )
            }
            _ => (400, serde_json::json!({"error": "invalid_request"})),
        };
        let mut r = Response::new(body.to_string().into_bytes());
        *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
        let len = r.body().len();
        r.headers_mut().insert("content-length", len.into());
        r
    }
}

impl ManagedIdentityEndpoint {
    /// Starts the endpoint; with `identity_header`, it requires that secret.
    pub fn start(identity_header: Option<&str>) -> ManagedIdentityEndpoint {
        let socket =
            tollgate_gateway::egress::listener::bind("127.0.0.1:0".parse().expect("addr"), None)
                .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let issued: Issued = Default::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (stop, watch) = watch::channel(false);
        let app = ManagedIdentityApp {
            identity_header: identity_header.map(str::to_string),
            issued: issued.clone(),
            requests: requests.clone(),
        };
        tollgate_gateway::egress::listener::serve("mi-endpoint", socket, app, None, watch);
        ManagedIdentityEndpoint {
            addr,
            issued,
            requests,
            _stop: stop,
        }
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}/metadata/identity/oauth2/token", self.addr)
    }

    /// How many token requests arrived.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// The start of a config in which the gateway gets tokens from `endpoint` (identity provider
/// `entra`, OAuth client credentials as `client_id` with the secret `secret`, a TOML value
/// such as `{ env = "X" }`) for `host` (pinned to 127.0.0.1) over TLS on `port` (a protected
/// origin's: [`origin_ca`] is trusted), with audience `audience`.
/// Lines that follow at once belong to that `[[credential_rules]]` entry.
pub fn entra_config(
    endpoint: &TokenEndpoint,
    client_id: &str,
    secret: &str,
    host: &str,
    port: u16,
    audience: &str,
) -> String {
    format!(
        r#"{EPHEMERAL_LISTENERS}{upstream}resolve = {{ "{host}" = "127.0.0.1" }}

[[identity_providers]]
name = "entra"
kind = "client_credentials"
token_url = "{url}"
client_id = "{client_id}"
client_secret = {secret}

[[credential_rules]]
hosts = ["{host}"]
ports = [{port}]
audience = "{audience}"
"#,
        upstream = loopback_upstream(Some(&origin_ca().cert_path())),
        url = endpoint.url(),
    )
}
