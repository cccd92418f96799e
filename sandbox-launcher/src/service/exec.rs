//! One execution in a session, which is one tool call on the gateway: the tool call is
//! opened (for the agent, in the session, with the execution's timeout plus the grace
//! `execution_grace_secs` as its TTL) before the command starts and closed when the
//! execution ends, however it ends — exit, timeout, cancel, the sandbox's death or hang, a
//! deleted session. Tokens the gateway injected for it go with it.
//!
//! The execution runs in a task of its own that owns the cleanup, so a client that leaves
//! (its answer is dropped) cancels the execution without skipping the tool call's close.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tollgate_guest::exec::Execution;
use tollgate_guest::python::PythonCall;

use super::error::ServiceError;
use super::guest::guest_error;
use super::sandbox::open_gateway_session;
use super::session::SessionKey;
use super::sessions::{Session, Sessions};
use crate::gateway_api::ApiError;

/// How long a cancelled execution may take to be killed and reaped in the guest before its
/// tool call is closed and the session's next execution may start.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// How an execution whose client left ended, for the log.
const CANCELLED: &str = "cancelled";
/// How an execution the guest did not end in time ended, for the log.
const UNRESPONSIVE: &str = "guest unresponsive";
/// Largest execution request (its stdin included).
pub const MAX_EXEC_REQUEST_BYTES: usize = 8 << 20;

/// What an execution runs: a shell command, or Python code in the session's interpreter.
#[derive(Debug, Clone)]
pub enum Work {
    /// A command in the session's shell state.
    Shell(Execution),
    /// Code in the session's persistent interpreter.
    Python(PythonCall),
}

impl Work {
    /// The guest agent's route for it, answered as it runs.
    fn route(&self) -> &'static str {
        match self {
            Work::Shell(_) => "/exec?stream=ndjson",
            Work::Python(_) => "/python?stream=ndjson",
        }
    }

    /// Its own timeout, if it names one.
    fn timeout_secs(&self) -> Option<u64> {
        match self {
            Work::Shell(execution) => execution.timeout_secs,
            Work::Python(call) => call.timeout_secs,
        }
    }

    /// What it runs, for the gateway's approvers: the command line (or the program and its
    /// arguments), or the Python code; at most [`MAX_DESCRIPTION_BYTES`], cut with `…`.
    fn description(&self) -> String {
        let whole = match self {
            Work::Shell(execution) => match (&execution.command, &execution.argv) {
                (Some(command), _) => command.clone(),
                (None, Some(argv)) => argv.join(" "),
                (None, None) => String::new(),
            },
            Work::Python(call) => call.code.clone(),
        };
        if whole.len() <= MAX_DESCRIPTION_BYTES {
            return whole;
        }
        let mut end = MAX_DESCRIPTION_BYTES - '…'.len_utf8();
        while !whole.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &whole[..end])
    }

    /// The body the guest agent takes.
    fn body(&self) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            Work::Shell(execution) => serde_json::to_vec(execution),
            Work::Python(call) => serde_json::to_vec(call),
        }
    }
}

/// The most of an execution's command or code the gateway keeps with its tool call (the
/// gateway's own limit).
const MAX_DESCRIPTION_BYTES: usize = 4096;

/// An execution as the API takes it: what to run and an optional tool call id.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// The command or Python code to run, as the guest agent takes it.
    pub work: Work,
    /// The tool call's id (one is generated otherwise).
    pub tool_call_id: Option<String>,
}

