//! Tool calls: the unit of an agent's work that credentials are scoped to.
//!
//! The agent runtime (control plane) opens a tool call on the admin API before the agent acts
//! and closes it afterwards. Requests from the agent are attributed to its open tool call,
//! which the policies see as `context.tool_call`; a request outside any open tool call has
//! none. When an agent has several tool calls open at once, the request names one with the
//! `Tollgate-Tool-Call` header (the header never reaches the origin).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::RwLock;
use serde::Serialize;

/// The request header that picks one of several open tool calls.
pub const TOOL_CALL_HEADER: &str = "tollgate-tool-call";

/// Longest TTL a tool call may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Longest description of what a tool call runs (its command or code), in bytes: enough to
/// read, bounded so that a tool call stays small in memory and in approval records.
pub const MAX_COMMAND_BYTES: usize = 4096;

/// A tool call a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallRef {
    /// The id the control plane gave it.
    pub id: String,
    /// Unique for each opening in this process: an id opened again after closing is another
    /// tool call, and never sees the tokens of the first.
    pub serial: u64,
    /// What it runs (the command or code the sandbox service executes), when its opener
    /// said: approvers see it beside the requests it makes.
    pub command: Option<Arc<str>>,
}

static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One open tool call.
#[derive(Debug, Clone)]
struct Open {
    id: String,
    serial: u64,
    /// The session it was opened in (its requests come on that session's listener).
    session: Option<String>,
    /// What it runs, if its opener said.
    command: Option<Arc<str>>,
    opened_at: SystemTime,
    expires_at: Option<Instant>,
}

impl Open {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// What the admin API shows of a tool call.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ToolCallInfo {
    /// The tool call's id.
    pub id: String,
    /// The agent it belongs to.
    pub agent: String,
    /// The session it belongs to, if it was opened in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// What it runs, if its opener said (at most [`MAX_COMMAND_BYTES`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// When it was opened (seconds since the Unix epoch).
    pub opened_at: u64,
    /// Seconds until it closes by itself, if it has a TTL.
    pub expires_in: Option<u64>,
}

/// Why a tool call could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ToolCallError {
    /// The id is empty, too long or has characters outside `[A-Za-z0-9._:-]`.
    #[error("tool call id {0:?} is invalid: use 1 to 128 characters of A-Z a-z 0-9 . _ : -")]
    InvalidId(String),
    /// A tool call with this id is already open for the agent.
    #[error("tool call {0:?} is already open")]
    AlreadyOpen(String),
    /// The TTL is zero or longer than [`MAX_TTL`].
    #[error("ttl_secs must be between 1 and {}", MAX_TTL.as_secs())]
    BadTtl,
    /// The command is longer than [`MAX_COMMAND_BYTES`].
    #[error("command is {0} bytes; at most {MAX_COMMAND_BYTES} are kept: shorten it")]
    CommandTooLong(usize),
    /// The agent has as many tool calls open as it may.
    #[error(
        "the agent has {0} tool calls open, its limit (limits.open_tool_calls): close finished \
         ones first"
    )]
    TooMany(usize),
}

/// One agent's open tool calls, by id and by serial: opening, closing and finding one take
/// the same time however many are open.
#[derive(Default)]
struct AgentCalls {
    by_id: HashMap<String, Open>,
    /// Serial → id, for [`ToolCalls::is_open`] (asked on every request with a tool call).
    by_serial: HashMap<u64, String>,
}

impl AgentCalls {
    fn remove(&mut self, id: &str) -> Option<Open> {
        let call = self.by_id.remove(id)?;
        self.by_serial.remove(&call.serial);
        Some(call)
    }

    /// Drops the calls whose TTL has passed; returns them.
    fn drop_expired(&mut self, now: Instant) -> Vec<Open> {
        let expired: Vec<String> = self
            .by_id
            .values()
            .filter(|c| !c.live(now))
            .map(|c| c.id.clone())
            .collect();
        expired.iter().filter_map(|id| self.remove(id)).collect()
    }
}

/// Checks an id given to a tool call or a session: 1 to 128 characters of
/// `[A-Za-z0-9._:-]`.
pub fn validate_id(id: &str) -> Result<(), ToolCallError> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    match valid {
        true => Ok(()),
        false => Err(ToolCallError::InvalidId(id.chars().take(200).collect())),
    }
}

