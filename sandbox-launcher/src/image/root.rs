//! The sessions' root file system: Debian's minimal base with the packages of
//! [`DEFAULT_PACKAGES`] (Python, its data libraries, the shell tools), made into one read-only
//! erofs image that every session's VM attaches as a read-only disk. A new session costs no
//! copy of it; the host's page cache holds one.
//!
//! Built with real package installs (debootstrap, then apt-get inside the tree from the
//! host's own apt sources, so security updates are in) rather than by unpacking `.deb`s:
//! maintainer scripts compile Python's bytecode and set up the libraries numpy loads. Then
//! what makes it a sandbox's image and not a Debian system: the package managers go, the
//! trust store becomes one link to the CA the session's VM is given at boot, and an
//! unprivileged account exists for executions.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::{io_error, output, set_mode, ImageError};
use crate::guest::{GUEST_CA_FILE, SESSION_MOUNT, SESSION_RUN_CA};

/// The default package list (`src/image/packages.txt`).
pub const DEFAULT_PACKAGES: &str = include_str!("packages.txt");

/// The root image's file name in the image directory.
pub const ROOT_FILE: &str = "root.erofs";

/// How the root image's files are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain blocks: nothing to decompress, about twice the size.
    None,
    /// LZ4 (high compression), decompressed by the guest's CPU: 172 MiB instead of 312 for
    /// the default list, and under emulation no slower to import pandas from (measured side
    /// by side, docs/benchmarks.md).
    #[default]
    Lz4hc,
}

/// What the root image holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootManifest {
    /// The image's file name in the image directory.
    pub file: String,
    /// Its size in bytes, as built.
    pub bytes: u64,
    /// How its files are stored.
    pub compression: Compression,
    /// The Debian suite it was built from.
    pub suite: String,
    /// The packages asked for, as `name=version`.
    pub packages: Vec<String>,
}

/// The package names in a package list: one per line, `#` comments and blank lines skipped.
pub fn parse_packages(list: &str) -> Result<Vec<String>, ImageError> {
    let mut names = Vec::new();
    for (number, line) in list.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        let valid = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
            && name.len() >= 2
            && name.as_bytes()[0].is_ascii_alphanumeric()
            // apt reads a trailing `-` as "remove" and `+` as "install".
            && !name.ends_with(['-', '+']);
        if !valid {
            return Err(ImageError::Tool {
                what: "reading the package list".into(),
                detail: format!("line {}: {name:?} is not a Debian package name", number + 1),
            });
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return Err(ImageError::Tool {
            what: "reading the package list".into(),
            detail: "it names no package".into(),
        });
    }
    Ok(names)
}

/// Where the base system comes from: the host's Debian suite and the apt source lines of the
/// distribution's own archive that serve it (security and updates included; no third-party
/// repository).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sources {
    suite: String,
    mirror: String,
    lines: Vec<String>,
}

impl Sources {
    /// The host's: its release's code name, and the sites apt fetches package lists from
    /// (`apt-get indextargets` lines `SITE RELEASE COMPONENT ORIGIN`).
    fn from_host() -> Result<Sources, ImageError> {
        let os_release = std::fs::read_to_string("/etc/os-release")
            .map_err(io_error(Path::new("/etc/os-release")))?;
        let suite = os_release
            .lines()
            .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
            .map(|s| s.trim_matches('"').to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ImageError::Tool {
                what: "finding the host's Debian release".into(),
                detail: "/etc/os-release names no VERSION_CODENAME".into(),
            })?;
        let distribution = os_release
            .lines()
            .find_map(|l| l.strip_prefix("ID="))
            .map(|s| s.trim_matches('"').to_string())
            .unwrap_or_else(|| "debian".into());
        let targets = output(
            "listing the host's apt sources",
            Command::new("apt-get").args([
                "indextargets",
                "--format",
                "$(SITE) $(RELEASE) $(COMPONENT) $(ORIGIN)",
                "Identifier: Packages",
            ]),
        )?;
        Sources::parse(&suite, &distribution, &String::from_utf8_lossy(&targets))
    }

