//! The guest agent as a process, over real TCP on loopback: the secret, executions as the
//! unprivileged user with their state carried, one at a time, and files kept inside the
//! workspace. (Inside a microVM it is the same binary; the launcher's tests reach it there.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SECRET: &str = "0123456789abcdef-session-secret";

struct Running {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent in a fresh directory; as `nobody` when the test runs as root.
fn start() -> Running {
    start_with(&[])
}

/// [`start`], with `extra` options.
fn start_with(extra: &[&str]) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    // The workload's user must be able to reach its workspace.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    // Started with SIGINT and SIGQUIT ignored, as a shell passes them to a process it starts
    // in the background (nohup, `&`): the agent's timeouts must not depend on what it inherits.
    let mut command = Command::new("sh");
    command
        .args(["-c", "trap '' INT QUIT; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_tollgate-guest-agent"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--max-output-bytes",
            "1000",
            "--max-file-bytes",
            "4096",
        ])
        .arg("--secret-file")
        .arg(&secret)
        .arg("--workspace")
        .arg(dir.path().join("workspace"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .args(extra)
        .stdout(Stdio::piped());
    if nix::unistd::geteuid().is_root() {
        command.args(["--user", "nobody"]);
    }
    let mut child = command.spawn().expect("agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Running { child, addr, dir }
}

/// One request; returns (status, body).
fn call(
    agent: SocketAddr,
    method: &str,
    target: &str,
    secret: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(agent).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(secret) = secret {
        head.push_str(&format!("X-Tollgate-Secret: {secret}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("body");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let status = std::str::from_utf8(&out[9..12])
        .expect("status")
        .parse()
        .expect("code");
    (status, out[split..].to_vec())
}

fn exec(agent: SocketAddr, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (status, out) = call(
        agent,
        "POST",
        "/exec",
        Some(SECRET),
        body.to_string().as_bytes(),
    );
    (status, serde_json::from_slice(&out).expect("json"))
}

#[test]
fn only_the_service_with_the_secret_is_answered() {
    let agent = start();
    assert_eq!(call(agent.addr, "GET", "/health", Some(SECRET), b"").0, 200);
    for secret in [None, Some("wrong"), Some("0123456789abcdef-session-secreT")] {
        let (status, body) = call(
            agent.addr,
            "POST",
            "/exec",
            secret,
            br#"{"command":"touch /tmp/x-agent-test"}"#,
        );
        assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    }
    assert!(!std::path::Path::new("/tmp/x-agent-test").exists());
    // Without the secret, nothing beyond the head is read or held: a huge body announced is
    // refused at once.
    let mut s = TcpStream::connect(agent.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"PUT /files?path=x HTTP/1.1\r\nContent-Length: 60000000\r\n\r\n")
        .expect("head");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
}

/// A connection to `agent` from `source` (a loopback address of the caller's choosing).
fn connect_from(source: std::net::Ipv4Addr, agent: SocketAddr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
    )
    .expect("bind");
    let SocketAddr::V4(agent) = agent else {
        panic!("the agent listens on IPv4")
    };
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(agent),
    )
    .expect("connect");
    TcpStream::from(fd)
}

#[test]
fn told_the_services_address_the_agent_closes_on_everyone_else_who_cannot_crowd_it_out() {
    // The service's side is 127.0.0.2 here; the workload's connections come from 127.0.0.1.
    let agent = start_with(&["--allow-from", "127.0.0.2"]);
    let health = format!("GET /health HTTP/1.1\r\nX-Tollgate-Secret: {SECRET}\r\n\r\n");
    let ask = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(health.as_bytes());
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    // Another address is closed on, even with the secret: nothing is answered.
    assert_eq!(ask(TcpStream::connect(agent.addr).expect("connect")), "");
    // Connections held open from there take none of the agent's: the service still gets in.
    let held: Vec<TcpStream> = (0..tollgate_guest::server::MAX_CONNECTIONS + 8)
        .map(|_| TcpStream::connect(agent.addr).expect("connect"))
        .collect();
    let answer = ask(connect_from(
        std::net::Ipv4Addr::new(127, 0, 0, 2),
        agent.addr,
    ));
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    drop(held);
}

#[test]
fn executions_carry_their_state_run_unprivileged_and_one_at_a_time() {
    let agent = start();
    let (status, first) = exec(
        agent.addr,
        serde_json::json!({"command": "export X=kept; mkdir -p d && cd d"}),
    );
    assert_eq!(
        (status, &first["exit_code"]),
        (200, &serde_json::json!(0)),
        "{first}"
    );
    let (_, second) = exec(
        agent.addr,
        serde_json::json!({"command": "echo $X; pwd; id -u"}),
    );
    let stdout = second["stdout"].as_str().expect("stdout").to_string();
    let workspace = agent.dir.path().join("workspace").display().to_string();
    let uid = if nix::unistd::geteuid().is_root() {
        "65534"
    } else {
        ""
    };
    assert!(
        stdout.starts_with(&format!("kept\n{workspace}/d\n{uid}")),
        "{stdout:?}"
    );
    // One at a time: a second execution while one runs is refused. (The first says when it
    // runs: on a loaded machine a fixed wait is not enough.)
    let addr = agent.addr;
    let started = agent.dir.path().join("workspace/slow-started");
    let slow = std::thread::spawn(move || {
        exec(
            addr,
            serde_json::json!({"command": "touch \"$HOME/slow-started\"; sleep 2"}),
        )
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first execution never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (busy, body) = exec(agent.addr, serde_json::json!({"command": "true"}));
    assert_eq!(
        (busy, &body["error"]),
        (409, &serde_json::json!("busy")),
        "{body}"
    );
    assert_eq!(slow.join().expect("slow").0, 200);
    // A bad request says why.
    let (bad, body) = exec(
        agent.addr,
        serde_json::json!({"command": "true", "argv": ["true"]}),
    );
    assert_eq!(bad, 400, "{body}");
}

#[test]
fn files_stay_inside_the_workspace_and_belong_to_its_user() {
    let agent = start();
    let (put, _) = call(
        agent.addr,
        "PUT",
        "/files?path=notes/a.txt",
        Some(SECRET),
        b"hello",
    );
    assert_eq!(put, 201);
    let (get, body) = call(
        agent.addr,
        "GET",
        "/files?path=%2Fnotes%2Fa.txt",
        Some(SECRET),
        b"",
    );
    assert_eq!((get, body.as_slice()), (200, &b"hello"[..]));
    let (list, body) = call(
        agent.addr,
        "GET",
        "/files/list?path=notes",
        Some(SECRET),
        b"",
    );
    assert_eq!(list, 200);
    let entries: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(entries["entries"][0]["name"], "a.txt");
    let written = agent.dir.path().join("workspace/notes/a.txt");
    if nix::unistd::geteuid().is_root() {
        let owner =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&written).expect("meta"));
        assert_eq!(
            owner, 65534,
            "a file the agent wrote belongs to the workspace's user"
        );
    }
    // The workload plants a link out; the agent will not follow it, either way.
    let (status, _) = exec(
        agent.addr,
        serde_json::json!({"command": "ln -s /etc/passwd leak; ln -s / root"}),
    );
    assert_eq!(status, 200);
    for target in [
        "/files?path=leak",
        "/files?path=root/etc/passwd",
        "/files?path=..%2Fsecret",
        "/files?path=notes/../../secret",
    ] {
        let (status, body) = call(agent.addr, "GET", target, Some(SECRET), b"");
        assert_eq!(status, 403, "{target}: {}", String::from_utf8_lossy(&body));
    }
    let (status, _) = call(
        agent.addr,
        "PUT",
        "/files?path=root/tmp/planted",
        Some(SECRET),
        b"x",
    );
    assert_eq!(status, 403);
    assert!(!std::path::Path::new("/tmp/planted").exists());
    let (status, _) = call(
        agent.addr,
        "PUT",
        "/files?path=big",
        Some(SECRET),
        &[b'x'; 5000],
    );
    assert_eq!(status, 413);
    // A FIFO the workload planted is refused, not waited on.
    let (status, _) = exec(agent.addr, serde_json::json!({"command": "mkfifo pipe"}));
    assert_eq!(status, 200);
    for method in ["GET", "PUT"] {
        let (status, body) = call(agent.addr, method, "/files?path=pipe", Some(SECRET), b"x");
        assert_eq!(status, 400, "{method}: {}", String::from_utf8_lossy(&body));
    }
    if nix::unistd::geteuid().is_root() {
        // A file of root's in the workspace (as a hard link to a host file would be): the
        // agent reads and writes only what the session's user may.
        let outside = agent.dir.path().join("root-only");
        std::fs::write(&outside, "root's").expect("write");
        std::fs::set_permissions(
            &outside,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        std::fs::hard_link(&outside, agent.dir.path().join("workspace/linked")).expect("link");
        let (status, body) = call(agent.addr, "GET", "/files?path=linked", Some(SECRET), b"");
        assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
        let (status, _) = call(
            agent.addr,
            "PUT",
            "/files?path=linked",
            Some(SECRET),
            b"overwritten",
        );
        assert_eq!(status, 403);
        assert_eq!(std::fs::read_to_string(&outside).expect("read"), "root's");
        let owner =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&outside).expect("meta"));
        assert_eq!(owner, 0, "not given away");
    }
}

/// Sends an execution and returns the open connection, its answer not yet read.
fn send_exec(agent: SocketAddr, target: &str, body: serde_json::Value) -> TcpStream {
    let mut s = TcpStream::connect(agent).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let body = body.to_string();
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: agent\r\nX-Tollgate-Secret: {SECRET}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body.as_bytes()).expect("body");
    s
}

#[test]
fn an_execution_streams_as_it_runs_and_ends_when_its_client_leaves() {
    let agent = start();
    let workspace = agent.dir.path().join("workspace");
    // The second line comes only after the test, having read the first, lets the command go on.
    let s = send_exec(
        agent.addr,
        "/exec?stream=ndjson",
        serde_json::json!({"command": "echo one; while [ ! -f go ]; do sleep 0.05; done; echo two >&2; exit 4"}),
    );
    let mut lines = BufReader::new(s).lines();
    let mut next = || -> serde_json::Value {
        loop {
            let line = lines.next().expect("a line").expect("read");
            // The answer's head lines come first.
            if line.starts_with('{') {
                return serde_json::from_str(&line).expect("json");
            }
        }
    };
    assert_eq!(next(), serde_json::json!({"stdout": "one\n"}));
    std::fs::write(workspace.join("go"), "").expect("go");
    assert_eq!(next(), serde_json::json!({"stderr": "two\n"}));
    let end = next();
    assert_eq!(end["end"]["exit_code"], 4, "{end}");
    assert_eq!(end["end"]["stdout"], "");

    // A client that leaves cancels its execution: the command is killed, and the session is
    // free for the next one.
    let s = send_exec(
        agent.addr,
        "/exec",
        serde_json::json!({"command": "sleep 2; touch after"}),
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = exec(agent.addr, serde_json::json!({"command": "true"}));
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session stayed busy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !workspace.join("after").exists(),
        "a cancelled execution ran on"
    );
}

fn python(agent: SocketAddr, body: serde_json::Value) -> serde_json::Value {
    let (status, out) = call(
        agent,
        "POST",
        "/python",
        Some(SECRET),
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
    serde_json::from_slice(&out).expect("json")
}

#[test]
fn python_keeps_its_state_reports_errors_and_is_interrupted_by_its_timeout() {
    if Command::new("python3").arg("-V").output().is_err() {
        eprintln!("SKIP: python3 is missing");
        return;
    }
    let agent = start();
    let answer = python(
        agent.addr,
        serde_json::json!({"code": "import os\nx = 40\ndef add(a, b):\n    return a + b\nprint('hello')"}),
    );
    assert_eq!(answer["stdout"], "hello\n", "{answer}");
    assert_eq!(answer["result"], serde_json::Value::Null);
    assert_eq!(answer["error"], serde_json::Value::Null);
    // Variables, imports and definitions carry to the next call; the last expression is
    // the result; what a subprocess prints is captured too.
    let answer = python(
        agent.addr,
        serde_json::json!({"code": "os.system('echo from-a-child')\nadd(x, 2)"}),
    );
    assert_eq!(answer["result"], "42", "{answer}");
    assert_eq!(answer["stdout"], "from-a-child\n", "{answer}");
    // An exception comes back with its traceback; the session goes on.
    let answer = python(agent.addr, serde_json::json!({"code": "y = 1\n1/0"}));
    assert_eq!(answer["error"]["type"], "ZeroDivisionError", "{answer}");
    assert!(answer["error"]["traceback"]
        .as_str()
        .is_some_and(|t| t.contains("Traceback")
            && t.contains("<tool call>")
            && !t.contains("<string>")));
    let answer = python(agent.addr, serde_json::json!({"code": "def broken(:"}));
    assert_eq!(answer["error"]["type"], "SyntaxError", "{answer}");
    assert_eq!(
        python(agent.addr, serde_json::json!({"code": "y + x"}))["result"],
        "41"
    );
    // A timeout interrupts an endless loop (KeyboardInterrupt): the interpreter lives on.
    let answer = python(
        agent.addr,
        serde_json::json!({"code": "print('before', flush=True)\nwhile True: pass", "timeout_secs": 1}),
    );
    assert_eq!(answer["timed_out"], true, "{answer}");
    assert_eq!(answer["error"]["type"], "KeyboardInterrupt", "{answer}");
    assert_eq!(answer["stdout"], "before\n");
    assert_eq!(answer["interpreter_restarted"], false);
    assert_eq!(
        python(agent.addr, serde_json::json!({"code": "x"}))["result"],
        "40"
    );
    // Code that ignores the interrupt: the interpreter is killed and the next call starts
    // a new one (its state gone, the files kept).
    let answer = python(
        agent.addr,
        serde_json::json!({"code": "import signal\nopen('kept.txt', 'w').write('k')\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass", "timeout_secs": 1}),
    );
    assert_eq!(answer["interpreter_restarted"], true, "{answer}");
    let answer = python(
        agent.addr,
        serde_json::json!({"code": "('x' in globals(), open('kept.txt').read())"}),
    );
    assert_eq!(answer["result"], "(False, 'k')", "{answer}");
    // The driver's channel has no path (nothing in the session's files stands for it, so
    // nothing there can be swapped for a link root would follow), and the code's standard
    // input is empty, not the channel.
    let answer = python(
        agent.addr,
        serde_json::json!({"code": "import sys\ntry:\n    input()\nexcept EOFError:\n    print('eof')\nsys.stdin.read()", "timeout_secs": 5}),
    );
    assert_eq!(
        (answer["stdout"].as_str(), answer["result"].as_str()),
        (Some("eof\n"), Some("''")),
        "{answer}"
    );
    let sockets: Vec<_> = walk(agent.dir.path())
        .into_iter()
        .filter(|p| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
        })
        .collect();
    assert!(sockets.is_empty(), "{sockets:?}");
    // Output is capped (1000 bytes here).
    let answer = python(agent.addr, serde_json::json!({"code": "print('a' * 5000)"}));
    assert_eq!(answer["truncated"], true);
    assert_eq!(answer["stdout"].as_str().map(str::len), Some(1000));
    // The interpreter runs as the workspace's user.
    if nix::unistd::geteuid().is_root() {
        let answer = python(
            agent.addr,
            serde_json::json!({"code": "import os\nos.getuid()"}),
        );
        assert_eq!(answer["result"], "65534", "{answer}");
    }
}

/// Every path below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}
