//! The processes of one user, found in `/proc`: how an execution's whole process tree is
//! ended after a timeout (a process that left the execution's process group with `setsid`
//! is still the session user's), and how a stopped session's user is left with nothing
//! running.
//!
//! A process is known by its pid and its start time together, so a pid reused by a new
//! process is never taken for the old one.

use std::collections::HashSet;

/// A process: its pid and its start time (clock ticks since boot).
pub type ProcessId = (i32, u64);

/// How many passes [`kill_user`] makes at most: each pass kills what it finds, and a process
/// can only add children until it is killed.
const MAX_PASSES: usize = 100;

/// The processes whose real user id is `uid`, now.
pub fn of_user(uid: u32) -> HashSet<ProcessId> {
    let mut found = HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((real_uid, start)) = identity(pid) {
            if real_uid == uid {
                found.insert((pid, start));
            }
        }
    }
    found
}

/// SIGKILLs every process of `uid` but those in `spared`, pass after pass until one finds
/// none (a process forking away from the kill is caught by the next pass). Returns how many
/// processes were killed (each counted once, however many passes found it still dying).
pub fn kill_user(uid: u32, spared: &HashSet<ProcessId>) -> usize {
    let mut killed: HashSet<ProcessId> = HashSet::new();
    for _ in 0..MAX_PASSES {
        let targets: Vec<ProcessId> = of_user(uid)
            .into_iter()
            .filter(|p| !spared.contains(p))
            .collect();
        if targets.is_empty() {
            break;
        }
        let mut new = false;
        for target in targets {
            let sent = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(target.0),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok();
            if sent && killed.insert(target) {
                new = true;
            }
        }
        if !new {
            // Only processes already killed and not yet gone (a busy machine takes a
            // moment): give them that moment rather than spin.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    killed.len()
}

/// A live (not zombie) process's real user id and start time.
fn identity(pid: i32) -> Option<(u32, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let real_uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold anything): state, then the
    // fields counted from there; the start time is field 22 of the line, 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let start = fields.nth(18)?.parse().ok()?;
    Some((real_uid, start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_users_processes_are_found_and_killed_unless_spared() {
        let me = of_user(nix::unistd::getuid().as_raw());
        assert!(
            me.iter().any(|(pid, _)| *pid == std::process::id() as i32),
            "this test's own process is found"
        );
        if !nix::unistd::getuid().is_root() {
            eprintln!("SKIP: killing a user's processes is tested as root, with a user of its own");
            return;
        }
        // A user id nothing else on the host has: killing all of its processes is safe.
        let uid = 2_900_000 + std::process::id() % 10_000;
        let spawn = || {
            std::process::Command::new("sleep")
                .arg("30")
                .uid(uid)
                .gid(uid)
                .spawn()
                .expect("sleep")
        };
        let (mut kept, mut killed) = (spawn(), spawn());
        let spared: HashSet<ProcessId> = of_user(uid)
            .into_iter()
            .filter(|(p, _)| *p == kept.id() as i32)
            .collect();
        assert_eq!(spared.len(), 1);
        assert_eq!(of_user(uid).len(), 2);
        assert_eq!(kill_user(uid, &spared), 1, "only the one not spared");
        assert!(!killed.wait().expect("wait").success());
        assert_eq!(of_user(uid), spared);
        assert_eq!(kill_user(uid, &HashSet::new()), 1);
        assert!(!kept.wait().expect("wait").success());
        assert!(of_user(uid).is_empty());
    }
}