    fn parse(suite: &str, distribution: &str, targets: &str) -> Result<Sources, ImageError> {
        let mut by_site: Vec<(String, String, Vec<String>)> = Vec::new();
        for line in targets.lines() {
            let mut words = line.split_whitespace();
            let (Some(site), Some(release), Some(component), Some(origin)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                continue;
            };
            // The distribution's own archive only: a third party's packages (and its keys,
            // which the tree does not have) stay out.
            if !origin.eq_ignore_ascii_case(distribution) {
                continue;
            }
            // Only this release's own suites (bookworm, bookworm-updates, bookworm-security).
            if release != suite && !release.starts_with(&format!("{suite}-")) {
                continue;
            }
            match by_site
                .iter_mut()
                .find(|(s, r, _)| s == site && r == release)
            {
                Some((_, _, components)) if !components.iter().any(|c| c == component) => {
                    components.push(component.to_string())
                }
                Some(_) => {}
                None => by_site.push((
                    site.to_string(),
                    release.to_string(),
                    vec![component.to_string()],
                )),
            }
        }
        let mirror = by_site
            .iter()
            .find(|(_, release, _)| release == suite)
            .map(|(site, _, _)| site.clone())
            .ok_or_else(|| ImageError::Tool {
                what: "finding a Debian mirror".into(),
                detail: format!(
                    "the host's apt sources serve no {suite} package list (run apt-get update)"
                ),
            })?;
        let lines = by_site
            .iter()
            .map(|(site, release, components)| {
                format!("deb {site} {release} {}", components.join(" "))
            })
            .collect();
        Ok(Sources {
            suite: suite.to_string(),
            mirror,
            lines,
        })
    }
}

/// Builds the root image from `packages` into `file`, in the scratch directory `work`.
pub fn build_root(
    packages: &[String],
    compression: Compression,
    work: &Path,
    file: &Path,
) -> Result<RootManifest, ImageError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::Tool {
            what: "building the root file system".into(),
            detail: "it needs root (debootstrap and chroot install real packages); or build an image for `up` only with --without-root".into(),
        });
    }
    for (program, package) in [
        ("debootstrap", "debootstrap"),
        ("mkfs.erofs", "erofs-utils"),
    ] {
        if super::which(program).is_none() {
            return Err(ImageError::Tool {
                what: "building the root file system".into(),
                detail: format!("{program} is missing (apt-get install -y {package})"),
            });
        }
    }
    let sources = Sources::from_host()?;
    let tree = work.join("root");
    let built = install_tree(&tree, &sources, packages);
    // debootstrap mounts /proc and /sys in the tree while it works: a run stopped half-way
    // must not leave them for the scratch directory's removal to walk into.
    unmount_below(&tree);
    let versions = built?;
    let mut mkfs = Command::new("mkfs.erofs");
    mkfs.args(["--quiet", "-x-1", "--all-root", "--preserve-mtime"]);
    if compression == Compression::Lz4hc {
        mkfs.arg("-zlz4hc");
    }
    let partial = file.with_extension("part");
    run("making the erofs image", mkfs.arg(&partial).arg(&tree))?;
    set_mode(&partial, 0o644)?;
    std::fs::rename(&partial, file).map_err(io_error(file))?;
    let bytes = std::fs::metadata(file).map_err(io_error(file))?.len();
    Ok(RootManifest {
        file: ROOT_FILE.to_string(),
        bytes,
        compression,
        suite: sources.suite,
        packages: String::from_utf8_lossy(&versions)
            .lines()
            .map(str::to_string)
            .collect(),
    })
}

/// The installed tree, made a sandbox's root; the versions of `packages` in it.
fn install_tree(
    tree: &Path,
    sources: &Sources,
    packages: &[String],
) -> Result<Vec<u8>, ImageError> {
    run(
        &format!("debootstrap {} from {}", sources.suite, sources.mirror),
        Command::new("debootstrap")
            .args(["--variant=minbase", "--force-check-gpg", &sources.suite])
            .arg(tree)
            .arg(&sources.mirror),
    )?;
    install_packages(tree, sources, packages)?;
    let versions = output(
        "listing the installed versions",
        Command::new("chroot")
            .arg(tree)
            .args(["dpkg-query", "-W", "-f", "${Package}=${Version}\\n"])
            .args(packages),
    )?;
    make_sandbox_tree(tree)?;
    Ok(versions)
}

