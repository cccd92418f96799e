//! An answer that carries its request's token back is never relayed.
//!
//! The sandbox chooses the request, so it can ask a covered origin for anything that echoes
//! the request (a debug route, `TRACE` — refused earlier — or an API that returns what it was
//! sent): the injected token would come back to the very sandbox that must never hold it. The
//! gateway scans what the origin answers for the exact token value before relaying it:
//!
//! - the header (names, without regard to case, since HTTP/1 carries them in the origin's;
//!   values; the reason phrase) and the first `credentials.reflection_scan_bytes` of the body
//!   are read and scanned before anything is relayed: a match there is
//!   `502 credential_reflected`;
//! - the rest of the body is scanned chunk by chunk before each chunk is relayed: a match ends
//!   the answer short and closes the connection, the token's bytes unsent;
//! - a token split across two reads is found too (the last bytes scanned are kept for the
//!   next read), and no part of it is relayed before it is: bytes at the end of a read that
//!   could be the token's start are withheld until the next read shows they are not. In a
//!   body that is any such bytes; in an upgraded connection (where holding back the end of a
//!   message could stall the conversation) runs of [`ReflectionScan::pipe_hold`] bytes or
//!   more ([`PIPE_HOLD`], fewer for a token shorter than twice that), measured over what was
//!   scanned (relayed bytes too), so at most one byte fewer of the token's start could cross
//!   there, however the stream is cut into reads. A body that ends with that many bytes or
//!   more of the token's start is cut short before them. (A WebSocket's frames are taken
//!   apart first: [`super::upgraded`].)
//!
//! Only the token's exact bytes are recognised: an origin that re-encodes what it echoes
//! (base64, escaping) is not, and tokened requests ask for `Accept-Encoding: identity` (and
//! no ranges) so an origin that honours them sends the bytes whole. The cost is one substring
//! search (`memchr`'s SIMD `memmem`) per header value and over the body of each answer to a
//! tokened request: `cargo bench -p tollgate-gateway --bench credentials` measures it.

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;

use super::Secret;

/// In an upgraded connection, the shortest run of the token's first bytes at the end of a
/// read that is held back until the next read, for a token of twice that length or more.
pub const PIPE_HOLD: usize = 8;

/// The shortest such run for any token: a run this long ends a message by chance about once
/// in 2^24 messages or more, so holding it cannot stall a conversation in practice.
const PIPE_HOLD_MIN: usize = 4;

/// The token was found: nothing more is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reflected;

