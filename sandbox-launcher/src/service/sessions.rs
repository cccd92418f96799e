//! Every session the service has: created on first use, started when an execution or a file
//! needs it, stopped when idle, deleted on request or after the retention, and found again
//! by a restarted service.
//!
//! Locks: the map is held only to find, add or remove a session; a session's `life` lock
//! for starting and stopping its sandbox and for writing its record; its `exec` lock for the
//! whole of an execution (one at a time per session; a second one gets 409 at once).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::BackendChoice;
use super::error::ServiceError;
use super::guest::GuestAgent;
use super::sandbox::{self, SandboxContext};
use super::session::{SessionDir, SessionKey, SessionRecord, SessionState};
use crate::state::{now_secs, Backend};

/// How long checking a running session's guest agent after a restart may take to connect.
const ADOPT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A session's sandbox and record, behind its lifecycle lock.
pub struct Life {
    /// What is remembered of it.
    pub record: SessionRecord,
    /// Its guest agent while it runs.
    pub guest: Option<GuestAgent>,
}

/// One session: an agent's conversation thread, its files, and its sandbox while it runs.
pub struct Session {
    /// The agent and thread it belongs to.
    pub key: SessionKey,
    /// Its short id (directory and namespace names).
    pub id: String,
    /// Its directory under the data directory (record, workspace, secret, logs).
    pub dir: SessionDir,
    /// The user id its executions run as.
    pub uid: u32,
    /// Its record and guest agent, behind the lock that starting and stopping hold.
    pub life: tokio::sync::Mutex<Life>,
    /// Held for the whole of an execution.
    pub exec: Arc<tokio::sync::Mutex<()>>,
    /// Set once it is being deleted: nothing new starts in it.
    deleted: AtomicBool,
}

impl Session {
    fn new(
        key: SessionKey,
        dir: SessionDir,
        record: SessionRecord,
        guest: Option<GuestAgent>,
    ) -> Arc<Session> {
        Arc::new(Session {
            id: key.id(),
            key,
            dir,
            uid: record.uid,
            life: tokio::sync::Mutex::new(Life { record, guest }),
            exec: Arc::new(tokio::sync::Mutex::new(())),
            deleted: AtomicBool::new(false),
        })
    }

    /// Whether it is being (or was) deleted.
    pub fn deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Updates its record with `change` and saves it (unless it was deleted).
    pub async fn update(&self, change: impl FnOnce(&mut SessionRecord)) {
        let mut life = self.life.lock().await;
        change(&mut life.record);
        if !self.deleted() {
            if let Err(e) = self.dir.save(&life.record) {
                tracing::warn!(agent = %self.key.agent, thread = %self.key.thread, "{e}");
            }
        }
    }
}

/// Every session of the service, by agent and thread, running or stopped.
pub struct Sessions {
    /// What starting a sandbox needs.
    pub context: Arc<SandboxContext>,
    map: Mutex<BTreeMap<SessionKey, Arc<Session>>>,
}

