//! The few calls the launcher makes to the gateway's admin API: register an agent with its
//! listener in the sandbox's namespace, and remove it again; open and close a session's
//! listener; open and close a tool call. Plain HTTP/1.1 to the admin
//! listener (which is on loopback or a management network, never reachable by sandboxes).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

/// How long the gateway may take to connect and to answer (binding a listener in a
/// namespace and storing the registration are quick; this is a safety net).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call to the gateway failed. Never carries the admin token.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The admin URL is not `http://host:port`.
    #[error("admin URL {0:?} is not http://HOST:PORT (the launcher speaks plain HTTP to the admin listener)")]
    BadUrl(String),
    /// The gateway could not be reached.
    #[error("cannot reach the gateway's admin API at {url}: {source}")]
    Unreachable {
        /// The admin URL.
        url: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The gateway answered with an error.
    #[error("the gateway refused {what} ({status}): {body}")]
    Refused {
        /// What was asked, as messages name it (e.g. "registering agent a1").
        what: String,
        /// The HTTP status the gateway answered with.
        status: u16,
        /// Its answer (the gateway's JSON error).
        body: String,
    },
}

/// An agent's registration, as the gateway's `PUT /v1/agents/{id}` takes it.
#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    /// What the agent may do without a person: `ReadOnly`, `Review` or `Autonomous`.
    pub run_mode: String,
    /// RBAC scopes (Azure subscription / resource-group ids).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The identity provider whose tokens the agent's calls get.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The agent's own listener, in the sandbox's namespace: every connection to it is the agent's.
    pub listen: Listen,
}

/// Where the gateway listens for the agent.
#[derive(Debug, Clone, Serialize)]
pub struct Listen {
    /// The address the gateway binds in the namespace, e.g. `10.200.1.1:3128`.
    pub address: String,
    /// The network namespace to bind it in, e.g. `/run/netns/tg-<agent>`.
    pub netns: String,
}

/// A client of a gateway's admin API: its URL and the admin token it is called with.
pub struct GatewayApi {
    url: String,
    authority: String,
    token: String,
}

impl std::fmt::Debug for GatewayApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayApi")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl GatewayApi {
    /// The admin API at `url` (`http://host:port`), called with `token`.
    pub fn new(url: &str, token: String) -> Result<GatewayApi, ApiError> {
        let authority = http_authority(url).ok_or_else(|| ApiError::BadUrl(url.to_string()))?;
        Ok(GatewayApi {
            url: url.trim_end_matches('/').to_string(),
            authority: authority.to_string(),
            token,
        })
    }

    /// Registers (or re-registers) `agent`.
    pub fn register(&self, agent: &str, registration: &Registration) -> Result<(), ApiError> {
        let body = serde_json::to_string(registration).unwrap_or_default();
        self.expect(
            &format!("registering agent {agent}"),
            &[200, 201],
            ("PUT", &format!("/v1/agents/{agent}"), Some(&body)),
        )
    }

    /// Removes `agent` (closing its listener); an agent already gone is not an error.
    pub fn deregister(&self, agent: &str) -> Result<(), ApiError> {
        self.expect(
            &format!("removing agent {agent}"),
            &[200, 204, 404],
            ("DELETE", &format!("/v1/agents/{agent}"), None),
        )
    }

    /// Opens the listener of `agent`'s session `session` (idempotent): the agent must be
    /// registered.
    pub fn open_session(
        &self,
        agent: &str,
        session: &str,
        listen: &Listen,
    ) -> Result<(), ApiError> {
        let body = serde_json::json!({ "listen": listen }).to_string();
        self.expect(
            &format!("opening session {session} of agent {agent}"),
            &[200, 201],
            (
                "PUT",
                &format!("/v1/agents/{agent}/sessions/{session}"),
                Some(&body),
            ),
        )
    }

    /// Closes `agent`'s session `session` (its listener, its tool calls); one already gone,
    /// or whose agent is gone, is not an error.
    pub fn close_session(&self, agent: &str, session: &str) -> Result<(), ApiError> {
        self.expect(
            &format!("closing session {session} of agent {agent}"),
            &[200, 204, 404],
            (
                "DELETE",
                &format!("/v1/agents/{agent}/sessions/{session}"),
                None,
            ),
        )
    }

    /// Opens tool call `id` of `agent` in session `session` for `ttl_secs`; `command` is
    /// what it runs, shown to approvers of its requests.
    pub fn open_tool_call(
        &self,
        agent: &str,
        session: &str,
        id: &str,
        ttl_secs: u64,
        command: Option<&str>,
    ) -> Result<(), ApiError> {
        let body = serde_json::json!({
            "id": id, "ttl_secs": ttl_secs, "session": session, "command": command,
        })
        .to_string();
        self.expect(
            &format!("opening tool call {id} of agent {agent}"),
            &[201],
            (
                "POST",
                &format!("/v1/agents/{agent}/tool-calls"),
                Some(&body),
            ),
        )
    }

    /// Closes `agent`'s tool call `id` (its tokens go); one already gone is not an error.
    pub fn close_tool_call(&self, agent: &str, id: &str) -> Result<(), ApiError> {
        self.expect(
            &format!("closing tool call {id} of agent {agent}"),
            &[200, 204, 404],
            (
                "DELETE",
                &format!("/v1/agents/{agent}/tool-calls/{id}"),
                None,
            ),
        )
    }

    /// Makes the call; a status not in `ok` is a refusal of `what`.
    fn expect(
        &self,
        what: &str,
        ok: &[u16],
        (method, path, body): (&str, &str, Option<&str>),
    ) -> Result<(), ApiError> {
        let (status, answer) = self.call(method, path, body)?;
        if ok.contains(&status) {
            return Ok(());
        }
        Err(ApiError::Refused {
            what: what.to_string(),
            status,
            body: answer,
        })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), ApiError> {
        let unreachable = |source| ApiError::Unreachable {
            url: self.url.clone(),
            source,
        };
        let address = self
            .authority
            .to_socket_addrs()
            .map_err(unreachable)?
            .next()
            .ok_or_else(|| unreachable(std::io::Error::other("the host name has no address")))?;
        let mut stream = TcpStream::connect_timeout(&address, TIMEOUT).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(unreachable)?;
        stream
            .set_write_timeout(Some(TIMEOUT))
            .map_err(unreachable)?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.authority,
            self.token,
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(unreachable)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).map_err(unreachable)?;
        parse_response(&answer).ok_or_else(|| {
            unreachable(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the answer is not HTTP",
            ))
        })
    }
}

