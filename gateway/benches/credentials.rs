//! The token injection hot path: a cache hit in `Credentials::for_request` (rule match,
//! cache lookup, header value) and a request no rule covers, with the bench's two rules and
//! behind 1,000 generated ones; and the scan of an answer for the injected token (its header,
//! and bodies of 1, 16 and 64 KiB in 16 KiB chunks, as they arrive).
//! Run: `cargo bench -p tollgate-gateway --bench credentials`.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_benches::scale;
use tollgate_gateway::agent::Agent;
use tollgate_gateway::config::Config;
use tollgate_gateway::egress::credentials::reflection::ReflectionScan;
use tollgate_gateway::egress::credentials::upgraded::UpgradeScan;
use tollgate_gateway::egress::credentials::{Credentials, Secret};
use tollgate_gateway::egress::toolcall::ToolCalls;
use tollgate_gateway::target::Target;

/// The credentials of a bench config with `extra_rules` generated credential rules before the
/// bench's own (so a walk through the rules would pass them all), and its agent.
fn credentials(
    token_file: &std::path::Path,
    extra_rules: usize,
) -> (Credentials, Agent, tokio::runtime::Runtime) {
    let config = Config::from_toml(
        &format!(
            r#"
[[identity_providers]]
name = "dev"
kind = "static"
token = {{ file = {token_file:?} }}

{generated}
[[credential_rules]]
hosts = ["other.example.net", "*.internal.example"]
audience = "other"
provider = "dev"

[[credential_rules]]
hosts = ["graph.microsoft.com"]
audience = "https://graph.microsoft.com/.default"
provider = "dev"

[[agents]]
id = "bench"
run_mode = "Autonomous"
identity = "dev"
peers = ["127.0.0.1"]
"#,
            generated = scale::credential_rules(extra_rules, "dev"),
        ),
        "bench",
    )
    .expect("config");
    let credentials = Credentials::new(&config, pingora::connectors::http::Connector::new(None))
        .expect("credentials");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (credentials, config.agents[0].clone(), runtime)
}

fn cache_hit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "bench-static-token\n").expect("write token");
    let tool_calls = ToolCalls::default();
    tool_calls
        .open("bench", None, "tc", None, 1, None)
        .expect("open");
    let tool_call = tool_calls.current("bench", None, None).expect("current");
    let (target, _) = Target::from_url("https://graph.microsoft.com/v1.0/me").expect("url");
    let (uncovered, _) = Target::from_url("https://api.github.com/").expect("url");
    // The bench's rules alone, and behind 1,000 others.
    for (extra, suffix) in [(0, ""), (1000, "/1000-rules")] {
        let (credentials, agent, runtime) = credentials(&token_file, extra);
        // Warm the cache.
        runtime
            .block_on(credentials.for_request(&agent, Some(&tool_call), &target))
            .expect("first token");
        c.bench_function(&format!("credentials/cache-hit{suffix}"), |b| {
            b.iter(|| runtime.block_on(credentials.for_request(&agent, Some(&tool_call), &target)))
        });
        c.bench_function(&format!("credentials/no-rule{suffix}"), |b| {
            b.iter(|| {
                runtime.block_on(credentials.for_request(&agent, Some(&tool_call), &uncovered))
            })
        });
    }
}

/// A token shaped like an Entra access token (a JWT of about 1.3 KB).
fn jwt_like() -> String {
    let mut token = String::from("eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.");
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut x = 0x9e37_79b9_u32;
    for i in 0..1300 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        token.push(char::from(alphabet[(x as usize) % alphabet.len()]));
        if i == 900 {
            token.push('.');
        }
    }
    token
}

fn reflection_scan(c: &mut Criterion) {
    let token = Secret::new(jwt_like());
    let mut header = pingora::http::ResponseHeader::build(200, None).expect("header");
    for (name, value) in [
        ("content-type", "application/json; charset=utf-8"),
        ("content-length", "16384"),
        ("date", "Sat, 05 Dec 2026 16:00:00 GMT"),
        ("cache-control", "no-cache"),
        ("x-ms-request-id", "0f6c9a34-5d1e-4a7b-9c2f-3e8d7b6a5c4d"),
        (
            "x-ms-correlation-request-id",
            "7a1b2c3d-4e5f-6789-abcd-ef0123456789",
        ),
        (
            "strict-transport-security",
            "max-age=31536000; includeSubDomains",
        ),
        ("x-content-type-options", "nosniff"),
        ("etag", "\"0x8DC1234567890AB\""),
        ("vary", "Accept-Encoding"),
    ] {
        header.insert_header(name, value).expect("value");
    }
    c.bench_function("credentials/reflection-scan/header", |b| {
        let scan = ReflectionScan::new(&token).expect("scan");
        b.iter(|| scan.header_reflects(&header))
    });
    // JSON-ish bodies without the token, scanned in the chunks an origin sends.
    for kib in [1usize, 16, 64] {
        let body: Vec<u8> =
            b"{\"id\":\"/subscriptions/1111/resourceGroups/rg-a\",\"value\":[1,2,3]},"
                .iter()
                .copied()
                .cycle()
                .take(kib * 1024)
                .collect();
        // As an origin sends it: 16 KiB reads, each scanned and relayed (or withheld).
        let chunks: Vec<bytes::Bytes> = body
            .chunks(16 * 1024)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        c.bench_function(&format!("credentials/reflection-scan/body-{kib}k"), |b| {
            b.iter(|| {
                let mut scan = ReflectionScan::new(&token).expect("scan");
                let relayed: usize = chunks
                    .iter()
                    .map(|chunk| {
                        let [a, b] = scan.pass(chunk.clone(), 1).expect("no token");
                        a.len() + b.len()
                    })
                    .sum();
                relayed + scan.end().expect("no token").len()
            })
        });
    }
}

/// What an upgraded WebSocket costs to scan: 16 KiB of 1 KiB text messages from the origin,
/// read as frames (data payloads as one stream, the raw bytes too) in 16 KiB reads.
fn websocket_scan(c: &mut Criterion) {
    let token = Secret::new(jwt_like());
    let mut stream = Vec::new();
    for i in 0..16u8 {
        stream.extend_from_slice(&[0x81, 126, 0x04, 0x00]);
        stream.extend(std::iter::repeat_n(b'a' + i, 1024));
    }
    let chunks: Vec<bytes::Bytes> = stream
        .chunks(16 * 1024)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    c.bench_function("credentials/websocket-scan/16k", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            let mut reflection = ReflectionScan::new(&token).expect("scan");
            let mut scan = UpgradeScan::new(&mut reflection, "websocket", Some("websocket"));
            let mut relayed = 0;
            for chunk in &chunks {
                out.clear();
                scan.pass(chunk.clone(), &mut out).expect("no token");
                relayed += out.iter().map(|p| p.len()).sum::<usize>();
            }
            relayed
        })
    });
}

criterion_group!(benches, cache_hit, reflection_scan, websocket_scan);
criterion_main!(benches);