/// A tool call just opened.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    /// What the admin API shows of it.
    pub info: ToolCallInfo,
    /// The call of the same id it replaced, past its TTL but not yet ended: (serial, id).
    pub ended: Option<(u64, String)>,
}

/// The open tool calls of every agent.
#[derive(Default)]
pub struct ToolCalls {
    open: RwLock<HashMap<String, AgentCalls>>,
}

impl ToolCalls {
    /// Opens tool call `id` for `agent`, closing by itself after `ttl` if given; refused when
    /// the agent has `max_open` open already. A call of the same id past its TTL that the
    /// sweeper has not ended yet is replaced, and returned in [`Opened::ended`]: end it as the
    /// sweeper would.
    pub fn open(
        &self,
        agent: &str,
        session: Option<&str>,
        id: &str,
        ttl: Option<Duration>,
        max_open: usize,
        command: Option<&str>,
    ) -> Result<Opened, ToolCallError> {
        validate_id(id)?;
        if let Some(command) = command.filter(|c| c.len() > MAX_COMMAND_BYTES) {
            return Err(ToolCallError::CommandTooLong(command.len()));
        }
        if ttl.is_some_and(|t| t.is_zero() || t > MAX_TTL) {
            return Err(ToolCallError::BadTtl);
        }
        let now = Instant::now();
        let mut open = self.open.write();
        let calls = open.entry(agent.to_string()).or_default();
        let mut ended = None;
        if let Some(call) = calls.by_id.get(id) {
            if call.live(now) {
                return Err(ToolCallError::AlreadyOpen(id.to_string()));
            }
            ended = calls.remove(id).map(|c| (c.serial, c.id));
        }
        // Calls past their TTL that the sweeper has not ended yet do not count: looked for
        // only when the agent is at its limit, so opening stays O(1) otherwise.
        if calls.by_id.len() >= max_open {
            let live = calls.by_id.values().filter(|c| c.live(now)).count();
            if live >= max_open {
                return Err(ToolCallError::TooMany(live));
            }
        }
        let call = Open {
            id: id.to_string(),
            serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            session: session.map(str::to_string),
            command: command.map(Arc::from),
            opened_at: SystemTime::now(),
            expires_at: ttl.map(|t| now + t),
        };
        let info = info(agent, &call, now);
        calls.by_serial.insert(call.serial, call.id.clone());
        calls.by_id.insert(call.id.clone(), call);
        Ok(Opened { info, ended })
    }

    /// Closes tool call `id` of `agent`; returns its serial, or `None` if it was not open.
    pub fn close(&self, agent: &str, id: &str) -> Option<u64> {
        let mut open = self.open.write();
        let calls = open.get_mut(agent)?;
        let closed = calls.remove(id)?;
        if calls.by_id.is_empty() {
            open.remove(agent);
        }
        Some(closed.serial)
    }

    /// Whether the tool call opened as `serial` for `agent` is still open (not closed, not
    /// past its TTL).
    pub fn is_open(&self, agent: &str, serial: u64) -> bool {
        let now = Instant::now();
        let open = self.open.read();
        let Some(calls) = open.get(agent) else {
            return false;
        };
        calls
            .by_serial
            .get(&serial)
            .and_then(|id| calls.by_id.get(id))
            .is_some_and(|c| c.live(now))
    }

