//! An execution: one command of a tool call, run in the session's shell state.
//!
//! Each execution is its own `sh` process (its own process group, so that a timeout kills
//! everything it started), but the session feels like one persistent shell: before the
//! command the shell takes the exported environment and the working directory the previous
//! execution left, and after it saves them again (`export -p`, `pwd`) in the session's state
//! directory. So `export X=1` or `cd /tmp` in one execution is in effect in the next; shell
//! functions, aliases and variables that are not exported are not carried (an `exit` in the
//! command ends the execution before its state is saved). Variables the request sets in `env`
//! are exported into the session, as `export` would.
//!
//! Output is read as it comes, each stream kept up to a cap (the rest read and dropped, and
//! the answer says `truncated`). At the timeout (or a cancel) the whole process group is
//! killed, and with it every process of the session's user that started during the
//! execution (one that left the group with `setsid` too); the output so far is returned with
//! `timed_out`. A process the command left in the background when it ended by itself keeps
//! running (the service closes the execution's tool call, so it gets no token — until a
//! later execution of the same session opens one: the gateway tells a session's requests
//! apart by its listener, not by process); its hold on the output pipes does not keep the
//! answer waiting.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

/// What the service asks to run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Execution {
    /// A shell command line (run by `sh`, in the session's state).
    #[serde(default)]
    pub command: Option<String>,
    /// Or a program and its arguments, run as given (quoted for the shell).
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Variables to export into the session before the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where to run it (relative to the workspace, or absolute); the session's working
    /// directory otherwise.
    #[serde(default)]
    pub cwd: Option<String>,
    /// What the command reads on its standard input (nothing otherwise).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Seconds before the execution is killed (the agent's default otherwise).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// How an execution ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finished {
    /// The command's exit status; `None` when a signal ended it.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did (e.g. 9 after a timeout).
    pub signal: Option<i32>,
    /// Its standard output (lossy UTF-8), up to the cap.
    pub stdout: String,
    /// Its standard error (lossy UTF-8), up to the cap.
    pub stderr: String,
    /// How long it ran, from start to end, in milliseconds.
    pub duration_ms: u64,
    /// Whether either stream was longer than the cap.
    pub truncated: bool,
    /// Whether the timeout ended it.
    pub timed_out: bool,
    /// Whether it was cancelled (its client went away).
    pub cancelled: bool,
}

/// Which output stream bytes came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Who waits for an execution: told of its output as it comes, and asked whether it still
/// wants it (a client that went away cancels the execution, which is then killed like one
/// past its timeout).
pub trait Watcher {
    /// New bytes on `stream` (those past the cap included: the watcher decides what to keep).
    fn output(&mut self, stream: Output, bytes: &[u8]);
    /// Whether the execution is no longer wanted.
    fn cancelled(&mut self) -> bool;
}

/// A watcher that wants the answer only at the end, and never cancels.
pub struct AtTheEnd;

impl Watcher for AtTheEnd {
    fn output(&mut self, _: Output, _: &[u8]) {}
    fn cancelled(&mut self) -> bool {
        false
    }
}

/// Why an execution could not run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The shell could not be started or watched.
    #[error("the execution could not run: {0}")]
    Failed(String),
    /// What it needs is not in this sandbox (e.g. Python).
    #[error("{0}")]
    Unavailable(String),
}

/// Makes `fd` non-blocking (the output pipes, read as they fill).
pub(crate) fn nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), ExecError> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| ExecError::Failed(e.to_string()))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| ExecError::Failed(e.to_string()))?;
    Ok(())
}

/// The user executions run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// The user id executions run as.
    pub uid: u32,
    /// The group id they run as.
    pub gid: u32,
}

/// A session's shell: where its state lives and what bounds its executions.
#[derive(Debug, Clone)]
pub struct Shell {
    /// The session's workspace (the first working directory, and `HOME`).
    pub workspace: PathBuf,
    /// Where the exported environment and working directory are kept between executions.
    pub state: PathBuf,
    /// The unprivileged user executions run as (`None`: the agent's own).
    pub run_as: Option<RunAs>,
    /// Most bytes kept of each of stdout and stderr.
    pub max_output_bytes: usize,
    /// Timeout when the request gives none.
    pub default_timeout: Duration,
    /// Longest timeout a request may ask for.
    pub max_timeout: Duration,
}

/// After the command's shell exits, how long output is still read from processes it left
/// holding the pipes.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);

