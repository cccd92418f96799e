//! The microVM backend: each session is a QEMU microVM of its own, booted from the shared
//! guest image with the session's files appended (its environment, the gateway's CA, the
//! guest agent's secret, the guest agent). Its root is the image's read-only root file system
//! (Python, the shell tools), one file every session's VM attaches read-only; its workspace
//! is a disk image of its own (ext4 on a sparse file, mounted at `/session`); its network a
//! tap in the session's namespace.
//!
//! QEMU runs as the session's own user id (so no session's VMM can open another's disk or
//! initramfs), unprivileged and with `-sandbox on`. In the guest the agent runs as root and
//! executions as an unprivileged user.

use std::path::{Path, PathBuf};

use super::config::{AccelChoiceArg, ServiceConfig};
use super::error::ServiceError;
use super::sandbox::{agent_options, blocking, SandboxContext, GUEST_PORT};
use super::session::{SessionDir, SessionRecord};
use crate::guest::{session_files, SessionGuest, DISK_MODULES, ROOT_MODULES};
use crate::image::Image;
use crate::network::{SandboxNetwork, HOST_ADDRESS, SANDBOX_ADDRESS};
use crate::tap::Tap;
use crate::vmm::{choose_accel, Accel, VmSpec, QEMU};
use crate::workload::RunAs;

/// The file system tool the workspace disks are made with.
const MKFS: &str = "mkfs.ext4";

/// The microVM backend's image and accelerator, chosen once at the service's start.
#[derive(Debug, Clone)]
pub struct Vm {
    /// The guest image every session's VM boots (checked to have the disk modules).
    pub image: Image,
    /// How the VMs' CPUs are run, chosen once (a probe boot under `auto`).
    pub accel: Accel,
}

impl Vm {
    /// Checks what the backend needs (QEMU, `mkfs.ext4`, an image with the disk modules)
    /// and chooses the accelerator (a probe boot under `auto`, remembered for the host's
    /// boot in the data directory).
    pub fn prepare(config: &ServiceConfig) -> Result<Vm, String> {
        if find_program(QEMU).is_none() {
            return Err(format!(
                "{QEMU} is missing (apt-get install -y qemu-system-x86), or run sessions without it: --backend netns"
            ));
        }
        if find_program(MKFS).is_none() {
            return Err(format!("{MKFS} is missing (apt-get install -y e2fsprogs)"));
        }
        let image = Image::open(&config.image).map_err(|e| e.to_string())?;
        if let Some(missing) = DISK_MODULES
            .iter()
            .chain(ROOT_MODULES.iter())
            .find(|m| !image.manifest.modules.iter().any(|have| have == *m))
        {
            return Err(format!(
                "the guest image in {} has no {missing} module (it predates sessions' disks): rebuild it with `tollgate-launcher image build`",
                config.image.display()
            ));
        }
        match image.root() {
            Some(root) if root.is_file() => {}
            _ => {
                return Err(format!(
                    "the guest image in {} has no root file system (built --without-root, or before sessions had Python): rebuild it with `tollgate-launcher image build`",
                    config.image.display()
                ))
            }
        }
        let accel = match config.accel {
            AccelChoiceArg::Kvm => Accel::Kvm,
            AccelChoiceArg::Tcg => Accel::Tcg,
            AccelChoiceArg::Auto => {
                let probe_user = RunAs {
                    uid: config.uid_base,
                    gid: config.uid_base,
                    device_group: None,
                };
                choose_accel(&image, probe_user, &config.data_dir.join("accel.json"))
            }
        };
        Ok(Vm { image, accel })
    }
}

/// Boots the session's VM in its namespace, wired to `tap`; returns QEMU's pid.
pub async fn spawn(
    context: &SandboxContext,
    vm: &Vm,
    net: &SandboxNetwork,
    dir: &SessionDir,
    record: &SessionRecord,
    secret: &str,
    tap: Tap,
) -> Result<u32, ServiceError> {
    let config = &context.config;
    let proxy = format!("http://{HOST_ADDRESS}:{}", config.gateway_port);
    let guest_agent = context.guest_agent.clone();
    let files = session_files(&SessionGuest {
        agent: &record.agent,
        thread: &record.thread,
        proxy_url: &proxy,
        ca_pem: &context.ca_pem,
        secret,
        guest_agent: &guest_agent,
        listen: (SANDBOX_ADDRESS, GUEST_PORT).into(),
        agent_options: agent_options(config),
    })
    .map_err(|e| ServiceError::Sandbox(format!("cannot make the VM's files: {e}")))?;
    let (vm, dir, namespace) = (vm.clone(), dir.clone(), net.gateway_namespace().to_string());
    let (uid, memory_mib, disk_mib) = (record.uid, config.memory_mib, config.disk_mib);
    blocking(move || -> Result<u32, String> {
        let user = RunAs {
            uid,
            gid: uid,
            device_group: None,
        };
        let disk = dir.disk();
        ensure_disk(&disk, disk_mib, user)?;
        let mut initrd = std::fs::read(vm.image.initramfs())
            .map_err(|e| format!("{}: {e}", vm.image.initramfs().display()))?;
        initrd.extend(files);
        write_owned(&dir.initrd(), &initrd, user)?;
        let root = vm.image.root();
        let spec = VmSpec {
            image: &vm.image,
            initrd: &dir.initrd(),
            root: root.as_deref(),
            memory_mib,
            accel: vm.accel,
            tap_fd: Some(tap.fd()),
            kernel_parameters: Vec::new(),
            disk: Some(&disk),
        };
        let mut qemu = spec
            .spawn(
                Some(&namespace),
                user,
                (&dir.console(), &dir.vmm_log()),
                Some(&tap),
            )
            .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
        // QEMU holds the tap now; the service's copy goes.
        drop(tap);
        let pid = qemu.id();
        // Reaped when it ends; stopped through its process group.
        std::thread::spawn(move || qemu.wait());
        Ok(pid)
    })
    .await
    .map_err(ServiceError::Sandbox)
}

/// Makes the session's workspace disk if it has none: a sparse file of `mib` MiB with an
/// ext4 file system, the VMM's user's alone.
fn ensure_disk(disk: &Path, mib: u64, owner: RunAs) -> Result<(), String> {
    if disk.exists() {
        return Ok(());
    }
    let fail = |e: std::io::Error| format!("{}: {e}", disk.display());
    let partial = disk.with_extension("new");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(fail)?;
        file.set_len(mib << 20).map_err(fail)?;
    }
    let out = std::process::Command::new(find_program(MKFS).unwrap_or_else(|| MKFS.into()))
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-L",
            "workspace",
            "-E",
            "root_owner=0:0",
        ])
        .arg(&partial)
        .output()
        .map_err(|e| format!("cannot run {MKFS}: {e} (apt-get install -y e2fsprogs)"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(format!(
            "{MKFS} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    chown(&partial, owner)?;
    std::fs::rename(&partial, disk).map_err(fail)
}

/// Writes `data` to `path`, 0600 and owned by `owner` (the VMM's user).
fn write_owned(path: &Path, data: &[u8], owner: RunAs) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, data))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    chown(path, owner)
}

fn chown(path: &Path, owner: RunAs) -> Result<(), String> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(owner.uid)),
        Some(nix::unistd::Gid::from_raw(owner.gid)),
    )
    .map_err(|e| format!("{}: {e}", path.display()))
}

/// `program` in the directories system tools live in.
fn find_program(program: &str) -> Option<PathBuf> {
    ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}
