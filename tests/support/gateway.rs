//! The `tollgate` binary as a child process: its configuration, start-up, the admin API's
//! helpers, and the policy sets tests run it with.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// The `tollgate` binary, running as a child process with its own data directory.
pub struct Gateway {
    child: Child,
    pub dir: tempfile::TempDir,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
    pub agent_listeners: HashMap<String, SocketAddr>,
    pub banner: Vec<String>,
}

impl Gateway {
    /// Starts `tollgate serve` with `config` (TOML); `data_dir` is set to a fresh temp dir
    /// unless the config names one.
    pub fn start(config: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, config)
    }

    /// Starts `tollgate serve` with `config` and a policy directory holding `policies`
    /// (file name, Cedar text).
    pub fn start_with_policies(config: &str, policies: &[(&str, &str)]) -> Gateway {
        Self::start_with_policy_settings(config, policies, "")
    }

    /// Like [`Gateway::start_with_policies`], with more `[policy]` lines (e.g. the watch
    /// interval).
    pub fn start_with_policy_settings(
        config: &str,
        policies: &[(&str, &str)],
        settings: &str,
    ) -> Gateway {
        Self::start_with_env(config, policies, settings, &[])
    }

    /// Like [`Gateway::start_with_policy_settings`], with environment variables for the
    /// gateway process (e.g. `RUST_LOG=debug`, or a secret's variable).
    pub fn start_with_env(
        config: &str,
        policies: &[(&str, &str)],
        settings: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        let (cmd, dir) = Self::prepare(config, policies, settings, env);
        Self::spawn(cmd, dir)
    }

    /// Like [`Gateway::start_with_policies`], with the gateway's stderr going to `stderr`.
    pub fn start_with_stderr(config: &str, policies: &[(&str, &str)], stderr: Stdio) -> Gateway {
        let (cmd, dir) = Self::prepare(config, policies, "", &[]);
        Self::spawn_with_stderr(cmd, dir, stderr)
    }

    /// The command and data directory for [`Gateway::start_with_env`].
    fn prepare(
        config: &str,
        policies: &[(&str, &str)],
        settings: &str,
        env: &[(&str, &str)],
    ) -> (Command, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).expect("policy dir");
        for (name, text) in policies {
            std::fs::write(policy_dir.join(name), text).expect("write policy");
        }
        let config = format!("{config}\n[policy]\ndir = {policy_dir:?}\n{settings}");
        let mut cmd = Self::command(&dir, &config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        (cmd, dir)
    }

    /// A `tollgate serve` command for `config` in `dir` (its data directory is `dir/data`).
    fn command(dir: &tempfile::TempDir, config: &str) -> Command {
        let config_path = dir.path().join("tollgate.toml");
        let config = format!("data_dir = {:?}\n{config}", dir.path().join("data"));
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve").arg("--config").arg(&config_path);
        cmd
    }

    /// The policy directory of a gateway started with [`Gateway::start_with_policies`].
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Starts `tollgate serve` in `dir` (its data directory is `dir/data`).
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Gateway {
        let cmd = Self::command(&dir, config);
        Self::spawn(cmd, dir)
    }

    /// Spawns a prepared `tollgate serve` command and waits for its banner; its stderr goes
    /// to `gateway.log` in `dir` ([`Gateway::log`]).
    pub fn spawn(cmd: Command, dir: tempfile::TempDir) -> Gateway {
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log file");
        Self::spawn_with_stderr(cmd, dir, log.into())
    }

    /// Like [`Gateway::spawn`], with its stderr going to `stderr`.
    fn spawn_with_stderr(mut cmd: Command, dir: tempfile::TempDir, stderr: Stdio) -> Gateway {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        cmd.current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().expect("spawn tollgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line == "ready" => break,
                Ok(line) => banner.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let log =
                        std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
                    panic!("tollgate did not start; stdout: {banner:?}\nlog:\n{log}");
                }
            }
        }
        let find = |prefix: &str| -> SocketAddr {
            banner
                .iter()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .and_then(|rest| rest.trim().strip_prefix("http://"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix:?} line in banner {banner:?}"))
        };
        let egress = find("egress proxy:");
        let admin = find("admin API:");
        let agent_listeners = banner
            .iter()
            .filter_map(|l| l.trim().strip_prefix("agent listener:"))
            .filter_map(|rest| {
                let mut parts = rest.split_whitespace();
                let id = parts.next()?.to_string();
                let addr = parts.next()?.strip_prefix("http://")?.parse().ok()?;
                Some((id, addr))
            })
            .collect();
        Gateway {
            child,
            dir,
            egress,
            admin,
            agent_listeners,
            banner,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir().join("ca.pem")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string()
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.egress)
    }

    /// Everything the gateway logged until now. It writes lines of info and below in
    /// batches, every 50 ms: this waits out one batch and a margin first, so that a line
    /// logged before the call is in what it returns (a check that a secret is *not* logged
    /// would otherwise pass too early).
    pub fn log(&self) -> String {
        std::thread::sleep(Duration::from_millis(200));
        self.log_written()
    }

    /// What the gateway's log file holds at this moment.
    fn log_written(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Calls the admin API with the admin token.
    pub fn admin_call(&self, method: &str, path: &str, body: Option<&str>) -> CurlResult {
        self.admin_as(Some(&self.admin_token()), method, path, body)
    }

    /// Calls the admin API presenting `token` (or none).
    pub fn admin_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> CurlResult {
        let mut args = vec![
            "-X".to_string(),
            method.to_string(),
            format!("http://{}{path}", self.admin),
        ];
        if let Some(token) = token {
            args.extend(["-H".to_string(), format!("Authorization: Bearer {token}")]);
        }
        if let Some(body) = body {
            args.extend([
                "-H".into(),
                "content-type: application/json".into(),
                "--data-binary".into(),
                body.into(),
            ]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs)
    }

    /// The value of the Prometheus sample `name` (one without labels) at `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.admin_call("GET", "/metrics", None).body;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// Waits (up to 5 s) until the log contains `needle`; the gateway logs a request after it
    /// has answered it, so a client can be faster than the log line.
    pub fn log_contains(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.log_written().contains(needle) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the gateway and hands back its directory (to restart on the same data).
    pub fn stop(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config lines that let the gateway reach test origins on loopback and trust `ca`.
pub fn loopback_upstream(ca: Option<&Path>) -> String {
    let mut s = String::from("[upstream]\nallow_networks = [\"127.0.0.1/32\"]\n");
    if let Some(ca) = ca {
        s.push_str(&format!("extra_ca_file = {:?}\n", ca));
    }
    s
}

/// The shipped run-mode policies alone (`policies/default/run-modes.cedar`): the run modes as
/// users get them, without the allowlist (test origins are on loopback).
pub const RUN_MODES: (&str, &str) = (
    "run-modes.cedar",
    include_str!("../../policies/default/run-modes.cedar"),
);

/// A policy that permits everything: for tests of the data path, not of policies.
pub const ALLOW_ALL: (&str, &str) = (
    "allow-all.cedar",
    "@id(\"allow-all\")\npermit (principal, action, resource);\n",
);

/// The repository's default policy files (policies/default/).
pub fn default_policies() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("policies/default")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().to_string();
            (name, std::fs::read_to_string(&p).expect("read policy"))
        })
        .collect();
    files.sort();
    files
}

/// The listeners on port 0 so parallel tests never collide.
pub const EPHEMERAL_LISTENERS: &str =
    "[egress]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";

/// Runs `tollgate serve` on `config` (data in `dir`), which must fail to start; returns what
/// it printed on stderr.
pub fn start_fails(dir: &Path, config: &str) -> String {
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        format!("data_dir = {:?}\n{config}", dir.join("data")),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run tollgate");
    assert!(
        !out.status.success(),
        "tollgate started although it should not have"
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The audit records of `agent`, once there are at least `n` (the audit thread writes them
/// within its flush interval); panics after 5 s with what there is.
pub fn audit_records(gw: &Gateway, agent: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let records = gw
            .admin_call("GET", &format!("/v1/agents/{agent}/audit"), None)
            .json()["records"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if records.len() >= n {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} audit records of {agent}, have {records:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// curl arguments for a request through `gw` to `url`, trusting the gateway's CA (for
/// https:// URLs, which the gateway intercepts).
pub fn via(gw: &Gateway, url: &str) -> Vec<String> {
    args![
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        url
    ]
}

/// Every file under `dir`, read whole.
pub fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

/// Whether `haystack` holds `needle`'s bytes anywhere.
pub fn bytes_contain(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
