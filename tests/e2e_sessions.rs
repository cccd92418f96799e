//! The sandbox service end to end, with its real binary and the netns backend: sessions
//! made over its API against a real gateway, executions in them (each one tool call: the
//! gateway injects a token into an HTTPS request to an origin on loopback while the
//! execution runs, and not after), files in and out, two threads kept apart, the sandbox
//! kept from the service and from any guest agent, idle stop and transparent restart, delete
//! leaving nothing, and a restarted service keeping its sessions.
//!
//! Needs root, iproute2, nftables and curl; skips with the reason otherwise (CI has them).

mod support;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tollgate_launcher::network::SandboxNetwork;
use tollgate_launcher::service::sandbox::GUEST_PORT;
use tollgate_launcher::service::session::SessionKey;

const HOST: &str = "api.protected.test";
const TOKEN: &str = "sessions-static-token-8c2f";

fn missing_prerequisite() -> Option<String> {
    if no_curl() {
        return Some("curl is missing".into());
    }
    missing_namespace_tools(true)
}

/// The guest image the microVM test boots (CI builds it before the tests).
const IMAGE: &str = "/var/lib/tollgate-launcher/image";

/// Why this machine cannot run the microVM test, or `None`.
fn missing_vm_prerequisite() -> Option<String> {
    if let Some(why) = missing_prerequisite() {
        return Some(why);
    }
    for (program, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        if Command::new(program).arg("-V").output().is_err() {
            return Some(format!(
                "{program} is missing (apt-get install -y {package})"
            ));
        }
    }
    let manifest = std::fs::read_to_string(format!("{IMAGE}/image.json")).unwrap_or_default();
    if !manifest.contains("\"erofs\"") || !manifest.contains("\"root\": {") {
        return Some(format!(
            "no guest image with a root file system in {IMAGE} (run `tollgate-launcher image build`; CI does)"
        ));
    }
    None
}

/// A binary built beside this test by `cargo test --workspace`.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir");
    let binary = dir.join(name);
    assert!(
        binary.is_file(),
        "{} is missing: cargo test --workspace builds it",
        binary.display()
    );
    binary
}

/// A gateway whose static identity provider's token is injected for `HOST` (an HTTPS origin
/// on loopback that accepts only that token), and a sandbox service using it.
struct World {
    gw: Gateway,
    origin: Origin,
    service: Service,
    /// Where the service keeps its sessions (outside /tmp, which sandboxes replace).
    data: tempfile::TempDir,
}

/// A running `tollgate-launcher serve`.
struct Service {
    child: Child,
    url: String,
    token: String,
    /// Sessions the test made: taken down when it ends, however it ends.
    keys: Vec<SessionKey>,
}

impl World {
    /// The world, with the service started with `service_args` too.
    fn start(service_args: &[&str]) -> World {
        let origin = Origin::protected_by(HOST, issued(TOKEN, "p"), "p");
        let config = format!(
            "{EPHEMERAL_LISTENERS}{upstream}resolve = {{ \"{HOST}\" = \"127.0.0.1\" }}\n\
             [[identity_providers]]\nname = \"p\"\nkind = \"static\"\ntoken = {{ env = \"SESSIONS_TEST_TOKEN\" }}\n\
             [[credential_rules]]\nhosts = [\"{HOST}\"]\nports = [{port}]\naudience = \"p\"\n",
            upstream = loopback_upstream(Some(&origin_ca().cert_path())),
            port = origin.port(),
        );
        let gw =
            Gateway::start_with_env(&config, &[ALLOW_ALL], "", &[("SESSIONS_TEST_TOKEN", TOKEN)]);
        let data = tempfile::Builder::new()
            .prefix("tollgate-sessions-")
            .tempdir_in("/var/tmp")
            .expect("data dir");
        let service = Service::start(&gw, &data.path().join("sessions"), service_args);
        World {
            gw,
            origin,
            service,
            data,
        }
    }

    /// Registers `agent` on the gateway (Autonomous, identity `p`).
    fn register(&self, agent: &str) {
        let r = self.gw.admin_call(
            "PUT",
            &format!("/v1/agents/{agent}"),
            Some(r#"{"run_mode":"Autonomous","identity":"p"}"#),
        );
        assert!(r.status == 201 || r.status == 200, "{r:?}");
    }

    /// Restarts the service (SIGTERM, then the same options).
    fn restart_service(&mut self, service_args: &[&str]) {
        let keys = std::mem::take(&mut self.service.keys);
        self.service.terminate();
        self.service = Service::start(&self.gw, &self.data.path().join("sessions"), service_args);
        self.service.keys = keys;
    }

    fn sessions_dir(&self) -> PathBuf {
        self.data.path().join("sessions")
    }
}

impl Service {
    fn start(gw: &Gateway, data: &std::path::Path, args: &[&str]) -> Service {
        // Each world's sessions get user ids no other world's have: stopping a session ends
        // every process of its user.
        static WORLDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let world = WORLDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let uid_base = 2_000_000 + (std::process::id() % 500) * 4000 + world * 200;
        let mut child = Command::new(binary("tollgate-launcher"))
            .arg("serve")
            .args(["--uid-base", &uid_base.to_string(), "--max-sessions", "100"])
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data)
            .arg("--admin")
            .arg(format!("http://{}", gw.admin))
            .arg("--admin-token-file")
            .arg(gw.data_dir().join("admin-token"))
            .arg("--ca")
            .arg(gw.ca_cert())
            .args(args)
            .env("TOLLGATE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the service");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the service's first line");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        let token = std::fs::read_to_string(data.join("service-token"))
            .expect("the service made its token")
            .trim()
            .to_string();
        Service {
            child,
            url,
            token,
            keys: Vec::new(),
        }
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Calls the API with the service's token.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> CurlResult {
        let auth = format!("Authorization: Bearer {}", self.token);
        self.call_with(&["-H", &auth], method, path, body)
    }

