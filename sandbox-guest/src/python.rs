//! A session's persistent Python interpreter: code run in it keeps its variables, imports and
//! definitions for the next call, like a notebook's kernel.
//!
//! The interpreter is one `python3` process per session, started at the first call, running
//! as the session's user in its workspace. A small driver (below) reads each call's code from
//! a socket pair the agent made (one end is the interpreter's standard input, which the driver
//! moves aside and replaces with `/dev/null`: no path, so nothing in the session's files can
//! stand in for it), runs it in one persistent namespace — the last expression's `repr` is the
//! result — and answers on the same socket with the result or the exception and its
//! traceback. What the code prints goes to the
//! process's own stdout and stderr, which the agent reads as they come (so a subprocess's
//! output is captured too, and nothing the code prints can be taken for the driver's answer).
//!
//! A timeout (or the caller leaving) interrupts the code with SIGINT, as Ctrl-C would: the
//! code gets `KeyboardInterrupt` and the interpreter lives on. If it does not answer within
//! [`INTERRUPT_GRACE`], the interpreter and everything it started are killed, and the next
//! call starts a new one (`interpreter_restarted`). The session's files are untouched either
//! way.

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

use crate::exec::{nonblocking, Capped, ExecError, Output, RunAs, Watcher};

/// How long interrupted code may take to stop before the interpreter is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// How long a new interpreter may take to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest `repr` of a result kept (the rest is cut, and `truncated` says so).
const MAX_RESULT_BYTES: usize = 64 * 1024;

/// The driver the interpreter runs (`python3 -u -c DRIVER`, its socket as standard input).
const DRIVER: &str = r#"
import ast, json, os, signal, socket, sys, traceback
# A timeout interrupts with SIGINT: Python raises KeyboardInterrupt only if SIGINT was not
# ignored when it started, and a process started in the background by a shell (nohup, `&`)
# passes it on ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
conn = socket.socket(fileno=os.dup(0))
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
channel = conn.makefile("rwb", buffering=0)
channel.write(b'{"ready": true}\n')
sys.path.insert(0, "")
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
while True:
    try:
        line = channel.readline()
        if not line:
            break
        code = json.loads(line)["code"]
        result = error = None
        try:
            tree = ast.parse(code, "<tool call>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<tool call>", "exec"), namespace)
            if last is not None:
                value = eval(compile(last, "<tool call>", "eval"), namespace)
                if value is not None:
                    result = repr(value)
        except BaseException as e:
            if isinstance(e, SyntaxError):
                shown = traceback.format_exception_only(type(e), e)
            else:
                # From the tool call's own frames on: the driver's is not the caller's.
                tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
                shown = traceback.format_exception(type(e), e, tb)
            error = {"type": type(e).__name__, "message": str(e), "traceback": "".join(shown)}
        sys.stdout.flush()
        sys.stderr.flush()
        channel.write((json.dumps({"result": result, "error": error}) + "\n").encode())
    except KeyboardInterrupt:
        # An interrupt that came between two calls: nothing was running.
        continue
"#;

/// A Python call, as the service sends it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonCall {
    /// The code (statements; the last one's value, if it is an expression, is the result).
    pub code: String,
    /// Seconds before the code is interrupted (the agent's default otherwise).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// The exception a call ended with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PythonError {
    /// Its type's name (`ZeroDivisionError`, `KeyboardInterrupt`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its message: `str()` of the exception, or why the interpreter is gone.
    pub message: String,
    /// The whole traceback, as Python prints it.
    pub traceback: String,
}

/// How a Python call ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PythonFinished {
    /// What it printed on stdout (lossy UTF-8), up to the cap.
    pub stdout: String,
    /// What it printed on stderr, up to the cap.
    pub stderr: String,
    /// The `repr` of the last expression's value, if the code ended with one (not `None`).
    pub result: Option<String>,
    /// The exception it ended with, if any.
    pub error: Option<PythonError>,
    /// How long it ran, from start to end, in milliseconds.
    pub duration_ms: u64,
    /// Whether output or the result was longer than the cap.
    pub truncated: bool,
    /// Whether the timeout interrupted it.
    pub timed_out: bool,
    /// Whether it was cancelled (its client went away).
    pub cancelled: bool,
    /// Whether the interpreter had to be killed (its state is gone; the next call starts a
    /// new one), or had died.
    pub interpreter_restarted: bool,
}

/// A session's interpreter and what bounds its calls.
#[derive(Debug)]
pub struct Python {
    /// The session's workspace (the interpreter's working directory and `HOME`).
    pub workspace: PathBuf,
    /// The unprivileged user the interpreter runs as (`None`: the agent's own).
    pub run_as: Option<RunAs>,
    /// Most bytes kept of each of stdout and stderr.
    pub max_output_bytes: usize,
    /// Timeout when the call gives none.
    pub default_timeout: Duration,
    /// Longest timeout a call may ask for.
    pub max_timeout: Duration,
    running: Mutex<Option<Interpreter>>,
}