impl ExecRequest {
    /// Parses and checks a request body: `{command | argv, env, cwd, stdin, timeout_secs,
    /// tool_call_id}`.
    pub fn parse(body: &[u8], max_timeout_secs: u64) -> Result<ExecRequest, ServiceError> {
        let (tool_call_id, object) = split_tool_call(body)?;
        let bad = |e: String| ServiceError::BadRequest(format!("invalid execution: {e}"));
        let execution: Execution = serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| bad(e.to_string()))?;
        match (&execution.command, &execution.argv) {
            (Some(_), None) => {}
            (None, Some(argv)) if !argv.is_empty() => {}
            _ => {
                return Err(bad(
                    "give exactly one of command and argv (non-empty)".into()
                ))
            }
        }
        check_timeout(execution.timeout_secs, max_timeout_secs)?;
        Ok(ExecRequest {
            work: Work::Shell(execution),
            tool_call_id,
        })
    }

    /// Parses and checks a Python call's body: `{code, timeout_secs, tool_call_id}`.
    pub fn parse_python(body: &[u8], max_timeout_secs: u64) -> Result<ExecRequest, ServiceError> {
        let (tool_call_id, object) = split_tool_call(body)?;
        let call: PythonCall = serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| ServiceError::BadRequest(format!("invalid Python call: {e}")))?;
        check_timeout(call.timeout_secs, max_timeout_secs)?;
        Ok(ExecRequest {
            work: Work::Python(call),
            tool_call_id,
        })
    }
}

/// A request body's `tool_call_id`, checked, and the rest of its object.
fn split_tool_call(
    body: &[u8],
) -> Result<(Option<String>, serde_json::Map<String, serde_json::Value>), ServiceError> {
    let bad = |e: String| ServiceError::BadRequest(format!("invalid execution: {e}"));
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let tool_call_id = match object.remove("tool_call_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) => Some(id),
        Some(_) => return Err(bad("tool_call_id must be a string".into())),
    };
    if let Some(id) = &tool_call_id {
        let valid = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if !valid {
            return Err(bad(
                "tool_call_id must be 1 to 128 of A-Z a-z 0-9 . _ : -".into()
            ));
        }
    }
    Ok((tool_call_id, object))
}

/// Refuses a timeout of 0 or past the service's longest.
fn check_timeout(timeout_secs: Option<u64>, max_timeout_secs: u64) -> Result<(), ServiceError> {
    let bad = |e: String| ServiceError::BadRequest(format!("invalid execution: {e}"));
    match timeout_secs {
        Some(0) => Err(bad("timeout_secs must be at least 1".into())),
        Some(secs) if secs > max_timeout_secs => Err(bad(format!(
            "timeout_secs must be at most {max_timeout_secs}"
        ))),
        _ => Ok(()),
    }
}

/// What an execution reports, in order: `Start`, output, then `End` or `Error`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// It runs, as this tool call.
    Start {
        /// The tool call's id on the gateway: the caller's, or one generated.
        tool_call_id: String,
    },
    /// Standard output (text, up to the cap).
    Stdout(String),
    /// Standard error (text, up to the cap).
    Stderr(String),
    /// It ended: how, as the guest agent reported it.
    End(Ended),
    /// It could not run, or broke off.
    Error {
        /// The stable code, as in the service's error answers (e.g. `guest_unresponsive`).
        error: String,
        /// What went wrong, for the caller.
        detail: String,
        /// The status a single JSON answer gets (a stream's is 200 by then).
        #[serde(skip)]
        status: u16,
    },
}

/// How an execution ended, with its tool call.
#[derive(Debug, Clone, Serialize)]
pub struct Ended {
    /// What the guest agent reported: a command's exit, signal, output and flags, or a
    /// Python call's output, result, error and flags.
    #[serde(flatten)]
    pub finished: serde_json::Map<String, serde_json::Value>,
    /// The id of the tool call it ran as (as in `Start`).
    pub tool_call_id: String,
}

impl Event {
    /// The NDJSON line (and SSE data) of this event: `{"<kind>": …}`.
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// The SSE event name: the same as the event's key in its JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Start { .. } => "start",
            Event::Stdout(_) => "stdout",
            Event::Stderr(_) => "stderr",
            Event::End(_) => "end",
            Event::Error { .. } => "error",
        }
    }

    fn failed(error: &ServiceError) -> Event {
        Event::Error {
            error: error.code().to_string(),
            detail: error.to_string(),
            status: error.status().as_u16(),
        }
    }
}

/// Starts `request` in `session` (whose execution lock the caller holds as `turn`) and
/// returns its events. The first is `Start` once the command runs, or an error from before
/// it did (an `Err` status for the API).
pub async fn start(
    sessions: Arc<Sessions>,
    session: Arc<Session>,
    turn: tokio::sync::OwnedMutexGuard<()>,
    request: ExecRequest,
) -> Result<mpsc::Receiver<Event>, ServiceError> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (events, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        run(&sessions, &session, request, ready_tx, events, turn).await;
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(receiver),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ServiceError::Internal(
            "the execution task ended early".into(),
        )),
    }
}