    fn call_with(
        &self,
        extra: &[&str],
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> CurlResult {
        let url = format!("{}{path}", self.url);
        let mut args = vec!["-X", method, "-m", "60"];
        args.extend_from_slice(extra);
        if let Some(body) = body {
            args.extend(["--data-binary", body]);
        }
        args.push(&url);
        curl(&args)
    }

    /// Creates (or finds) the session.
    fn open(&mut self, agent: &str, thread: &str) -> serde_json::Value {
        self.keys
            .push(SessionKey::new(agent, thread).expect("valid ids"));
        let r = self.call("PUT", &format!("/v1/sessions/{agent}/{thread}"), None);
        assert!(r.status == 201 || r.status == 200, "{r:?}");
        r.json()
    }

    /// Runs `command` in the session and returns the single JSON answer (any status).
    fn exec_raw(&self, agent: &str, thread: &str, body: serde_json::Value) -> CurlResult {
        self.call(
            "POST",
            &format!("/v1/sessions/{agent}/{thread}/exec"),
            Some(&body.to_string()),
        )
    }

    /// Runs shell `command` and returns the answer, which must be 200.
    fn exec(&self, agent: &str, thread: &str, command: &str) -> serde_json::Value {
        let r = self.exec_raw(agent, thread, serde_json::json!({ "command": command }));
        assert_eq!(r.status, 200, "{command}: {r:?}");
        r.json()
    }

    /// Runs Python `body` (`{code, timeout_secs?, tool_call_id?}`) in the session's
    /// interpreter and returns the answer, which must be 200.
    fn python(&self, agent: &str, thread: &str, body: serde_json::Value) -> serde_json::Value {
        let r = self.call(
            "POST",
            &format!("/v1/sessions/{agent}/{thread}/python"),
            Some(&body.to_string()),
        );
        assert_eq!(r.status, 200, "{body}: {r:?}");
        r.json()
    }

    /// The session's stdout of `command`, which must exit 0.
    fn stdout(&self, agent: &str, thread: &str, command: &str) -> String {
        let answer = self.exec(agent, thread, command);
        assert_eq!(answer["exit_code"], 0, "{command}: {answer}");
        answer["stdout"].as_str().unwrap_or_default().to_string()
    }

    /// Starts an execution of `body` in `thread` answered as NDJSON, by a curl the caller
    /// may kill (a client that leaves); returns it, its output's reader and the first line.
    fn stream(
        &self,
        agent: &str,
        thread: &str,
        body: &str,
    ) -> (Child, std::io::BufReader<std::process::ChildStdout>, String) {
        let url = format!(
            "{}/v1/sessions/{agent}/{thread}/exec?stream=ndjson",
            self.url
        );
        let auth = format!("Authorization: Bearer {}", self.token);
        let mut curl = Command::new("curl")
            .args([
                "-sS",
                "-N",
                "-m",
                "30",
                "-H",
                &auth,
                "--data-binary",
                body,
                &url,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        let mut lines = std::io::BufReader::new(curl.stdout.take().expect("stdout"));
        let mut first = String::new();
        lines.read_line(&mut first).expect("the start line");
        (curl, lines, first)
    }

    /// A timeout kills the execution's processes — one that left its process group too —
    /// and returns what came before; the output cap (1000 bytes in these tests' services)
    /// cuts and says so.
    fn timeout_and_cap(&self, agent: &str, thread: &str) {
        let answer = self.exec_raw(
            agent,
            thread,
            serde_json::json!({"command": "setsid sleep 4242 & echo $! > /tmp/escaped.pid; echo before; sleep 30; echo after", "timeout_secs": 1}),
        );
        let answer = answer.json();
        assert_eq!(answer["timed_out"], true, "{answer}");
        assert_eq!(answer["stdout"], "before\n", "{answer}");
        assert_eq!(
            self.stdout(agent, thread, &still_running("/tmp/escaped.pid")),
            "gone\n",
            "the process that left the group was killed too"
        );
        let answer = self.exec(agent, thread, "head -c 5000 /dev/zero | tr '\\0' a");
        assert_eq!(answer["truncated"], true, "{answer}");
        assert_eq!(answer["stdout"].as_str().map(str::len), Some(1000));
    }

    /// From inside the session: neither the service (on the sandbox's own loopback or on
    /// the gateway's side) nor the guest agent, which closes on anyone but the service's
    /// side of the network, answers.
    fn sandbox_reaches_neither_service_nor_guest_agent(&self, agent: &str, thread: &str) {
        let service_port = self.url.rsplit(':').next().unwrap_or_default().to_string();
        let probe = |url: &str| {
            format!("curl -sS --noproxy '*' --connect-timeout 3 -m 5 -o /dev/null -w '%{{http_code}}' {url} 2>/dev/null || echo blocked")
        };
        for url in [
            format!("http://127.0.0.1:{service_port}/healthz"),
            format!("http://10.200.1.1:{service_port}/healthz"),
        ] {
            let out = self.stdout(agent, thread, &probe(&url));
            assert!(out.ends_with("blocked\n"), "{url}: {out}");
        }
        let out = self.stdout(
            agent,
            thread,
            &probe(&format!("http://10.200.1.2:{GUEST_PORT}/health")),
        );
        assert_eq!(
            out, "000blocked\n",
            "the guest agent answers the service alone"
        );
    }

    /// The files API keeps to the session's workspace: `..`, absolute paths and links out of
    /// it are refused, and nothing is read or planted outside.
    fn files_stay_in_the_workspace(&self, agent: &str, thread: &str) {
        self.stdout(
            agent,
            thread,
            "ln -s /etc/passwd link; ln -s .. up; mkdir -p d",
        );
        for (method, path) in [
            ("GET", "..%2Fsecret"),
            ("GET", "%2Fetc%2Fpasswd"),
            ("GET", "link"),
            ("PUT", "up%2Fplanted"),
            ("PUT", "..%2F..%2Fplanted"),
            ("GET", "d%2F..%2F..%2Fsession.json"),
        ] {
            let r = self.call(
                method,
                &format!("/v1/sessions/{agent}/{thread}/files?path={path}"),
                (method == "PUT").then_some("x"),
            );
            // An absolute path is taken as one in the workspace (404 there); the others
            // lead out of it (403).
            assert!(
                matches!(r.status, 400 | 403 | 404),
                "{method} {path}: {r:?}"
            );
            assert!(!r.body.contains("root:"), "{r:?}");
            assert!(r.json()["detail"].is_string(), "{r:?}");
        }
        let out = self.stdout(
            agent,
            thread,
            "(cd ~ && ls -d ../planted ../../planted 2>/dev/null) || true",
        );
        assert_eq!(out, "", "planted outside the workspace");
    }

    fn session(&self, agent: &str, thread: &str) -> serde_json::Value {
        let r = self.call("GET", &format!("/v1/sessions/{agent}/{thread}"), None);
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
    }
}

impl World {
    /// A request made during an execution in `thread` carries the injected token; the same
    /// request from a process the execution left running, made after it ended, carries none
    /// (the origin refuses it). The requests' paths are `/{tag}during` and `/{tag}after`.
    fn token_only_during_the_execution(&self, agent: &str, thread: &str, tag: &str) {
        let (svc, port) = (&self.service, self.origin.port());
        let tool_call = format!("tc-{tag}during");
        let answer = svc.exec_raw(
            agent,
            thread,
            serde_json::json!({
                "command": format!("{}; (sleep 3; {} > ~/{tag}late.txt) >/dev/null 2>&1 &", fetch(port, &format!("/{tag}during")), fetch(port, &format!("/{tag}after"))),
                "tool_call_id": tool_call,
            }),
        );
        assert_eq!(answer.status, 200, "{answer:?}");
        let answer = answer.json();
        assert_eq!(answer["stdout"], "200", "{answer}");
        assert_eq!(answer["tool_call_id"], tool_call.as_str());
        let open = self
            .gw
            .admin_call("GET", &format!("/v1/agents/{agent}/tool-calls"), None);
        assert_eq!(
            open.json()["tool_calls"],
            serde_json::json!([]),
            "closed at its end: {open:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let late = loop {
            let r = svc.call(
                "GET",
                &format!("/v1/sessions/{agent}/{thread}/files?path={tag}late.txt"),
                None,
            );
            if r.status == 200 && !r.body.is_empty() {
                break r.body;
            }
            assert!(
                Instant::now() < deadline,
                "the background request never ended: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            late, "401",
            "the origin refused a request without the token"
        );
        let bearer = format!("Bearer {TOKEN}");
        let seen = self.origin.seen();
        let target = format!("/{tag}during");
        let during = seen
            .iter()
            .find(|s| s.target == target)
            .expect("seen during");
        assert_eq!(during.authorization(), Some(bearer.as_str()));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for key in self.service.keys.clone() {
            let _ = self.service.call(
                "DELETE",
                &format!("/v1/sessions/{}/{}", key.agent, key.thread),
                None,
            );
            if let Ok(net) = SandboxNetwork::for_session(&key.id(), 3128, GUEST_PORT) {
                let _ = net.destroy();
            }
        }
        let _ = self.service.child.kill();
        let _ = self.service.child.wait();
    }
}

/// The session's two namespaces, and whether each exists.
fn namespaces_exist(key: &SessionKey) -> (bool, bool) {
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let id = key.id();
    let has = |name: &str| {
        listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    };
    (has(&format!("tgs-{id}")), has(&format!("tgs-{id}-s")))
}

/// Runs `checks` on the runtime's blocking pool (the origin serves on the runtime) with a
/// world whose service has `args`, and an agent `<prefix><pid>` registered — or skips,
/// saying why, when `missing` names what this machine lacks.
async fn in_world(
    missing: Option<String>,
    args: &'static [&'static str],
    prefix: &'static str,
    checks: impl FnOnce(&mut World, &str) + Send + 'static,
) {
    if let Some(why) = missing {
        eprintln!("SKIP: {why}");
        return;
    }
    tokio::task::spawn_blocking(move || {
        let mut world = World::start(args);
        let agent = format!("{prefix}{}", std::process::id());
        world.register(&agent);
        checks(&mut world, &agent);
    })
    .await
    .expect("the checks panicked");
}

/// The microVM test's service: software emulation as CI has it (no probe boot: this host's
/// /dev/kvm cannot boot a kernel), a short cool-down — long enough for the checks that need
/// the VM up to run on a loaded machine (a second VM booting beside another test's took 4.4 s
/// on CI's two cores) — and the output cap the shared checks expect.
const VM_ARGS: [&str; 8] = [
    "--backend",
    "qemu",
    "--accel",
    "tcg",
    "--idle-stop-secs",
    "10",
    "--max-output-bytes",
    "1000",
];

/// A shell line that prints `alive` if the process whose pid is in `pid_file` runs, `gone`
/// if it does not (a zombie, which its new parent has not reaped yet, runs no more), and
/// `no-pid` if the file holds none.
fn still_running(pid_file: &str) -> String {
    // Without a pid, `/proc//stat` would read as `/proc/stat`: "alive".
    format!(
        "p=$(cat {pid_file} 2>/dev/null); \
         case \"$p\" in ''|*[!0-9]*) echo no-pid;; *) \
         s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null); \
         if [ -z \"$s\" ] || [ \"$s\" = Z ]; then echo gone; else echo alive; fi;; esac"
    )
}

/// The shell line a workload uses to fetch `path` from the protected origin through the
/// gateway: prints the status.
fn fetch(port: u16, path: &str) -> String {
    format!("curl -sS -m 10 -o /dev/null -w '%{{http_code}}' https://{HOST}:{port}{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_state_and_each_execution_is_one_tool_call() {
    let args = &[
        "--backend",
        "netns",
        "--max-output-bytes",
        "1000",
        "--max-file-bytes",
        "100000",
        "--execution-grace-secs",
        "2",
    ];
    in_world(missing_prerequisite(), args, "ses", |world, agent| {
        let started = Instant::now();
        let session = world.service.open(agent, "t1");
        eprintln!("TIMING netns session: created in {:?}", started.elapsed());
        assert_eq!(session["state"], "running", "{session}");
        let svc = &world.service;

        // Environment and working directory carry from one execution to the next.
        svc.stdout(agent, "t1", "export GREETING=hello; mkdir -p sub; cd sub");
        assert_eq!(
            svc.stdout(agent, "t1", "echo \"$GREETING\"; basename \"$PWD\""),
            "hello\nsub\n"
        );

        // Files: uploaded, seen by an execution; written by one, downloaded.
        let r = svc.call(
            "PUT",
            &format!("/v1/sessions/{agent}/t1/files?path=in%2Fdata.txt"),
            Some("uploaded bytes"),
        );
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(
            svc.stdout(agent, "t1", "cat ../in/data.txt; echo made > ../out.txt"),
            "uploaded bytes"
        );
        let r = svc.call(
            "GET",
            &format!("/v1/sessions/{agent}/t1/files?path=out.txt"),
            None,
        );
        assert_eq!((r.status, r.body.as_str()), (200, "made\n"), "{r:?}");
        let r = svc.call("GET", &format!("/v1/sessions/{agent}/t1/files/list"), None);
        let names: Vec<String> = r.json()["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect();
        assert!(
            names.contains(&"out.txt".into()) && names.contains(&"sub".into()),
            "{names:?}"
        );

        // A request made during an execution carries the injected token; the same request
        // from a process left running after its execution carries none.
        world.token_only_during_the_execution(agent, "t1", "");
        // The audit records name the thread, and the tool call and credential of the one
        // made during the execution only (the origin records only requests it accepted).
        let (during, after) = (
            audit_record(world, agent, "/during"),
            audit_record(world, agent, "/after"),
        );
        assert_eq!(during["session"], "t1", "{during}");
        assert_eq!(during["tool_call"], "tc-during", "{during}");
        assert!(during["credential"].is_string(), "{during}");
        assert_eq!(after["session"], "t1", "{after}");
        assert_eq!(after["tool_call"], serde_json::Value::Null, "{after}");
        assert_eq!(after["credential"], "stripped", "{after}");
        assert_eq!(after["status"], 401, "{after}");

        // A gateway that lost the session's listener (a restart, the agent registered anew)
        // gets it again at the next execution, whose requests still carry the token.
        let r = world
            .gw
            .admin_call("DELETE", &format!("/v1/agents/{agent}/sessions/t1"), None);
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(
            svc.stdout(agent, "t1", &fetch(world.origin.port(), "/after-reopen")),
            "200"
        );

        svc.timeout_and_cap(agent, "t1");
        // The sandbox's mounts: its own /tmp, /run and /dev/shm; no gaining privileges.
        assert_eq!(
            svc.stdout(
                agent,
                "t1",
                "ls -A /run /dev/shm | grep -v : | grep -c . || true"
            ),
            "0\n"
        );
        assert_eq!(
            svc.stdout(agent, "t1", "grep NoNewPrivs /proc/self/status"),
            "NoNewPrivs:\t1\n"
        );

        // One execution at a time: a second one gets 409 while the first runs.
        let url = format!("{}/v1/sessions/{agent}/t1/exec", svc.url);
        let auth = format!("Authorization: Bearer {}", svc.token);
        let mut slow = Command::new("curl")
            .args([
                "-sS",
                "-m",
                "30",
                "-H",
                &auth,
                "--data-binary",
                r#"{"command":"sleep 2"}"#,
                &url,
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("curl");
        let deadline = Instant::now() + Duration::from_secs(10);
        while svc.session(agent, "t1")["executing"] != true {
            assert!(
                Instant::now() < deadline,
                "the slow execution never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let busy = svc.exec_raw(agent, "t1", serde_json::json!({"command": "true"}));
        assert_eq!(busy.status, 409, "{busy:?}");
        assert_eq!(busy.json()["error"], "session_busy");
        assert!(slow.wait().expect("wait").success());

        // A client that leaves cancels its execution, and its tool call is closed.
        let (mut leaving, mut lines, first) = svc.stream(
            agent,
            "t1",
            r#"{"command":"echo $$ > /tmp/left.pid; echo ready; exec sleep 60","tool_call_id":"tc-left"}"#,
        );
        assert!(
            first.contains("\"start\"") && first.contains("tc-left"),
            "{first}"
        );
        // The client leaves once the command has written its pid (the start line comes
        // before the shell runs: a client leaving at once cancels it before it wrote one).
        let mut ready = String::new();
        lines.read_line(&mut ready).expect("the ready line");
        assert!(ready.contains("ready"), "{ready}");
        let open = world
            .gw
            .admin_call("GET", &format!("/v1/agents/{agent}/tool-calls"), None);
        assert!(
            open.body.contains("tc-left"),
            "open while it runs: {open:?}"
        );
        // The gateway knows what the tool call runs, for the approvers of its requests.
        assert_eq!(
            open.json()["tool_calls"][0]["command"],
            "echo $$ > /tmp/left.pid; echo ready; exec sleep 60",
            "{open:?}"
        );
        let _ = leaving.kill();
        let _ = leaving.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let open = world
                .gw
                .admin_call("GET", &format!("/v1/agents/{agent}/tool-calls"), None);
            if !open.body.contains("tc-left") && svc.session(agent, "t1")["executing"] == false {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cancelled execution still runs: {open:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            svc.stdout(agent, "t1", &still_running("/tmp/left.pid")),
            "gone\n",
            "the cancelled command was killed"
        );

        // The sandbox dying during an execution ends it with an error, and its tool call.
        let (mut dying, mut lines, first) = svc.stream(
            agent,
            "t1",
            r#"{"command":"sleep 60","tool_call_id":"tc-dies"}"#,
        );
        assert!(first.contains("tc-dies"), "{first}");
        let pid = record(world, agent, "t1")["process"]["pid"]
            .as_i64()
            .expect("pid");
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let mut last = String::new();
        lines.read_line(&mut last).expect("the last line");
        assert!(
            last.contains("\"error\"") && last.contains("guest"),
            "{last}"
        );
        let _ = dying.wait();
        let open = world
            .gw
            .admin_call("GET", &format!("/v1/agents/{agent}/tool-calls"), None);
        assert!(!open.body.contains("tc-dies"), "{open:?}");
        // The next execution starts the sandbox again, files kept.
        assert_eq!(svc.stdout(agent, "t1", "cat ../out.txt"), "made\n");

        // A hung sandbox (its guest agent stopped): past the execution's timeout plus the
        // grace, the caller gets 504, the tool call is closed and the sandbox stopped; the
        // next execution starts a new one, files kept.
        let pid = record(world, agent, "t1")["process"]["pid"]
            .as_i64()
            .expect("pid");
        let _ = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status();
        let started = Instant::now();
        let r = svc.call(
            "POST",
            &format!("/v1/sessions/{agent}/t1/exec"),
            Some(r#"{"command":"echo never","timeout_secs":1,"tool_call_id":"tc-hung"}"#),
        );
        assert_eq!(r.status, 504, "{r:?}");
        assert_eq!(r.json()["error"], "guest_unresponsive", "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "answered after {:?}",
            started.elapsed()
        );
        let open = world
            .gw
            .admin_call("GET", &format!("/v1/agents/{agent}/tool-calls"), None);
        assert!(!open.body.contains("tc-hung"), "{open:?}");
        assert!(
            !PathBuf::from(format!("/proc/{pid}")).exists(),
            "the hung guest agent was not stopped"
        );
        assert_eq!(svc.stdout(agent, "t1", "cat ../out.txt"), "made\n");

        // Files larger than the cap are refused.
        let big = world.data.path().join("big");
        std::fs::write(&big, vec![b'x'; 200_000]).expect("write");
        let r = svc.call(
            "PUT",
            &format!("/v1/sessions/{agent}/t1/files?path=big"),
            Some(&format!("@{}", big.display())),
        );
        assert_eq!(r.status, 413, "{r:?}");

        // The command line streams the output and exits with the command's status.
        let out = Command::new(binary("tollgate-launcher"))
            .args([
                "exec",
                "--service",
                &svc.url,
                "--agent",
                agent,
                "--thread",
                "t1",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 7",
            ])
            .env("TOLLGATE_LAUNCHER_TOKEN", &svc.token)
            .output()
            .expect("tollgate-launcher exec");
        assert_eq!(out.status.code(), Some(7), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
        // … and moves files and lists and removes sessions.
        let cli = |args: &[&str]| {
            Command::new(binary("tollgate-launcher"))
                .args(args)
                .args(["--service", &svc.url])
                .env("TOLLGATE_LAUNCHER_TOKEN", &svc.token)
                .output()
                .expect("tollgate-launcher")
        };
        // A command about session t1.
        let in_t1 = |args: &[&str]| cli(&[args, &["--agent", agent, "--thread", "t1"]].concat());
        let local = world.data.path().join("cli-upload.txt");
        std::fs::write(&local, "from the command line").expect("write");
        let local = local.to_string_lossy().to_string();
        let out = in_t1(&["files", "put", &local, "cli/up.txt"]);
        assert!(out.status.success(), "{out:?}");
        let out = in_t1(&["files", "get", "cli/up.txt"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "from the command line"
        );
        let out = in_t1(&["files", "ls", "cli"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("up.txt"),
            "{out:?}"
        );
        let out = cli(&["sessions", "list", "--agent", agent]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("t1"),
            "{out:?}"
        );
        let out = in_t1(&["files", "get", "../secret"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("(403)"),
            "{out:?}"
        );
        let out = in_t1(&["sessions", "show"]);
        let shown: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("sessions show prints JSON");
        assert_eq!(
            (shown["thread"].as_str(), shown["state"].as_str()),
            (Some("t1"), Some("running")),
            "{shown}"
        );
        let r = svc.call("PUT", &format!("/v1/sessions/{agent}/t3"), None);
        assert_eq!(r.status, 201, "{r:?}");
        let out = cli(&["sessions", "rm", "--agent", agent, "--thread", "t3"]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            svc.call("GET", &format!("/v1/sessions/{agent}/t3"), None)
                .status,
            404
        );

        // Server-sent events: the same events as NDJSON, each named.
        let url = format!("{}/v1/sessions/{agent}/t1/exec", svc.url);
        let auth = format!("Authorization: Bearer {}", svc.token);
        let sse = curl(&[
            "-N",
            "-H",
            &auth,
            "-H",
            "Accept: text/event-stream",
            "--data-binary",
            r#"{"command":"echo out; echo err >&2; exit 3","tool_call_id":"tc-sse"}"#,
            &url,
        ]);
        assert_eq!(sse.status, 200, "{sse:?}");
        let events: Vec<(&str, serde_json::Value)> = sse
            .body
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let name = e
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .expect("an event name");
                let data = e
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .expect("event data");
                (name, serde_json::from_str(data).expect("JSON data"))
            })
            .collect();
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.first(), Some(&"start"), "{sse:?}");
        assert_eq!(names.last(), Some(&"end"), "{sse:?}");
        assert!(
            names.contains(&"stdout") && names.contains(&"stderr"),
            "{sse:?}"
        );
        assert_eq!(
            events.last().map(|(_, d)| d["end"]["exit_code"].clone()),
            Some(serde_json::json!(3)),
            "{sse:?}"
        );

        let session = svc.session(agent, "t1");
        assert!(session["executions"].as_u64() >= Some(8), "{session}");
        assert!(session["disk_bytes"].as_u64() > Some(0), "{session}");
        assert!(
            !world.gw.log().contains(TOKEN),
            "the injected token reached the gateway's log"
        );
    })
    .await;
}

/// The session's record, as the service keeps it.
fn record(world: &World, agent: &str, thread: &str) -> serde_json::Value {
    let path = session_dir(world, agent, thread).join("session.json");
    serde_json::from_slice(&std::fs::read(path).expect("record")).expect("json")
}

/// The audit record of the agent's request to `path`, once the gateway has written it.
fn audit_record(world: &World, agent: &str, path: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = world
            .gw
            .admin_call("GET", &format!("/v1/agents/{agent}/audit"), None);
        let records = audit.json()["records"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(record) = records.iter().find(|r| r["path"] == path) {
            return record.clone();
        }
        assert!(Instant::now() < deadline, "no {path} in {records:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's sessions as the gateway lists them.
fn gateway_sessions(world: &World, agent: &str) -> serde_json::Value {
    let listed = world
        .gw
        .admin_call("GET", &format!("/v1/agents/{agent}/sessions"), None);
    listed.json()["sessions"].clone()
}

/// The session's directory under the service's data directory.
fn session_dir(world: &World, agent: &str, thread: &str) -> PathBuf {
    world
        .sessions_dir()
        .join(SessionKey::new(agent, thread).expect("valid").id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_are_apart_and_a_sandbox_reaches_neither_the_service_nor_a_guest_agent() {
    in_world(
        missing_prerequisite(),
        &["--backend", "netns", "--max-sessions-per-agent", "2"],
        "apart",
        |world, agent| {
            world.service.open(agent, "t1");
            world.service.open(agent, "t2");
            let svc = &world.service;

            // Two threads of one agent: different users, environments, files.
            svc.stdout(agent, "t1", "export X=one; echo one > mine.txt");
            let answer = svc.exec(agent, "t2", "echo \"X=$X\"; cat mine.txt");
            assert_eq!(answer["stdout"], "X=\n", "{answer}");
            assert_ne!(answer["exit_code"], 0, "{answer}");
            let (u1, u2) = (
                svc.stdout(agent, "t1", "id -u"),
                svc.stdout(agent, "t2", "id -u"),
            );
            assert_ne!(u1, u2);
            assert_ne!(u1.trim(), "0");
            // t2 cannot read t1's workspace, nor its own session's secret, nor list the service's.
            let t1_dir = session_dir(world, agent, "t1");
            let t2_dir = session_dir(world, agent, "t2");
            for path in [
                t1_dir.join("workspace/mine.txt"),
                t2_dir.join("secret"),
                t1_dir.join("secret"),
                world.sessions_dir().join("service-token"),
            ] {
                let answer = svc.exec(agent, "t2", &format!("cat {}", path.display()));
                assert_ne!(answer["exit_code"], 0, "{}: {answer}", path.display());
                assert!(
                    answer["stderr"]
                        .as_str()
                        .unwrap_or("")
                        .contains("Permission denied"),
                    "{answer}"
                );
            }
            let answer = svc.exec(
                agent,
                "t2",
                &format!("ls {}", world.sessions_dir().display()),
            );
            assert_ne!(answer["exit_code"], 0, "{answer}");

            // The workload cannot stop its guest agent (it runs as root).
            let answer = svc.exec(
                agent,
                "t2",
                "pkill -9 -f '[t]ollgate-guest-agent'; echo done",
            );
            assert_eq!(answer["stdout"], "done\n", "{answer}");
            assert_eq!(svc.stdout(agent, "t2", "echo still"), "still\n");

            // Nothing but the gateway.
            svc.sandbox_reaches_neither_service_nor_guest_agent(agent, "t2");

            // Files stay in the workspace.
            svc.files_stay_in_the_workspace(agent, "t2");
            assert!(
                !t2_dir.join("planted").exists() && !world.sessions_dir().join("planted").exists()
            );

            // Without the token, or with another, nothing is done.
            for header in [
                None,
                Some("Authorization: Bearer wrong"),
                Some("Authorization: Basic eDp5"),
            ] {
                let extra: Vec<&str> = header.map(|h| vec!["-H", h]).unwrap_or_default();
                let r = svc.call_with(&extra, "PUT", &format!("/v1/sessions/{agent}/t9"), None);
                assert_eq!(r.status, 401, "{r:?}");
                assert_eq!(r.json()["error"], "unauthorized");
                let r = svc.call_with(
                    &extra,
                    "POST",
                    &format!("/v1/sessions/{agent}/t1/exec"),
                    Some(r#"{"command":"touch /tmp/x"}"#),
                );
                assert_eq!(r.status, 401, "{r:?}");
            }
            assert!(!session_dir(world, agent, "t9").exists());
            let health = svc.call_with(&[], "GET", "/healthz", None);
            assert_eq!(health.status, 200);
            // The OpenAPI description is served and names every route.
            let api = svc.call_with(&[], "GET", "/v1/openapi.json", None).json();
            for route in [
                "/v1/sessions",
                "/v1/sessions/{agent}/{thread}",
                "/v1/sessions/{agent}/{thread}/exec",
                "/v1/sessions/{agent}/{thread}/python",
                "/v1/sessions/{agent}/{thread}/files",
                "/v1/sessions/{agent}/{thread}/files/list",
            ] {
                assert!(api["paths"][route].is_object(), "{route} is not described");
            }

            // Limits and bad input: clear refusals, nothing made.
            let r = svc.call("PUT", &format!("/v1/sessions/{agent}/t3"), None);
            assert_eq!(r.status, 429, "{r:?}");
            assert_eq!(r.json()["error"], "too_many_sessions");
            let r = svc.call("PUT", "/v1/sessions/nobody-registered/t1", None);
            assert_eq!(r.status, 409, "{r:?}");
            assert_eq!(r.json()["error"], "agent_not_registered");
            assert!(!session_dir(world, "nobody-registered", "t1").exists());
            let (gw_side, sb_side) =
                namespaces_exist(&SessionKey::new("nobody-registered", "t1").expect("valid"));
            assert!(
                !gw_side && !sb_side,
                "a refused session leaves no namespace"
            );
            let r = svc.call("PUT", &format!("/v1/sessions/{agent}/.hidden"), None);
            assert_eq!(r.status, 400, "{r:?}");
            let r = svc.call(
                "POST",
                &format!("/v1/sessions/{agent}/t1/exec"),
                Some("{not json"),
            );
            assert_eq!(
                (r.status, r.json()["error"].as_str()),
                (400, Some("bad_request")),
                "{r:?}"
            );
            let r = svc.call(
                "POST",
                &format!("/v1/sessions/{agent}/nope/exec"),
                Some(r#"{"command":"true"}"#),
            );
            assert_eq!(r.status, 404, "{r:?}");
            world
                .service
                .keys
                .push(SessionKey::new(agent, "t3").expect("valid"));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_stops_and_comes_back_with_its_files_and_delete_leaves_nothing() {
    in_world(
        missing_prerequisite(),
        &["--backend", "netns", "--idle-stop-secs", "2"],
        "idle",
        |world, agent| {
            world.service.open(agent, "t1");
            let key = SessionKey::new(agent, "t1").expect("valid");
            let svc = &world.service;
            svc.stdout(agent, "t1", "echo kept > kept.txt; export K=v; cd /");
            // A process left running, out of every group: it goes with the sandbox.
            svc.stdout(agent, "t1", "setsid sleep 4343 >/dev/null 2>&1 &");
            let uid = svc
                .stdout(agent, "t1", "id -u")
                .trim()
                .parse::<u32>()
                .expect("uid");

            // Idle: stopped, its sandbox and gateway listener gone, its files kept.
            let deadline = Instant::now() + Duration::from_secs(20);
            while svc.session(agent, "t1")["state"] != "stopped" {
                assert!(
                    Instant::now() < deadline,
                    "the idle session was not stopped"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            assert_eq!(namespaces_exist(&key), (false, false));
            assert!(
                tollgate_guest::procs::of_user(uid).is_empty(),
                "nothing of the session's user runs once it is stopped"
            );
            assert_eq!(gateway_sessions(world, agent), serde_json::json!([]));
            assert!(session_dir(world, agent, "t1")
                .join("workspace/kept.txt")
                .is_file());

            // The next execution starts it again, transparently, state and files as they were.
            let started = Instant::now();
            let out = svc.stdout(agent, "t1", "cat ~/kept.txt; echo \"$K\"; pwd");
            eprintln!(
                "TIMING netns session: resumed execution in {:?}",
                started.elapsed()
            );
            assert_eq!(out, "kept\nv\n/\n");
            assert_eq!(svc.session(agent, "t1")["state"], "running");

            // Delete: no namespace, rule, directory, registration or process is left.
            let record = record(world, agent, "t1");
            let pid = record["process"]["pid"]
                .as_u64()
                .expect("a running session's pid");
            let r = svc.call("DELETE", &format!("/v1/sessions/{agent}/t1"), None);
            assert_eq!(r.status, 204, "{r:?}");
            assert_eq!(namespaces_exist(&key), (false, false));
            assert!(!session_dir(world, agent, "t1").exists());
            assert!(
                !PathBuf::from(format!("/proc/{pid}")).exists(),
                "the guest agent still runs"
            );
            assert_eq!(gateway_sessions(world, agent), serde_json::json!([]));
            let r = svc.call("GET", &format!("/v1/sessions/{agent}/t1"), None);
            assert_eq!(r.status, 404, "{r:?}");
            let r = svc.call("DELETE", &format!("/v1/sessions/{agent}/t1"), None);
            assert_eq!(r.status, 404, "{r:?}");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_session_is_deleted_after_its_retention() {
    in_world(
        missing_prerequisite(),
        &[
            "--backend",
            "netns",
            "--idle-stop-secs",
            "1",
            "--retention-secs",
            "1",
        ],
        "keep",
        |world, agent| {
            world.service.open(agent, "t1");
            world.service.stdout(agent, "t1", "echo x > f");
            let deadline = Instant::now() + Duration::from_secs(20);
            while world
                .service
                .call("GET", &format!("/v1/sessions/{agent}/t1"), None)
                .status
                != 404
            {
                assert!(
                    Instant::now() < deadline,
                    "the session outlived its retention"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            assert!(!session_dir(world, agent, "t1").exists());
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_service_keeps_its_sessions_and_closes_what_its_predecessor_left_open() {
    in_world(
        missing_prerequisite(),
        &["--backend", "netns"],
        "restart",
        |world, agent| {
            world.service.open(agent, "t1");
            world.service.open(agent, "t2");
            world
                .service
                .stdout(agent, "t1", "echo here > /tmp/marker; export R=1");
            world.service.stdout(agent, "t2", "echo file > f");

            // t2's sandbox dies while the service is down; t1's lives on.
            world.service.terminate();
            let record = record(world, agent, "t2");
            let pid = record["process"]["pid"].as_i64().expect("pid");
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            world.restart_service(&["--backend", "netns"]);
            let svc = &world.service;
            // The same sandbox (its private /tmp is there), the same shell state.
            assert_eq!(svc.session(agent, "t1")["state"], "running");
            assert_eq!(
                svc.stdout(agent, "t1", "cat /tmp/marker; echo $R"),
                "here\n1\n"
            );
            // The dead one was cleaned up and starts again at its next use, files kept.
            assert_eq!(svc.session(agent, "t2")["state"], "stopped");
            assert_eq!(svc.stdout(agent, "t2", "cat f"), "file\n");

            // A service killed during an execution: the next one closes the tool call it left.
            let (mut running, _, first) = svc.stream(
                agent,
                "t1",
                r#"{"command":"sleep 30","tool_call_id":"tc-orphan"}"#,
            );
            assert!(first.contains("tc-orphan"), "{first}");
            let _ = world.service.child.kill();
            let _ = world.service.child.wait();
            let _ = running.wait();
            let open = world
                .gw
                .admin_call("GET", &format!("/v1/agents/{agent}/tool-calls"), None);
            assert!(open.body.contains("tc-orphan"), "{open:?}");
            world.restart_service(&["--backend", "netns"]);
            let open = world
                .gw
                .admin_call("GET", &format!("/v1/agents/{agent}/tool-calls"), None);
            assert!(
                !open.body.contains("tc-orphan"),
                "the orphaned tool call is still open: {open:?}"
            );
            assert_eq!(world.service.stdout(agent, "t1", "echo $R"), "1\n");
        },
    )
    .await;
}

/// The QEMU processes running as `uid` (zombies, which an exited service's init may not have
/// reaped yet, do not count: they hold nothing).
fn vmm_processes(uid: u64) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
                .unwrap_or_default()
        };
        if field("Name:").starts_with("qemu-system")
            && field("Uid:") == uid.to_string()
            && field("State:") != "Z"
        {
            count += 1;
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_sessions_keep_their_disk_across_idle_stops_and_restarts_and_leave_nothing() {
    in_world(missing_vm_prerequisite(), &VM_ARGS, "vm", |world, agent| {
        let started = Instant::now();
        let session = world.service.open(agent, "q1");
        eprintln!("TIMING microVM session: created (boot included) in {:?}", started.elapsed());
        assert_eq!((session["state"].as_str(), session["backend"].as_str()), (Some("running"), Some("qemu")), "{session}");
        world.service.open(agent, "q2");
        let svc = &world.service;

        // State in one VM, not in the other.
        svc.stdout(agent, "q1", "export X=vm; mkdir -p d; cd d; echo on-disk > f; echo here > /tmp/marker");
        assert_eq!(svc.stdout(agent, "q1", "echo $X; pwd; id -u"), "vm\n/session/workspace/d\n1000\n");
        let answer = svc.exec(agent, "q2", "echo \"X=$X\"; cat d/f");
        assert_eq!(answer["stdout"], "X=\n", "{answer}");
        assert_ne!(answer["exit_code"], 0, "{answer}");

        // The workload can neither read the guest agent's secret nor stop it, and the agent
        // closes on it at once (it serves the service's side of the network alone).
        let answer = svc.exec(agent, "q1", "cat /run/tollgate/secret");
        assert!(answer["stderr"].as_str().unwrap_or("").contains("Permission denied"), "{answer}");
        svc.exec(agent, "q1", "pkill -9 -f '[t]ollgate-guest-agent'");
        let answer = svc.exec(agent, "q1", &format!("curl -sS --noproxy '*' -m 5 -o /dev/null -w '%{{http_code}}' http://10.200.1.2:{GUEST_PORT}/health"));
        assert_eq!(answer["stdout"], "000", "the guest agent answers the service alone: {answer}");

        // A request made during an execution gets the token; the VM has no other way out.
        let port = world.origin.port();
        let answer = svc.exec(agent, "q1", &format!("{}; curl -sS --noproxy '*' --connect-timeout 3 -m 5 http://10.200.1.1:{port}/ 2>/dev/null || echo blocked", fetch(port, "/from-vm")));
        assert_eq!(answer["stdout"], "200blocked\n", "{answer}");
        let bearer = format!("Bearer {TOKEN}");
        assert!(world.origin.seen().iter().any(|s| s.target == "/from-vm" && s.authorization() == Some(bearer.as_str())));

        // The interpreter lives in the VM.
        svc.python(agent, "q1", serde_json::json!({"code": "y = 'kept'"}));

        // A restarted service keeps the VM (its /tmp and its interpreter are still there: no
        // reboot).
        world.restart_service(&VM_ARGS);
        let svc = &world.service;
        assert_eq!(svc.stdout(agent, "q1", "cat /tmp/marker"), "here\n");
        assert_eq!(svc.python(agent, "q1", serde_json::json!({"code": "y"}))["result"], "'kept'");

        // Idle: both VMs stop; the next execution boots q1 again with its disk.
        let record = record(world, agent, "q1");
        let uid = record["uid"].as_u64().expect("uid");
        assert_eq!(vmm_processes(uid), 1, "one QEMU for the session, as its own user");
        let deadline = Instant::now() + Duration::from_secs(30);
        while svc.session(agent, "q1")["state"] != "stopped" {
            assert!(Instant::now() < deadline, "the idle VM was not stopped");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(vmm_processes(uid), 0, "the stopped session's QEMU is gone");
        assert_eq!(namespaces_exist(&SessionKey::new(agent, "q1").expect("valid")), (false, false));
        let started = Instant::now();
        let out = svc.stdout(agent, "q1", "cat f; echo $X; pwd");
        eprintln!("TIMING microVM session: resumed execution (boot included) in {:?}", started.elapsed());
        assert_eq!(out, "on-disk\nvm\n/session/workspace/d\n");
        // A new boot is a new interpreter (the files are what carries over).
        assert_eq!(svc.python(agent, "q1", serde_json::json!({"code": "'y' in globals()"}))["result"], "False");
        let r = svc.call("GET", &format!("/v1/sessions/{agent}/q1/files?path=d%2Ff"), None);
        assert_eq!((r.status, r.body.as_str()), (200, "on-disk\n"), "{r:?}");

        // Delete: no VM, namespace, disk or registration is left.
        let r = svc.call("DELETE", &format!("/v1/sessions/{agent}/q1"), None);
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(vmm_processes(uid), 0);
        assert_eq!(namespaces_exist(&SessionKey::new(agent, "q1").expect("valid")), (false, false));
        assert!(!session_dir(world, agent, "q1").exists());
let listed = gateway_sessions(world, agent);
        assert!(
            listed.as_array().into_iter().flatten().all(|s| s["session"] != "q1"),
            "{listed}"
        );

        // The checks the namespace sandbox passes, in a VM (q2, booted again after its idle
        // stop): a process the execution left running gets no token after it ended; the
        // timeout and the output cap; the service out of reach; the files API inside the
        // workspace; no call without the service's token.
        world.token_only_during_the_execution(agent, "q2", "vm-");
        let svc = &world.service;
        svc.timeout_and_cap(agent, "q2");
        svc.sandbox_reaches_neither_service_nor_guest_agent(agent, "q2");
        svc.files_stay_in_the_workspace(agent, "q2");
        let r = svc.call_with(&[], "POST", &format!("/v1/sessions/{agent}/q2/exec"), Some(r#"{"command":"touch unauthorized"}"#));
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(svc.stdout(agent, "q2", "ls unauthorized 2>/dev/null || echo absent"), "absent\n");
    })
    .await;
}

/// The microVM Python test's service: emulation, a small output cap, and the default idle
/// stop (an idle stop would end the interpreter in the middle of the test).
const VM_PYTHON_ARGS: [&str; 6] = [
    "--backend",
    "qemu",
    "--accel",
    "tcg",
    "--max-output-bytes",
    "1000",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_python_has_the_images_libraries_trusts_only_the_gateway_and_installs_nothing() {
    in_world(missing_vm_prerequisite(), &VM_PYTHON_ARGS, "vmpy", |world, agent| {
        let started = Instant::now();
        world.service.open(agent, "v1");
        let svc = &world.service;
        let python = |thread: &str, body: serde_json::Value| svc.python(agent, thread, body);
        let answer = python("v1", serde_json::json!({"code": "x = 41\nprint('set')"}));
        eprintln!("TIMING microVM Python: session to first result in {:?}", started.elapsed());
        assert_eq!(answer["stdout"], "set\n", "{answer}");
        world.service.open(agent, "v2");
        let svc = &world.service;
        let python = |thread: &str, body: serde_json::Value| svc.python(agent, thread, body);

        // State carries from call to call in one thread, not to another.
        assert_eq!(python("v1", serde_json::json!({"code": "x + 1"}))["result"], "42");
        assert_eq!(python("v2", serde_json::json!({"code": "'x' in globals()"}))["result"], "False");

        // The image's libraries.
        let started = Instant::now();
        let answer = python("v1", serde_json::json!({
            "code": "import numpy, pandas, yaml, dateutil.parser, requests\n\
                     frame = pandas.DataFrame({'n': numpy.arange(4)})\n\
                     (int(frame.n.sum()), yaml.safe_load('a: 1')['a'], dateutil.parser.isoparse('2026-01-02').day)",
            "timeout_secs": 120,
        }));
        eprintln!("TIMING microVM Python: import numpy, pandas, yaml, dateutil, requests in {:?}", started.elapsed());
        assert_eq!(answer["result"], "(6, 1, 2)", "{answer}");

        // An exception comes back with its traceback; an endless loop is interrupted by its
        // timeout; the interpreter keeps its state through both.
        let answer = python("v1", serde_json::json!({"code": "1/0"}));
        assert_eq!(answer["error"]["type"], "ZeroDivisionError", "{answer}");
        assert!(answer["error"]["traceback"].as_str().unwrap_or("").contains("Traceback"), "{answer}");
        let answer = python("v1", serde_json::json!({"code": "while True: pass", "timeout_secs": 2}));
        assert_eq!((answer["timed_out"].as_bool(), answer["error"]["type"].as_str()), (Some(true), Some("KeyboardInterrupt")), "{answer}");
        assert_eq!(python("v1", serde_json::json!({"code": "x"}))["result"], "41");
        // Output is capped.
        let answer = python("v1", serde_json::json!({"code": "print('a' * 5000)"}));
        assert_eq!(answer["truncated"], true, "{answer}");

        // requests and urllib go through the gateway, trust its intercepted TLS through the
        // system trust store alone (the CA variables unset), and get the injected token: the
        // call is a tool call.
        let port = world.origin.port();
        let answer = python("v1", serde_json::json!({
            "code": format!("import os, urllib.request\n\
                     for name in ('REQUESTS_CA_BUNDLE', 'SSL_CERT_FILE', 'CURL_CA_BUNDLE'):\n    os.environ.pop(name, None)\n\
                     (requests.get('https://{HOST}:{port}/from-requests').status_code, urllib.request.urlopen('https://{HOST}:{port}/from-urllib').status)"),
            "tool_call_id": "tc-vm-python",
        }));
        assert_eq!(answer["result"], "(200, 200)", "{answer}");
        let record = audit_record(world, agent, "/from-requests");
        assert_eq!((record["session"].as_str(), record["tool_call"].as_str()), (Some("v1"), Some("tc-vm-python")), "{record}");
        let bearer = format!("Bearer {TOKEN}");
        for path in ["/from-requests", "/from-urllib"] {
            assert!(world.origin.seen().iter().any(|s| s.target == path && s.authorization() == Some(bearer.as_str())), "{path}");
        }

        // So do curl and git; the trust store holds the gateway's CA and nothing else.
        let unset = "env -u CURL_CA_BUNDLE -u SSL_CERT_FILE -u REQUESTS_CA_BUNDLE";
        let out = svc.stdout(agent, "v1", &format!(
            "{unset} curl -sS -o /dev/null -w '%{{http_code}}\\n' https://{HOST}:{port}/from-curl; \
             {unset} GIT_TERMINAL_PROMPT=0 git ls-remote https://{HOST}:{port}/repo.git > /dev/null 2> git.err; \
             grep -ci certificate git.err; grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt"
        ));
        assert_eq!(out, "200\n0\n1\n");
        assert!(world.origin.seen().iter().any(|s| s.target.starts_with("/repo.git/info/refs") && s.authorization() == Some(bearer.as_str())), "git's request did not reach the origin");

        // The workload sees its own processes only (not the guest agent), and the guest's
        // hardening is set.
        let out = svc.stdout(agent, "v1", "ps -e -o user= | sort -u; cat /proc/sys/fs/protected_symlinks /proc/sys/fs/protected_regular /proc/sys/user/max_user_namespaces; bash -c 'cat <(echo substituted)'");
        assert_eq!(out, "sandbox\n1\n2\n0\nsubstituted\n");

        // Nothing can be installed: no pip, no ensurepip, no package manager, a read-only
        // root; and no set-id program to become anyone else with.
        let answer = svc.exec(agent, "v1", "for c in pip pip3 apt-get apt dpkg; do command -v $c; done; \
             python3 -m pip --version 2>&1; python3 -m ensurepip 2>&1; touch /usr/lib/python3/dist-packages/x.py 2>&1; \
             find / -xdev -type f -perm /6000 2>/dev/null; true");
        assert_eq!(
            answer["stdout"],
            "/usr/bin/python3: No module named pip\n/usr/bin/python3: No module named ensurepip\n\
             touch: cannot touch '/usr/lib/python3/dist-packages/x.py': Read-only file system\n",
            "{answer}"
        );
    })
    .await;
}

/// Why this machine cannot run the Python test (the netns backend runs the host's
/// `/usr/bin/python3`), or `None`.
fn missing_python() -> Option<String> {
    missing_prerequisite().or_else(|| {
        (!std::path::Path::new("/usr/bin/python3").exists())
            .then(|| "/usr/bin/python3 is missing (apt-get install -y python3)".to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_in_a_session_keeps_its_state_and_each_call_is_one_tool_call() {
    let args = &["--backend", "netns", "--max-output-bytes", "1000"];
    in_world(missing_python(), args, "py", |world, agent| {
        world.service.open(agent, "p1");
        world.service.open(agent, "p2");
        let svc = &world.service;
        let python = |thread: &str, body: serde_json::Value| svc.python(agent, thread, body);
        // State carries from call to call in one thread, not to another.
        let answer = python("p1", serde_json::json!({"code": "x = 1\nprint('set')"}));
        assert_eq!(answer["stdout"], "set\n", "{answer}");
        assert_eq!(python("p1", serde_json::json!({"code": "x + 1"}))["result"], "2");
        assert_eq!(
            python("p2", serde_json::json!({"code": "'x' in globals()"}))["result"],
            "False"
        );
        // An exception comes back with its traceback, and the session works on.
        let answer = python("p1", serde_json::json!({"code": "1/0"}));
        assert_eq!(answer["error"]["type"], "ZeroDivisionError", "{answer}");
        assert!(answer["error"]["traceback"].as_str().unwrap_or("").contains("Traceback"));
        // An endless loop is interrupted by its timeout; the next call works.
        let answer = python(
            "p1",
            serde_json::json!({"code": "while True: pass", "timeout_secs": 1}),
        );
        assert_eq!((answer["timed_out"].as_bool(), answer["error"]["type"].as_str()), (Some(true), Some("KeyboardInterrupt")), "{answer}");
        assert_eq!(python("p1", serde_json::json!({"code": "x"}))["result"], "1");
        // Output is capped.
        let answer = python("p1", serde_json::json!({"code": "print('a' * 5000)"}));
        assert_eq!(answer["truncated"], true, "{answer}");
        // Python's own HTTPS client goes through the gateway (its intercepted TLS trusted,
        // through the environment) and gets the injected token: the call is a tool call.
        let port = world.origin.port();
        let answer = python(
            "p1",
            serde_json::json!({
                "code": format!("import urllib.request\nurllib.request.urlopen('https://{HOST}:{port}/from-python').status"),
                "tool_call_id": "tc-python",
            }),
        );
        assert_eq!(answer["result"], "200", "{answer}");
        assert_eq!(answer["tool_call_id"], "tc-python");
        let record = audit_record(world, agent, "/from-python");
        assert_eq!((record["session"].as_str(), record["tool_call"].as_str()), (Some("p1"), Some("tc-python")), "{record}");
        let open = world.gw.admin_call("GET", &format!("/v1/agents/{agent}/tool-calls"), None);
        assert_eq!(open.json()["tool_calls"], serde_json::json!([]), "{open:?}");
        // The command line prints the output and the result, and exits 1 on an exception.
        let cli = |code: &str| {
            Command::new(binary("tollgate-launcher"))
                .args(["python", "--service", &svc.url, "--agent", agent, "--thread", "p1", "-c", code])
                .env("TOLLGATE_LAUNCHER_TOKEN", &svc.token)
                .output()
                .expect("tollgate-launcher python")
        };
        let out = cli("print('hi')\nx");
        assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()), (Some(0), "hi\n1\n"), "{out:?}");
        let out = cli("undefined_name");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("NameError"), "{out:?}");
    })
    .await;
}