    /// Removes the tool calls whose TTL has passed; returns (agent, serial, id) of each.
    pub fn sweep_expired(&self) -> Vec<(String, u64, String)> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut open = self.open.write();
        open.retain(|agent, calls| {
            for call in calls.drop_expired(now) {
                expired.push((agent.clone(), call.serial, call.id));
            }
            !calls.by_id.is_empty()
        });
        expired
    }

    /// Closes every tool call of `agent` in `session` (the session ended); returns (serial,
    /// id) of each, to end them.
    pub fn close_session(&self, agent: &str, session: &str) -> Vec<(u64, String)> {
        let mut open = self.open.write();
        let Some(calls) = open.get_mut(agent) else {
            return Vec::new();
        };
        let ids: Vec<String> = calls
            .by_id
            .values()
            .filter(|c| c.session.as_deref() == Some(session))
            .map(|c| c.id.clone())
            .collect();
        let closed = ids
            .iter()
            .filter_map(|id| calls.remove(id))
            .map(|c| (c.serial, c.id))
            .collect();
        if calls.by_id.is_empty() {
            open.remove(agent);
        }
        closed
    }

    /// Closes every tool call of `agent` (the agent was removed).
    pub fn close_all(&self, agent: &str) {
        self.open.write().remove(agent);
    }

    /// The open tool calls of `agent`, oldest first.
    pub fn list(&self, agent: &str) -> Vec<ToolCallInfo> {
        let now = Instant::now();
        let open = self.open.read();
        let Some(calls) = open.get(agent) else {
            return Vec::new();
        };
        let mut live: Vec<&Open> = calls.by_id.values().filter(|c| c.live(now)).collect();
        live.sort_by_key(|c| c.serial);
        live.into_iter().map(|c| info(agent, c, now)).collect()
    }

    /// The tool call a request of `agent` in `session` (the session of the listener it came
    /// on, if any) belongs to: the only one open there, or the one `named` (by the request's
    /// `Tollgate-Tool-Call` header) among several. `None` when none is open there, or several
    /// and the request names none of them. A tool call of one session is never another's.
    pub fn current(
        &self,
        agent: &str,
        session: Option<&str>,
        named: Option<&str>,
    ) -> Option<ToolCallRef> {
        let now = Instant::now();
        let open = self.open.read();
        let calls = open.get(agent)?;
        let here = |c: &&Open| c.live(now) && c.session.as_deref() == session;
        let found = match named {
            Some(name) => calls.by_id.get(name).filter(here),
            None => {
                let mut live = calls.by_id.values().filter(here);
                let first = live.next()?;
                live.next().is_none().then_some(first)
            }
        };
        found.map(|c| ToolCallRef {
            id: c.id.clone(),
            serial: c.serial,
            command: c.command.clone(),
        })
    }
}

