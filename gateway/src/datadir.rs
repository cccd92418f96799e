//! The data directory and the secret files in it.
//!
//! Everything the gateway keeps on disk that an attacker could use — the CA key, the admin
//! token — is written with mode 0600 from the first byte (no window in which it is readable),
//! and never overwritten: an existing file is reused, so restarts keep the same CA and token.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a file in the data directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct FileError {
    /// What failed, as the start of the message, e.g. "cannot write".
    pub action: &'static str,
    /// The file or directory it failed on.
    pub path: PathBuf,
    /// What the operating system said.
    pub source: std::io::Error,
}

/// Creates the data directory (mode 0700) if it does not exist.
pub fn ensure_dir(path: &Path) -> Result<(), FileError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| FileError {
            action: "cannot create directory",
            path: path.into(),
            source,
        })
}

/// Writes a file that must not exist yet, with `mode` from the first byte on, and syncs it.
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let io_err = |source| FileError {
        action: "cannot write",
        path: path.into(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

/// Reads a secret file, warning when other users could read it too.
pub fn read_secret(path: &Path) -> Result<String, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError {
        action: "cannot read",
        path: path.into(),
        source,
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "secret file is readable by other users; chmod 600 it");
        }
    }
    Ok(text)
}

/// Returns the admin token stored at `path`, creating a random one (0600) if it is missing.
/// Returns the token and whether it was created.
pub fn load_or_create_token(path: &Path) -> Result<(String, bool), FileError> {
    if path.exists() {
        let token = read_secret(path)?.trim().to_string();
        if token.len() < 16 {
            return Err(FileError {
                action: "refusing to use",
                path: path.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the admin token must be at least 16 characters",
                ),
            });
        }
        return Ok((token, false));
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_new_file(path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok((token, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        let (first, created) = load_or_create_token(&path).unwrap();
        assert!(created);
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, created) = load_or_create_token(&path).unwrap();
        assert!(!created);
        assert_eq!(first, second);
    }

    #[test]
    fn a_short_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        std::fs::write(&path, "short\n").unwrap();
        assert!(load_or_create_token(&path).is_err());
    }
}
