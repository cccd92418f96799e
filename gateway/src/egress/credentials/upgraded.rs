//! The token scan of what an origin sends inside an upgraded connection whose handshake
//! carried a token.
//!
//! For a WebSocket the sandbox's client reads messages, not the bytes on the wire: it strips
//! each frame's header, joins a message's fragments, and takes control frames (ping, pong,
//! close) apart from the message they may arrive in the middle of; the agent can join
//! messages. A token the origin sends in two frames is whole to the sandbox yet, on the wire,
//! has a frame header between its halves — or a pong, which the sandbox can draw out with a
//! ping. So a WebSocket is read frame by frame:
//!
//! - data frames' payloads are scanned as one stream (consecutive messages too: erring
//!   towards finding), with the pipe's hold of the token's start
//!   ([`ReflectionScan::pipe_hold`]);
//! - control frames' payloads (at most 125 bytes each) are kept out of that stream;
//! - the raw bytes are scanned too (finding, not holding back), so a token within a control
//!   frame, or laid across a frame header's bytes, is found;
//! - frame headers pass once whole and checked; they and control payloads never pass ahead of
//!   data bytes held back before them, so the stream's order is kept;
//! - a frame the gateway cannot read as the sandbox would — masked (only a client masks), a
//!   reserved bit set (an extension's transformed payload: the gateway offered none), a
//!   control frame longer than 125 bytes or fragmented — ends the connection before it.
//!
//! Other upgraded protocols (the default policies permit none) are scanned as raw bytes.

use std::collections::VecDeque;

use bytes::Bytes;

use super::reflection::ReflectionScan;

/// Bytes (frame headers, control payloads) that may wait behind held-back data bytes: only
/// the frames an origin sends while a message stops at what could be the token's start.
const QUEUED_MAX: usize = 16 * 1024;

/// Why an upgraded connection was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The origin sent the injected token.
    Reflected,
    /// The origin sent what the scan cannot read as the sandbox would; says what.
    Unreadable(&'static str),
}

/// Scans the origin's side of an upgraded connection for the injected token.
pub enum UpgradeScan<'a> {
    /// Bytes as they come.
    Raw(&'a mut ReflectionScan),
    /// WebSocket frames.
    WebSocket(Box<FrameScan<'a>>),
}

impl<'a> UpgradeScan<'a> {
    /// The scan for a connection the sandbox `asked` to upgrade (its `Upgrade` value) and the
    /// origin `switched` (the answer's). The sandbox's client reads the stream as what it
    /// asked for, so if either names WebSocket (any version), frames are read (and bytes that
    /// are not frames end the connection).
    pub fn new(
        scan: &'a mut ReflectionScan,
        asked: &str,
        switched: Option<&str>,
    ) -> UpgradeScan<'a> {
        let names_websocket = |protocols: &str| {
            protocols.split(',').any(|p| {
                let name = p.split('/').next().unwrap_or_default();
                name.trim().eq_ignore_ascii_case("websocket")
            })
        };
        match names_websocket(asked) || switched.is_some_and(names_websocket) {
            true => UpgradeScan::WebSocket(Box::new(FrameScan::new(scan))),
            false => UpgradeScan::Raw(scan),
        }
    }

    /// Scans the origin's next `chunk` and appends to `out`, in order, what may be relayed
    /// now. Bytes that could be the token's start (runs of [`ReflectionScan::pipe_hold`] bytes
    /// or more) wait for what follows.
    pub fn pass(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), Cut> {
        match self {
            UpgradeScan::Raw(scan) => {
                let hold = scan.pipe_hold();
                let pieces = scan.pass(chunk, hold).map_err(|_| Cut::Reflected)?;
                out.extend(pieces.into_iter().filter(|p| !p.is_empty()));
                Ok(())
            }
            UpgradeScan::WebSocket(frames) => frames.pass(chunk, out),
        }
    }
}

/// Where the frame reader is.
enum At {
    /// In a frame header: the bytes read of it so far.
    Header { bytes: [u8; 14], read: usize },
    /// In a frame's payload: how many bytes of it are still to come, and whether it is a
    /// control frame's.
    Payload { left: u64, control: bool },
}