/// The execution: sandbox running, tool call opened, command sent, output relayed, tool call
/// closed and the session's record updated whatever happened — all before its last event is
/// sent and its `turn` released, so a client that saw the end finds the tool call closed and
/// the session free.
async fn run(
    sessions: &Sessions,
    session: &Session,
    request: ExecRequest,
    ready: tokio::sync::oneshot::Sender<Result<(), ServiceError>>,
    events: mpsc::Sender<Event>,
    turn: tokio::sync::OwnedMutexGuard<()>,
) {
    let key = &session.key;
    let context = &sessions.context;
    let guest = match sessions.running(session).await {
        Ok(guest) => guest,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let tool_call = request
        .tool_call_id
        .clone()
        .unwrap_or_else(|| format!("exec-{}", hex::encode(rand::random::<[u8; 8]>())));
    let timeout = request
        .work
        .timeout_secs()
        .unwrap_or(context.config.default_timeout_secs);
    // The gateway ends the tool call after this by itself, so the service waits no longer.
    let ttl = timeout + context.config.execution_grace_secs;
    let deadline = Deadline {
        at: tokio::time::Instant::now() + Duration::from_secs(ttl),
        grace_secs: context.config.execution_grace_secs,
    };
    let id = tool_call.clone();
    session.update(|r| r.open_tool_call = Some(id)).await;
    let described = request.work.description();
    if let Err(e) = open_tool_call(sessions, session, &tool_call, ttl, &described).await {
        session.update(|r| r.open_tool_call = None).await;
        let _ = ready.send(Err(e));
        return;
    }
    tracing::info!(agent = %key.agent, thread = %key.thread, tool_call = %tool_call, "execution started");

    let (outcome, last) = relay(&guest, &request.work, &tool_call, ready, &events, deadline).await;
    if outcome == CANCELLED && !guest.idle(CANCEL_WAIT).await {
        // Its tool call closes all the same; the next execution may find the agent busy.
        tracing::warn!(agent = %key.agent, thread = %key.thread, tool_call = %tool_call, "the cancelled command was not gone in time");
    }
    if outcome == UNRESPONSIVE {
        tracing::warn!(agent = %key.agent, thread = %key.thread, tool_call = %tool_call, "the sandbox did not end the execution in time; stopping it as hung");
        if let Err(e) = sessions.stop(session).await {
            tracing::warn!(agent = %key.agent, thread = %key.thread, "cannot stop the hung sandbox: {e}");
        }
    }

    let (agent, id) = (key.agent.clone(), tool_call.clone());
    if let Err(e) = context
        .gateway_call(&key.agent, move |api| api.close_tool_call(&agent, &id))
        .await
    {
        // Its TTL ends it on the gateway; the record keeps it so a restart closes it too.
        tracing::warn!(agent = %key.agent, tool_call = %tool_call, "cannot close the tool call: {e}");
    } else {
        session.update(|r| r.open_tool_call = None).await;
    }
    session
        .update(|r| {
            r.executions += 1;
            r.touch();
        })
        .await;
    tracing::info!(agent = %key.agent, thread = %key.thread, tool_call = %tool_call, outcome, "execution ended");
    drop(turn);
    if let Some(last) = last {
        let _ = events.send(last).await;
    }
}

/// Opens the execution's tool call on the gateway. A gateway that has lost the session's
/// listener (it restarted, or the agent was registered anew) gets it again first, once.
async fn open_tool_call(
    sessions: &Sessions,
    session: &Session,
    tool_call: &str,
    ttl: u64,
    command: &str,
) -> Result<(), ServiceError> {
    let context = &sessions.context;
    let key = &session.key;
    let open = || {
        let (agent, thread, id) = (key.agent.clone(), key.thread.clone(), tool_call.to_string());
        let command = command.to_string();
        context.gateway_call(&key.agent, move |api| {
            api.open_tool_call(&agent, &thread, &id, ttl, Some(&command))
        })
    };
    match open().await {
        Err(ServiceError::Gateway(ApiError::Refused {
            status: 404, body, ..
        })) if body.contains("has no session") => {
            tracing::warn!(agent = %key.agent, thread = %key.thread, "the gateway had lost the session's listener; opening it again");
            open_gateway_session(context, &session.id, &key.agent, &key.thread).await?;
            open().await
        }
        other => other,
    }
}

/// When the service stops waiting for an execution's end: its timeout plus the grace.
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    grace_secs: u64,
}

