//! An answer that carries its request's token back is never relayed.
//!
//! The sandbox chooses the request, so it can ask a covered origin for anything that echoes
//! the request (a debug route, `TRACE` — refused earlier — or an API that returns what it was
//! sent): the injected token would come back to the very sandbox that must never hold it. The
//! gateway scans what the origin answers for the exact token value before relaying it:
//!
//! - the header and the first `credentials.reflection_scan_bytes` of the body are read and
//!   scanned before anything is relayed: a match there is `502 credential_reflected`;
//! - the rest of the body is scanned chunk by chunk before each chunk is relayed (with the
//!   token's length less one byte carried over, so a token split across chunks is found): a
//!   match there ends the answer short and closes the connection, the token's bytes unsent.
//!
//! Only the token's exact bytes are recognised: an origin that re-encodes what it echoes
//! (base64, escaping) is not, and tokened requests ask for `Accept-Encoding: identity` so an
//! origin that honours it does not compress. The cost is one substring search (`memchr`'s
//! SIMD `memmem`) per header value and over the body of each answer to a tokened request:
//! `cargo bench -p tollgate-gateway --bench credentials` measures it.

use pingora::http::ResponseHeader;

use super::Secret;

/// Scans one answer for one token.
pub struct ReflectionScan {
    /// The token (its searcher is built once per token and kept with it).
    token: Secret,
    /// The end of what was scanned so far (up to the token's length less one byte), so a
    /// token split across two chunks is still found.
    tail: Vec<u8>,
}

impl ReflectionScan {
    /// A scan for `token`; `None` for an empty token (nothing to find).
    pub fn new(token: &Secret) -> Option<ReflectionScan> {
        if token.expose().is_empty() {
            return None;
        }
        Some(ReflectionScan {
            token: token.clone(),
            tail: Vec::new(),
        })
    }

    /// Whether any header value (or name) of `header` contains the token.
    pub fn header_reflects(&self, header: &ResponseHeader) -> bool {
        let finder = self.token.finder();
        header.headers.iter().any(|(name, value)| {
            finder.find(value.as_bytes()).is_some()
                || finder.find(name.as_str().as_bytes()).is_some()
        })
    }

    /// Whether the token occurs in the body scanned so far once `chunk` is added.
    pub fn body_reflects(&mut self, chunk: &[u8]) -> bool {
        let finder = self.token.finder();
        if finder.find(chunk).is_some() {
            return true;
        }
        let keep = finder.needle().len() - 1;
        if keep == 0 {
            return false;
        }
        // Across the boundary: the carried tail and the start of this chunk.
        if !self.tail.is_empty() {
            let start = &chunk[..chunk.len().min(keep)];
            let mut seam = Vec::with_capacity(self.tail.len() + start.len());
            seam.extend_from_slice(&self.tail);
            seam.extend_from_slice(start);
            if finder.find(&seam).is_some() {
                return true;
            }
        }
        if chunk.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else {
            self.tail.extend_from_slice(chunk);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(token: &str) -> ReflectionScan {
        ReflectionScan::new(&Secret::new(token.into())).unwrap()
    }

    #[test]
    fn a_token_in_any_header_value_is_found() {
        let s = scan("tok-123456");
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.insert_header("x-echo", "Bearer tok-123456").unwrap();
        assert!(s.header_reflects(&header));
        let mut clean = ResponseHeader::build(200, None).unwrap();
        clean.insert_header("x-echo", "Bearer tok-12345").unwrap();
        assert!(!s.header_reflects(&clean));
    }

    #[test]
    fn a_token_split_across_chunks_is_found_wherever_it_falls() {
        let token = "secret-token-value";
        let body = format!("{}{token}{}", "a".repeat(100), "b".repeat(50));
        for first in 0..body.len() {
            for second in first..body.len() {
                let mut s = scan(token);
                let chunks = [&body[..first], &body[first..second], &body[second..]];
                assert!(
                    chunks.iter().any(|c| s.body_reflects(c.as_bytes())),
                    "split at {first} and {second}"
                );
            }
        }
        // Byte by byte.
        let mut s = scan(token);
        assert!(body.as_bytes().chunks(1).any(|c| s.body_reflects(c)));
    }

    #[test]
    fn a_body_without_the_whole_token_is_not_flagged() {
        let mut s = scan("secret-token-value");
        for chunk in [
            "secret-token-valu",
            "x",
            "secret-",
            "token-valuX",
            "ecret-token-value",
        ] {
            assert!(!s.body_reflects(chunk.as_bytes()), "{chunk}");
        }
        assert!(ReflectionScan::new(&Secret::new(String::new())).is_none());
        let mut one = scan("q");
        assert!(!one.body_reflects(b"abc"));
        assert!(one.body_reflects(b"xqz"));
    }
}
