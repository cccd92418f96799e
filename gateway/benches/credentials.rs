//! The token injection hot path: a cache hit in `Credentials::for_request` (rule match,
//! cache lookup, header value). Run: `cargo bench -p tollgate-gateway --bench credentials`.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_gateway::config::Config;
use tollgate_gateway::credentials::Credentials;
use tollgate_gateway::identity::Agent;
use tollgate_gateway::target::Target;
use tollgate_gateway::toolcall::ToolCalls;

fn cache_hit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "bench-static-token\n").expect("write token");
    let config = Config::from_toml(
        &format!(
            r#"
[[identity_providers]]
name = "dev"
kind = "static"
token = {{ file = {token_file:?} }}

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
"#
        ),
        "bench",
    )
    .expect("config");
    let credentials = Credentials::new(&config, pingora::connectors::http::Connector::new(None))
        .expect("credentials");
    let agent: Agent = config.agents[0].clone();
    let tool_calls = ToolCalls::default();
    tool_calls.open("bench", "tc", None).expect("open");
    let tool_call = tool_calls.current("bench", None).expect("current");
    let (target, _) = Target::from_url("https://graph.microsoft.com/v1.0/me").expect("url");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Warm the cache.
    runtime
        .block_on(credentials.for_request(&agent, Some(&tool_call), &target))
        .expect("first token");
    c.bench_function("credentials/cache-hit", |b| {
        b.iter(|| runtime.block_on(credentials.for_request(&agent, Some(&tool_call), &target)))
    });
    let (uncovered, _) = Target::from_url("https://api.github.com/").expect("url");
    c.bench_function("credentials/no-rule", |b| {
        b.iter(|| runtime.block_on(credentials.for_request(&agent, Some(&tool_call), &uncovered)))
    });
}

criterion_group!(benches, cache_hit);
criterion_main!(benches);
