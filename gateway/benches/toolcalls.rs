//! Opening and closing a tool call, with many of the agent's already open: the cost should
//! not grow with their number (it did, when each opening scanned the agent's open calls).
//! Also what every request pays to check its tool call is still open.
//! Run: `cargo bench -p tollgate-gateway --bench toolcalls`.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tollgate_gateway::egress::toolcall::ToolCalls;

fn tool_calls(c: &mut Criterion) {
    let mut group = c.benchmark_group("toolcalls");
    for already_open in [0usize, 1_000, 100_000] {
        let calls = ToolCalls::default();
        for i in 0..already_open {
            calls
                .open("agent", None, &format!("open-{i}"), None, usize::MAX, None)
                .expect("open");
        }
        group.bench_with_input(
            BenchmarkId::new("open_and_close", already_open),
            &already_open,
            |b, _| {
                b.iter(|| {
                    calls
                        .open("agent", None, "tc", None, usize::MAX, None)
                        .expect("open");
                    calls.close("agent", "tc")
                })
            },
        );
        let probe = calls
            .open("agent", None, "probe", None, usize::MAX, None)
            .expect("open")
            .info;
        let serial = calls
            .current("agent", None, Some(&probe.id))
            .expect("current")
            .serial;
        group.bench_with_input(
            BenchmarkId::new("is_open", already_open),
            &already_open,
            |b, _| b.iter(|| calls.is_open("agent", serial)),
        );
    }
    group.finish();
}

criterion_group!(benches, tool_calls);
criterion_main!(benches);