/// The shell program around the command: restore, run, save (see the module's text).
/// (Builtins only: each program the shell starts costs a fork and an exec per execution. The
/// agent moves the `.next` files in place once the shell has exited by itself, so a killed
/// execution leaves the session's state as it was.)
const PROLOGUE: &str = r#"if [ -r "$TG_STATE/env" ]; then . "$TG_STATE/env"; fi
__tg_cwd=$TG_WORKSPACE
if [ -r "$TG_STATE/cwd" ]; then IFS= read -r __tg_cwd < "$TG_STATE/cwd"; fi
cd "$__tg_cwd" 2>/dev/null || cd "$TG_WORKSPACE"
__tg_state=$TG_STATE
unset TG_STATE TG_WORKSPACE __tg_cwd
"#;
const EPILOGUE: &str = r#"
__tg_status=$?
export -p > "$__tg_state/env.next"
pwd > "$__tg_state/cwd.next"
exit $__tg_status
"#;

/// The files of the session's state, each written as `<name>.next` by an execution.
const STATE_FILES: [&str; 2] = ["env", "cwd"];

impl Shell {
    /// Runs `execution` to its end (or its timeout, or until `watcher` cancels it).
    pub fn run(
        &self,
        execution: &Execution,
        watcher: &mut dyn Watcher,
    ) -> Result<Finished, ExecError> {
        let (script, timeout) = self.check(execution)?;
        self.spawn_and_watch(&mut Command::new("sh"), script, timeout, execution, watcher)
    }

    /// Checks `execution` before it runs: its shell program and its timeout.
    pub fn check(&self, execution: &Execution) -> Result<(String, Duration), ExecError> {
        let script = self.script(execution)?;
        let timeout = match execution.timeout_secs {
            None => self.default_timeout,
            Some(0) => return Err(ExecError::Invalid("timeout_secs must be at least 1".into())),
            Some(secs) if Duration::from_secs(secs) > self.max_timeout => {
                return Err(ExecError::Invalid(format!(
                    "timeout_secs must be at most {}",
                    self.max_timeout.as_secs()
                )))
            }
            Some(secs) => Duration::from_secs(secs),
        };
        Ok((script, timeout))
    }

    fn spawn_and_watch(
        &self,
        command: &mut Command,
        script: String,
        timeout: Duration,
        execution: &Execution,
        watcher: &mut dyn Watcher,
    ) -> Result<Finished, ExecError> {
        command
            .arg("-c")
            .arg(script)
            .env("TG_STATE", &self.state)
            .env("TG_WORKSPACE", &self.workspace)
            .env("HOME", &self.workspace)
            .current_dir(&self.workspace)
            .stdin(if execution.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(user) = self.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        for name in STATE_FILES {
            let _ = std::fs::remove_file(self.state.join(format!("{name}.next")));
        }
        // What the session's user runs before: a timeout ends everything else it runs.
        let before = self.run_as.map(|user| crate::procs::of_user(user.uid));
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| ExecError::Failed(format!("cannot start sh: {e}")))?;
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        // Fed from a thread: a command that does not read its input must not block the rest.
        if let (Some(mut pipe), Some(input)) = (child.stdin.take(), execution.stdin.clone()) {
            std::thread::spawn(move || {
                let _ = pipe.write_all(input.as_bytes());
            });
        }
        let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take())
        else {
            return Err(ExecError::Failed("no output pipes".into()));
        };
        for fd in [stdout.as_fd(), stderr.as_fd()] {
            nonblocking(fd)?;
        }
        let mut out = Capped::new(self.max_output_bytes);
        let mut err = Capped::new(self.max_output_bytes);
        let (mut out_open, mut err_open) = (true, true);
        let deadline = started + timeout;
        let mut timed_out = false;
        let mut cancelled = false;
        let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
        loop {
            let now = Instant::now();
            if !timed_out && !cancelled && exited.is_none() {
                if now >= deadline {
                    timed_out = true;
                } else if watcher.cancelled() {
                    cancelled = true;
                }
                if timed_out || cancelled {
                    // The whole group: the command and everything it started; and, as the
                    // session's user, whatever it started that left the group (setsid).
                    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                    if let (Some(user), Some(before)) = (self.run_as, &before) {
                        crate::procs::kill_user(user.uid, before);
                    }
                }
            }
            if exited.is_none() {
                if let Some(status) = child
                    .try_wait()
                    .map_err(|e| ExecError::Failed(e.to_string()))?
                {
                    exited = Some((status, now));
                }
            }
            match exited {
                Some(_) if !out_open && !err_open => break,
                Some((_, at)) if now.duration_since(at) >= DRAIN_AFTER_EXIT => break,
                _ => {}
            }
            let mut fds = Vec::with_capacity(2);
            if out_open {
                fds.push(PollFd::new(stdout.as_fd(), PollFlags::POLLIN));
            }
            if err_open {
                fds.push(PollFd::new(stderr.as_fd(), PollFlags::POLLIN));
            }
            if !fds.is_empty() {
                let _ = nix::poll::poll(&mut fds, PollTimeout::from(20u16));
            } else {
                // Both pipes closed, the shell not reaped yet: it is about to be.
                std::thread::sleep(Duration::from_millis(1));
            }
            if out_open {
                out_open = out.read_from(&mut stdout, &mut |b| watcher.output(Output::Stdout, b));
            }
            if err_open {
                err_open = err.read_from(&mut stderr, &mut |b| watcher.output(Output::Stderr, b));
            }
        }
        let status = match exited {
            Some((status, _)) => status,
            None => child.wait().map_err(|e| ExecError::Failed(e.to_string()))?,
        };
        // The state the execution left, taken only when it ended by itself.
        if !timed_out && !cancelled {
            for name in STATE_FILES {
                let next = self.state.join(format!("{name}.next"));
                if next.exists() {
                    let _ = std::fs::rename(&next, self.state.join(name));
                }
            }
        }
        Ok(Finished {
            exit_code: status.code(),
            signal: status.signal(),
            truncated: out.truncated || err.truncated,
            stdout: String::from_utf8_lossy(&out.kept).into_owned(),
            stderr: String::from_utf8_lossy(&err.kept).into_owned(),
            duration_ms: started.elapsed().as_millis() as u64,
            timed_out,
            cancelled,
        })
    }

    /// The whole shell program for `execution`.
    fn script(&self, execution: &Execution) -> Result<String, ExecError> {
        let command = match (&execution.command, &execution.argv) {
            (Some(command), None) => command.clone(),
            (None, Some(argv)) if !argv.is_empty() => argv
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
            _ => {
                return Err(ExecError::Invalid(
                    "give either command (a shell command line) or argv (a program and its \
                     arguments)"
                        .into(),
                ))
            }
        };
        let mut script = String::from(PROLOGUE);
        for (name, value) in &execution.env {
            let valid = name.bytes().enumerate().all(|(i, b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            });
            if name.is_empty() || !valid || name.starts_with("TG_") || name.starts_with("__tg") {
                return Err(ExecError::Invalid(format!(
                    "env: {name:?} is not a variable name (letters, digits, _; not starting \
                     with a digit or TG_)"
                )));
            }
            script.push_str(&format!("export {name}={}\n", shell_quote(value)));
        }
        if let Some(cwd) = &execution.cwd {
            script.push_str(&format!("cd {} || exit 126\n", shell_quote(cwd)));
        }
        // The command on lines of its own, so that a comment in it ends with it.
        script.push_str(&command);
        script.push_str(EPILOGUE);
        Ok(script)
    }
}

