//! The guest image every microVM boots: Debian's kernel as an uncompressed `vmlinux` (QEMU
//! boots it directly through PVH, which saves seconds of in-guest decompression under
//! emulation) and an initramfs with busybox, curl and its libraries, the virtio modules and
//! the guest's init.
//!
//! Built from packages: the versioned kernel package that `linux-image-amd64` depends on
//! (downloaded with `apt-get download`, unpacked without installing it), `busybox-static` and
//! `curl` from the host. Sessions' VMs also get the read-only root file system of [`root`]
//! (Python and the shell tools), which their init switches into.

pub mod root;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::cpio::Archive;
use crate::guest::{init_script, DISK_MODULES, MODULES, ROOT_MODULES};
use root::{build_root, Compression, RootManifest, ROOT_FILE};

/// The image's kernel file, uncompressed: QEMU boots it directly (PVH).
pub const KERNEL_FILE: &str = "vmlinux";
/// The image's initramfs file, shared by every VM (each appends its own files to a copy).
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
/// The image's [`Manifest`], as JSON: what it was built from.
pub const MANIFEST_FILE: &str = "image.json";
/// The Debian package whose dependency names the current kernel package.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// What the guest runs: busybox (every basic tool) and a real HTTP client.
const GUEST_PROGRAMS: [(&str, &str); 2] = [("busybox", "busybox-static"), ("curl", "curl")];
/// xz's stream magic, where the compressed kernel starts inside a bzImage.
const XZ_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];

/// Why an image could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A program the build needs failed or is missing.
    #[error("{what}: {detail}")]
    Tool {
        /// What was being done, as the message's start (e.g. "finding the kernel package").
        what: String,
        /// What went wrong, with the fix where there is one.
        detail: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory that could not be read or written.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The image directory lacks a file.
    #[error("no guest image in {0}: build one with `tollgate-launcher image build`")]
    Missing(PathBuf),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What an image was built from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// The kernel package, e.g. `linux-image-6.1.0-56-amd64`.
    pub kernel_package: String,
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Bytes of `vmlinux`.
    pub kernel_bytes: u64,
    /// Bytes of the initramfs.
    pub initramfs_bytes: u64,
    /// The kernel modules in it (an image built before sessions had disks lists none).
    #[serde(default)]
    pub modules: Vec<String>,
    /// The sessions' root file system (none in an image built `--without-root`).
    #[serde(default)]
    pub root: Option<RootManifest>,
}

/// A built image, checked complete: its directory and what it was built from.
#[derive(Debug, Clone)]
pub struct Image {
    dir: PathBuf,
    /// What it was built from.
    pub manifest: Manifest,
}

impl Image {
    /// The image in `dir`, checked to be complete.
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let complete = [KERNEL_FILE, INITRAMFS_FILE, MANIFEST_FILE]
            .iter()
            .all(|f| dir.join(f).is_file());
        if !complete {
            return Err(ImageError::Missing(dir.to_path_buf()));
        }
        let text = std::fs::read_to_string(&manifest_path).map_err(io_error(&manifest_path))?;
        let manifest = serde_json::from_str(&text).map_err(|e| ImageError::Tool {
            what: format!("reading {}", manifest_path.display()),
            detail: format!("{e}; rebuild the image with `tollgate-launcher image build`"),
        })?;
        // QEMU runs from `/`: the paths it is given must be absolute.
        let dir = dir.canonicalize().map_err(io_error(dir))?;
        Ok(Image { dir, manifest })
    }

    /// The uncompressed kernel, which QEMU boots with `-kernel`.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(KERNEL_FILE)
    }

    /// The shared initramfs (each VM appends its own files to a copy).
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join(INITRAMFS_FILE)
    }

    /// The sessions' read-only root file system, if the image has one.
    pub fn root(&self) -> Option<PathBuf> {
        self.manifest.root.as_ref().map(|r| self.dir.join(&r.file))
    }
}

