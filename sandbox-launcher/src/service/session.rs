//! A session: one agent's conversation thread, with a sandbox of its own and a workspace
//! that outlives the sandbox's stops. Its record is kept in its directory, so a restarted
//! service finds it again.
//!
//! A session's directory (`<data>/<id>/`, `id` derived from agent and thread):
//! `session.json` (this record), `secret` (the guest agent's, 0600, replaced at every
//! start), `console.log` (the guest agent's messages or the VM's console); for the netns
//! backend `ca.pem`, `workspace/` and `shell/` (the persistent shell's state, both 0700 and
//! owned by the session's user); for the microVM backend `workspace.img` (the workspace disk,
//! which holds the shell's state too), `initrd` and `vmm.log` (0600, the VMM's user's).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::ServiceError;
use crate::state::{now_secs, process_stat, Backend};

/// Entries the disk use of a workspace directory counts at most (it is a figure, not a
/// bill: a workspace of millions of files is not walked whole on every look).
const MAX_COUNTED_ENTRIES: usize = 100_000;

/// The record file in a session's directory.
const RECORD_FILE: &str = "session.json";

/// Which session: an agent and one of its conversation threads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    /// The agent (as the gateway names it): whose tokens and policies apply.
    pub agent: String,
    /// The conversation thread: what sets this session apart from the agent's others.
    pub thread: String,
}

impl SessionKey {
    /// The session of `agent`'s thread `thread`: both 1 to 128 of `A-Z a-z 0-9 . _ -` (the
    /// thread also `:`), not starting with a dot.
    pub fn new(agent: &str, thread: &str) -> Result<SessionKey, ServiceError> {
        let valid = |id: &str, colon: bool| {
            !id.is_empty()
                && id.len() <= 128
                && !id.starts_with('.')
                && id.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'.' | b'_' | b'-')
                        || (colon && b == b':')
                })
        };
        if !valid(agent, false) {
            return Err(ServiceError::BadRequest(format!(
                "agent id {:?} is invalid: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with .)",
                shown(agent)
            )));
        }
        if !valid(thread, true) {
            return Err(ServiceError::BadRequest(format!(
                "thread id {:?} is invalid: use 1 to 128 of A-Z a-z 0-9 . _ : - (not starting with .)",
                shown(thread)
            )));
        }
        Ok(SessionKey {
            agent: agent.to_string(),
            thread: thread.to_string(),
        })
    }

    /// The session's short id: 16 hex digits of SHA-256 over agent and thread. It names the
    /// session's directory and namespaces (which cannot hold every id a thread may have).
    pub fn id(&self) -> String {
        let mut input = Vec::with_capacity(self.agent.len() + self.thread.len() + 1);
        input.extend_from_slice(self.agent.as_bytes());
        input.push(b'\n');
        input.extend_from_slice(self.thread.as_bytes());
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        hex::encode(&digest.as_ref()[..8])
    }
}

/// At most 64 characters of an id that was refused, for its error message.
fn shown(id: &str) -> String {
    id.chars().take(64).collect()
}

/// Whether a session's sandbox runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Its sandbox runs; the record's `process` is its process.
    Running,
    /// Its sandbox is stopped (idle, or never started); its files stay.
    Stopped,
}

/// The process that is a running session's sandbox: the guest agent (netns) or the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxProcess {
    /// Its pid (leader of its process group).
    pub pid: u32,
    /// Its start time (clock ticks since boot), so a reused pid is never taken for it.
    pub start: u64,
}

impl SandboxProcess {
    /// The process `pid`, as it is now.
    pub fn of(pid: u32) -> SandboxProcess {
        SandboxProcess {
            pid,
            start: process_stat(pid).map(|(_, start)| start).unwrap_or(0),
        }
    }

    /// Whether it still runs (the same process, not a zombie).
    pub fn alive(&self) -> bool {
        matches!(process_stat(self.pid), Some((state, start)) if state != 'Z' && start == self.start)
    }
}