/// The `host:port` of a plain `http://host:port` URL (a trailing `/` allowed, no path).
pub fn http_authority(url: &str) -> Option<&str> {
    url.strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/') && a.rsplit_once(':').is_some())
}

/// Status and body of a complete HTTP/1.1 response (the connection was closed after it).
fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(raw).ok()? else {
        return None;
    };
    let status = response.code?;
    let body = String::from_utf8_lossy(&raw[head..]).trim().to_string();
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn admin_urls_must_be_plain_http_host_and_port() {
        for bad in [
            "https://127.0.0.1:9901",
            "127.0.0.1:9901",
            "http://",
            "http://h/x",
            "http://host",
        ] {
            assert!(GatewayApi::new(bad, "t".into()).is_err(), "{bad}");
        }
        assert!(GatewayApi::new("http://127.0.0.1:9901/", "t".into()).is_ok());
    }

    #[test]
    fn a_registration_is_put_with_the_token_and_a_refusal_says_why_without_it() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).expect("read");
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = r#"{"error":"invalid_agent","detail":"the namespace cannot be entered"}"#;
            write!(
                s,
                "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .expect("write");
            request
        });
        let api = GatewayApi::new(&format!("http://127.0.0.1:{port}"), "secret-token".into())
            .expect("api");
        let err = api
            .register(
                "vm-a",
                &Registration {
                    run_mode: "Review".into(),
                    scopes: vec![],
                    identity: None,
                    listen: Listen {
                        address: "10.200.1.1:3128".into(),
                        netns: "/run/netns/tg-vm-a".into(),
                    },
                },
            )
            .expect_err("refused");
        let request = server.join().expect("server");
        assert!(
            request.starts_with("PUT /v1/agents/vm-a HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Authorization: Bearer secret-token\r\n"));
        assert!(request.ends_with(
            r#"{"run_mode":"Review","listen":{"address":"10.200.1.1:3128","netns":"/run/netns/tg-vm-a"}}"#
        ));
        let message = err.to_string();
        assert!(
            message.contains("(400)") && message.contains("cannot be entered"),
            "{message}"
        );
        assert!(!message.contains("secret-token"));
        assert!(!format!("{api:?}").contains("secret-token"));
    }
}
