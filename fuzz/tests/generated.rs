//! Generated inputs for the WebSocket target, on stable Rust and in every test run: streams of
//! frames of every kind, with pieces of the token placed where a scan could miss them
//! (fragment and control-frame boundaries, read boundaries), through
//! [`tollgate_fuzz::websocket_frames`], whose properties must hold for each. The generator is
//! seeded, so a failure repeats.

/// xorshift64*: enough to spread the choices, and the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A frame's bytes, as an origin sends it (unmasked unless `mask`).
fn frame(first: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(n as u8 | mask_bit),
        n if n <= 0xffff => {
            out.push(126 | mask_bit);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127 | mask_bit);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        out.extend_from_slice(&[1, 2, 3, 4]);
    }
    out.extend_from_slice(payload);
    out
}

/// A payload: filler, and now and then a piece of the token (its start, its end, or whole).
fn payload(rng: &mut Rng, token: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(4) {
        match rng.below(6) {
            0 => out.extend_from_slice(&token[..rng.below(token.len()) + 1]),
            1 => out.extend_from_slice(&token[rng.below(token.len())..]),
            2 => out.extend_from_slice(token),
            _ => out.extend(std::iter::repeat_n(
                b'a' + rng.below(26) as u8,
                rng.below(40),
            )),
        }
    }
    if rng.below(50) == 0 {
        out.resize(out.len() + 200, b'z');
    }
    out
}

/// A stream of frames: mostly valid (data frames, fragments, pings, pongs, a close), now
/// and then one the scan must refuse.
fn stream(rng: &mut Rng, token: &[u8]) -> Vec<u8> {
    let mut out = vec![rng.next() as u8];
    for _ in 0..rng.below(8) + 1 {
        let body = payload(rng, token);
        let (first, body) = match rng.below(12) {
            0 => (0x09, body[..body.len().min(125)].to_vec()),
            1 => (0x8A, body[..body.len().min(125)].to_vec()),
            2 => (0x88, body[..body.len().min(125)].to_vec()),
            3 => (0x01, body),
            4 => (0x00, body),
            5 if rng.below(8) == 0 => (0xC1, body),
            6 if rng.below(8) == 0 => (0x89, vec![b'p'; 126]),
            n => (if n % 2 == 0 { 0x81 } else { 0x80 }, body),
        };
        out.extend(frame(first, &body, rng.below(40) == 0));
    }
    out
}

#[test]
fn websocket_frames_holds_for_generated_streams() {
    let token = tollgate_fuzz::WEBSOCKET_TOKEN.as_bytes();
    let mut rng = Rng(0x7011_6a7e_5eed_0001);
    let (mut cut, mut whole) = (0, 0);
    for _ in 0..20_000 {
        let data = stream(&mut rng, token);
        tollgate_fuzz::websocket_frames(&data);
        match tollgate_fuzz::websocket_scanned(&data[1..], data.len()).1 {
            true => cut += 1,
            false => whole += 1,
        }
    }
    // Both outcomes are exercised, so the properties were checked on each.
    assert!(cut > 1_000 && whole > 1_000, "cut {cut}, whole {whole}");
}