/// Scans one answer for one token.
pub struct ReflectionScan {
    /// The token (its searcher is built once per token and kept with it).
    token: Secret,
    /// The end of what was scanned so far (up to the token's length less one byte), so a
    /// token split across two chunks is still found.
    tail: Vec<u8>,
    /// Scanned bytes not yet relayed: the end of what was read (so the end of `tail`), which
    /// is the start of the token.
    withheld: BytesMut,
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
            withheld: BytesMut::new(),
        })
    }

    /// A scan for the same token with nothing scanned yet.
    pub fn restarted(&self) -> ReflectionScan {
        ReflectionScan {
            token: self.token.clone(),
            tail: Vec::new(),
            withheld: BytesMut::new(),
        }
    }

    /// Whether any header name or value of `header`, or its reason phrase, contains the token.
    /// Names are compared without regard to case: the map holds them lowercased, but an
    /// HTTP/1 answer is written with the names in the origin's own case.
    pub fn header_reflects(&self, header: &ResponseHeader) -> bool {
        let finder = self.token.finder();
        let in_names = self.token.lowercase_finder();
        header
            .get_reason_phrase()
            .is_some_and(|r| finder.find(r.as_bytes()).is_some())
            || header.headers.iter().any(|(name, value)| {
                finder.find(value.as_bytes()).is_some()
                    || in_names.find(name.as_str().as_bytes()).is_some()
            })
    }

    /// Scans the body's next `chunk` and returns what may be relayed now (two pieces, either
    /// possibly empty: withheld bytes released, then the part of `chunk` that can go). A run
    /// of at least `hold` bytes at the end that is the token's start is withheld.
    pub fn pass(&mut self, chunk: Bytes, hold: usize) -> Result<[Bytes; 2], Reflected> {
        if self.body_reflects(&chunk) {
            return Err(Reflected);
        }
        // The run is measured over what was scanned, relayed bytes included: with `hold` above
        // one, a run's first bytes may have gone while it was shorter, and the rest of it must
        // still wait once it is `hold` long (so, read after read, no more than `hold - 1` of
        // the token's bytes go).
        let total = self.withheld.len() + chunk.len();
        let run = run_at_end(&self.tail, &self.token);
        let keep = if run >= hold.max(1) {
            run.min(total)
        } else {
            0
        };
        let release = total - keep;
        if release <= self.withheld.len() {
            let out = self.withheld.split_to(release).freeze();
            self.withheld.extend_from_slice(&chunk);
            return Ok([out, Bytes::new()]);
        }
        let out = self.withheld.split().freeze();
        let from_chunk = release - out.len();
        self.withheld.extend_from_slice(&chunk[from_chunk..]);
        Ok([out, chunk.slice(..from_chunk)])
    }

    /// In an upgraded connection, the shortest run of the token's first bytes at the end of a
    /// read that is held back: [`PIPE_HOLD`], or half a shorter token (at least
    /// `PIPE_HOLD_MIN`), so that fewer than half of a token of 8 to 15 bytes could cross.
    pub fn pipe_hold(&self) -> usize {
        (self.token.expose().len() / 2).clamp(PIPE_HOLD_MIN, PIPE_HOLD)
    }

    /// The end of the body: what is still withheld may go, unless it is
    /// [`ReflectionScan::pipe_hold`] bytes or more of the token's start (then the body is cut
    /// short before it).
    pub fn end(&mut self) -> Result<Bytes, Reflected> {
        if self.withheld.len() >= self.pipe_hold() {
            return Err(Reflected);
        }
        Ok(self.withheld.split().freeze())
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

/// The longest run at the end of `end` (shorter than `token`) that is `token`'s start.
/// Candidates are found by the token's first two bytes (a SIMD search whose searcher is
/// built once per token), so ordinary data costs one pass; a run of one byte is the last
/// byte alone. Every candidate is tried, overlapping ones too: the searcher's own iterator
/// skips past each match it reports, so for a token that starts `aab` the window `…aaab`
/// would show only the candidate that fails, and the run starting one byte later would go
/// out unwithheld.
fn run_at_end(end: &[u8], token: &Secret) -> usize {
    let bytes = token.expose().as_bytes();
    let matches_from = |at: usize| end[at..] == bytes[..end.len() - at];
    let mut longer = None;
    if bytes.len() >= 2 {
        let finder = token.start_finder();
        let mut from = 0;
        while let Some(found) = finder.find(&end[from..]) {
            if matches_from(from + found) {
                longer = Some(from + found);
                break;
            }
            from += found + 1;
        }
    }
    match longer {
        Some(at) => end.len() - at,
        None if end.last() == bytes.first() && !end.is_empty() => 1,
        None => 0,
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
    fn a_token_in_a_header_name_is_found_in_the_case_it_is_sent() {
        let token = "eyJhbGciOi.Tok-XYZ";
        let s = scan(token);
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.insert_header(format!("X-{token}"), "1").unwrap();
        // As the sandbox would get it over HTTP/1: the name in the origin's case.
        let mut wire = Vec::new();
        header.header_to_h1_wire(&mut wire);
        assert!(memchr::memmem::find(&wire, token.as_bytes()).is_some());
        assert!(s.header_reflects(&header));
        let mut clean = ResponseHeader::build(200, None).unwrap();
        clean.insert_header("X-eyJhbGciOi.Tok-XY", "1").unwrap();
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

    /// Feeds `body` in pieces split at `cuts`: what was relayed, up to where the token was
    /// found (all of it if it never was), and whether it was.
    fn feed(token: &str, body: &str, cuts: &[usize], hold: usize) -> (Vec<u8>, bool) {
        let mut s = scan(token);
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&body.len())) {
            let Ok(pieces) = s.pass(Bytes::copy_from_slice(&body.as_bytes()[from..to]), hold)
            else {
                return (out, true);
            };
            for piece in pieces {
                out.extend_from_slice(&piece);
            }
            from = to;
        }
        match s.end() {
            Ok(rest) => {
                out.extend_from_slice(&rest);
                (out, false)
            }
            Err(Reflected) => (out, true),
        }
    }

    /// What was relayed of `body` split at `cuts`, or `None` once the token was found.
    fn relayed(token: &str, body: &str, cuts: &[usize], hold: usize) -> Option<String> {
        match feed(token, body, cuts, hold) {
            (_, true) => None,
            (out, false) => Some(String::from_utf8(out).unwrap()),
        }
    }

    #[test]
    fn no_part_of_a_split_token_is_relayed_before_it_is_found() {
        let token = "secret-token-value";
        let body = format!("{}{token}{}", "a".repeat(40), "b".repeat(10));
        for cut in 1..body.len() {
            assert_eq!(relayed(token, &body, &[cut], 1), None, "split at {cut}");
        }
        // Bytes that only looked like the token's start go once the next read shows they are
        // not; a body without the token arrives whole, however it is split.
        let clean = format!("{}secret-tok{}secret-", "a".repeat(40), "b".repeat(10));
        for cut in 1..clean.len() {
            assert_eq!(
                relayed(token, &clean, &[cut], 1).as_deref(),
                Some(clean.as_str()),
                "split at {cut}"
            );
        }
        // A body that ends with a long run of the token's start is cut short.
        assert_eq!(relayed(token, &format!("xx{}", &token[..10]), &[], 1), None);
    }

    #[test]
    fn a_token_whose_first_bytes_repeat_is_withheld_from_its_first_byte() {
        // Where a failed candidate overlaps the real start (`…aaab…` for a token `aab…`), the
        // real start must still be found.
        for token in ["aabcccccccccc", "aaaaaaaab", "abababx", "aab", "aa"] {
            for lead in ["", "a", "aa", "ab", "aba", "xa"] {
                let body = format!("xxxx{lead}{token}yyyy");
                let at = body.find(token).unwrap();
                for cut in 1..body.len() {
                    let (sent, _) = feed(token, &body, &[cut], 1);
                    assert!(
                        sent.len() <= at,
                        "token {token:?} in {body:?} split at {cut}: {:?} relayed",
                        String::from_utf8_lossy(&sent)
                    );
                }
            }
        }
    }

    #[test]
    fn in_a_pipe_only_runs_of_pipe_hold_bytes_are_held() {
        let token = "secret-token-value";
        let mut s = scan(token);
        // A message that ends in the token's first byte goes at once.
        let [a, b] = s.pass(Bytes::from_static(b"hello s"), PIPE_HOLD).unwrap();
        assert_eq!([&a[..], &b[..]].concat(), b"hello s");
        // One that ends in eight of them waits for the next read.
        let [a, b] = s
            .pass(Bytes::from_static(b"x secret-t"), PIPE_HOLD)
            .unwrap();
        assert_eq!([&a[..], &b[..]].concat(), b"x ");
        assert_eq!(
            s.pass(Bytes::from_static(b"oken-value"), PIPE_HOLD),
            Err(Reflected)
        );
    }

    #[test]
    fn in_a_pipe_no_more_than_pipe_hold_less_one_of_the_tokens_bytes_go_however_it_is_read() {
        // Read by read, a run that was too short to hold when its first bytes went must still
        // be held once it is long enough: reads of every length, starting at every offset.
        for token in [
            "secret-token-value",
            "aaaaaaaaab-value",
            "abababababx-value",
        ] {
            for lead in ["xx", "xaaaa", "xabab"] {
                reads_of_every_size(token, &format!("{lead}{token}yy"), PIPE_HOLD);
            }
        }
        // Of a short token, at most half less a byte.
        for (token, hold) in [("short-tk", 4), ("shortertk1", 5), ("a-fifteen-byte!", 7)] {
            assert_eq!(scan(token).pipe_hold(), hold, "{token}");
            reads_of_every_size(token, &format!("xx{token}yy"), hold);
        }
    }

    /// Feeds `body` (which carries `token` once) in reads of every size from every offset, as
    /// a pipe does: the token is found, and fewer than `hold` of its bytes were relayed.
    fn reads_of_every_size(token: &str, body: &str, hold: usize) {
        let at = body.find(token).unwrap();
        for size in 1..=token.len() {
            for offset in 0..size {
                let cuts: Vec<usize> = (offset.max(1)..body.len()).step_by(size).collect();
                let (sent, found) = feed(token, body, &cuts, scan(token).pipe_hold());
                assert!(
                    found,
                    "{token} in {body}, reads of {size} from {offset}: not found"
                );
                assert!(
                    sent.len() < at + hold,
                    "{token} in {body}, reads of {size} from {offset}: {:?} relayed",
                    String::from_utf8_lossy(&sent)
                );
            }
        }
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