fn info(agent: &str, call: &Open, now: Instant) -> ToolCallInfo {
    ToolCallInfo {
        id: call.id.clone(),
        agent: agent.to_string(),
        session: call.session.clone(),
        command: call.command.as_deref().map(str::to_string),
        opened_at: call
            .opened_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        expires_in: call
            .expires_at
            .map(|at| at.saturating_duration_since(now).as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current(t: &ToolCalls, agent: &str, named: Option<&str>) -> Option<String> {
        t.current(agent, None, named).map(|c| c.id)
    }

    #[test]
    fn the_only_open_tool_call_is_the_current_one() {
        let t = ToolCalls::default();
        assert_eq!(current(&t, "a", None), None);
        t.open("a", None, "tc-1", None, 8, None).unwrap();
        assert_eq!(current(&t, "a", None).as_deref(), Some("tc-1"));
        assert_eq!(current(&t, "b", None), None, "tool calls are per agent");
        assert!(t.close("a", "tc-1").is_some());
        assert_eq!(current(&t, "a", None), None);
        assert!(t.close("a", "tc-1").is_none());
    }

    #[test]
    fn several_open_tool_calls_need_the_request_to_name_one() {
        let t = ToolCalls::default();
        t.open("a", None, "tc-1", None, 8, None).unwrap();
        t.open("a", None, "tc-2", None, 8, None).unwrap();
        assert_eq!(current(&t, "a", None), None, "ambiguous: no tool call");
        assert_eq!(current(&t, "a", Some("tc-2")).as_deref(), Some("tc-2"));
        assert_eq!(current(&t, "a", Some("tc-9")), None);
        assert_eq!(
            current(&t, "b", Some("tc-1")),
            None,
            "another agent's tool call"
        );
        assert_eq!(t.list("a").len(), 2);
    }

    #[test]
    fn ids_are_unique_per_agent_and_checked() {
        let t = ToolCalls::default();
        t.open("a", None, "x", None, 8, None).unwrap();
        assert_eq!(
            t.open("a", None, "x", None, 8, None),
            Err(ToolCallError::AlreadyOpen("x".into()))
        );
        assert!(t.open("b", None, "x", None, 8, None).is_ok());
        assert!(matches!(
            t.open("a", None, "a b", None, 8, None),
            Err(ToolCallError::InvalidId(_))
        ));
        assert_eq!(
            t.open("a", None, "y", Some(Duration::ZERO), 8, None),
            Err(ToolCallError::BadTtl)
        );
    }

    #[test]
    fn an_expired_tool_call_is_no_longer_current_and_a_reopened_id_is_another_call() {
        let t = ToolCalls::default();
        t.open("a", None, "short", Some(Duration::from_millis(30)), 8, None)
            .unwrap();
        let first = t.current("a", None, None).unwrap();
        assert_eq!(first.id, "short");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.current("a", None, None), None);
        assert!(t.list("a").is_empty());
        assert_eq!(
            t.sweep_expired(),
            vec![("a".to_string(), first.serial, first.id.clone())]
        );
        assert!(t.sweep_expired().is_empty());
        t.open("a", None, "short", None, 8, None).unwrap();
        let again = t.current("a", None, None).unwrap();
        assert_eq!(again.id, "short", "the id can be reused");
        assert_ne!(again.serial, first.serial, "but it is another tool call");
    }

    #[test]
    fn an_agent_opens_at_most_its_limit_and_expired_calls_make_room() {
        let t = ToolCalls::default();
        t.open("a", None, "1", None, 2, None).unwrap();
        t.open("a", None, "2", Some(Duration::from_millis(30)), 2, None)
            .unwrap();
        assert_eq!(
            t.open("a", None, "3", None, 2, None),
            Err(ToolCallError::TooMany(2))
        );
        assert!(
            t.open("b", None, "3", None, 2, None).is_ok(),
            "the limit is per agent"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            t.open("a", None, "3", None, 2, None).is_ok(),
            "an expired call does not count"
        );
        assert_eq!(
            t.sweep_expired().len(),
            1,
            "and is still ended by the sweeper"
        );
        assert_eq!(
            t.open("a", None, "4", None, 2, None),
            Err(ToolCallError::TooMany(2))
        );
        assert!(t.close("a", "1").is_some());
        let again = t.open("a", None, "4", None, 2, None).unwrap();
        assert_eq!(again.info.id, "4");
        let listed: Vec<String> = t.list("a").into_iter().map(|c| c.id).collect();
        assert_eq!(listed, ["3", "4"], "oldest first");
    }

    #[test]
    fn what_a_tool_call_runs_goes_with_its_requests_and_is_bounded() {
        let t = ToolCalls::default();
        t.open("a", None, "tc-1", None, 8, Some("rm -rf build && make"))
            .unwrap();
        let current = t.current("a", None, None).expect("open");
        assert_eq!(current.command.as_deref(), Some("rm -rf build && make"));
        assert_eq!(
            t.list("a")[0].command.as_deref(),
            Some("rm -rf build && make")
        );
        let long = "x".repeat(MAX_COMMAND_BYTES + 1);
        assert_eq!(
            t.open("a", None, "tc-2", None, 8, Some(&long)),
            Err(ToolCallError::CommandTooLong(MAX_COMMAND_BYTES + 1))
        );
        let most = "x".repeat(MAX_COMMAND_BYTES);
        assert!(t.open("a", None, "tc-3", None, 8, Some(&most)).is_ok());
    }

    #[test]
    fn a_sessions_tool_calls_are_its_own() {
        let t = ToolCalls::default();
        t.open("a", Some("s1"), "tc-1", None, 8, None).unwrap();
        t.open("a", Some("s2"), "tc-2", None, 8, None).unwrap();
        let of = |session, named| t.current("a", session, named).map(|c| c.id);
        assert_eq!(of(Some("s1"), None).as_deref(), Some("tc-1"));
        assert_eq!(of(Some("s2"), None).as_deref(), Some("tc-2"));
        assert_eq!(of(None, None), None, "outside the sessions: none");
        assert_eq!(
            of(Some("s1"), Some("tc-2")),
            None,
            "another session's, even named"
        );
        let closed = t.close_session("a", "s1");
        assert_eq!(closed.len(), 1);
        assert_eq!(of(Some("s1"), None), None);
        assert_eq!(of(Some("s2"), None).as_deref(), Some("tc-2"));
        assert_eq!(t.list("a")[0].session.as_deref(), Some("s2"));
    }
}