/// What is remembered of a session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    /// The agent it belongs to (see [`SessionKey`]).
    pub agent: String,
    /// Its thread (see [`SessionKey`]).
    pub thread: String,
    /// What runs its sandbox, fixed when the session is created.
    pub backend: Backend,
    /// The user id its executions run as (netns backend; its group id is the same number).
    pub uid: u32,
    /// When it was created (seconds since the epoch).
    pub created_at: u64,
    /// When it was last used: created, started, an execution ended, a file moved.
    pub last_used_at: u64,
    /// How many executions (commands and Python calls) have run in it.
    pub executions: u64,
    /// Whether its sandbox runs.
    pub state: SessionState,
    /// The sandbox's process while it runs.
    pub process: Option<SandboxProcess>,
    /// Whether the gateway has the session's listener open (so a stop closes it).
    pub gateway_session: bool,
    /// The tool call of the execution under way, if one is (so a restarted service closes
    /// one its predecessor left open).
    pub open_tool_call: Option<String>,
}

impl SessionRecord {
    /// A new, stopped session.
    pub fn new(key: &SessionKey, backend: Backend, uid: u32) -> SessionRecord {
        let now = now_secs();
        SessionRecord {
            agent: key.agent.clone(),
            thread: key.thread.clone(),
            backend,
            uid,
            created_at: now,
            last_used_at: now,
            executions: 0,
            state: SessionState::Stopped,
            process: None,
            gateway_session: false,
            open_tool_call: None,
        }
    }

    /// Its key, from `agent` and `thread`.
    pub fn key(&self) -> SessionKey {
        SessionKey {
            agent: self.agent.clone(),
            thread: self.thread.clone(),
        }
    }

    /// Marks it used now: its idle stop and its retention count from here.
    pub fn touch(&mut self) {
        self.last_used_at = now_secs();
    }
}

/// A session's directory under the data directory, and where each of its files is.
#[derive(Debug, Clone)]
pub struct SessionDir {
    path: PathBuf,
}

impl SessionDir {
    /// The directory of session `id` under `data`.
    pub fn new(data: &Path, id: &str) -> SessionDir {
        SessionDir {
            path: data.join(id),
        }
    }

    /// The directory itself: `<data_dir>/<session id>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its workspace directory (netns backend; a VM's workspace is on [`disk`](Self::disk)).
    pub fn workspace(&self) -> PathBuf {
        self.path.join("workspace")
    }

    /// Its persistent shell's state.
    pub fn shell_state(&self) -> PathBuf {
        self.path.join("shell")
    }

    /// The guest agent's secret (0600), new at every start: the service sends it with each call.
    pub fn secret(&self) -> PathBuf {
        self.path.join("secret")
    }

    /// The gateway's CA, as the sandbox sees it.
    pub fn ca(&self) -> PathBuf {
        self.path.join("ca.pem")
    }

    /// The guest agent's messages, or the VM's serial console.
    pub fn console(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// QEMU's own messages (microVM backend).
    pub fn vmm_log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }

    /// The workspace disk (microVM backend).
    pub fn disk(&self) -> PathBuf {
        self.path.join("workspace.img")
    }

    /// The VM's initramfs: the image's with the session's files appended (microVM backend).
    pub fn initrd(&self) -> PathBuf {
        self.path.join("initrd")
    }