impl Deadline {
    /// What the caller learns when it passed.
    fn passed(self) -> ServiceError {
        ServiceError::GuestUnresponsive(self.grace_secs)
    }
}

/// Sends the execution to the guest agent and relays what it reports until it ends, the
/// client leaves (`events` closed: the connection to the guest is dropped, which cancels
/// the command), the guest breaks off or `deadline` passes (the guest is hung). Returns how
/// it ended (for the log) and the last event, unsent: the end, or why it broke off.
async fn relay(
    guest: &super::guest::GuestAgent,
    work: &Work,
    tool_call: &str,
    ready: tokio::sync::oneshot::Sender<Result<(), ServiceError>>,
    events: &mpsc::Sender<Event>,
    deadline: Deadline,
) -> (&'static str, Option<Event>) {
    let body = match work.body() {
        Ok(body) => Bytes::from(body),
        Err(e) => {
            let _ = ready.send(Err(ServiceError::Internal(e.to_string())));
            return ("not sent", None);
        }
    };
    let sent = guest.send(http::Method::POST, work.route(), body);
    let response = match tokio::time::timeout_at(deadline.at, sent).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            let _ = ready.send(Err(e));
            return ("guest unreachable", None);
        }
        Err(_) => {
            // Answered as the execution's end, after the sandbox is stopped.
            let _ = ready.send(Ok(()));
            return (UNRESPONSIVE, Some(Event::failed(&deadline.passed())));
        }
    };
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = match tokio::time::timeout_at(deadline.at, body.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            _ => Bytes::new(),
        };
        let _ = ready.send(Err(guest_error(status.as_u16(), &bytes)));
        return ("refused by the guest", None);
    }
    let _ = ready.send(Ok(()));
    let start = Event::Start {
        tool_call_id: tool_call.to_string(),
    };
    if events.send(start).await.is_err() {
        return (CANCELLED, None);
    }
    let mut pending = Vec::new();
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = events.closed() => return (CANCELLED, None),
            () = tokio::time::sleep_until(deadline.at) => {
                return (UNRESPONSIVE, Some(Event::failed(&deadline.passed())));
            }
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(e)) => {
                let e = ServiceError::GuestUnreachable(e.to_string());
                return ("guest broke off", Some(Event::failed(&e)));
            }
            None => {
                let e = ServiceError::GuestUnreachable(
                    "the guest agent ended the execution without its exit (did the sandbox stop?)"
                        .into(),
                );
                return ("guest broke off", Some(Event::failed(&e)));
            }
        };
        pending.extend_from_slice(&data);
        while let Some(newline) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=newline).collect();
            let event = match guest_event(&line, tool_call) {
                Some(event) => event,
                None => continue,
            };
            if matches!(event, Event::End(_) | Event::Error { .. }) {
                return ("ended", Some(event));
            }
            if events.send(event).await.is_err() {
                return (CANCELLED, None);
            }
        }
    }
}

/// One line of the guest's NDJSON as an event.
fn guest_event(line: &[u8], tool_call: &str) -> Option<Event> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Line {
        Stdout(String),
        Stderr(String),
        End(serde_json::Map<String, serde_json::Value>),
        Error(String),
    }
    match serde_json::from_slice::<Line>(line).ok()? {
        Line::Stdout(text) => Some(Event::Stdout(text)),
        Line::Stderr(text) => Some(Event::Stderr(text)),
        Line::End(finished) => Some(Event::End(Ended {
            finished,
            tool_call_id: tool_call.to_string(),
        })),
        Line::Error(detail) => Some(Event::Error {
            error: "exec_failed".into(),
            detail,
            status: 502,
        }),
    }
}

