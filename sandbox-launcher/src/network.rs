//! One sandbox's network: two network namespaces joined by a veth pair, and a firewall that
//! leaves the sandbox exactly one way out — the gateway's listener for its agent.
//!
//! - `tg-<agent>` is the gateway's side. It holds `lo` and the host end of the pair
//!   (`tgw0`, [`HOST_ADDRESS`]/30). The gateway binds the agent's own listener here
//!   ([`SandboxNetwork::listen_address`]), registered over its admin API. Its nftables table
//!   (policy drop) accepts only new TCP connections from the sandbox's address to that port
//!   (and what belongs to them), answers every other attempt with a reset or an
//!   administratively-prohibited, and forwards nothing: no route leads further.
//! - `tg-<agent>-s` is the sandbox's side, where the process backend runs its workload. It
//!   holds `lo` and `eth0` ([`SANDBOX_ADDRESS`]/30), with the default route via the gateway's
//!   side. No DNS server is offered (its `resolv.conf`, `/etc/netns/tg-<agent>-s/resolv.conf`,
//!   names none): the gateway resolves names.
//! - A microVM needs no second namespace: its tap device ([`SandboxNetwork::create_for_vm`])
//!   takes the veth's place in `tg-<agent>`, under the same name and rules, and the guest
//!   configures [`SANDBOX_ADDRESS`] itself.
//!
//! Every sandbox gets the same addresses; namespaces never meet, so they cannot clash. IPv6
//! is disabled in both namespaces (link-local addresses would otherwise come up beside the
//! IPv4-only rules). Deleting the two namespaces removes the pair and the rules with them.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::tap::Tap;

/// The gateway's address on the pair, which the sandbox's traffic is addressed to.
pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// The sandbox's address on the pair.
pub const SANDBOX_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// The pair's host end, inside the gateway's namespace.
const HOST_DEVICE: &str = "tgw0";
/// The pair's sandbox end, inside the sandbox's namespace.
const SANDBOX_DEVICE: &str = "eth0";
/// Longest agent id a namespace is named after.
const MAX_AGENT_ID: usize = 48;