    /// Creates the directory: 0711, so the session's user can pass through to its
    /// workspace, and see nothing else in it.
    pub fn create(&self) -> Result<(), ServiceError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.path)
            .and_then(|()| {
                std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o711))
            })
            .map_err(|e| io_error(&self.path, e))
    }

    /// Writes the record (whole, then renamed into place: a crash leaves the old or the new).
    pub fn save(&self, record: &SessionRecord) -> Result<(), ServiceError> {
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| ServiceError::Internal(format!("cannot encode a session record: {e}")))?;
        write_private(&self.path.join(RECORD_FILE), &bytes)
    }

    /// Reads the record [`save`](Self::save) wrote.
    pub fn load(&self) -> Result<SessionRecord, ServiceError> {
        let path = self.path.join(RECORD_FILE);
        let bytes = std::fs::read(&path).map_err(|e| io_error(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ServiceError::Internal(format!("{} is not a session record: {e}", path.display()))
        })
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) -> Result<(), ServiceError> {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&self.path, e)),
        }
    }

    /// Bytes the workspace takes: a VM's disk image's allocated blocks, or the sizes of the
    /// files in a workspace directory (symbolic links not followed).
    pub fn disk_use(&self) -> u64 {
        if let Ok(meta) = std::fs::metadata(self.disk()) {
            use std::os::unix::fs::MetadataExt;
            return meta.blocks() * 512;
        }
        // Walked by descriptor, never through a symbolic link (the workload may swap a
        // directory for one while it is walked), and only so far.
        fn walk(dir: nix::dir::Dir, budget: &mut usize) -> u64 {
            use nix::fcntl::{AtFlags, OFlag};
            use std::os::fd::AsFd;
            let mut dir = dir;
            let Ok(parent) = dir.as_fd().try_clone_to_owned() else {
                return 0;
            };
            let mut total = 0;
            for entry in dir.iter().flatten() {
                let name = entry.file_name();
                if name.to_bytes() == b"." || name.to_bytes() == b".." || *budget == 0 {
                    continue;
                }
                *budget -= 1;
                let Ok(stat) = nix::sys::stat::fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                else {
                    continue;
                };
                if stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    let flags =
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                    if let Ok(child) =
                        nix::dir::Dir::openat(&parent, name, flags, nix::sys::stat::Mode::empty())
                    {
                        total += walk(child, budget);
                    }
                } else {
                    total += stat.st_size as u64;
                }
            }
            total
        }
        let flags = nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC;
        let Ok(root) = nix::dir::Dir::open(&self.workspace(), flags, nix::sys::stat::Mode::empty())
        else {
            return 0;
        };
        let mut budget = MAX_COUNTED_ENTRIES;
        walk(root, &mut budget)
    }
}

/// Writes `bytes` to `path`, 0600, through a temporary file of a random name (created new,
/// never through a link) renamed into place.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServiceError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension(format!("{}.tmp", hex::encode(rand::random::<[u8; 6]>())));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_data()))
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(|e| io_error(path, e))
}

/// An I/O failure on `path`, as the service reports it.
pub fn io_error(path: &Path, error: std::io::Error) -> ServiceError {
    ServiceError::Internal(format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_a_session_id_depends_on_both_parts() {
        for (agent, thread) in [
            ("", "t"),
            ("a", ""),
            ("a/b", "t"),
            ("..", "t"),
            ("a", ".."),
            ("a", "t/x"),
            ("a:b", "t"),
            (&"a".repeat(129), "t"),
        ] {
            assert!(
                SessionKey::new(agent, thread).is_err(),
                "{agent:?} {thread:?}"
            );
        }
        let a = SessionKey::new("agent-1", "thread:1").expect("valid");
        let b = SessionKey::new("agent-1", "thread:2").expect("valid");
        let c = SessionKey::new("agent-1\nthread", "1");
        assert!(c.is_err(), "a newline cannot make two keys one");
        assert_ne!(a.id(), b.id());
        assert_eq!(
            a.id(),
            SessionKey::new("agent-1", "thread:1").expect("valid").id()
        );
        assert_eq!(a.id().len(), 16);
        assert!(a.id().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn a_record_survives_a_save_and_a_load() {
        let dir = tempfile::tempdir().expect("dir");
        let key = SessionKey::new("a", "t").expect("valid");
        let session = SessionDir::new(dir.path(), &key.id());
        session.create().expect("create");
        let mut record = SessionRecord::new(&key, Backend::Netns, 2_000_001);
        record.executions = 3;
        record.open_tool_call = Some("exec-1".into());
        session.save(&record).expect("save");
        assert_eq!(session.load().expect("load"), record);
        std::fs::create_dir_all(session.workspace().join("d")).expect("mkdir");
        std::fs::write(session.workspace().join("d/f"), b"12345").expect("write");
        std::os::unix::fs::symlink("/usr", session.workspace().join("d/usr")).expect("link");
        assert_eq!(
            session.disk_use(),
            5 + "/usr".len() as u64,
            "a link is counted, not followed"
        );
        session.remove().expect("remove");
        assert!(!session.path().exists());
        session.remove().expect("removing again is no error");
    }
}