/// Detaches every mount at or below `dir` (deepest first).
fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    // /proc/self/mounts names resolved, absolute paths (a space as `\040`: the tree's path
    // has none).
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    let prefix = dir.to_string_lossy().to_string();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `apt-get install` of `packages` inside `tree`, from the host's sources.
fn install_packages(tree: &Path, sources: &Sources, packages: &[String]) -> Result<(), ImageError> {
    let apt = tree.join("etc/apt");
    let list = apt.join("sources.list");
    write(&list, &format!("{}\n", sources.lines.join("\n")))?;
    // Name resolution for apt inside the tree (removed again below).
    let resolv = tree.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    std::fs::copy("/etc/resolv.conf", &resolv).map_err(io_error(&resolv))?;
    // No service a package brings is started while it is installed (the scripts run on the
    // host, chrooted); removed again with the rest of the package machinery.
    let policy = tree.join("usr/sbin/policy-rc.d");
    write(&policy, "#!/bin/sh\nexit 101\n")?;
    set_mode(&policy, 0o755)?;
    let in_tree = |args: &[&str]| {
        let mut command = Command::new("chroot");
        command
            .arg(tree)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        command
    };
    run(
        "apt-get update in the root file system",
        &mut in_tree(&["apt-get", "update", "-qq"]),
    )?;
    // Packages the base system has from the first mirror get their updates too.
    run(
        "apt-get upgrade in the root file system",
        &mut in_tree(&["apt-get", "upgrade", "-y", "-qq"]),
    )?;
    let mut install = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    install.extend(packages.iter().map(String::as_str));
    run(
        &format!("installing {} packages", packages.len()),
        &mut in_tree(&install),
    )
}

/// Turns the installed tree into a sandbox's root: no package manager, no documentation, the
/// gateway's CA as the only trust anchor, an account for executions, mount points.
fn make_sandbox_tree(tree: &Path) -> Result<(), ImageError> {
    // The package managers and what only they use. dpkg's status file stays as the record
    // of what is installed.
    for path in [
        "etc/apt",
        "usr/bin/apt",
        "usr/bin/apt-cache",
        "usr/bin/apt-cdrom",
        "usr/bin/apt-config",
        "usr/bin/apt-extracttemplates",
        "usr/bin/apt-ftparchive",
        "usr/bin/apt-get",
        "usr/bin/apt-key",
        "usr/bin/apt-mark",
        "usr/bin/apt-sortpkgs",
        "usr/lib/apt",
        "usr/sbin/policy-rc.d",
        "var/cache/apt",
        "var/lib/apt",
        "var/cache/debconf",
        "var/log",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "usr/share/ca-certificates",
        "etc/ssl/certs",
        "etc/resolv.conf",
    ] {
        remove(&tree.join(path))?;
    }
    for entry in std::fs::read_dir(tree.join("usr/bin"))
        .map_err(io_error(&tree.join("usr/bin")))?
        .filter_map(Result::ok)
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if name == "dpkg" || name.starts_with("dpkg-") || name.starts_with("pip") {
            remove(&entry.path())?;
        }
    }
    // No set-user-id or set-group-id program: executions stay who they are (the session's
    // init also mounts the image `nosuid`).
    strip_set_id_bits(tree)?;
    // The trust store: one link to the CA the session's VM brings (its `/run` is a tmpfs).
    // curl, git (GnuTLS), OpenSSL and so Python's ssl, and requests (Debian's certifi) read
    // this file by default.
    let certs = tree.join("etc/ssl/certs");
    std::fs::create_dir_all(&certs).map_err(io_error(&certs))?;
    symlink(
        SESSION_RUN_CA,
        &tree.join(GUEST_CA_FILE.trim_start_matches('/')),
    )?;
    let openssl_default = tree.join("usr/lib/ssl/cert.pem");
    if std::fs::symlink_metadata(&openssl_default).is_err() {
        std::fs::create_dir_all(tree.join("usr/lib/ssl")).map_err(io_error(tree))?;
        symlink(GUEST_CA_FILE, &openssl_default)?;
    }
    // Executions run as uid 1000; name it, for tools that ask (git, getpass, ~).
    append(
        &tree.join("etc/passwd"),
        &format!("sandbox:x:1000:1000:sandbox:{SESSION_MOUNT}/workspace:/bin/bash\n"),
    )?;
    append(&tree.join("etc/group"), "sandbox:x:1000:\n")?;
    write(&tree.join("etc/hostname"), "sandbox\n")?;
    // No resolver: names are resolved by the gateway, which is the only route out.
    write(&tree.join("etc/resolv.conf"), "")?;
    for dir in [SESSION_MOUNT, "/run", "/tmp", "/proc", "/sys", "/dev"] {
        let path = tree.join(dir.trim_start_matches('/'));
        std::fs::create_dir_all(&path).map_err(io_error(&path))?;
    }
    Ok(())
}