/// `arg` as one shell word.
pub fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// One output stream, kept up to a cap.
/// One output stream of an execution, kept up to a cap.
pub(crate) struct Capped {
    pub(crate) kept: Vec<u8>,
    cap: usize,
    pub(crate) truncated: bool,
}

impl Capped {
    pub(crate) fn new(cap: usize) -> Self {
        Capped {
            kept: Vec::new(),
            cap,
            truncated: false,
        }
    }

    /// Reads what is there now, passing it to `seen` too; returns whether the stream is
    /// still open.
    pub(crate) fn read_from(&mut self, from: &mut impl Read, seen: &mut dyn FnMut(&[u8])) -> bool {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    seen(&buf[..n]);
                    let room = self.cap.saturating_sub(self.kept.len());
                    self.kept.extend_from_slice(&buf[..n.min(room)]);
                    self.truncated |= n > room;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Shell {
        fn run_at_end(&self, execution: &Execution) -> Result<Finished, ExecError> {
            self.run(execution, &mut AtTheEnd)
        }
    }

    /// Keeps what it is told, and cancels once it has seen `cancel_at` on stdout.
    struct Recorder {
        seen: Vec<(Output, Vec<u8>)>,
        cancel_at: Option<&'static str>,
    }

    impl Watcher for Recorder {
        fn output(&mut self, stream: Output, bytes: &[u8]) {
            self.seen.push((stream, bytes.to_vec()));
        }
        fn cancelled(&mut self) -> bool {
            let out: Vec<u8> = self
                .seen
                .iter()
                .filter(|(s, _)| *s == Output::Stdout)
                .flat_map(|(_, b)| b.clone())
                .collect();
            self.cancel_at
                .is_some_and(|at| String::from_utf8_lossy(&out).contains(at))
        }
    }

    #[test]
    fn a_watcher_sees_output_as_it_comes_and_can_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let shell = shell(dir.path());
        let mut recorder = Recorder {
            seen: Vec::new(),
            cancel_at: Some("ready"),
        };
        let started = Instant::now();
        let done = shell
            .run(
                &Execution {
                    command: Some("echo ready; sleep 30; echo never".into()),
                    ..Execution::default()
                },
                &mut recorder,
            )
            .unwrap();
        assert!(done.cancelled && !done.timed_out, "{done:?}");
        assert_eq!(done.signal, Some(9));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(recorder.seen, [(Output::Stdout, b"ready\n".to_vec())]);
    }

