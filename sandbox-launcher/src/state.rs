//! What the launcher remembers between commands: one directory per sandbox under the state
//! directory (`/run/tollgate-launcher` by default: sandboxes do not outlive a reboot), with
//! `sandbox.json`, the console log and, for a VM, its initramfs. No secret is kept here: the
//! admin token is read from its file each time it is needed.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The record file in a sandbox's directory.
const RECORD_FILE: &str = "sandbox.json";
/// The workload's (process) or serial console's (VM) output.
pub const CONSOLE_FILE: &str = "console.log";
/// QEMU's own messages, kept apart from the guest's console; quoted when a boot fails.
pub const VMM_LOG_FILE: &str = "vmm.log";

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory that could not be read or written.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A record is not what this launcher writes.
    #[error("{path} is not a sandbox record: {reason}")]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// What the JSON parser reported.
        reason: String,
    },
}

/// Which backend runs a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A QEMU microVM.
    Qemu,
    /// A process in a network namespace.
    Netns,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Qemu => "qemu",
            Backend::Netns => "netns",
        })
    }
}

/// One running (or exited, not yet taken down) sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxRecord {
    /// The agent whose sandbox this is; its directory is named after it.
    pub agent: String,
    /// What runs it, and so whose process `pid` is (QEMU's or the workload's).
    pub backend: Backend,
    /// The VMM's or workload's process id (leader of its process group).
    pub pid: u32,
    /// That process's start time (clock ticks since boot), so a reused pid is never mistaken
    /// for it.
    pub pid_start: u64,
    /// When `up` started it (seconds since the epoch).
    pub started_at: u64,
    /// The gateway's admin API it is registered with.
    pub admin: String,
    /// The admin token's file (`None`: the `TOLLGATE_TOKEN` variable).
    pub token_file: Option<PathBuf>,
    /// Whether the gateway accepted the agent's registration (so `down` removes it).
    #[serde(default)]
    pub registered: bool,
    /// `kvm` or `tcg` for a VM.
    pub accel: Option<String>,
    /// The workload's command (empty: idle).
    pub command: Vec<String>,
}

/// Whether a sandbox's process is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// The process `up` started is still there (same pid and start time, not a zombie).
    Running,
    /// Ended (or a zombie awaiting its parent).
    Exited,
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessState::Running => "running",
            ProcessState::Exited => "exited",
        })
    }
}

/// A process's state and start time from `/proc/<pid>/stat`; `None` if there is none.
pub fn process_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the whole line, the 20th after the name.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Resident memory of `pid` in KiB.
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

impl SandboxRecord {
    /// Whether its process is the one `up` started and still runs.
    pub fn state(&self) -> ProcessState {
        match process_stat(self.pid) {
            Some((state, start)) if start == self.pid_start && state != 'Z' && state != 'X' => {
                ProcessState::Running
            }
            _ => ProcessState::Exited,
        }
    }

    /// Seconds since `up`.
    pub fn uptime_secs(&self) -> u64 {
        now_secs().saturating_sub(self.started_at)
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The launcher's state directory: one sub-directory per agent's sandbox.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root` (created when first written).
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// The directory's path, as given (it may not exist yet).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Agent `agent`'s sandbox directory.
    pub fn sandbox_dir(&self, agent: &str) -> PathBuf {
        self.root.join(agent)
    }

    /// Creates agent `agent`'s directory, traversable by the unprivileged VMM (which opens
    /// its initramfs there), and fails if it exists: one sandbox per agent.
    pub fn create_sandbox_dir(&self, agent: &str) -> Result<PathBuf, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.sandbox_dir(agent);
        let io = |source| StateError::Io {
            path: dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(io)?;
        // The VMM passes through it to the sandbox's initramfs.
        crate::workload::allow_traversal(&self.root).map_err(|source| StateError::Io {
            path: self.root.clone(),
            source,
        })?;
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&dir)
            .map_err(|source| StateError::Io {
                path: dir.clone(),
                source,
            })?;
        Ok(dir)
    }

    /// Saves `record` (written whole, then renamed into place).
    pub fn save(&self, record: &SandboxRecord) -> Result<(), StateError> {
        let path = self.sandbox_dir(&record.agent).join(RECORD_FILE);
        let tmp = path.with_extension("json.part");
        let json = serde_json::to_vec_pretty(record).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| StateError::Io { path, source })
    }

    /// Agent `agent`'s record, if it has a sandbox.
    pub fn load(&self, agent: &str) -> Result<Option<SandboxRecord>, StateError> {
        let path = self.sandbox_dir(agent).join(RECORD_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Every sandbox's record, by agent; unreadable ones as errors.
    pub fn list(&self) -> Vec<Result<SandboxRecord, StateError>> {
        let mut agents: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join(RECORD_FILE).exists())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        agents.sort();
        agents
            .iter()
            .filter_map(|a| self.load(a).transpose())
            .collect()
    }

    /// Removes agent `agent`'s directory and everything in it.
    pub fn remove(&self, agent: &str) -> Result<(), StateError> {
        let dir = self.sandbox_dir(agent);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path: dir, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(agent: &str, pid: u32, pid_start: u64) -> SandboxRecord {
        SandboxRecord {
            agent: agent.into(),
            backend: Backend::Netns,
            pid,
            pid_start,
            started_at: now_secs(),
            admin: "http://127.0.0.1:9901".into(),
            token_file: Some("/tmp/token".into()),
            registered: true,
            accel: None,
            command: vec!["sleep".into(), "5".into()],
        }
    }

    #[test]
    fn records_round_trip_and_one_agent_has_one_sandbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("state"));
        state.create_sandbox_dir("a").expect("first");
        assert!(
            state.create_sandbox_dir("a").is_err(),
            "a second sandbox for a"
        );
        let saved = record("a", 1, 2);
        state.save(&saved).expect("save");
        assert_eq!(state.load("a").expect("load"), Some(saved.clone()));
        assert_eq!(state.load("b").expect("load"), None);
        std::fs::create_dir(dir.path().join("state/broken")).expect("mkdir");
        std::fs::write(dir.path().join("state/broken/sandbox.json"), "{").expect("write");
        let listed = state.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].as_ref().expect("a"), &saved);
        assert!(listed[1].is_err());
        state.remove("a").expect("remove");
        state.remove("a").expect("remove again");
        assert_eq!(state.load("a").expect("load"), None);
    }

    #[test]
    fn the_state_root_gains_execute_bits_and_loses_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1700)).expect("chmod");
        StateDir::new(&root)
            .create_sandbox_dir("a")
            .expect("create");
        let mode = std::fs::metadata(&root).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o1711);
    }

    #[test]
    fn a_record_is_running_only_while_its_own_process_lives() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let (_, start) = process_stat(child.id()).expect("stat");
        assert_eq!(
            record("a", child.id(), start).state(),
            ProcessState::Running
        );
        assert_eq!(
            record("a", child.id(), start + 1).state(),
            ProcessState::Exited,
            "a reused pid is not the sandbox"
        );
        child.kill().expect("kill");
        let _ = child.wait();
        assert_eq!(record("a", child.id(), start).state(), ProcessState::Exited);
        assert!(resident_kib(std::process::id()).is_some());
    }
}