/// Why a sandbox's network could not be set up or taken down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The agent id cannot name a namespace.
    #[error("agent id {0:?} cannot name a network namespace: use 1 to 48 of a-z, 0-9 and '-'")]
    InvalidAgent(String),
    /// A command could not be run at all.
    #[error("cannot run {program}: {source} (the launcher needs iproute2 and nftables: apt-get install -y iproute2 nftables)")]
    Missing {
        /// The program that could not be started (iproute2's `ip`).
        program: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The tap device could not be made.
    #[error("cannot create the VM's tap device in namespace {namespace}: {source} (needs root and /dev/net/tun)")]
    Tap {
        /// The gateway side's namespace, where the tap was to be made.
        namespace: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The sandbox's resolver file could not be written or removed.
    #[error("cannot write or remove {path}: {source}")]
    Resolver {
        /// The sandbox's `/etc/netns/<namespace>` directory, or its `resolv.conf`.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A command ran but exited with an error.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line that failed, program and arguments.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The network of one sandbox (an agent's or a session's): two namespaces, a pair, the rules.
#[derive(Debug, Clone)]
pub struct SandboxNetwork {
    gateway_namespace: String,
    sandbox_namespace: String,
    port: u16,
    /// A session sandbox's guest agent port: the one port the gateway's side may open
    /// connections to on the sandbox.
    guest_port: Option<u16>,
}

impl SandboxNetwork {
    /// The network for `agent`'s sandbox, whose gateway listener will be on `port`.
    pub fn new(agent: &str, port: u16) -> Result<SandboxNetwork, NetworkError> {
        let valid = !agent.is_empty()
            && agent.len() <= MAX_AGENT_ID
            && agent
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(NetworkError::InvalidAgent(agent.to_string()));
        }
        Ok(SandboxNetwork {
            gateway_namespace: format!("tg-{agent}"),
            sandbox_namespace: format!("tg-{agent}-s"),
            port,
            guest_port: None,
        })
    }

    /// The network of session `session` (its id: 1 to 48 of a-z, 0-9, '-'), whose gateway
    /// listener will be on `port` and whose guest agent the service reaches on the sandbox's
    /// `guest_port`. Its namespaces are `tgs-<session>` and `tgs-<session>-s`, apart from
    /// `up`'s.
    pub fn for_session(
        session: &str,
        port: u16,
        guest_port: u16,
    ) -> Result<SandboxNetwork, NetworkError> {
        let plain = SandboxNetwork::new(session, port)?;
        Ok(SandboxNetwork {
            gateway_namespace: format!("tgs-{session}"),
            sandbox_namespace: format!("tgs-{session}-s"),
            guest_port: Some(guest_port),
            ..plain
        })
    }

    /// The gateway's side's namespace name (`tg-<agent>`, or `tgs-<session>`).
    pub fn gateway_namespace(&self) -> &str {
        &self.gateway_namespace
    }

    /// The gateway's side's namespace, as the path the gateway enters to bind.
    pub fn gateway_namespace_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.gateway_namespace)
    }

    /// The sandbox's side's namespace name (the gateway's side's, with `-s`).
    pub fn sandbox_namespace(&self) -> &str {
        &self.sandbox_namespace
    }

    /// Where the gateway listens for this agent (inside the gateway's side's namespace).
    pub fn listen_address(&self) -> SocketAddr {
        SocketAddr::from((HOST_ADDRESS, self.port))
    }

    /// The gateway's side's nftables table: the sandbox may connect to the gateway listener only.
    pub fn ruleset(&self) -> String {
        // A session's service connects to its guest agent from this side; nothing from here
        // may open any other connection to the sandbox.
        let output = match self.guest_port {
            Some(guest_port) => format!(
                "\tchain output {{\n\
                 \t\ttype filter hook output priority filter; policy accept;\n\
                 \t\toifname \"{HOST_DEVICE}\" ct state established,related accept\n\
                 \t\toifname \"{HOST_DEVICE}\" ip daddr {SANDBOX_ADDRESS} tcp dport {guest_port} ct state new accept\n\
                 \t\toifname \"{HOST_DEVICE}\" meta l4proto tcp tcp flags rst accept\n\
                 \t\toifname \"{HOST_DEVICE}\" meta l4proto icmp accept\n\
                 \t\toifname \"{HOST_DEVICE}\" drop\n\
                 \t}}\n"
            ),
            None => String::new(),
        };
        format!(
            "table inet tollgate {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy drop;\n\
             \t\tiif \"lo\" accept\n\
             \t\tct state established,related accept\n\
             \t\tiifname \"{HOST_DEVICE}\" ip saddr {SANDBOX_ADDRESS} ip daddr {HOST_ADDRESS} tcp dport {port} ct state new accept\n\
             \t\tiifname \"{HOST_DEVICE}\" meta l4proto tcp reject with tcp reset\n\
             \t\tiifname \"{HOST_DEVICE}\" reject with icmpx type admin-prohibited\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             \t}}\n\
             {output}\
             }}\n",
            port = self.port
        )
    }

    /// Creates both namespaces, the pair, the addresses and the rules (the process backend's
    /// network). On any failure what was made is removed again.
    pub fn create(&self) -> Result<(), NetworkError> {
        self.undo_on_error(|| {
            self.build_gateway_side()?;
            self.build_sandbox_side()
        })
    }

    /// Creates the gateway's side with a tap device in the pair's place (a microVM's
    /// network), and returns the tap, open: whoever holds it is the other end of the wire.
    /// The device goes when the last holder closes it. On any failure what was made is
    /// removed again.
    pub fn create_for_vm(&self) -> Result<Tap, NetworkError> {
        self.undo_on_error(|| {
            self.build_gateway_side()?;
            let tap =
                Tap::open_in(&self.gateway_namespace_path(), HOST_DEVICE).map_err(|source| {
                    NetworkError::Tap {
                        namespace: self.gateway_namespace.clone(),
                        source,
                    }
                })?;
            self.address_host_device()?;
            Ok(tap)
        })
    }

    fn undo_on_error<T>(
        &self,
        build: impl FnOnce() -> Result<T, NetworkError>,
    ) -> Result<T, NetworkError> {
        let made = build();
        if made.is_err() {
            let _ = self.destroy();
        }
        made
    }

    /// The gateway's side: its namespace, IPv6 off, `lo`, and the rules.
    fn build_gateway_side(&self) -> Result<(), NetworkError> {
        let gw = &self.gateway_namespace;
        make_namespace(gw)?;
        run(
            "ip",
            &["netns", "exec", gw, "nft", "-f", "-"],
            Some(&self.ruleset()),
        )?;
        Ok(())
    }

    /// The host end's address, and the device up.
    fn address_host_device(&self) -> Result<(), NetworkError> {
        let gw = &self.gateway_namespace;
        let host = format!("{HOST_ADDRESS}/30");
        run(
            "ip",
            &["-n", gw, "addr", "add", &host, "dev", HOST_DEVICE],
            None,
        )?;
        run("ip", &["-n", gw, "link", "set", HOST_DEVICE, "up"], None)
    }

    /// The sandbox's namespace, the pair into it, addresses and the route; no DNS.
    fn build_sandbox_side(&self) -> Result<(), NetworkError> {
        let (gw, sb) = (&self.gateway_namespace, &self.sandbox_namespace);
        make_namespace(sb)?;
        let etc = self.sandbox_etc();
        std::fs::create_dir_all(&etc)
            .and_then(|()| {
                std::fs::write(
                    etc.join("resolv.conf"),
                    "# No DNS in a Tollgate sandbox: the gateway resolves names.\n",
                )
            })
            .map_err(|source| NetworkError::Resolver {
                path: etc.clone(),
                source,
            })?;
        run(
            "ip",
            &[
                "link",
                "add",
                HOST_DEVICE,
                "netns",
                gw,
                "type",
                "veth",
                "peer",
                "name",
                SANDBOX_DEVICE,
                "netns",
                sb,
            ],
            None,
        )?;
        self.address_host_device()?;
        let sandbox = format!("{SANDBOX_ADDRESS}/30");
        run(
            "ip",
            &["-n", sb, "addr", "add", &sandbox, "dev", SANDBOX_DEVICE],
            None,
        )?;
        run("ip", &["-n", sb, "link", "set", SANDBOX_DEVICE, "up"], None)?;
        let via = HOST_ADDRESS.to_string();
        run(
            "ip",
            &["-n", sb, "route", "add", "default", "via", &via],
            None,
        )?;
        tracing::info!(namespace = %gw, sandbox = %sb, "sandbox network created");
        Ok(())
    }

    /// `/etc/netns/<sandbox namespace>`: `ip netns exec` shows the files in it over `/etc`.
    fn sandbox_etc(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.sandbox_namespace)
    }

    /// Removes both namespaces (and with them the pair or tap and the rules), after ending
    /// every process still inside them: a process keeps its namespace alive after the name is
    /// gone. Removing what is already gone is not an error.
    pub fn destroy(&self) -> Result<(), NetworkError> {
        for ns in [&self.sandbox_namespace, &self.gateway_namespace] {
            if namespace_exists(ns) {
                kill_processes_in(ns);
                run("ip", &["netns", "delete", ns], None)?;
            }
        }
        let etc = self.sandbox_etc();
        if etc.exists() {
            std::fs::remove_dir_all(&etc).map_err(|source| NetworkError::Resolver {
                path: etc.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Whether either namespace exists.
    pub fn exists(&self) -> bool {
        namespace_exists(&self.gateway_namespace) || namespace_exists(&self.sandbox_namespace)
    }
}

/// Runs `f` on a thread of its own inside the network namespace at `namespace` (a
/// `/run/netns/…` path): sockets it binds and devices it opens belong to that namespace.
/// The calling thread's namespace is untouched.
pub fn in_namespace<T: Send>(
    namespace: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let target = std::fs::File::open(namespace)?;
                nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                f()
            })
            .join()
            .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    })
}

