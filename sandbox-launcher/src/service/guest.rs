//! The service's side of a session's guest agent: HTTP/1.1 over TCP to the agent's port on
//! the sandbox's address, from the session's gateway-side namespace (so only the service,
//! which can enter it, reaches the agent, and every session's agent has the same address),
//! with the session's secret on every request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::error::ServiceError;
use crate::network::in_namespace;

/// How long connecting to the guest agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest agent may take to answer (an execution's answer starts before its
/// command runs) and to send a whole answer read here.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// The request header that carries the secret (the guest agent's `SECRET_HEADER`).
const SECRET_HEADER: &str = tollgate_guest::server::SECRET_HEADER;

/// One session's guest agent.
#[derive(Clone)]
pub struct GuestAgent {
    /// The namespace the service connects from.
    pub namespace: PathBuf,
    /// The guest agent's address, as reached from that namespace.
    pub address: SocketAddr,
    /// The secret sent with every call, new at each start of the sandbox.
    secret: String,
}

impl std::fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAgent")
            .field("namespace", &self.namespace)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl GuestAgent {
    /// The agent at `address`, reached from `namespace`, with `secret`.
    pub fn new(namespace: PathBuf, address: SocketAddr, secret: String) -> GuestAgent {
        GuestAgent {
            namespace,
            address,
            secret,
        }
    }

    /// Sends one request; the answer's body is read by the caller (or dropped, which closes
    /// the connection: the agent cancels an execution whose client left).
    pub async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<http::Response<Incoming>, ServiceError> {
        self.send_within(CONNECT_TIMEOUT, method, path_and_query, body)
            .await
    }

    async fn send_within(
        &self,
        connect_timeout: Duration,
        method: http::Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<http::Response<Incoming>, ServiceError> {
        let unreachable = |e: String| ServiceError::GuestUnreachable(e);
        let stream = self
            .connect(connect_timeout)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let request = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, self.address.to_string())
            .header(SECRET_HEADER, &self.secret)
            .header(http::header::CONNECTION, "close")
            .body(Full::new(body))
            .map_err(|e| ServiceError::Internal(format!("a guest request: {e}")))?;
        match tokio::time::timeout(ANSWER_TIMEOUT, crate::client::exchange(stream, request)).await {
            Ok(answer) => answer.map_err(|e| unreachable(e.to_string())),
            Err(_) => Err(unreachable(format!(
                "no answer within {} s",
                ANSWER_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Sends one request and reads its whole answer; an error status becomes the guest's
    /// error.
    pub async fn call(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Bytes, ServiceError> {
        let response = self.send(method, path_and_query, body).await?;
        let status = response.status();
        let bytes = tokio::time::timeout(ANSWER_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| ServiceError::GuestUnreachable("its answer did not end in time".into()))?
            .map_err(|e| ServiceError::GuestUnreachable(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(guest_error(status.as_u16(), &bytes))
        }
    }

    /// Whether the agent answers its health check, connecting within `connect_timeout` (a
    /// booting VM answers no ARP: a short one keeps the wait for it short).
    pub async fn healthy(&self, connect_timeout: Duration) -> bool {
        match self
            .send_within(connect_timeout, http::Method::GET, "/health", Bytes::new())
            .await
        {
            Ok(response) => response.status().is_success(),
            Err(_) => false,
        }
    }

    /// Waits until no execution runs in the agent (a cancelled one is killed and reaped
    /// once the agent sees its client gone), at most `within`; whether it got there.
    pub async fn idle(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(bytes) = self.call(http::Method::GET, "/health", Bytes::new()).await {
                let health: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                if health["executing"] == false {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A TCP connection to the agent, made inside the namespace.
    async fn connect(&self, timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
        let (namespace, address) = (self.namespace.clone(), self.address);
        let stream = tokio::task::spawn_blocking(move || {
            in_namespace(&namespace, || {
                std::net::TcpStream::connect_timeout(&address, timeout)
            })
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    }
}

/// The guest's error answer (`{"error", "detail"}`) as the service's.
pub fn guest_error(status: u16, body: &[u8]) -> ServiceError {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: String,
        detail: String,
    }
    match serde_json::from_slice::<Answer>(body) {
        // The caller's fault (4xx), or something this sandbox lacks (503): passed on.
        Ok(answer) if (400..500).contains(&status) || status == 503 => ServiceError::Guest {
            status,
            code: answer.error,
            detail: answer.detail,
        },
        Ok(answer) => ServiceError::GuestUnreachable(format!(
            "{} ({status}): {}",
            answer.error, answer.detail
        )),
        Err(_) => ServiceError::GuestUnreachable(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}