impl At {
    const NEXT_HEADER: At = At::Header {
        bytes: [0; 14],
        read: 0,
    };
}

/// Reads WebSocket frames from the origin and scans their payloads.
pub struct FrameScan<'a> {
    /// The data frames' payloads.
    scan: &'a mut ReflectionScan,
    /// Its hold in a pipe.
    hold: usize,
    /// The raw bytes (finding only: nothing is held for it).
    raw: ReflectionScan,
    at: At,
    /// Data payload bytes scanned so far.
    scanned: u64,
    /// Data payload bytes relayed so far (the rest of `scanned` is held back).
    released: u64,
    /// Bytes behind held-back payload bytes, each with the payload offset it follows.
    queued: VecDeque<(u64, Bytes)>,
    queued_bytes: usize,
}

impl<'a> FrameScan<'a> {
    fn new(scan: &'a mut ReflectionScan) -> FrameScan<'a> {
        FrameScan {
            raw: scan.restarted(),
            hold: scan.pipe_hold(),
            scan,
            at: At::NEXT_HEADER,
            scanned: 0,
            released: 0,
            queued: VecDeque::new(),
            queued_bytes: 0,
        }
    }

    fn pass(&mut self, mut chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), Cut> {
        if self.raw.body_reflects(&chunk) {
            return Err(Cut::Reflected);
        }
        // With nothing pending from earlier reads, a read that goes out whole goes as one piece.
        let pending =
            self.released != self.scanned || matches!(self.at, At::Header { read, .. } if read > 0);
        let (whole, first) = (chunk.clone(), out.len());
        while !chunk.is_empty() {
            match &mut self.at {
                At::Payload { left, control } => {
                    let control = *control;
                    let n = chunk
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let payload = chunk.split_to(n);
                    *left -= n as u64;
                    if *left == 0 {
                        self.at = At::NEXT_HEADER;
                    }
                    match control {
                        true => self.opaque(payload, out)?,
                        false => self.payload(payload, out)?,
                    }
                }
                At::Header { bytes, read } => {
                    // A header is relayed once whole and checked: as the chunk's own bytes when
                    // it lies in one, else from the bytes kept while it came in pieces.
                    let before = *read;
                    let mut took = 0;
                    loop {
                        check_first_bytes(&bytes[..*read])?;
                        let need = header_len(&bytes[..*read]);
                        if need == *read || took == chunk.len() {
                            break;
                        }
                        let n = (chunk.len() - took).min(need - *read);
                        bytes[*read..*read + n].copy_from_slice(&chunk[took..took + n]);
                        *read += n;
                        took += n;
                    }
                    let part = chunk.split_to(took);
                    let len = *read;
                    if header_len(&bytes[..len]) != len {
                        continue;
                    }
                    let left = payload_len(&bytes[..len])?;
                    let control = bytes[0] & 0x08 != 0;
                    let header = match before {
                        0 => part,
                        _ => Bytes::copy_from_slice(&bytes[..len]),
                    };
                    self.at = match left {
                        0 => At::NEXT_HEADER,
                        left => At::Payload { left, control },
                    };
                    self.opaque(header, out)?;
                }
            }
        }
        if !pending && out[first..].iter().map(Bytes::len).sum::<usize>() == whole.len() {
            out.truncate(first);
            out.push(whole);
        }
        Ok(())
    }

    /// Scans data payload bytes; relays what the scan lets go, with what was queued among it.
    fn payload(&mut self, payload: Bytes, out: &mut Vec<Bytes>) -> Result<(), Cut> {
        self.scanned += payload.len() as u64;
        let pieces = self
            .scan
            .pass(payload, self.hold)
            .map_err(|_| Cut::Reflected)?;
        for mut piece in pieces {
            while !piece.is_empty() {
                self.release_queued_at_released(out);
                let until_queued = self
                    .queued
                    .front()
                    .map_or(u64::MAX, |(at, _)| at - self.released);
                let n = piece
                    .len()
                    .min(usize::try_from(until_queued).unwrap_or(usize::MAX));
                self.released += n as u64;
                out.push(piece.split_to(n));
            }
        }
        self.release_queued_at_released(out);
        Ok(())
    }

    /// Bytes outside the data payloads go at once, unless payload bytes are held back ahead
    /// of them.
    fn opaque(&mut self, bytes: Bytes, out: &mut Vec<Bytes>) -> Result<(), Cut> {
        if self.released == self.scanned {
            out.push(bytes);
            return Ok(());
        }
        self.queued_bytes += bytes.len();
        if self.queued_bytes > QUEUED_MAX {
            return Err(Cut::Unreadable(
                "too many frames while a message stopped at what could be the credential",
            ));
        }
        self.queued.push_back((self.scanned, bytes));
        Ok(())
    }

    fn release_queued_at_released(&mut self, out: &mut Vec<Bytes>) {
        while self
            .queued
            .front()
            .is_some_and(|(at, _)| *at == self.released)
        {
            if let Some((_, bytes)) = self.queued.pop_front() {
                self.queued_bytes -= bytes.len();
                out.push(bytes);
            }
        }
    }
}

/// How long the frame header starting with `read` is, as far as its bytes tell (2 until the
/// second byte is known).
fn header_len(read: &[u8]) -> usize {
    let Some(second) = read.get(1) else {
        return 2;
    };
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// Refuses a frame the sandbox's client would read other than as its bytes say.
fn check_first_bytes(read: &[u8]) -> Result<(), Cut> {
    if read.first().is_some_and(|first| first & 0x70 != 0) {
        return Err(Cut::Unreadable(
            "a WebSocket frame with a reserved bit set (an extension no one offered)",
        ));
    }
    if read.get(1).is_some_and(|second| second & 0x80 != 0) {
        return Err(Cut::Unreadable("a masked WebSocket frame from the origin"));
    }
    Ok(())
}

/// The payload length a whole frame header gives.
fn payload_len(header: &[u8]) -> Result<u64, Cut> {
    check_first_bytes(header)?;
    let len = match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(bytes)
        }
        short => u64::from(short),
    };
    if len >> 63 != 0 {
        return Err(Cut::Unreadable(
            "a WebSocket frame length with its top bit set",
        ));
    }
    let control = header[0] & 0x08 != 0;
    if control && (header[0] & 0x80 == 0 || header[1] & 0x7f > 125) {
        return Err(Cut::Unreadable(
            "a WebSocket control frame fragmented or longer than 125 bytes",
        ));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::credentials::reflection::PIPE_HOLD;
    use crate::egress::credentials::Secret;

    const TOKEN: &str = "Bearer eyJhbGciOiJFUzI1NiJ9.secret-part";

    /// A frame as an origin sends it (unmasked).
    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// A text message sent in fragments, cut at `cuts` of its text.
    fn fragmented(text: &str, cuts: &[usize]) -> Vec<u8> {
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(text.len());
        let mut out = Vec::new();
        for (i, pair) in bounds.windows(2).enumerate() {
            let opcode = if i == 0 { 1 } else { 0 };
            out.extend(frame(
                opcode,
                pair[1] == text.len(),
                &text.as_bytes()[pair[0]..pair[1]],
            ));
        }
        out
    }

    /// Feeds `stream` read by read (cut at `reads`) through a WebSocket scan: what was relayed,
    /// and how it ended.
    fn feed(stream: &[u8], reads: &[usize]) -> (Vec<u8>, Result<(), Cut>) {
        let mut token = ReflectionScan::new(&Secret::new(TOKEN.into())).unwrap();
        let mut scan = UpgradeScan::new(&mut token, "websocket", Some("websocket"));
        let mut relayed = Vec::new();
        let mut from = 0;
        for &to in reads.iter().chain([stream.len()].iter()) {
            let mut out = Vec::new();
            let passed = scan.pass(Bytes::copy_from_slice(&stream[from..to]), &mut out);
            out.iter().for_each(|p| relayed.extend_from_slice(p));
            if passed.is_err() {
                return (relayed, passed);
            }
            from = to;
        }
        (relayed, Ok(()))
    }

    /// The data frames' payload bytes in `stream` (its last frame may be cut short).
    fn payloads(stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 2 <= stream.len() {
            let header = header_len(&stream[at..at + 2]);
            if at + header > stream.len() {
                break;
            }
            let len = payload_len(&stream[at..at + header]).unwrap() as usize;
            let end = (at + header + len).min(stream.len());
            if stream[at] & 0x08 == 0 {
                out.extend_from_slice(&stream[at + header..end]);
            }
            at = end;
        }
        out
    }

    #[test]
    fn a_token_split_across_fragments_is_found_and_none_of_its_start_relayed() {
        let text = format!("you sent: {TOKEN} and more");
        let start = text.find(TOKEN).unwrap();
        let head = &TOKEN.as_bytes()[..PIPE_HOLD];
        // Every place a fragment boundary can fall in the token, read whole and at every byte.
        for cut in start + 1..start + TOKEN.len() {
            let stream = fragmented(&text, &[cut]);
            for read in 0..=stream.len() {
                let (relayed, ended) = feed(&stream, &[read]);
                assert_eq!(
                    ended,
                    Err(Cut::Reflected),
                    "fragment at {cut}, read at {read}"
                );
                assert!(stream.starts_with(&relayed), "out of order: {cut}, {read}");
                let seen = payloads(&relayed);
                assert!(
                    !seen.windows(head.len()).any(|w| w == head),
                    "the token's start was relayed: fragment at {cut}, read at {read}"
                );
            }
        }
    }

    #[test]
    fn a_token_split_around_a_control_frame_is_found_and_none_of_its_start_relayed() {
        // The sandbox's client takes a pong (which it can draw out with a ping) apart from the
        // fragments around it, and a pong between two messages apart from both.
        let token = TOKEN.as_bytes();
        let around = |first_opcode: u8, fin: bool| {
            let mut stream = frame(first_opcode, fin, &token[..10]);
            stream.extend(frame(0xA, true, b"x"));
            stream.extend(frame(if fin { 1 } else { 0 }, true, &token[10..]));
            stream
        };
        for stream in [around(1, false), around(1, true)] {
            for read in 0..=stream.len() {
                let (relayed, ended) = feed(&stream, &[read]);
                assert_eq!(ended, Err(Cut::Reflected), "read at {read}");
                assert!(stream.starts_with(&relayed), "out of order at {read}");
                let seen = payloads(&relayed);
                assert!(
                    !seen.windows(PIPE_HOLD).any(|w| w == &token[..PIPE_HOLD]),
                    "the token's start was relayed, read at {read}"
                );
            }
        }
        // A token in a control frame (a close's reason) is found there.
        let mut close = vec![0x03, 0xe8];
        close.extend_from_slice(token);
        assert_eq!(feed(&frame(8, true, &close), &[5]).1, Err(Cut::Reflected));
    }

    #[test]
    fn a_token_laid_across_a_frame_header_is_found() {
        // A length byte of 66 is `B`: the raw bytes hold the token, the payload does not.
        assert_eq!(TOKEN.as_bytes()[0], 66);
        let mut payload = TOKEN.as_bytes()[1..].to_vec();
        payload.resize(66, b' ');
        assert_eq!(feed(&frame(1, true, &payload), &[]).1, Err(Cut::Reflected));
    }

    #[test]
    fn frames_without_the_token_pass_whole_and_in_order_however_they_are_read() {
        // A held run of the token's start (longer than PIPE_HOLD) that the next fragment,
        // after its header, shows is not the token; then frames of every length encoding.
        let near = &TOKEN[..20];
        let mut stream = fragmented(&format!("{near}!{near}?"), &[20, 21]);
        // A ping in the middle of a message, after a held run; an empty pong; a message.
        let first = frame(1, false, near.as_bytes());
        stream.extend(&first);
        stream.extend(frame(9, true, b"ping"));
        stream.extend(frame(0xA, true, &[]));
        stream.extend(frame(0, true, b"not the token"));
        stream.extend(frame(1, true, &[]));
        stream.extend(frame(2, true, &[7u8; 300]));
        stream.extend(frame(2, true, &vec![8u8; 70_000]));
        stream.extend(frame(8, true, b"\x03\xe8bye"));
        let ends = [stream.len() - 9, stream.len() - 1, stream.len()];
        for read in (0..400).chain(ends) {
            let next = (read + read % 13).min(stream.len());
            let (relayed, ended) = feed(&stream, &[read, next]);
            assert_eq!(ended, Ok(()));
            assert!(relayed == stream, "read at {read}: the stream was changed");
        }
    }

    #[test]
    fn frame_headers_wait_behind_a_held_run() {
        let near = &TOKEN[..20];
        let first = frame(1, false, near.as_bytes());
        let second = frame(0, true, b"!");
        let stream = [first.clone(), second].concat();
        // The first frame and the next header read: the run and the header wait.
        let (relayed, _) = feed(&stream[..first.len() + 2], &[]);
        assert_eq!(relayed, first[..2]);
        // The next payload byte shows it is not the token: all goes, in order.
        assert_eq!(feed(&stream, &[first.len() + 2]).0, stream);
    }

    #[test]
    fn frames_the_sandbox_would_read_otherwise_end_the_connection() {
        let masked = [0x81, 0x85, 1, 2, 3, 4, b'a', b'b', b'c', b'd', b'e'];
        let compressed = [0xc1, 0x03, b'a', b'b', b'c'];
        let too_long = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        let long_ping = [&[0x89, 126, 0, 126][..], &[b'p'; 126]].concat();
        let fragmented_ping = [0x09, 0x01, b'p'];
        for (stream, why) in [
            (&masked[..], "masked"),
            (&compressed[..], "reserved bit"),
            (&too_long[..], "top bit"),
            (&long_ping[..], "longer than 125"),
            (&fragmented_ping[..], "fragmented"),
        ] {
            let (relayed, ended) = feed(stream, &[]);
            assert!(relayed.is_empty(), "{why}: {relayed:?}");
            assert!(
                matches!(ended, Err(Cut::Unreadable(m)) if m.contains(why)),
                "{why}: {ended:?}"
            );
        }
        // What waits behind a held run is bounded: up to the bound, it goes once the run is
        // shown not to be the token; beyond, the connection ends.
        let held = frame(1, false, &TOKEN.as_bytes()[..20]);
        let empty = frame(0, false, &[]);
        let waiting = |frames: usize| {
            let mut stream = held.clone();
            (0..frames).for_each(|_| stream.extend(&empty));
            stream.extend(frame(0, true, b"!"));
            stream
        };
        // (The last frame's header waits too.)
        let fits = waiting(QUEUED_MAX / empty.len() - 1);
        let (relayed, ended) = feed(&fits, &[]);
        assert!(relayed == fits && ended.is_ok(), "{ended:?}");
        let over = waiting(QUEUED_MAX / empty.len());
        assert!(matches!(feed(&over, &[]).1, Err(Cut::Unreadable(_))));
    }

    #[test]
    fn a_read_with_nothing_held_goes_out_as_one_piece() {
        // One write to the sandbox per read, not one per frame.
        let stream = [
            frame(1, true, b"hello"),
            frame(9, true, b"p"),
            frame(0xA, true, &[]),
            frame(2, true, &[1; 300]),
        ]
        .concat();
        let mut token = ReflectionScan::new(&Secret::new(TOKEN.into())).unwrap();
        let mut scan = UpgradeScan::new(&mut token, "websocket", None);
        let mut out = Vec::new();
        scan.pass(Bytes::from(stream.clone()), &mut out).unwrap();
        assert_eq!(out, vec![Bytes::from(stream)]);
    }

    #[test]
    fn other_protocols_are_scanned_as_raw_bytes() {
        let mut token = ReflectionScan::new(&Secret::new(TOKEN.into())).unwrap();
        let mut scan = UpgradeScan::new(&mut token, "h2c", Some("h2c"));
        let mut out = Vec::new();
        let stream = frame(1, true, b"\x81\x85 is not read as frames");
        scan.pass(Bytes::from(stream.clone()), &mut out).unwrap();
        assert_eq!(out.concat(), stream);
        assert_eq!(
            scan.pass(Bytes::from(format!("x{TOKEN}")), &mut out),
            Err(Cut::Reflected)
        );
    }
}