/// Where to build and where downloads are kept.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The image directory (created; made readable for the unprivileged VMM).
    pub out: PathBuf,
    /// Where the kernel package is downloaded to and found again.
    pub cache: PathBuf,
    /// Use only a kernel package already in the cache; never download.
    pub offline: bool,
    /// The sessions' root file system to build, or none (an image for `up` only).
    pub root: Option<RootOptions>,
}

/// What goes into the root file system.
#[derive(Debug, Clone)]
pub struct RootOptions {
    /// Debian packages, installed with their dependencies.
    pub packages: Vec<String>,
    /// How its files are stored.
    pub compression: Compression,
}

/// Builds the image into `options.out`.
pub fn build(options: &BuildOptions) -> Result<Image, ImageError> {
    if options.offline && options.root.is_some() {
        return Err(ImageError::Tool {
            what: "building the image offline".into(),
            detail: "the root file system is installed from the package mirror: drop --offline, or build an image for `up` only with --without-root".into(),
        });
    }
    let package = kernel_package()?;
    let deb = kernel_deb(&package, options)?;
    std::fs::create_dir_all(&options.out).map_err(io_error(&options.out))?;
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&options.out)
        .map_err(io_error(&options.out))?;
    let unpacked = unpack_kernel(&deb, work.path())?;

    let kernel_path = options.out.join(KERNEL_FILE);
    let vmlinuz = std::fs::read(&unpacked.vmlinuz).map_err(io_error(&unpacked.vmlinuz))?;
    let vmlinux = decompress_kernel(&vmlinuz)?;
    write_public(&kernel_path, &vmlinux)?;

    let initramfs = base_initramfs(&unpacked.modules)?;
    let initramfs_path = options.out.join(INITRAMFS_FILE);
    write_public(&initramfs_path, &initramfs)?;

    let root = match &options.root {
        Some(root) => Some(build_root(
            &root.packages,
            root.compression,
            work.path(),
            &options.out.join(ROOT_FILE),
        )?),
        None => {
            let stale = options.out.join(ROOT_FILE);
            let _ = std::fs::remove_file(&stale);
            None
        }
    };

    let manifest = Manifest {
        kernel_release: package
            .strip_prefix("linux-image-")
            .unwrap_or(&package)
            .to_string(),
        kernel_package: package,
        kernel_bytes: vmlinux.len() as u64,
        initramfs_bytes: initramfs.len() as u64,
        modules: all_modules().map(str::to_string).collect(),
        root,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::Tool {
        what: "writing the manifest".into(),
        detail: e.to_string(),
    })?;
    let manifest_path = options.out.join(MANIFEST_FILE);
    write_public(&manifest_path, &json)?;
    crate::workload::allow_traversal(&options.out).map_err(io_error(&options.out))?;
    Image::open(&options.out)
}

/// The versioned kernel package `linux-image-amd64` depends on.
fn kernel_package() -> Result<String, ImageError> {
    let out = output(
        "finding the kernel package",
        Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
    )?;
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| ImageError::Tool {
            what: "finding the kernel package".into(),
            detail: format!(
                "apt-cache names no linux-image-* dependency of {KERNEL_META_PACKAGE} (run apt-get update)"
            ),
        })
}

/// The kernel package's `.deb`, from the cache or downloaded into it.
fn kernel_deb(package: &str, options: &BuildOptions) -> Result<PathBuf, ImageError> {
    let cached = |dir: &Path| -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .collect();
        found.sort();
        found.pop()
    };
    if let Some(deb) = cached(&options.cache) {
        return Ok(deb);
    }
    if options.offline {
        return Err(ImageError::Tool {
            what: format!("finding {package}"),
            detail: format!(
                "not in {} and --offline forbids downloading it",
                options.cache.display()
            ),
        });
    }
    std::fs::create_dir_all(&options.cache).map_err(io_error(&options.cache))?;
    output(
        &format!("downloading {package}"),
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&options.cache),
    )?;
    cached(&options.cache).ok_or_else(|| ImageError::Tool {
        what: format!("downloading {package}"),
        detail: format!("apt-get left no .deb in {}", options.cache.display()),
    })
}

struct UnpackedKernel {
    vmlinuz: PathBuf,
    modules: Vec<(String, PathBuf)>,
}

