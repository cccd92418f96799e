//! Files of a session: read, written and listed only inside its workspace.
//!
//! A path is taken relative to the workspace (a leading `/` names the workspace's root). `..`
//! is refused outright, and every file is opened with `openat2(RESOLVE_BENEATH)` from the
//! workspace's own descriptor: the kernel refuses any resolution — a symbolic link the
//! workload planted, absolute or relative, or one swapped in while the path is walked — that
//! would leave the workspace.
//!
//! Every operation runs with the file-system identity of the workspace's user (`setfsuid`,
//! which holds for the calling thread alone): the agent, root, reads and writes only what
//! that user could — not a host file hard-linked into the workspace — and what it creates
//! belongs to that user. Nothing is opened in a way that can block (a FIFO the workload
//! planted is refused, not waited on), and only regular files are read or written.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use serde::Serialize;

use crate::exec::RunAs;

/// Why a file operation was refused or failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    /// The path is not one the workspace can have.
    #[error("{0}")]
    Invalid(String),
    /// The path resolves outside the workspace (through `..` or a symbolic link).
    #[error("the path leads outside the session's workspace")]
    Escapes,
    /// Nothing there.
    #[error("no such file or directory in the workspace")]
    NotFound,
    /// Not what the operation needs (a directory to read as a file, …).
    #[error("{0}")]
    WrongKind(String),
    /// Larger than the agent serves.
    #[error("the file is larger than {0} bytes")]
    TooLarge(u64),
    /// The workspace's user may not read or write it.
    #[error("the session's user may not do that to this file")]
    Denied,
    /// Another I/O failure, with the system's message (500).
    #[error("{0}")]
    Io(String),
}

impl FileError {
    /// The HTTP status the service is answered with.
    pub fn status(&self) -> u16 {
        match self {
            FileError::Invalid(_) | FileError::WrongKind(_) => 400,
            FileError::Escapes | FileError::Denied => 403,
            FileError::NotFound => 404,
            FileError::TooLarge(_) => 413,
            FileError::Io(_) => 500,
        }
    }
}

