#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! One decision — entity building plus the two-pass evaluation — with policy sets of 10, 100
//! and 1,000 policies, made anew and made before (the decision cache). Run: `cargo bench -p
//! tollgate-policy --bench decision`.
//!
//! The sets are the default policies plus generated ones of the shapes real sets have
//! ([`scale::generated_policies`], which the end-to-end benchmark's gateway at scale loads
//! too): a permit per allowlisted service domain, a policy per agent, a forbid per blocked
//! host.

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tollgate_benches::scale;
use tollgate_policy::target::{Scheme, Target};
use tollgate_policy::{AgentFacts, PolicyEngine, PolicySources, RequestFacts, RunMode};

fn policy_set(total: usize) -> PolicySources {
    let mut sources = PolicySources::embedded_default();
    let generated = total.saturating_sub(scale::default_policy_count());
    sources.files.push((
        "generated.cedar".into(),
        scale::generated_policies(generated),
    ));
    sources
}

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    let scopes = vec!["/subscriptions/sub-1/resourceGroups/rg-a".to_string()];
    let tags = BTreeMap::from([("team".to_string(), "data".to_string())]);
    let agent = AgentFacts {
        revision: 0,
        id: "agent-1",
        run_mode: RunMode::Review,
        scopes: &scopes,
        tags: &tags,
    };
    let cases = [
        ("read-allow", "GET", "https://api.github.com/repos/octo/hello"),
        ("write-needs-approval", "POST", "https://api.github.com/repos/octo/hello/issues"),
        (
            "arm-write",
            "PUT",
            "https://management.azure.com/subscriptions/sub-1/resourceGroups/rg-a/providers/Microsoft.Web/sites/app",
        ),
    ];
    for total in [10, 100, 1000] {
        let engine = PolicyEngine::load(&policy_set(total)).expect("generated set is valid");
        for (name, method, url) in cases {
            let (target, path) = Target::from_url(url).expect("url");
            let request = RequestFacts::new(method, target, &path).expect("path");
            // Made anew each time (what a first request costs), and made before (the same
            // agent revision asking the same thing again: the decision cache).
            group.bench_with_input(BenchmarkId::new(name, total), &request, |b, request| {
                b.iter(|| engine.decide_uncached(&agent, request))
            });
            group.bench_with_input(
                BenchmarkId::new(format!("{name}-made-before"), total),
                &request,
                |b, request| b.iter(|| engine.decide(&agent, request)),
            );
        }
    }
    group.finish();
}

/// Classification alone: method → action, host → ARM or not, an ARM path → its scopes.
fn classification(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    let cases = [
        ("plain", "GET", "https://api.github.com/repos/octo/hello?page=2"),
        (
            "arm",
            "PUT",
            "https://management.azure.com/subscriptions/sub-1/resourceGroups/rg-a/providers/Microsoft.Web/sites/app?api-version=2023-01-01",
        ),
    ];
    for (name, method, url) in cases {
        let (target, path) = Target::from_url(url).expect("url");
        group.bench_function(name, |b| {
            b.iter(|| RequestFacts::new(method, target.clone(), &path))
        });
    }
    group.finish();
}

/// A target's `Host` value: made twice for every request (the upstream request's header and
/// the audit record).
fn host_header(c: &mut Criterion) {
    let mut group = c.benchmark_group("target");
    for (name, scheme, authority) in [
        ("host_header/name", Scheme::Https, "api.github.com"),
        ("host_header/name:port", Scheme::Http, "origin.test:8080"),
        ("host_header/ip:port", Scheme::Http, "10.0.0.7:8080"),
    ] {
        let target = Target::from_url_authority(scheme, authority).expect("authority");
        group.bench_function(name, |b| b.iter(|| target.host_header()));
    }
    group.finish();
}

criterion_group!(benches, decision, classification, host_header);
criterion_main!(benches);
