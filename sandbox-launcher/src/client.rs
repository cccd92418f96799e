//! The command line's side of the sandbox service: `exec`, `files` and `sessions` call the
//! service's API (plain HTTP on its host-only listener, with its bearer token).

use std::io::Write;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::gateway_api::http_authority;

/// Where the service is and how to prove the right to call it.
pub struct ServiceClient {
    authority: String,
    token: String,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl ServiceClient {
    /// The service at `url` (`http://host:port`), called with `token`.
    pub fn new(url: &str, token: String) -> Result<ServiceClient, String> {
        let authority = http_authority(url).ok_or_else(|| {
            format!("service URL {url:?} is not http://HOST:PORT (the service's API is plain HTTP on a host-only listener)")
        })?;
        Ok(ServiceClient {
            authority: authority.to_string(),
            token,
        })
    }

    /// Sends one request; the caller reads the answer.
    pub async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Bytes,
        accept: &str,
    ) -> Result<http::Response<Incoming>, String> {
        let unreachable = |e: String| {
            format!(
                "cannot reach the sandbox service at {}: {e}",
                self.authority
            )
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let request = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, &self.authority)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::ACCEPT, accept)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        exchange(stream, request)
            .await
            .map_err(|e| unreachable(e.to_string()))
    }

    /// Sends one request and reads the whole answer; an error status is an error with the
    /// service's reason.
    pub async fn call(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Bytes, String> {
        let response = self
            .send(method, path_and_query, body, "application/json")
            .await?;
        let status = response.status();
        let bytes = read_all(response.into_body()).await?;
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(refusal(status.as_u16(), &bytes))
        }
    }
}

/// Sends `request` as the one request of a new HTTP/1.1 connection over `stream`; the
/// connection is driven until its answer is read or dropped (dropping it closes the
/// connection).
pub async fn exchange(
    stream: tokio::net::TcpStream,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<Incoming>, hyper::Error> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await
}

/// Reads the whole of an answer's body; an error says the answer broke off.
pub async fn read_all(body: Incoming) -> Result<Bytes, String> {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("the answer broke off: {e}"))
}

/// The service's error answer, for a person.
pub fn refusal(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => format!(
            "{} ({status}): {}",
            v["error"].as_str().unwrap_or("error"),
            v["detail"].as_str().unwrap_or("")
        ),
        Err(_) => format!("status {status}: {}", String::from_utf8_lossy(body)),
    }
}

/// `/v1/sessions/{agent}/{thread}` with both parts percent-encoded.
pub fn session_path(agent: &str, thread: &str) -> String {
    let part = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    format!("/v1/sessions/{}/{}", part(agent), part(thread))
}

/// What to run: a command (`exec`) or Python code (`python`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST …/exec`.
    Exec,
    /// `POST …/python`.
    Python,
}

/// Runs an execution (a command, or Python code), printing its output as it comes; returns
/// the exit status the command line should end with: the command's, 128 + its signal, 1 for
/// Python code that raised (its traceback printed), or 124 after a timeout (as `timeout(1)`
/// does).
pub async fn exec(
    client: &ServiceClient,
    (agent, thread): (&str, &str),
    route: Route,
    execution: serde_json::Value,
) -> Result<i32, String> {
    let path = session_path(agent, thread);
    // The session is made if it does not exist yet (PUT is idempotent).
    client.call(http::Method::PUT, &path, Bytes::new()).await?;
    let body = Bytes::from(execution.to_string());
    let route = match route {
        Route::Exec => "exec",
        Route::Python => "python",
    };
    let response = client
        .send(
            http::Method::POST,
            &format!("{path}/{route}?stream=ndjson"),
            body,
            "application/x-ndjson",
        )
        .await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = read_all(body).await?;
        return Err(refusal(status.as_u16(), &bytes));
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the answer broke off: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(newline) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=newline).collect();
            let Ok(event) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(text) = event["stdout"].as_str() {
                let mut out = std::io::stdout();
                let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            } else if let Some(text) = event["stderr"].as_str() {
                let _ = std::io::stderr().write_all(text.as_bytes());
            } else if let Some(end) = event.get("end") {
                if end["truncated"].as_bool() == Some(true) {
                    eprintln!("tollgate-launcher: the output was longer than the cap and was cut");
                }
                if let Some(result) = end["result"].as_str() {
                    println!("{result}");
                }
                if let Some(traceback) = end["error"]["traceback"].as_str() {
                    eprint!("{traceback}");
                }
                if end["interpreter_restarted"].as_bool() == Some(true) {
                    eprintln!(
                        "tollgate-launcher: the interpreter was restarted: its variables are gone"
                    );
                }
                if end["timed_out"].as_bool() == Some(true) {
                    eprintln!("tollgate-launcher: the execution timed out and was stopped");
                    return Ok(124);
                }
                if let Some(code) = end["exit_code"].as_i64() {
                    return Ok(code as i32);
                }
                if end.get("error").is_some() {
                    return Ok(if end["error"].is_null() { 0 } else { 1 });
                }
                return Ok(128 + end["signal"].as_i64().unwrap_or(0) as i32);
            } else if let Some(error) = event.get("error") {
                return Err(format!(
                    "{}: {}",
                    error["error"].as_str().unwrap_or("error"),
                    error["detail"].as_str().unwrap_or("")
                ));
            }
        }
    }
    Err("the service ended the answer before the execution's end".into())
}