/// A live interpreter.
#[derive(Debug)]
struct Interpreter {
    child: Child,
    stdout: ChildStdout,
    stderr: ChildStderr,
    channel: UnixStream,
    /// Bytes of the channel read but not yet a whole line.
    pending: Vec<u8>,
}

impl Python {
    /// The interpreter of the session at `workspace` (started at the first call).
    pub fn new(
        workspace: PathBuf,
        run_as: Option<RunAs>,
        max_output_bytes: usize,
        (default_timeout, max_timeout): (Duration, Duration),
    ) -> Python {
        Python {
            workspace,
            run_as,
            max_output_bytes,
            default_timeout,
            max_timeout,
            running: Mutex::new(None),
        }
    }

    /// The call's timeout, checked.
    pub fn check(&self, call: &PythonCall) -> Result<Duration, ExecError> {
        match call.timeout_secs {
            None => Ok(self.default_timeout),
            Some(0) => Err(ExecError::Invalid("timeout_secs must be at least 1".into())),
            Some(secs) if Duration::from_secs(secs) > self.max_timeout => {
                Err(ExecError::Invalid(format!(
                    "timeout_secs must be at most {}",
                    self.max_timeout.as_secs()
                )))
            }
            Some(secs) => Ok(Duration::from_secs(secs)),
        }
    }