/// Collects an execution's events into its single answer.
pub async fn collect(mut events: mpsc::Receiver<Event>) -> Result<Ended, ServiceError> {
    let (mut stdout, mut stderr) = (String::new(), String::new());
    while let Some(event) = events.recv().await {
        match event {
            Event::Start { .. } => {}
            Event::Stdout(text) => stdout.push_str(&text),
            Event::Stderr(text) => stderr.push_str(&text),
            Event::End(mut ended) => {
                ended.finished.insert("stdout".into(), stdout.into());
                ended.finished.insert("stderr".into(), stderr.into());
                return Ok(ended);
            }
            Event::Error {
                error,
                detail,
                status,
            } => {
                return Err(ServiceError::Guest {
                    status,
                    code: error,
                    detail,
                })
            }
        }
    }
    Err(ServiceError::Internal(
        "the execution ended without a result".into(),
    ))
}

/// Whose execution, for the API's 409.
pub fn busy(key: &SessionKey) -> ServiceError {
    ServiceError::Busy {
        agent: key.agent.clone(),
        thread: key.thread.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_of_an_execution_is_its_command_or_code_and_bounded() {
        let shell: Work =
            Work::Shell(serde_json::from_str(r#"{"command": "make test"}"#).expect("execution"));
        assert_eq!(shell.description(), "make test");
        let argv: Work =
            Work::Shell(serde_json::from_str(r#"{"argv": ["ls", "-l"]}"#).expect("execution"));
        assert_eq!(argv.description(), "ls -l");
        let long = "é".repeat(MAX_DESCRIPTION_BYTES);
        let python: Work = Work::Python(
            serde_json::from_value(serde_json::json!({ "code": long })).expect("call"),
        );
        let described = python.description();
        assert!(
            described.len() <= MAX_DESCRIPTION_BYTES,
            "{}",
            described.len()
        );
        assert!(described.ends_with('…') && long.starts_with(described.trim_end_matches('…')));
    }

    #[test]
    fn an_execution_request_is_checked_before_anything_runs() {
        let ok =
            ExecRequest::parse(br#"{"command":"true","tool_call_id":"tc-1"}"#, 60).expect("valid");
        assert_eq!(ok.tool_call_id.as_deref(), Some("tc-1"));
        assert!(matches!(&ok.work, Work::Shell(e) if e.command.as_deref() == Some("true")));
        for bad in [
            &br#"{}"#[..],
            br#"{"command":"a","argv":["b"]}"#,
            br#"{"argv":[]}"#,
            br#"{"command":"a","timeout_secs":0}"#,
            br#"{"command":"a","timeout_secs":61}"#,
            br#"{"command":"a","tool_call_id":"a/b"}"#,
            br#"{"command":"a","tool_call_id":7}"#,
            br#"{"command":"a","surprise":1}"#,
            br#"[1]"#,
        ] {
            let e = ExecRequest::parse(bad, 60).expect_err("refused");
            assert_eq!(e.status(), 400, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_guests_lines_become_events_with_the_tool_call() {
        let end = br#"{"end":{"exit_code":3,"signal":null,"stdout":"","stderr":"","duration_ms":5,"truncated":false,"timed_out":false,"cancelled":false}}"#;
        match guest_event(end, "tc") {
            Some(Event::End(ended)) => {
                assert_eq!(ended.finished["exit_code"], 3);
                assert_eq!(ended.tool_call_id, "tc");
                // Read back, not compared as text: the key order depends on serde_json's
                // features, which the workspace may unify differently.
                let line: serde_json::Value =
                    serde_json::from_str(&Event::End(ended).json()).expect("json");
                assert_eq!(line["end"]["exit_code"], 3, "{line}");
                assert_eq!(line["end"]["tool_call_id"], "tc", "{line}");
                assert_eq!(line.as_object().map(|o| o.len()), Some(1), "{line}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(guest_event(br#"{"stdout":"hi"}"#, "tc"), Some(Event::Stdout(t)) if t == "hi")
        );
        assert!(guest_event(b"not json", "tc").is_none());
        assert_eq!(Event::Stdout("x".into()).json(), r#"{"stdout":"x"}"#);
    }
}