impl From<Errno> for FileError {
    fn from(e: Errno) -> Self {
        match e {
            Errno::EXDEV | Errno::ELOOP => FileError::Escapes,
            Errno::ENOENT => FileError::NotFound,
            Errno::EACCES | Errno::EPERM => FileError::Denied,
            // A FIFO without a reader, a device without its driver: opened without waiting.
            Errno::ENXIO | Errno::ENODEV => FileError::WrongKind("not a regular file".into()),
            Errno::EISDIR => FileError::WrongKind("it is a directory".into()),
            Errno::ENOTDIR => FileError::WrongKind("a part of the path is not a directory".into()),
            other => FileError::Io(other.desc().to_string()),
        }
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// Its name in the listed directory (not a path).
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    /// Its size in bytes (files only).
    pub size: u64,
}

/// A session's workspace: every path is resolved beneath it, never out through `..` or a link.
#[derive(Debug)]
pub struct Workspace {
    root: OwnedFd,
    owner: Option<RunAs>,
    max_file_bytes: u64,
}

impl Workspace {
    /// The workspace at `path`; files created in it are given to `owner`.
    pub fn open(path: &Path, owner: Option<RunAs>, max_file_bytes: u64) -> Result<Self, FileError> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Workspace {
            root,
            owner,
            max_file_bytes,
        })
    }

    /// A file's contents, read as the workspace's owner; larger than the limit: `TooLarge`.
    pub fn read(&self, path: &str) -> Result<Vec<u8>, FileError> {
        self.as_owner(|| self.read_as_owner(path))
    }

    fn read_as_owner(&self, path: &str) -> Result<Vec<u8>, FileError> {
        let fd = self.open_beneath(
            &relative(path)?,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
        )?;
        regular(&fd)?;
        let stat = nix::sys::stat::fstat(&fd)?;
        if stat.st_size as u64 > self.max_file_bytes {
            return Err(FileError::TooLarge(self.max_file_bytes));
        }
        let mut bytes = Vec::with_capacity(stat.st_size as usize);
        std::fs::File::from(fd)
            .take(self.max_file_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| FileError::Io(e.to_string()))?;
        if bytes.len() as u64 > self.max_file_bytes {
            return Err(FileError::TooLarge(self.max_file_bytes));
        }
        Ok(bytes)
    }

    /// Writes `bytes` as the file at `path` (replacing it), making its directories.
    pub fn write(&self, path: &str, bytes: &[u8]) -> Result<(), FileError> {
        self.as_owner(|| self.write_as_owner(path, bytes))
    }

    fn write_as_owner(&self, path: &str, bytes: &[u8]) -> Result<(), FileError> {
        if bytes.len() as u64 > self.max_file_bytes {
            return Err(FileError::TooLarge(self.max_file_bytes));
        }
        let rel = relative(path)?;
        let (parents, name) = match rel.rsplit_once('/') {
            Some((parents, name)) => (Some(parents), name),
            None => (None, rel.as_str()),
        };
        if name == "." {
            return Err(FileError::Invalid("name a file, not the workspace".into()));
        }
        let mut dir = self.open_beneath(".", OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())?;
        for part in parents.into_iter().flat_map(|p| p.split('/')) {
            match nix::sys::stat::mkdirat(&dir, part, Mode::from_bits_truncate(0o755)) {
                Ok(()) => {
                    dir = openat2(
                        &dir,
                        part,
                        how(
                            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                            Mode::empty(),
                        ),
                    )?;
                }
                Err(Errno::EEXIST) => {
                    dir = openat2(
                        &dir,
                        part,
                        how(OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()),
                    )?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Truncated only once it is known to be a regular file.
        let fd = openat2(
            &dir,
            name,
            how(
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_NONBLOCK
                    | OFlag::O_NOCTTY,
                Mode::from_bits_truncate(0o644),
            ),
        )?;
        regular(&fd)?;
        nix::unistd::ftruncate(&fd, 0)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| FileError::Io(e.to_string()))
    }

    /// The entries of the directory at `path`, by name.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>, FileError> {
        self.as_owner(|| self.list_as_owner(path))
    }

    fn list_as_owner(&self, path: &str) -> Result<Vec<Entry>, FileError> {
        let fd = self.open_beneath(
            &relative(path)?,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )?;
        let mut dir = nix::dir::Dir::from_fd(fd)?;
        let dir_fd = dir
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| FileError::Io(e.to_string()))?;
        let mut entries = Vec::new();
        for entry in dir.iter() {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let stat = nix::sys::stat::fstatat(
                &dir_fd,
                entry.file_name(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            let kind = match stat.st_mode & libc::S_IFMT {
                libc::S_IFREG => "file",
                libc::S_IFDIR => "dir",
                libc::S_IFLNK => "symlink",
                _ => "other",
            };
            let size = if kind == "file" {
                stat.st_size as u64
            } else {
                0
            };
            entries.push(Entry { name, kind, size });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn open_beneath(&self, rel: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, FileError> {
        Ok(openat2(&self.root, rel, how(flags, mode))?)
    }

    /// Runs `operation` with the workspace user's file-system identity on this thread (the
    /// agent's own when it has no other user), and takes the agent's back after it.
    fn as_owner<T>(
        &self,
        operation: impl FnOnce() -> Result<T, FileError>,
    ) -> Result<T, FileError> {
        let Some(owner) = self.owner else {
            return operation();
        };
        let (uid, gid) = (
            nix::unistd::Uid::from_raw(owner.uid),
            nix::unistd::Gid::from_raw(owner.gid),
        );
        let old_gid = nix::unistd::setfsgid(gid);
        let old_uid = nix::unistd::setfsuid(uid);
        let done = operation();
        nix::unistd::setfsuid(old_uid);
        nix::unistd::setfsgid(old_gid);
        done
    }
}

/// Refuses what is not a regular file (a directory, a FIFO, a device, …).
fn regular(fd: &OwnedFd) -> Result<(), FileError> {
    let stat = nix::sys::stat::fstat(fd)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(FileError::WrongKind("not a regular file".into()));
    }
    Ok(())
}

/// How every path is resolved: beneath the starting directory, never through /proc's magic
/// links.
fn how(flags: OFlag, mode: Mode) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// `path` relative to the workspace: `.` for its root; `..`, NUL and empty names refused.
fn relative(path: &str) -> Result<String, FileError> {
    if path.contains('\0') {
        return Err(FileError::Invalid("the path has a NUL byte".into()));
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(FileError::Escapes);
    }
    Ok(match parts.is_empty() {
        true => ".".to_string(),
        false => parts.join("/"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_read_and_listed_inside_the_workspace_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ws");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret"), "outside").unwrap();
        let ws = Workspace::open(&root, None, 100).unwrap();
        ws.write("/a/b/c.txt", b"hello").unwrap();
        assert_eq!(ws.read("a/b/c.txt").unwrap(), b"hello");
        assert_eq!(ws.read("./a//b/c.txt").unwrap(), b"hello");
        let listed = ws.list("/").unwrap();
        assert_eq!(
            listed,
            [Entry {
                name: "a".into(),
                kind: "dir",
                size: 0
            }]
        );
        assert_eq!(ws.list("a/b").unwrap()[0].size, 5);
        // Ways out, all refused.
        assert_eq!(ws.read("../secret"), Err(FileError::Escapes));
        assert_eq!(ws.write("a/../../secret", b"x"), Err(FileError::Escapes));
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("rel")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        assert_eq!(ws.read("link"), Err(FileError::Escapes));
        assert_eq!(ws.read("rel"), Err(FileError::Escapes));
        assert_eq!(ws.read("up/secret"), Err(FileError::Escapes));
        assert_eq!(ws.write("up/new", b"x"), Err(FileError::Escapes));
        assert!(
            ws.write("link", b"x").is_err(),
            "a write through a planted link"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("secret")).unwrap(),
            "outside"
        );
        assert!(!dir.path().join("new").exists());
        // A link that stays inside is followed.
        std::os::unix::fs::symlink("a/b/c.txt", root.join("inside")).unwrap();
        assert_eq!(ws.read("inside").unwrap(), b"hello");
        // Bounds and kinds.
        assert_eq!(ws.write("big", &[0; 101]), Err(FileError::TooLarge(100)));
        assert_eq!(ws.read("nope"), Err(FileError::NotFound));
        assert!(matches!(ws.read("a"), Err(FileError::WrongKind(_))));
    }
}