/// Unpacks only the compressed kernel and the virtio modules from the package.
fn unpack_kernel(deb: &Path, into: &Path) -> Result<UnpackedKernel, ImageError> {
    let what = format!("unpacking {}", deb.display());
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool(&what, "dpkg-deb", e))?;
    let mut patterns = vec!["./boot/vmlinuz-*".to_string()];
    patterns.extend(all_modules().map(|m| format!("*/{m}.ko")));
    let tar_input = dpkg.stdout.take().map(Stdio::from).unwrap_or(Stdio::null());
    output(
        &what,
        Command::new("tar")
            .args(["-x", "-C"])
            .arg(into)
            .arg("--wildcards")
            .args(&patterns)
            .stdin(tar_input),
    )?;
    let dpkg = dpkg
        .wait_with_output()
        .map_err(|e| tool(&what, "dpkg-deb", e))?;
    if !dpkg.status.success() {
        return Err(ImageError::Tool {
            what,
            detail: String::from_utf8_lossy(&dpkg.stderr).trim().to_string(),
        });
    }
    let boot = into.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io_error(&boot))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ImageError::Tool {
            what: what.clone(),
            detail: "the package has no /boot/vmlinuz-*".into(),
        })?;
    let found = find_files(into);
    let modules = all_modules()
        .map(|m| {
            let file = format!("{m}.ko");
            found
                .iter()
                .find(|p| p.file_name().is_some_and(|n| n == file.as_str()))
                .map(|p| (m.to_string(), p.clone()))
                .ok_or_else(|| ImageError::Tool {
                    what: what.clone(),
                    detail: format!("the package has no {file}"),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(UnpackedKernel { vmlinuz, modules })
}

/// Every module the image carries: the network's (loaded at boot), a session disk's and the
/// root file system's.
fn all_modules() -> impl Iterator<Item = &'static str> {
    MODULES
        .iter()
        .chain(DISK_MODULES.iter())
        .chain(ROOT_MODULES.iter())
        .copied()
}

fn find_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// The ELF kernel inside a bzImage: the xz stream that starts at the first xz magic which
/// decompresses to an ELF file.
pub fn decompress_kernel(bzimage: &[u8]) -> Result<Vec<u8>, ImageError> {
    let what = "decompressing the kernel";
    let mut last = String::from("the kernel image holds no xz stream");
    for offset in bzimage
        .windows(XZ_MAGIC.len())
        .enumerate()
        .filter(|(_, w)| *w == XZ_MAGIC)
        .map(|(i, _)| i)
    {
        let mut xz = Command::new("xz")
            .args(["-dc", "--single-stream"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| tool(what, "xz", e))?;
        let input = bzimage[offset..].to_vec();
        let mut stdin = xz.stdin.take();
        let feeder = std::thread::spawn(move || {
            if let Some(pipe) = stdin.as_mut() {
                // xz stops reading after the stream: a broken pipe here is expected.
                let _ = pipe.write_all(&input);
            }
        });
        let mut elf = Vec::new();
        if let Some(mut out) = xz.stdout.take() {
            out.read_to_end(&mut elf).map_err(|e| tool(what, "xz", e))?;
        }
        let _ = xz.wait();
        let _ = feeder.join();
        if elf.starts_with(b"\x7fELF") {
            return Ok(elf);
        }
        last = format!("the xz stream at byte {offset} is not an ELF kernel");
    }
    Err(ImageError::Tool {
        what: what.into(),
        detail: last,
    })
}

/// The shared initramfs: directories, `/dev/console`, init, the modules, busybox and curl
/// with the libraries they load.
fn base_initramfs(modules: &[(String, PathBuf)]) -> Result<Vec<u8>, ImageError> {
    let mut archive = Archive::new();
    for dir in [
        "bin",
        "dev",
        "etc",
        "etc/ssl",
        "etc/ssl/certs",
        "lib",
        "lib/modules",
        "proc",
        "root",
        "sys",
        "tmp",
        "usr",
        "usr/bin",
    ] {
        archive.directory(dir);
    }
    archive.character_device("dev/console", 0o600, 5, 1);
    archive.file("init", 0o755, init_script().as_bytes());
    for (name, path) in modules {
        let data = std::fs::read(path).map_err(io_error(path))?;
        archive.file(&format!("lib/modules/{name}.ko"), 0o644, &data);
    }
    let mut added = std::collections::BTreeSet::new();
    for (program, package) in GUEST_PROGRAMS {
        let path = which(program).ok_or_else(|| ImageError::Tool {
            what: format!("adding {program} to the guest"),
            detail: format!("{program} is not installed (apt-get install -y {package})"),
        })?;
        let target = if program == "busybox" {
            "bin/busybox".to_string()
        } else {
            format!("usr/bin/{program}")
        };
        add_host_file(&mut archive, &path, &target, 0o755, &mut added)?;
        for library in shared_libraries(&path)? {
            let name = library
                .to_string_lossy()
                .trim_start_matches('/')
                .to_string();
            add_host_file(&mut archive, &library, &name, 0o755, &mut added)?;
        }
    }
    Ok(archive.finish())
}

/// Adds the host's file `from` (its contents, symlinks followed) as `to`, with the parent
/// directories it needs.
pub(crate) fn add_host_file(
    archive: &mut Archive,
    from: &Path,
    to: &str,
    mode: u32,
    added: &mut std::collections::BTreeSet<String>,
) -> Result<(), ImageError> {
    if !added.insert(to.to_string()) {
        return Ok(());
    }
    let mut parent = PathBuf::new();
    for part in Path::new(to)
        .parent()
        .into_iter()
        .flat_map(Path::components)
    {
        parent.push(part);
        let dir = parent.to_string_lossy().to_string();
        if added.insert(format!("{dir}/")) {
            archive.directory(&dir);
        }
    }
    let data = std::fs::read(from).map_err(io_error(from))?;
    archive.file(to, mode, &data);
    Ok(())
}

/// The shared libraries (and the loader) `program` needs, as `ldd` lists them; none for a
/// static program.
pub(crate) fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| tool("listing shared libraries", "ldd", e))?;
    // ldd fails on a static program ("not a dynamic executable"): nothing to add.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn which(program: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Writes `data` to `path` readable by everyone (the VMM runs unprivileged).
fn write_public(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension("part");
    let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(data).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    drop(file);
    set_mode(&tmp, 0o644)?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error(path))
}

fn tool(what: &str, program: &str, e: std::io::Error) -> ImageError {
    ImageError::Tool {
        what: what.to_string(),
        detail: format!("cannot run {program}: {e}"),
    }
}

/// Runs `command`; its stdout, or an error with its stderr.
fn output(what: &str, command: &mut Command) -> Result<Vec<u8>, ImageError> {
    let program = command.get_program().to_string_lossy().to_string();
    let out = command
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| tool(what, &program, e))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(ImageError::Tool {
        what: what.to_string(),
        detail: format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_is_the_first_xz_stream_that_holds_an_elf_file() {
        let compress = |data: &[u8]| {
            let mut xz = Command::new("xz")
                .args(["-c", "--check=crc32"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("xz");
            xz.stdin
                .take()
                .expect("stdin")
                .write_all(data)
                .expect("write");
            xz.wait_with_output().expect("xz").stdout
        };
        let elf = b"\x7fELF and the rest of a kernel".to_vec();
        // A setup header, a stream that is not ELF, the kernel, and trailing data.
        let mut bzimage = b"MZ setup code".to_vec();
        bzimage.extend(compress(b"not a kernel"));
        bzimage.extend(compress(&elf));
        bzimage.extend(b"trailer");
        assert_eq!(decompress_kernel(&bzimage).expect("kernel"), elf);
        assert!(decompress_kernel(b"no stream here").is_err());
    }

    #[test]
    fn a_missing_image_says_how_to_build_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Image::open(dir.path()).expect_err("empty");
        assert!(
            err.to_string().contains("tollgate-launcher image build"),
            "{err}"
        );
    }
}