/// Clears the set-user-id and set-group-id bits of every file below `dir` (links not
/// followed).
fn strip_set_id_bits(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            let meta = std::fs::symlink_metadata(&path).map_err(io_error(&path))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && meta.permissions().mode() & 0o6000 != 0 {
                set_mode(&path, meta.permissions().mode() & 0o1777)?;
            }
        }
    }
    Ok(())
}

fn run(what: &str, command: &mut Command) -> Result<(), ImageError> {
    output(what, command).map(|_| ())
}

fn remove(path: &Path) -> Result<(), ImageError> {
    let result = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    result.map_err(io_error(path))
}

fn symlink(target: &str, link: &Path) -> Result<(), ImageError> {
    remove(link)?;
    std::os::unix::fs::symlink(target, link).map_err(io_error(link))
}

fn write(path: &Path, text: &str) -> Result<(), ImageError> {
    remove(path)?;
    std::fs::write(path, text).map_err(io_error(path))
}

fn append(path: &Path, line: &str) -> Result<(), ImageError> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(line.as_bytes()).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_list_has_python_its_libraries_and_the_shell_tools_and_no_package_manager() {
        let packages = parse_packages(DEFAULT_PACKAGES).expect("the default list");
        for wanted in [
            "python3",
            "python3-requests",
            "python3-numpy",
            "python3-pandas",
            "python3-yaml",
            "python3-dateutil",
            "bash",
            "coreutils",
            "curl",
            "jq",
            "git",
        ] {
            assert!(packages.iter().any(|p| p == wanted), "{wanted} is missing");
        }
        for unwanted in ["python3-pip", "pip", "apt", "python3-venv"] {
            assert!(!packages.iter().any(|p| p == unwanted), "{unwanted} is in");
        }
    }

    #[test]
    fn a_package_list_refuses_what_is_not_a_package_name() {
        assert_eq!(
            parse_packages("# c\n\njq  # the JSON tool\npython3\n").expect("list"),
            ["jq", "python3"]
        );
        for bad in [
            "",
            "# only a comment\n",
            "jq; rm -rf /\n",
            "--allow-unauthenticated\n",
            "Foo\n",
            "systemd-\n",
            "openssh-server+\n",
        ] {
            assert!(parse_packages(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mounts_left_in_the_tree_are_detached_before_it_is_removed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("root");
        let proc_dir = tree.join("proc");
        std::fs::create_dir_all(&proc_dir).expect("dirs");
        nix::mount::mount(
            Some("tmpfs"),
            &proc_dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount");
        let mounted = || {
            std::fs::read_to_string("/proc/self/mounts")
                .expect("mounts")
                .lines()
                .any(|l| l.split(' ').nth(1) == Some(proc_dir.to_str().expect("utf-8")))
        };
        assert!(mounted());
        std::fs::write(proc_dir.join("kept"), "x").expect("a file in the mount");
        unmount_below(&tree);
        assert!(!mounted());
        assert!(
            !proc_dir.join("kept").exists(),
            "the directory is the tree's own again"
        );
    }

    #[test]
    fn set_id_bits_are_cleared_and_other_bits_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("usr/bin");
        std::fs::create_dir_all(&bin).expect("dirs");
        for (name, mode) in [("su", 0o4755), ("wall", 0o2755), ("plain", 0o755)] {
            std::fs::write(bin.join(name), "").expect("file");
            set_mode(&bin.join(name), mode).expect("mode");
        }
        strip_set_id_bits(dir.path()).expect("strip");
        for name in ["su", "wall", "plain"] {
            let mode = std::fs::metadata(bin.join(name))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o755, "{name}");
        }
    }

    #[test]
    fn the_sources_are_the_hosts_suites_of_its_release() {
        let targets = "\
http://deb.debian.org/debian-security bookworm-security main Debian
http://deb.debian.org/debian bookworm-updates main Debian
http://deb.debian.org/debian bookworm main Debian
http://deb.debian.org/debian bookworm contrib Debian
http://deb.debian.org/debian bookworm main Debian
http://example.test/other stable main Other
http://example.test/pgdg bookworm-pgdg main PostgreSQL
";
        let sources = Sources::parse("bookworm", "debian", targets).expect("sources");
        assert_eq!(sources.mirror, "http://deb.debian.org/debian");
        assert_eq!(
            sources.lines,
            [
                "deb http://deb.debian.org/debian-security bookworm-security main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian bookworm main contrib",
            ]
        );
        let err = Sources::parse("trixie", "debian", targets).expect_err("no trixie");
        assert!(err.to_string().contains("apt-get update"), "{err}");
    }
}