fn namespace_exists(name: &str) -> bool {
    PathBuf::from("/run/netns").join(name).exists()
}

/// A new namespace `ns` with IPv6 off and `lo` up.
fn make_namespace(ns: &str) -> Result<(), NetworkError> {
    run("ip", &["netns", "add", ns], None)?;
    disable_ipv6(ns)?;
    run("ip", &["-n", ns, "link", "set", "lo", "up"], None)
}

/// SIGKILLs every process in namespace `ns` (as `ip netns pids` lists them).
fn kill_processes_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        tracing::info!(
            namespace = ns,
            pid,
            "ending a process left in the sandbox's namespace"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// IPv6 off for every device of namespace `ns`, present and future.
fn disable_ipv6(ns: &str) -> Result<(), NetworkError> {
    // /proc/sys/net shows the namespace of the process reading it.
    let script = "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && \
                  echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6";
    run("ip", &["netns", "exec", ns, "sh", "-c", script], None)
}

/// Runs `program args`, feeding it `stdin`; an error carries the command and its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), NetworkError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let missing = |source| NetworkError::Missing {
        program: program.to_string(),
        source,
    };
    let mut child = command.spawn().map_err(missing)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(missing)?;
    }
    let output = child.wait_with_output().map_err(missing)?;
    if output.status.success() {
        return Ok(());
    }
    Err(NetworkError::Command {
        command: format!("{program} {}", args.join(" ")),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_that_cannot_name_a_namespace_are_refused() {
        for bad in ["", "A", "a b", "../x", "a/b", &"a".repeat(49)] {
            assert!(SandboxNetwork::new(bad, 3128).is_err(), "{bad:?}");
        }
        let net = SandboxNetwork::new("agent-7", 3128).expect("valid");
        assert_eq!(net.gateway_namespace(), "tg-agent-7");
        assert_eq!(net.sandbox_namespace(), "tg-agent-7-s");
        assert_eq!(
            net.gateway_namespace_path(),
            PathBuf::from("/run/netns/tg-agent-7")
        );
        assert_eq!(net.listen_address().to_string(), "10.200.1.1:3128");
    }

    #[test]
    fn the_ruleset_admits_only_new_connections_from_the_sandbox_to_the_gateway_port() {
        let rules = SandboxNetwork::new("a", 4128).expect("valid").ruleset();
        assert!(
            rules.contains("policy drop;\n\t\tiif \"lo\" accept"),
            "{rules}"
        );
        assert!(rules.contains(
            "iifname \"tgw0\" ip saddr 10.200.1.2 ip daddr 10.200.1.1 tcp dport 4128 ct state new accept"
        ));
        assert!(rules.contains(
            "chain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}"
        ));
        assert_eq!(rules.matches(" accept").count(), 3, "{rules}");
        assert!(!rules.contains("chain output"), "{rules}");
    }

    #[test]
    fn a_sessions_gateway_side_may_open_connections_to_its_guest_agent_only() {
        let net = SandboxNetwork::for_session("0123abcd", 3128, 999).expect("valid");
        assert_eq!(net.gateway_namespace(), "tgs-0123abcd");
        assert_eq!(net.sandbox_namespace(), "tgs-0123abcd-s");
        let rules = net.ruleset();
        let output = &rules[rules.find("chain output").expect("an output chain")..];
        assert!(output
            .contains("oifname \"tgw0\" ip daddr 10.200.1.2 tcp dport 999 ct state new accept"));
        assert!(
            output.trim_end().ends_with("oifname \"tgw0\" drop\n\t}\n}"),
            "everything else to the sandbox is dropped: {output}"
        );
        // The input side is the same as any sandbox's.
        assert!(rules.contains("tcp dport 3128 ct state new accept"));
        assert!(SandboxNetwork::for_session("../x", 3128, 999).is_err());
    }
}
