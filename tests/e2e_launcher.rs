//! The sandbox launcher end to end, with its real binary: sandboxes started with `up`, their
//! agent registered with a real gateway, a workload inside fetching an HTTPS URL from an
//! origin on loopback through the gateway (intercepted, token injected) and failing to get
//! out any other way, two sandboxes at once, and `down` leaving nothing behind. The microVM
//! test boots real QEMU guests (software emulation here); the process-backend test runs the
//! same checks in a network namespace.
//!
//! Needs root, iproute2, nftables and curl; the microVM test also QEMU, busybox-static and the
//! kernel package in the launcher's cache (`tollgate-launcher image build` fetches it; CI
//! does so before the tests). Each skips with the reason when something is missing.
//!
//! Timings are printed, never asserted (see `benches/` for the measurements).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use tollgate_launcher::network::{in_namespace, SandboxNetwork, HOST_ADDRESS};

const HOST: &str = "api.protected.test";
const TOKEN: &str = "launcher-static-token-5d1e";

/// The launcher binary, built beside this test by `cargo test --workspace`.
fn launcher_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let binary = dir.join("tollgate-launcher");
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build -p tollgate-launcher` (cargo test --workspace does)",
        binary.display()
    );
    binary
}

/// Why this machine cannot run the test (with `qemu`: the microVM one), or `None`.
fn missing_prerequisite(qemu: bool) -> Option<String> {
    if no_curl() {
        return Some("curl is missing".into());
    }
    if let Some(why) = missing_namespace_tools(true) {
        return Some(why);
    }
    if qemu {
        for (program, package) in [
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox-static"),
            ("xz", "xz-utils"),
        ] {
            if Command::new(program).arg("--help").output().is_err() {
                return Some(format!(
                    "{program} is missing (apt-get install -y {package})"
                ));
            }
        }
        let cached = std::fs::read_dir("/var/cache/tollgate-launcher")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("linux-image-"));
        if !cached {
            return Some(
                "the kernel package is not in /var/cache/tollgate-launcher (run `tollgate-launcher image build` once; CI does)"
                    .into(),
            );
        }
    }
    None
}

/// A gateway with a static identity provider `p` whose token is injected for `HOST`, which
/// is pinned to the HTTPS origin on loopback (trusted through the test origins' CA), which
/// accepts only that token.
struct World {
    gw: Gateway,
    origin: Origin,
    state: tempfile::TempDir,
    /// Agents `up` was run for: taken down when the test ends, however it ends.
    started: std::sync::Mutex<Vec<String>>,
}

/// A port on the gateway's side of every sandbox where a service answers: only the firewall
/// keeps the sandbox from it.
const HIDDEN_PORT: u16 = 9999;

/// Serves a one-line HTTP answer on `HIDDEN_PORT` inside agent `agent`'s namespace until the
/// namespace goes (the thread ends with the test).
fn serve_hidden_service(agent: &str) {
    let net = SandboxNetwork::new(agent, 0).expect("agent id");
    let listener = in_namespace(&net.gateway_namespace_path(), || {
        std::net::TcpListener::bind((HOST_ADDRESS, HIDDEN_PORT))
    })
    .expect("bind in the sandbox's namespace");
    std::thread::spawn(move || {
        use std::io::Write;
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 6\r\n\r\nhidden");
        }
    });
}

impl Drop for World {
    fn drop(&mut self) {
        let agents = self.started.lock().map(|a| a.clone()).unwrap_or_default();
        for agent in agents {
            let _ = self.launcher(&["down", &agent]);
            if let Ok(net) = SandboxNetwork::new(&agent, 0) {
                let _ = net.destroy();
            }
        }
    }
}

impl World {
    fn start() -> World {
        let origin = Origin::protected_by(HOST, issued(TOKEN, "p"), "p");
        let config = format!(
            "{EPHEMERAL_LISTENERS}{upstream}resolve = {{ \"{HOST}\" = \"127.0.0.1\" }}\n\
             [[identity_providers]]\nname = \"p\"\nkind = \"static\"\ntoken = {{ env = \"LAUNCHER_TEST_TOKEN\" }}\n\
             [[credential_rules]]\nhosts = [\"{HOST}\"]\nports = [{port}]\naudience = \"p\"\n",
            upstream = loopback_upstream(Some(&origin_ca().cert_path())),
            port = origin.port(),
        );
        let gw =
            Gateway::start_with_env(&config, &[ALLOW_ALL], "", &[("LAUNCHER_TEST_TOKEN", TOKEN)]);
        let state = tempfile::tempdir().expect("state dir");
        World {
            gw,
            origin,
            state,
            started: Default::default(),
        }
    }

    /// Runs the launcher with `args` (after the gateway options for `up`).
    fn launcher(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(launcher_binary());
        command.env("TOLLGATE_LAUNCHER_STATE", self.state.path());
        if args.first() == Some(&"up") {
            if let Some(agent) = args.iter().skip_while(|a| **a != "--agent").nth(1) {
                if let Ok(mut started) = self.started.lock() {
                    started.push(agent.to_string());
                }
            }
            let admin = format!("http://{}", self.gw.admin);
            command.arg("up").args([
                "--admin",
                &admin,
                "--ca",
                &self.gw.ca_cert().to_string_lossy(),
            ]);
            if !args.contains(&"--token-file") {
                let token = self.gw.data_dir().join("admin-token");
                command.arg("--token-file").arg(token);
            }
            command.args(&args[1..]);
        } else {
            command.args(args);
        }
        command.output().expect("run tollgate-launcher")
    }

    fn launcher_ok(&self, args: &[&str]) -> String {
        let out = self.launcher(args);
        assert!(
            out.status.success(),
            "tollgate-launcher {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Waits until agent `agent`'s console shows `marker`, and returns the console.
    fn wait_for_console(&self, agent: &str, marker: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let console = self.launcher_ok(&["logs", agent]);
            if console.contains(marker) {
                return console;
            }
            assert!(
                Instant::now() < deadline,
                "no {marker:?} from {agent} in {within:?}:\n{console}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Opens a tool call for `agent` so its requests get the injected token.
    fn open_tool_call(&self, agent: &str) {
        let r = self.gw.admin_call(
            "POST",
            &format!("/v1/agents/{agent}/tool-calls"),
            Some(r#"{"id":"tc-1"}"#),
        );
        assert_eq!(r.status, 201, "{r:?}");
    }

    /// The paths of agent `agent`'s audited requests.
    fn audited_paths(&self, agent: &str) -> Vec<String> {
        let r = self
            .gw
            .admin_call("GET", &format!("/v1/agents/{agent}/audit"), None);
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|rec| rec["path"].as_str().map(str::to_string))
            .collect()
    }
}

/// The workload: fetch the origin through the gateway until it answers 200 — it accepts only
/// the injected token (the test opens the agent's tool call once `up` returns) — then try
/// every other way out.
fn checks(origin_port: u16, admin_port: u16) -> String {
    format!(
        r#"n=0
while :; do
  out=$(curl -sS -m 10 -w ' HTTP %{{http_code}}' "https://{HOST}:{origin_port}/from-$TOLLGATE_AGENT")
  case "$out" in *" HTTP 200") break ;; esac
  n=$((n + 1)); [ "$n" -ge 120 ] && break
  sleep 0.5
done
echo "FETCHED $out"
probe() {{
  if curl -sS --noproxy '*' --connect-timeout 5 -m 5 -o /dev/null "$2" 2>/dev/null; then
    echo "CHECK $1 reached"
  else
    echo "CHECK $1 blocked"
  fi
}}
probe service-on-gateway-side http://10.200.1.1:{HIDDEN_PORT}/
probe origin-port-on-gateway-side http://10.200.1.1:{origin_port}/
probe admin-port-on-gateway-side http://10.200.1.1:{admin_port}/healthz
probe origin-on-loopback http://127.0.0.1:{origin_port}/
probe other-address http://192.0.2.1/
probe name-resolution http://{HOST}:{origin_port}/
probe proxy-port-without-proxying http://10.200.1.1:3128/
echo CHECKS-DONE"#
    )
}

/// Checks what one sandbox's workload reported.
fn assert_confined(console: &str, agent: &str) {
    let fetched = console
        .lines()
        .find_map(|l| l.strip_prefix("FETCHED "))
        .unwrap_or_default();
    assert!(
        fetched.ends_with(" HTTP 200"),
        "{agent} did not get through with the injected token:\n{console}"
    );
    assert!(
        !fetched.contains(TOKEN),
        "the sandbox saw the token:\n{console}"
    );
    assert!(fetched.contains(&format!("/from-{agent}")), "{console}");
    let probes: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("CHECK "))
        .collect();
    assert_eq!(probes.len(), 7, "{console}");
    for probe in probes {
        let reached = probe.ends_with(" reached");
        // The gateway's own port answers (with a refusal, as a proxy without a target): it is
        // the one way out. Every other attempt must fail.
        if probe.contains("proxy-port-without-proxying") {
            continue;
        }
        assert!(!reached, "{agent}: {probe}\n{console}");
    }
}

/// Nothing of agent `agent`'s sandbox is left: namespaces, resolver file, process, state,
/// registration.
fn assert_gone(world: &World, agent: &str, pid: u32) {
    let namespaces = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains(&format!("tg-{agent}")),
        "a namespace of {agent} is left: {namespaces}"
    );
    assert!(!Path::new(&format!("/etc/netns/tg-{agent}-s")).exists());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    assert!(
        matches!(state, None | Some(Some('Z'))),
        "process {pid} of {agent} still runs: {stat}"
    );
    assert!(!world.state.path().join(agent).exists());
    let r = world
        .gw
        .admin_call("GET", &format!("/v1/agents/{agent}"), None);
    assert_eq!(r.status, 404, "{agent} is still registered: {r:?}");
    assert!(!world.launcher_ok(&["list"]).contains(agent));
}

fn pid_of(list: &str, agent: &str) -> u32 {
    list.lines()
        .find(|l| l.split_whitespace().next() == Some(agent))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or_else(|| panic!("{agent} not in:\n{list}"))
}

/// Starts agents `agents` at once with `backend_args`, each with the check workload; returns
/// per agent the time from `up` until its first request reached the origin.
fn up_together(world: &World, agents: &[&str], backend_args: &[&str]) -> Vec<Duration> {
    let script = checks(world.origin.port(), world.gw.admin.port());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for agent in agents {
            let script = script.clone();
            scope.spawn(move || {
                let mut args = vec![
                    "up",
                    "--agent",
                    agent,
                    "--run-mode",
                    "Autonomous",
                    "--identity",
                    "p",
                ];
                args.extend(backend_args);
                args.extend(["--", "sh", "-c", &script]);
                let out = world.launcher_ok(&args);
                eprintln!("{}", out.trim());
                // Before the tool call opens, so before the workload probes.
                serve_hidden_service(agent);
                world.open_tool_call(agent);
            });
        }
    });
    let mut first = Vec::new();
    for agent in agents {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if !world.audited_paths(agent).is_empty() {
                first.push(started.elapsed());
                break;
            }
            assert!(Instant::now() < deadline, "no request from {agent}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    first
}

fn run_confinement_checks(backend_args: &[&str], prefix: &str) {
    let world = World::start();
    // Unique per run: a run killed half-way cannot get in the next one's way.
    let id = std::process::id();
    let (a, b) = (format!("{prefix}{id}-a"), format!("{prefix}{id}-b"));
    let (a, b) = (a.as_str(), b.as_str());

    // One sandbox alone, then two at once.
    let alone = up_together(&world, &[a], backend_args);
    let console = world.wait_for_console(a, "CHECKS-DONE", Duration::from_secs(120));
    assert_confined(&console, a);
    // The origin got the token the gateway injected; the sandbox never had it.
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        world.origin.seen().iter().any(|seen| {
            seen.target == format!("/from-{a}") && seen.authorization() == Some(bearer.as_str())
        }),
        "{:?}",
        world.origin.seen()
    );
    let list = world.launcher_ok(&["list"]);
    eprintln!("{list}");
    let pid = pid_of(&list, a);
    world.launcher_ok(&["down", a]);
    assert_gone(&world, a, pid);

    let together = up_together(&world, &[a, b], backend_args);
    let list = world.launcher_ok(&["list"]);
    eprintln!("{list}");
    for agent in [a, b] {
        let console = world.wait_for_console(agent, "CHECKS-DONE", Duration::from_secs(120));
        assert_confined(&console, agent);
        // Each sandbox's requests are its agent's and no other's.
        let other = if agent == a { b } else { a };
        let paths = world.audited_paths(agent);
        assert!(
            paths.contains(&format!("/from-{agent}")),
            "{agent}: {paths:?}"
        );
        assert!(
            !paths.iter().any(|p| p.contains(other)),
            "{agent}'s trail has {other}'s requests: {paths:?}"
        );
    }
    eprintln!(
        "TIMING {prefix}: up -> first request: alone {:.1} s; two at once {:.1} s and {:.1} s",
        alone[0].as_secs_f64(),
        together[0].as_secs_f64(),
        together[1].as_secs_f64()
    );
    for agent in [a, b] {
        let pid = pid_of(&list, agent);
        world.launcher_ok(&["down", agent]);
        assert_gone(&world, agent, pid);
    }
    assert!(
        !world.gw.log().contains(TOKEN),
        "the injected token reached the log"
    );
}

/// Runs `checks` on the runtime's blocking pool (the origin serves on the runtime; the
/// launcher and the admin calls block).
async fn blocking(checks: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(checks)
        .await
        .expect("test body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvms_reach_origins_only_through_their_own_gateway_listener() {
    if let Some(why) = missing_prerequisite(true) {
        eprintln!("SKIP: {why}");
        return;
    }
    let image_arg = guest_image().to_string_lossy().to_string();
    blocking(move || run_confinement_checks(&["--image", &image_arg, "--memory", "192"], "vm"))
        .await;
}

/// The guest image, built once per run of this test binary with `image build --offline`
/// (from the cached kernel package) under cargo's scratch directory for tests.
fn guest_image() -> PathBuf {
    static IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-image");
            let out = Command::new(launcher_binary())
                .args(["image", "build", "--offline", "--without-root", "--out"])
                .arg(&dir)
                .output()
                .expect("image build");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .clone()
}

/// `up` fails with `expected` in its message and leaves nothing behind.
fn assert_up_fails_cleanly(world: &World, agent: &str, args: &[&str], expected: &str) {
    let mut full = vec!["up", "--agent", agent];
    full.extend(args);
    let out = world.launcher(&full);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up {args:?} succeeded");
    assert!(stderr.contains(expected), "{expected:?} not in: {stderr}");
    let namespaces = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains(&format!("tg-{agent}")),
        "up {args:?} left a namespace"
    );
    assert!(
        !world.state.path().join(agent).exists(),
        "up {args:?} left its state"
    );
    let r = world
        .gw
        .admin_call("GET", &format!("/v1/agents/{agent}"), None);
    assert_eq!(r.status, 404, "up {args:?} left the agent registered");
    // A VM's QEMU has its initramfs in the sandbox's state directory on its command line.
    let sandbox_dir = world.state.path().join(agent);
    let left = Command::new("pgrep")
        .arg("-f")
        .arg(&sandbox_dir)
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "up {args:?} left a process: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_up_takes_down_what_it_made_and_says_why() {
    if let Some(why) = missing_prerequisite(true) {
        eprintln!("SKIP: {why}");
        return;
    }
    let image = guest_image();
    blocking(move || {
        let world = World::start();
        let agent = format!("fail{}", std::process::id());
        let image_arg = image.to_string_lossy().to_string();
        let image_args = ["--image", image_arg.as_str()];

        // The gateway refuses the registration (a wrong admin token).
        let bad_token = world.state.path().join("bad-token");
        std::fs::write(&bad_token, "not-the-admin-token").expect("write");
        let bad_token = bad_token.to_string_lossy().to_string();
        let mut args = vec!["--backend", "netns", "--token-file", bad_token.as_str()];
        args.extend(["--", "true"]);
        assert_up_fails_cleanly(
            &world,
            &agent,
            &args,
            "the gateway refused registering agent",
        );

        // QEMU dies at once (the kernel is not a kernel): its own message is quoted.
        let broken = tempfile::tempdir().expect("broken image");
        for file in ["image.json", "initramfs.cpio"] {
            std::fs::copy(image.join(file), broken.path().join(file)).expect("copy");
        }
        std::fs::write(broken.path().join("vmlinux"), b"not a kernel").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(broken.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let broken_arg = broken.path().to_string_lossy().to_string();
        assert_up_fails_cleanly(
            &world,
            &agent,
            &["--image", &broken_arg, "--accel", "tcg"],
            "QEMU exited",
        );

        // The watchdog: no ready marker in time.
        let mut args = image_args.to_vec();
        args.extend(["--accel", "tcg", "--ready-timeout", "0"]);
        assert_up_fails_cleanly(
            &world,
            &agent,
            &args,
            "no ready marker on its console within 0 s",
        );

        // One sandbox per agent; the second `up` touches nothing of the first.
        world.launcher_ok(&[
            "up",
            "--agent",
            &agent,
            "--backend",
            "netns",
            "--",
            "sleep",
            "60",
        ]);
        let second = world.launcher(&["up", "--agent", &agent, "--backend", "netns"]);
        assert!(!second.status.success());
        assert!(String::from_utf8_lossy(&second.stderr).contains("already has a sandbox"));
        assert!(world.launcher_ok(&["list"]).contains("running"));
        let pid = pid_of(&world.launcher_ok(&["list"]), &agent);
        world.launcher_ok(&["down", &agent]);
        assert_gone(&world, &agent, pid);

        // `down` of what is not there says so.
        let none = world.launcher(&["down", &agent]);
        assert!(!none.status.success());
        assert!(String::from_utf8_lossy(&none.stderr).contains("has no sandbox"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_sandboxes_reach_origins_only_through_their_own_gateway_listener() {
    if let Some(why) = missing_prerequisite(false) {
        eprintln!("SKIP: {why}");
        return;
    }
    blocking(|| run_confinement_checks(&["--backend", "netns"], "proc")).await;
}
