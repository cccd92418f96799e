//! The guest agent's API, for the sandbox service only: every request carries the session's
//! secret (`X-Tollgate-Secret`), compared in constant time; anything else gets 401 and
//! nothing is done.
//!
//! | route | |
//! |---|---|
//! | `GET /health` | the agent is up: `{"ok": true, "executing": bool}` |
//! | `POST /exec` | run an [`Execution`] → [`crate::exec::Finished`]; one at a time (409 while one runs); the client closing its connection cancels it |
//! | `POST /python` | run a [`PythonCall`] in the session's interpreter → [`PythonFinished`]; `?stream=ndjson` as for `/exec`; executions and Python calls share one turn |
//! | `POST /exec?stream=ndjson` | the same, answered as it runs: one JSON object per line, `{"stdout": …}` or `{"stderr": …}` (text, up to the cap per stream), then `{"end": …}` (a `Finished` without its output); the answer ends with the connection |
//! | `GET /files?path=` | a file's bytes |
//! | `PUT /files?path=` | write the body as that file (201) |
//! | `GET /files/list?path=` | a directory's entries |
//! | `POST /sync` | write everything cached to disk (before the sandbox is stopped) |

use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::exec::{ExecError, Execution, Finished, Output, Shell, Watcher};
use crate::files::Workspace;
use crate::http::{read_request, write_error, write_response, ReadError, Request};
use crate::python::{Python, PythonCall, PythonFinished};

/// The request header that carries the session's secret.
pub const SECRET_HEADER: &str = "x-tollgate-secret";

/// Connections served at once; more are answered 503.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a request may touch.
pub struct Agent {
    /// The session's secret: a request without it in [`SECRET_HEADER`] gets 401.
    pub secret: Vec<u8>,
    /// Runs shell executions in the session's shell state.
    pub shell: Shell,
    /// The session's Python interpreter.
    pub python: Python,
    /// The workspace file uploads, downloads and listings work in.
    pub workspace: Workspace,
    /// Largest request body (a file upload, an execution).
    pub max_request_bytes: usize,
    /// Held while an execution runs.
    running: Mutex<()>,
    connections: AtomicUsize,
    /// The one address served, when set: see [`Agent::serving_only`].
    allowed_peer: Option<IpAddr>,
}

impl Agent {
    /// An agent for one session.
    pub fn new(
        secret: Vec<u8>,
        (shell, python): (Shell, Python),
        workspace: Workspace,
        max_request_bytes: usize,
    ) -> Self {
        Agent {
            secret,
            shell,
            python,
            workspace,
            max_request_bytes,
            running: Mutex::new(()),
            connections: AtomicUsize::new(0),
            allowed_peer: None,
        }
    }

    /// Serves connections from `peer` only (the sandbox service's side of the sandbox's
    /// network); any other is closed unanswered, before it takes one of the
    /// [`MAX_CONNECTIONS`]. The workload shares the agent's network and cannot send from
    /// `peer`: without this, a workload holding open connections to its own agent would
    /// leave none for the service, and the session could no longer be used.
    pub fn serving_only(mut self, peer: IpAddr) -> Self {
        self.allowed_peer = Some(peer);
        self
    }
}

impl Agent {
    /// The session's one turn to run something (shell or Python), if it is free.
    fn turn(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.running.try_lock().ok()
    }
}

/// Serves `listener` forever, a thread per connection.
pub fn serve(listener: TcpListener, agent: Arc<Agent>) -> std::io::Result<()> {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if let Some(allowed) = agent.allowed_peer {
            // Dropped: closed without a byte read or written.
            match stream.peer_addr() {
                Ok(peer) if peer.ip() == allowed => {}
                _ => continue,
            }
        }
        if agent.connections.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            agent.connections.fetch_sub(1, Ordering::AcqRel);
            let _ = write_error(
                &mut stream,
                503,
                "busy",
                "too many connections to the guest agent",
            );
            continue;
        }
        let agent = agent.clone();
        std::thread::spawn(move || {
            handle(&agent, stream);
            agent.connections.fetch_sub(1, Ordering::AcqRel);
        });
    }
    Ok(())
}