    /// Starts the interpreter if there is none (or it died), so that a sandbox without
    /// Python is refused before an answer starts.
    pub fn prepare(&self) -> Result<(), ExecError> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.live(&mut running).map(|_| ())
    }

    /// The live interpreter in `running`: the one there, unless it died, else a new one.
    fn live<'a>(
        &self,
        running: &'a mut Option<Interpreter>,
    ) -> Result<&'a mut Interpreter, ExecError> {
        if running
            .as_mut()
            .is_some_and(|i| !matches!(i.child.try_wait(), Ok(None)))
        {
            *running = None;
        }
        match running {
            Some(interpreter) => Ok(interpreter),
            None => Ok(running.insert(self.start()?)),
        }
    }

    /// Runs `call` in the session's interpreter (started first if there is none).
    pub fn run(
        &self,
        call: &PythonCall,
        watcher: &mut dyn Watcher,
    ) -> Result<PythonFinished, ExecError> {
        let timeout = self.check(call)?;
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let interpreter = self.live(&mut running)?;
        let before = self.run_as.map(|user| crate::procs::of_user(user.uid));
        let outcome = self.call(interpreter, call, timeout, watcher, before.as_ref());
        if outcome.as_ref().map_or(true, |f| f.interpreter_restarted) {
            if let Some(mut dead) = running.take() {
                let _ = dead.child.kill();
                let _ = dead.child.wait();
            }
        }
        outcome
    }

    /// Starts an interpreter and waits for its driver to say it is ready.
    fn start(&self) -> Result<Interpreter, ExecError> {
        let failed = |e: String| ExecError::Failed(format!("cannot start python3: {e}"));
        let (channel, theirs) = UnixStream::pair().map_err(|e| failed(e.to_string()))?;
        let mut command = Command::new("python3");
        command
            .args(["-u", "-c", DRIVER])
            .env("HOME", &self.workspace)
            .current_dir(&self.workspace)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(user) = self.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        let spawned = command.spawn();
        // The command holds the driver's end until it goes: the driver's must be the only
        // one, so that its exit closes the channel.
        drop(command);
        let mut child = spawned.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ExecError::Unavailable("this sandbox has no python3".into())
            }
            _ => failed(e.to_string()),
        })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(failed("no output pipes".into()));
        };
        for fd in [stdout.as_fd(), stderr.as_fd(), channel.as_fd()] {
            nonblocking(fd)?;
        }
        let mut interpreter = Interpreter {
            child,
            stdout,
            stderr,
            channel,
            pending: Vec::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match read_line(&mut interpreter) {
                Ok(Some(line)) if line == b"{\"ready\": true}\n" => return Ok(interpreter),
                Ok(None) if Instant::now() < deadline => {
                    let mut fds = [PollFd::new(interpreter.channel.as_fd(), PollFlags::POLLIN)];
                    let _ = nix::poll::poll(&mut fds, PollTimeout::from(100u16));
                }
                _ => break,
            }
        }
        let _ = interpreter.child.kill();
        let _ = interpreter.child.wait();
        let mut why = String::new();
        let _ = interpreter.stderr.read_to_string(&mut why);
        Err(failed(format!("its driver did not start: {}", why.trim())))
    }

    /// Sends `call` to `interpreter` and watches it to its answer, the timeout or the caller
    /// leaving.
    fn call(
        &self,
        interpreter: &mut Interpreter,
        call: &PythonCall,
        timeout: Duration,
        watcher: &mut dyn Watcher,
        before: Option<&HashSet<crate::procs::ProcessId>>,
    ) -> Result<PythonFinished, ExecError> {
        let started = Instant::now();
        let request = serde_json::json!({ "code": call.code }).to_string() + "\n";
        write_all(&mut interpreter.channel, request.as_bytes())
            .map_err(|e| ExecError::Failed(format!("the interpreter is gone: {e}")))?;
        let mut out = Capped::new(self.max_output_bytes);
        let mut err = Capped::new(self.max_output_bytes);
        let mut interrupted: Option<Instant> = None;
        let (mut timed_out, mut cancelled, mut restarted) = (false, false, false);
        let answer = loop {
            let now = Instant::now();
            if interrupted.is_none() {
                timed_out = now >= started + timeout;
                cancelled = !timed_out && watcher.cancelled();
                if timed_out || cancelled {
                    let pid = nix::unistd::Pid::from_raw(interpreter.child.id() as i32);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
                    interrupted = Some(now);
                }
            } else if interrupted.is_some_and(|at| now.duration_since(at) >= INTERRUPT_GRACE) {
                // It did not stop: the interpreter goes, and what it started.
                let group = nix::unistd::Pid::from_raw(interpreter.child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                if let (Some(user), Some(before)) = (self.run_as, before) {
                    crate::procs::kill_user(user.uid, before);
                }
                restarted = true;
                break None;
            }
            {
                let mut fds = [
                    PollFd::new(interpreter.stdout.as_fd(), PollFlags::POLLIN),
                    PollFd::new(interpreter.stderr.as_fd(), PollFlags::POLLIN),
                    PollFd::new(interpreter.channel.as_fd(), PollFlags::POLLIN),
                ];
                let _ = nix::poll::poll(&mut fds, PollTimeout::from(20u16));
            }
            let out_open = out.read_from(&mut interpreter.stdout, &mut |b| {
                watcher.output(Output::Stdout, b)
            });
            let err_open = err.read_from(&mut interpreter.stderr, &mut |b| {
                watcher.output(Output::Stderr, b)
            });
            match read_line(interpreter) {
                Ok(Some(line)) => break Some(line),
                Ok(None) if out_open && err_open => {}
                // The interpreter died (its channel or its output closed).
                _ => {
                    restarted = true;
                    break None;
                }
            }
        };
        // What it printed before answering is in the pipes by now.
        out.read_from(&mut interpreter.stdout, &mut |b| {
            watcher.output(Output::Stdout, b)
        });
        err.read_from(&mut interpreter.stderr, &mut |b| {
            watcher.output(Output::Stderr, b)
        });
        #[derive(Deserialize)]
        struct Answer {
            result: Option<String>,
            error: Option<PythonError>,
        }
        let (mut result, error) = match answer.map(|line| serde_json::from_slice::<Answer>(&line)) {
            Some(Ok(answer)) => (answer.result, answer.error),
            Some(Err(e)) => (
                None,
                Some(died(&format!("an answer that is not JSON: {e}"))),
            ),
            None if restarted && (timed_out || cancelled) => (
                None,
                Some(died(
                    "the code did not stop when interrupted; the interpreter was killed",
                )),
            ),
            None => (None, Some(died("the interpreter exited"))),
        };
        let mut truncated = out.truncated || err.truncated;
        if let Some(repr) = result.as_mut().filter(|r| r.len() > MAX_RESULT_BYTES) {
            let mut end = MAX_RESULT_BYTES;
            while !repr.is_char_boundary(end) {
                end -= 1;
            }
            repr.truncate(end);
            truncated = true;
        }
        Ok(PythonFinished {
            stdout: String::from_utf8_lossy(&out.kept).into_owned(),
            stderr: String::from_utf8_lossy(&err.kept).into_owned(),
            result,
            error,
            duration_ms: started.elapsed().as_millis() as u64,
            truncated,
            timed_out,
            cancelled,
            interpreter_restarted: restarted,
        })
    }
}

/// The error of a call whose interpreter is gone.
fn died(message: &str) -> PythonError {
    PythonError {
        kind: "InterpreterRestarted".into(),
        message: message.into(),
        traceback: String::new(),
    }
}

/// A whole line from the driver, if one has come; `Err` once the channel closed.
fn read_line(interpreter: &mut Interpreter) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = interpreter.pending.iter().position(|&b| b == b'\n') {
            return Ok(Some(interpreter.pending.drain(..=end).collect()));
        }
        match interpreter.channel.read(&mut buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => interpreter.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `bytes` to a non-blocking stream, waiting for room as needed.
fn write_all(stream: &mut UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
                let _ = nix::poll::poll(&mut fds, PollTimeout::from(100u16));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
