//! What a sandbox's workload is given, whatever runs it: the gateway as its proxy, the
//! gateway's CA as the only trust anchor, and its command. The process backend starts it
//! here; a microVM's init gets the same environment (see [`crate::guest`]).

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The environment that names the agent, points HTTP clients at the gateway and makes them
/// trust its CA (which intercepts HTTPS). Lower- and upper-case proxy variables both, since
/// clients disagree on which they read (curl ignores `HTTP_PROXY`).
pub fn workload_environment(
    agent: &str,
    proxy_url: &str,
    ca_file: &str,
) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = vec![("TOLLGATE_AGENT", agent.to_string())];
    env.extend(
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"]
            .into_iter()
            .map(|name| (name, proxy_url.to_string())),
    );
    env.extend(
        [
            "SSL_CERT_FILE",
            "CURL_CA_BUNDLE",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
        ]
        .into_iter()
        .map(|name| (name, ca_file.to_string())),
    );
    env
}

/// `arg` quoted for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// A command line quoted for a POSIX shell; an idle loop when there is no command (the
/// sandbox then waits for `down`).
pub fn shell_command(command: &[String]) -> String {
    if command.is_empty() {
        return "while :; do sleep 3600; done".to_string();
    }
    let quoted: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
    format!("exec {}", quoted.join(" "))
}

/// The unprivileged account a workload or VMM runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// The user id the process runs as.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// One supplementary group, when the process needs a device only that group may open
    /// (QEMU and `/dev/kvm`); otherwise none.
    pub device_group: Option<u32>,
}

impl RunAs {
    /// The account named `user` on this host.
    pub fn lookup(user: &str) -> Result<RunAs, String> {
        match nix::unistd::User::from_name(user) {
            Ok(Some(u)) if u.uid.is_root() => {
                Err(format!("user {user:?} is root: sandboxes run unprivileged"))
            }
            Ok(Some(u)) => Ok(RunAs {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                device_group: None,
            }),
            Ok(None) => Err(format!("no user {user:?} on this host")),
            Err(e) => Err(format!("cannot look up user {user:?}: {e}")),
        }
    }

    /// The same account, also in `device_group`.
    pub fn with_device_group(self, gid: u32) -> RunAs {
        RunAs {
            device_group: Some(gid),
            ..self
        }
    }

    /// `setpriv` arguments that drop to this account for good: no supplementary groups (but
    /// the device's), no capabilities, no way back through set-user-id programs.
    pub fn setpriv_args(&self) -> Vec<String> {
        vec![
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.gid),
            match self.device_group {
                Some(gid) => format!("--groups={gid}"),
                None => "--clear-groups".into(),
            },
            "--inh-caps=-all".into(),
            "--no-new-privs".into(),
            "--".into(),
        ]
    }
}

/// Lets the unprivileged account pass through directory `dir` (to open a file in it by
/// path) by adding the execute bits; takes no permission away (the directory may be one the
/// operator chose, e.g. `/tmp` with its sticky bit).
pub fn allow_traversal(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o111 != 0o111 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o111))?;
    }
    Ok(())
}

/// Starts `program args` as `user` (inside network namespace `namespace` when given), in a
/// process group of its own (so `down` can end it and everything it started), detached from
/// the launcher, with exactly `env` (plus a minimal `PATH` and `HOME`), its standard output
/// and error appended to the files `stdout` and `stderr` (the same one may be named twice);
/// `prepare` may add to the command last (e.g. hand it a descriptor).
pub fn spawn_confined(
    namespace: Option<&str>,
    user: RunAs,
    program: &str,
    args: &[String],
    env: &[(&'static str, String)],
    (stdout, stderr): (&Path, &Path),
    prepare: impl FnOnce(&mut Command),
) -> std::io::Result<Child> {
    let append = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let (stdout, stderr) = (append(stdout)?, append(stderr)?);
    let mut command = match namespace {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "setpriv"]);
            c
        }
        None => Command::new("setpriv"),
    };
    command
        .args(user.setpriv_args())
        .arg(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    prepare(&mut command);
    command.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_a_shell_round_trip() {
        let args: Vec<String> = [
            "echo",
            "a b",
            "it's",
            "$HOME",
            "",
            "semi;colon",
            "plain-1.2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let script = format!(
            "printf '%s|' {}",
            args[1..]
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("sh");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "a b|it's|$HOME||semi;colon|plain-1.2|"
        );
        assert_eq!(shell_command(&args[..1]), "exec echo");
        assert!(shell_command(&[]).contains("sleep"));
    }

    #[test]
    fn the_environment_points_every_client_at_the_gateway_and_its_ca() {
        let env = workload_environment("a", "http://10.200.1.1:3128", "/ca.pem");
        assert_eq!(env[0], ("TOLLGATE_AGENT", "a".to_string()));
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("https_proxy"), Some("http://10.200.1.1:3128"));
        assert_eq!(get("HTTP_PROXY"), Some("http://10.200.1.1:3128"));
        assert_eq!(get("CURL_CA_BUNDLE"), Some("/ca.pem"));
        assert_eq!(get("NO_PROXY"), None, "nothing bypasses the gateway");
    }

    #[test]
    fn the_account_keeps_no_group_but_a_devices() {
        let nobody = RunAs {
            uid: 65534,
            gid: 65534,
            device_group: None,
        };
        let args = nobody.setpriv_args().join(" ");
        assert_eq!(
            args,
            "--reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --no-new-privs --"
        );
        let with_kvm = nobody.with_device_group(993).setpriv_args().join(" ");
        assert!(with_kvm.contains(" --groups=993 "), "{with_kvm}");
        assert!(!with_kvm.contains("--clear-groups"));
    }

    #[test]
    fn root_is_refused_as_the_sandbox_user() {
        assert!(RunAs::lookup("root").is_err());
        assert!(RunAs::lookup("no-such-user-tollgate").is_err());
    }
}