fn handle(agent: &Agent, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let authorized = |headers: &[(String, Vec<u8>)]| {
        headers
            .iter()
            .find(|(name, _)| name == SECRET_HEADER)
            .is_some_and(|(_, given)| bool::from(given.as_slice().ct_eq(&agent.secret)))
    };
    let request = match read_request(&mut stream, agent.max_request_bytes, authorized) {
        Ok(request) => request,
        Err(ReadError::Bad(status, why)) => {
            let _ = write_error(&mut stream, status, "bad_request", &why);
            return;
        }
        Err(ReadError::Unauthorized) => {
            let _ = write_error(
                &mut stream,
                401,
                "unauthorized",
                "this agent answers only its sandbox service (X-Tollgate-Secret)",
            );
            return;
        }
        Err(ReadError::Io(_)) => return,
    };
    let _ = route(agent, &request, &mut stream);
}

fn route(agent: &Agent, request: &Request, stream: &mut TcpStream) -> std::io::Result<()> {
    let path = || request.query_param("path").unwrap_or_default();
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/health") => {
            // Whether an execution runs: after a cancel, the service waits for it to be gone.
            let executing = agent.running.try_lock().is_err();
            let body = serde_json::json!({ "ok": true, "executing": executing }).to_string();
            write_response(stream, 200, "application/json", body.as_bytes())
        }
        ("POST", "/sync") => {
            nix::unistd::sync();
            write_response(stream, 200, "application/json", b"{\"ok\":true}")
        }
        ("POST", "/exec") => {
            let execution: Execution = match serde_json::from_slice(&request.body) {
                Ok(execution) => execution,
                Err(e) => {
                    return write_error(
                        stream,
                        400,
                        "bad_request",
                        &format!("invalid execution: {e}"),
                    )
                }
            };
            let Some(running) = agent.turn() else {
                return write_busy(stream);
            };
            // Checked before anything is written, so that a bad request gets its status.
            if let Err(e) = agent.shell.check(&execution) {
                return write_exec_error(stream, &e);
            }
            let streamed = request.query_param("stream").as_deref() == Some("ndjson");
            answer_as_it_runs(agent, stream, streamed, running, |watcher| {
                let finished = agent.shell.run(&execution, watcher)?;
                Ok((
                    serde_json::to_value(&finished).unwrap_or_default(),
                    serde_json::to_value(Finished {
                        stdout: String::new(),
                        stderr: String::new(),
                        ..finished
                    })
                    .unwrap_or_default(),
                ))
            })
        }
        ("POST", "/python") => {
            let call: PythonCall = match serde_json::from_slice(&request.body) {
                Ok(call) => call,
                Err(e) => {
                    return write_error(stream, 400, "bad_request", &format!("invalid call: {e}"))
                }
            };
            let Some(running) = agent.turn() else {
                return write_busy(stream);
            };
            if let Err(e) = agent
                .python
                .check(&call)
                .and_then(|_| agent.python.prepare())
            {
                return write_exec_error(stream, &e);
            }
            let streamed = request.query_param("stream").as_deref() == Some("ndjson");
            answer_as_it_runs(agent, stream, streamed, running, |watcher| {
                let finished = agent.python.run(&call, watcher)?;
                Ok((
                    serde_json::to_value(&finished).unwrap_or_default(),
                    serde_json::to_value(PythonFinished {
                        stdout: String::new(),
                        stderr: String::new(),
                        ..finished
                    })
                    .unwrap_or_default(),
                ))
            })
        }
        ("GET", "/files") => match agent.workspace.read(&path()) {
            Ok(bytes) => write_response(stream, 200, "application/octet-stream", &bytes),
            Err(e) => write_error(stream, e.status(), "file", &e.to_string()),
        },
        ("PUT", "/files") => match agent.workspace.write(&path(), &request.body) {
            Ok(()) => write_response(stream, 201, "application/json", b"{}"),
            Err(e) => write_error(stream, e.status(), "file", &e.to_string()),
        },
        ("GET", "/files/list") => match agent.workspace.list(&path()) {
            Ok(entries) => {
                let body = serde_json::json!({ "entries": entries }).to_string();
                write_response(stream, 200, "application/json", body.as_bytes())
            }
            Err(e) => write_error(stream, e.status(), "file", &e.to_string()),
        },
        (_, "/health" | "/sync" | "/exec" | "/python" | "/files" | "/files/list") => {
            write_error(stream, 405, "method_not_allowed", "not with this method")
        }
        _ => write_error(stream, 404, "not_found", "no such route"),
    }
}