    fn shell(dir: &std::path::Path) -> Shell {
        let workspace = dir.join("workspace");
        let state = dir.join("state");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        Shell {
            workspace,
            state,
            run_as: None,
            max_output_bytes: 1000,
            default_timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(60),
        }
    }

    fn run(shell: &Shell, command: &str) -> Finished {
        shell
            .run(
                &Execution {
                    command: Some(command.into()),
                    ..Execution::default()
                },
                &mut AtTheEnd,
            )
            .unwrap()
    }

    #[test]
    fn the_environment_and_working_directory_carry_to_the_next_execution() {
        let dir = tempfile::tempdir().unwrap();
        let shell = shell(dir.path());
        let first = run(
            &shell,
            "export GREETING='hello world' && mkdir -p sub && cd sub",
        );
        assert_eq!(first.exit_code, Some(0), "{first:?}");
        let second = run(&shell, "echo \"$GREETING\"; pwd");
        let workspace = shell.workspace.display().to_string();
        assert_eq!(second.stdout, format!("hello world\n{workspace}/sub\n"));
        // Request variables are exported into the session; a failing command keeps its status.
        let third = shell
            .run_at_end(&Execution {
                command: Some("echo $A; exit 3".into()),
                env: [("A".to_string(), "it's".to_string())].into(),
                ..Execution::default()
            })
            .unwrap();
        assert_eq!(
            (third.exit_code, third.stdout.as_str()),
            (Some(3), "it's\n")
        );
        assert!(shell
            .run_at_end(&Execution {
                command: Some("true".into()),
                env: [("1A".to_string(), String::new())].into(),
                ..Execution::default()
            })
            .is_err());
    }

    #[test]
    fn argv_is_run_as_given_and_stdin_is_fed() {
        let dir = tempfile::tempdir().unwrap();
        let shell = shell(dir.path());
        let done = shell
            .run_at_end(&Execution {
                argv: Some(vec![
                    "printf".into(),
                    "%s|".into(),
                    "a b".into(),
                    "$HOME".into(),
                ]),
                ..Execution::default()
            })
            .unwrap();
        assert_eq!(done.stdout, "a b|$HOME|");
        let fed = shell
            .run_at_end(&Execution {
                command: Some("tr a-z A-Z".into()),
                stdin: Some("quiet".into()),
                ..Execution::default()
            })
            .unwrap();
        assert_eq!(fed.stdout, "QUIET");
    }

    #[test]
    fn a_timeout_kills_the_whole_group_and_keeps_the_output_so_far() {
        let dir = tempfile::tempdir().unwrap();
        let shell = shell(dir.path());
        let marker = dir.path().join("survived");
        let started = Instant::now();
        let done = shell
            .run_at_end(&Execution {
                command: Some(format!(
                    "echo before; (sleep 2; touch {}) & sleep 30",
                    marker.display()
                )),
                timeout_secs: Some(1),
                ..Execution::default()
            })
            .unwrap();
        assert!(done.timed_out && done.exit_code.is_none(), "{done:?}");
        assert_eq!(done.signal, Some(9));
        assert_eq!(done.stdout, "before\n");
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !marker.exists(),
            "a process the command started outlived the timeout"
        );
        // A killed execution leaves the session's state as it was.
        let killed = shell
            .run_at_end(&Execution {
                command: Some("export Y=set; cd /; sleep 30".into()),
                timeout_secs: Some(1),
                ..Execution::default()
            })
            .unwrap();
        assert!(killed.timed_out);
        let after = run(&shell, "echo \"[$Y]\"; pwd");
        assert_eq!(after.stdout, format!("[]\n{}\n", shell.workspace.display()));
    }

    #[test]
    fn output_is_capped_and_a_background_process_does_not_hold_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let shell = shell(dir.path());
        let big = run(&shell, "head -c 5000 /dev/zero | tr '\\0' x; echo err >&2");
        assert_eq!(big.stdout.len(), 1000);
        assert!(big.truncated);
        assert_eq!(big.stderr, "err\n");
        let started = Instant::now();
        let background = run(&shell, "sleep 5 & echo started");
        assert_eq!(background.stdout, "started\n");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the answer waited for a background process"
        );
    }
}
