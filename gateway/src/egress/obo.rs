//! On-behalf-of tokens at rest: sealed with ChaCha20-Poly1305 before they reach the store.
//!
//! An approver may lend their own token (OBO) with an approval. The store keeps it only
//! sealed, bound to its approval id (the AEAD's associated data), so a sealed token copied onto
//! another record does not open. The key is 32 random bytes: from `TOLLGATE_OBO_KEY` (64 hex
//! characters) or a file in the data directory (mode 0600, created on first start).

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};

use crate::datadir::{self, FileError};
use crate::egress::credentials::Secret;

/// The environment variable that may hold the key (hex), instead of the key file.
pub const KEY_ENV: &str = "TOLLGATE_OBO_KEY";

/// Why the sealing key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file.
    #[error(transparent)]
    File(#[from] FileError),
    /// The key is not 64 hex characters.
    #[error("the OBO sealing key from {0} must be 64 hex characters (32 bytes)")]
    BadKey(String),
}

/// Seals and opens on-behalf-of tokens.
pub struct OboSealer {
    key: LessSafeKey,
}

impl OboSealer {
    /// The sealer with the key from `TOLLGATE_OBO_KEY`, else from `key_file` (created if
    /// missing).
    pub fn load(key_file: &Path) -> Result<OboSealer, SealError> {
        let (hex_key, origin) = match std::env::var(KEY_ENV) {
            Ok(value) => (value, KEY_ENV.to_string()),
            Err(_) => (
                datadir::load_or_create_token(key_file)?.0,
                key_file.display().to_string(),
            ),
        };
        let bytes = hex::decode(hex_key.trim()).map_err(|_| SealError::BadKey(origin.clone()))?;
        let key =
            UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| SealError::BadKey(origin))?;
        Ok(OboSealer {
            key: LessSafeKey::new(key),
        })
    }

    /// Seals `token` for approval `approval_id`: a random nonce followed by the ciphertext
    /// and tag.
    pub fn seal(&self, token: &Secret, approval_id: &str) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut sealed = token.expose().as_bytes().to_vec();
        let nonce = Nonce::assume_unique_for_key(nonce_bytes);
        // Sealing fails only for inputs near 2^38 bytes; a token never is.
        if self
            .key
            .seal_in_place_append_tag(nonce, Aad::from(approval_id.as_bytes()), &mut sealed)
            .is_err()
        {
            return Vec::new();
        }
        [nonce_bytes.as_slice(), &sealed].concat()
    }

    /// Opens a token sealed for `approval_id`; `None` if it was not (or was altered).
    pub fn open(&self, sealed: &[u8], approval_id: &str) -> Option<Secret> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(approval_id.as_bytes()), &mut buffer)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok().map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_opens_only_for_its_approval_and_hides_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = OboSealer::load(&dir.path().join("obo-key")).unwrap();
        let token = Secret::new("person-token-123".into());
        let sealed = sealer.seal(&token, "ap-1");
        assert!(!sealed
            .windows(b"person-token-123".len())
            .any(|w| w == b"person-token-123"));
        assert_eq!(
            sealer.open(&sealed, "ap-1").map(|s| s.expose().to_string()),
            Some("person-token-123".to_string())
        );
        assert!(sealer.open(&sealed, "ap-2").is_none());
        let mut altered = sealed.clone();
        if let Some(last) = altered.last_mut() {
            *last ^= 1;
        }
        assert!(sealer.open(&altered, "ap-1").is_none());

        // The key file is reused: a second sealer opens what the first sealed.
        let again = OboSealer::load(&dir.path().join("obo-key")).unwrap();
        assert!(again.open(&sealed, "ap-1").is_some());
    }
}