/// An execution answered at its end, cancelled if the client closes its connection first.
struct PeerWatch<'a> {
    peer: &'a TcpStream,
}

impl Watcher for PeerWatch<'_> {
    fn output(&mut self, _: Output, _: &[u8]) {}

    fn cancelled(&mut self) -> bool {
        peer_gone(self.peer)
    }
}

/// Whether the client closed its side (or the connection broke): it sends nothing after its
/// request, so a peek that finds the end means it went away.
fn peer_gone(peer: &TcpStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut probe = [0u8; 1];
    match recv(
        peer.as_raw_fd(),
        &mut probe,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => true,
        Ok(_) => false,
        Err(nix::errno::Errno::EAGAIN) => false,
        Err(_) => true,
    }
}

/// An execution answered as it runs (NDJSON), cancelled if a line cannot be written.
struct Streamed<'a> {
    peer: &'a TcpStream,
    /// Bytes sent so far of stdout and stderr.
    sent: [usize; 2],
    cap: usize,
    failed: bool,
}

impl Streamed<'_> {
    fn line(&mut self, value: serde_json::Value) {
        let mut line = value.to_string();
        line.push('\n');
        let mut peer = self.peer;
        if std::io::Write::write_all(&mut peer, line.as_bytes()).is_err() {
            self.failed = true;
        }
    }
}

impl Watcher for Streamed<'_> {
    fn output(&mut self, stream: Output, bytes: &[u8]) {
        let (index, key) = match stream {
            Output::Stdout => (0, "stdout"),
            Output::Stderr => (1, "stderr"),
        };
        let room = self.cap.saturating_sub(self.sent[index]);
        let part = &bytes[..bytes.len().min(room)];
        if part.is_empty() || self.failed {
            return;
        }
        self.sent[index] += part.len();
        self.line(serde_json::json!({ key: String::from_utf8_lossy(part) }));
    }

    fn cancelled(&mut self) -> bool {
        self.failed || peer_gone(self.peer)
    }
}

/// An execution's answer (the shell's or Python's), whose turn `running` is: one JSON at the
/// end, or (`streamed`) NDJSON as it runs — `{"stdout": …}`, `{"stderr": …}`, then `{"end":
/// …}` without the output, or `{"error": …}`. `run` gives the whole result and the end line's.
/// The turn is given back before the last line, so a client that read it may send the next
/// execution at once; the client leaving cancels the execution.
fn answer_as_it_runs(
    agent: &Agent,
    peer: &mut TcpStream,
    streamed: bool,
    running: std::sync::MutexGuard<'_, ()>,
    run: impl FnOnce(&mut dyn Watcher) -> Result<(serde_json::Value, serde_json::Value), ExecError>,
) -> std::io::Result<()> {
    if !streamed {
        let mut watcher = PeerWatch { peer };
        let ran = run(&mut watcher);
        drop(running);
        return match ran {
            Ok((whole, _)) => {
                let body = serde_json::to_vec(&whole).unwrap_or_default();
                write_response(peer, 200, "application/json", &body)
            }
            Err(e) => write_exec_error(peer, &e),
        };
    }
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n";
    std::io::Write::write_all(peer, head.as_bytes())?;
    let mut streamed = Streamed {
        peer,
        sent: [0, 0],
        cap: agent.shell.max_output_bytes,
        failed: false,
    };
    let ran = run(&mut streamed);
    drop(running);
    match ran {
        Ok((_, end)) => streamed.line(serde_json::json!({ "end": end })),
        Err(e) => streamed.line(serde_json::json!({ "error": e.to_string() })),
    }
    Ok(())
}

/// The answer to an execution sent while another runs.
fn write_busy(stream: &mut TcpStream) -> std::io::Result<()> {
    write_error(
        stream,
        409,
        "busy",
        "an execution is running in this session; executions run one at a time",
    )
}

/// An execution that could not run, answered with its status.
fn write_exec_error(stream: &mut TcpStream, error: &ExecError) -> std::io::Result<()> {
    let (status, code) = match error {
        ExecError::Invalid(_) => (400, "bad_request"),
        ExecError::Unavailable(_) => (503, "unavailable"),
        ExecError::Failed(_) => (500, "exec_failed"),
    };
    write_error(stream, status, code, &error.to_string())
}