impl Sessions {
    /// No sessions yet (see [`Sessions::adopt`]).
    pub fn new(context: Arc<SandboxContext>) -> Sessions {
        Sessions {
            context,
            map: Mutex::new(BTreeMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<SessionKey, Arc<Session>>> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The session `key`, or `NoSession` (404) if the service has none.
    pub fn get(&self, key: &SessionKey) -> Result<Arc<Session>, ServiceError> {
        self.map()
            .get(key)
            .cloned()
            .ok_or_else(|| ServiceError::NoSession {
                agent: key.agent.clone(),
                thread: key.thread.clone(),
            })
    }

    /// The sessions (of `agent`, if given), by agent and thread.
    pub fn list(&self, agent: Option<&str>) -> Vec<Arc<Session>> {
        self.map()
            .values()
            .filter(|s| agent.is_none_or(|a| s.key.agent == a))
            .cloned()
            .collect()
    }

    /// The session `key`, created (and started) if it does not exist; `true` when it was
    /// created.
    pub async fn open(&self, key: &SessionKey) -> Result<(Arc<Session>, bool), ServiceError> {
        let session = {
            let mut map = self.map();
            if let Some(existing) = map.get(key) {
                return Ok((existing.clone(), false));
            }
            let config = &self.context.config;
            let of_agent = map.keys().filter(|k| k.agent == key.agent).count();
            if of_agent >= config.max_sessions_per_agent {
                return Err(ServiceError::TooManySessions(format!(
                    "agent {:?} has {of_agent} sessions, the most it may have (--max-sessions-per-agent): delete one (DELETE /v1/sessions/{}/{{thread}})",
                    key.agent, key.agent
                )));
            }
            if map.len() >= config.max_sessions {
                return Err(ServiceError::TooManySessions(format!(
                    "the service has {} sessions, the most it may have (--max-sessions)",
                    map.len()
                )));
            }
            let used: std::collections::BTreeSet<u32> = map.values().map(|s| s.uid).collect();
            let uid = (0..config.max_sessions as u32)
                .map(|slot| config.uid_base + slot)
                .find(|uid| !used.contains(uid))
                .ok_or_else(|| ServiceError::TooManySessions("no user id is free".into()))?;
            let id = key.id();
            let dir = SessionDir::new(&config.data_dir, &id);
            let backend = match config.backend {
                BackendChoice::Qemu => Backend::Qemu,
                BackendChoice::Netns => Backend::Netns,
            };
            let record = SessionRecord::new(key, backend, uid);
            dir.create()?;
            dir.save(&record)?;
            let session = Session::new(key.clone(), dir, record, None);
            map.insert(key.clone(), session.clone());
            session
        };
        if let Err(e) = self.running(&session).await {
            // A session that never started is not kept.
            let _ = self.delete(key).await;
            return Err(e);
        }
        tracing::info!(agent = %key.agent, thread = %key.thread, uid = session.uid, "session created");
        Ok((session, true))
    }

    /// The session's guest agent, its sandbox started first if it is stopped (or died).
    pub async fn running(&self, session: &Session) -> Result<GuestAgent, ServiceError> {
        let mut life = session.life.lock().await;
        if session.deleted() {
            return Err(ServiceError::NoSession {
                agent: session.key.agent.clone(),
                thread: session.key.thread.clone(),
            });
        }
        let Life { record, guest } = &mut *life;
        if record.state == SessionState::Running {
            let alive = record.process.is_some_and(|p| p.alive());
            if let (true, Some(guest)) = (alive, guest.as_ref()) {
                return Ok(guest.clone());
            }
            tracing::warn!(agent = %record.agent, thread = %record.thread, "the session's sandbox died; starting it again");
            *guest = None;
            sandbox::stop(&self.context, &session.id, &session.dir, record).await?;
        }
        let started = sandbox::start(&self.context, &session.id, &session.dir, record).await?;
        *guest = Some(started.clone());
        Ok(started)
    }

    /// Stops the session's sandbox (its files stay).
    pub async fn stop(&self, session: &Session) -> Result<(), ServiceError> {
        let mut life = session.life.lock().await;
        life.guest = None;
        sandbox::stop(&self.context, &session.id, &session.dir, &mut life.record).await
    }

    /// Deletes the session: its sandbox, its listener on the gateway, its files. An execution
    /// under way is ended with it.
    pub async fn delete(&self, key: &SessionKey) -> Result<(), ServiceError> {
        let session = self.get(key)?;
        session.deleted.store(true, Ordering::Release);
        {
            let mut life = session.life.lock().await;
            life.guest = None;
            let removed =
                match sandbox::stop(&self.context, &session.id, &session.dir, &mut life.record)
                    .await
                {
                    Ok(()) => session.dir.remove(),
                    Err(e) => Err(e),
                };
            if let Err(e) = removed {
                // Still there, and usable: a later DELETE tries again.
                session.deleted.store(false, Ordering::Release);
                return Err(e);
            }
        }
        self.map().remove(key);
        tracing::info!(agent = %key.agent, thread = %key.thread, "session deleted");
        Ok(())
    }

    /// Stops the sessions idle for longer than the cool-down and deletes the stopped ones
    /// kept longer than the retention. An execution under way keeps its session running; one
    /// that comes while its session is being stopped waits for the stop, then starts the
    /// sandbox again (it is not refused as busy).
    pub async fn sweep(&self) {
        let config = &self.context.config;
        let now = now_secs();
        for session in self.list(None) {
            let Ok(idle) = session.exec.clone().try_lock_owned() else {
                continue;
            };
            let mut life = session.life.lock().await;
            let (state, last_used) = (life.record.state, life.record.last_used_at);
            let idle_for = Duration::from_secs(now.saturating_sub(last_used));
            match state {
                SessionState::Running if idle_for >= config.idle_stop() => {
                    // The session's turn is free again at once: an execution that takes it
                    // waits for the sandbox (`running`), which the stop holds.
                    drop(idle);
                    tracing::info!(agent = %session.key.agent, thread = %session.key.thread, idle_secs = idle_for.as_secs(), "stopping an idle session");
                    life.guest = None;
                    let stopped =
                        sandbox::stop(&self.context, &session.id, &session.dir, &mut life.record)
                            .await;
                    if let Err(e) = stopped {
                        tracing::warn!(agent = %session.key.agent, thread = %session.key.thread, "{e}");
                    }
                }
                SessionState::Stopped
                    if config
                        .retention()
                        .is_some_and(|keep| idle_for >= config.idle_stop() + keep) =>
                {
                    drop(life);
                    tracing::info!(agent = %session.key.agent, thread = %session.key.thread, "deleting a session past its retention");
                    if let Err(e) = self.delete(&session.key).await {
                        tracing::warn!(agent = %session.key.agent, thread = %session.key.thread, "{e}");
                    }
                }
                _ => {}
            }
        }
    }

    /// Finds the sessions a previous service left in the data directory: a running one whose
    /// sandbox still answers is kept running, any other is stopped (its leftovers taken
    /// down); a tool call left open is closed. A directory that cannot be read is left as
    /// it is, and said.
    pub async fn adopt(&self) {
        let data = self.context.config.data_dir.clone();
        let Ok(entries) = std::fs::read_dir(&data) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let id = entry.file_name().to_string_lossy().to_string();
            // A session's directory is named by its id; the rest (`bin/`) is the service's.
            if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let dir = SessionDir::new(&data, &id);
            let mut record = match dir.load() {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!("not a session, left as it is: {e}");
                    continue;
                }
            };
            let key = record.key();
            if key.id() != id {
                tracing::warn!(dir = %path.display(), "a session record in another session's directory, left as it is");
                continue;
            }
            if let Some(tool_call) = record.open_tool_call.take() {
                let (agent, id) = (record.agent.clone(), tool_call.clone());
                if let Err(e) = self
                    .context
                    .gateway_call(&record.agent, move |api| api.close_tool_call(&agent, &id))
                    .await
                {
                    tracing::warn!(agent = %record.agent, tool_call = %tool_call, "cannot close a tool call left open: {e}");
                }
            }
            let mut guest = None;
            if record.state == SessionState::Running {
                let alive = record.process.is_some_and(|p| p.alive());
                let agent = sandbox::network(&self.context, &id)
                    .and_then(|net| sandbox::guest_agent(&net, &dir));
                match agent {
                    Ok(agent) if alive && agent.healthy(ADOPT_PROBE_TIMEOUT).await => {
                        guest = Some(agent)
                    }
                    _ => {
                        if let Err(e) = sandbox::stop(&self.context, &id, &dir, &mut record).await {
                            tracing::warn!(agent = %record.agent, thread = %record.thread, "{e}");
                        }
                    }
                }
            }
            if let Err(e) = dir.save(&record) {
                tracing::warn!("{e}");
            }
            tracing::info!(agent = %key.agent, thread = %key.thread, state = ?record.state, "session adopted");
            self.map()
                .insert(key.clone(), Session::new(key, dir, record, guest));
        }
    }
}
