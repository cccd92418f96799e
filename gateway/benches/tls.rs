#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The intercepting TLS path's certificate work: handing out a cached leaf certificate (every
//! tunnel to a host seen before) against minting one (the first tunnel to a host). Run:
//! `cargo bench -p tollgate-gateway --bench tls`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_gateway::egress::ca::{GatewayCa, LeafCerts};
use tollgate_gateway::target::Host;

fn leaves(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, _) =
        GatewayCa::load_or_create(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem"))
            .expect("CA");
    let validity = Duration::from_secs(24 * 3600);
    let host = Host::Name("api.github.com".into());
    let mut group = c.benchmark_group("leaf-certificate");
    group.bench_function("mint", |b| {
        b.iter(|| ca.mint_leaf(&host, validity).expect("mint"))
    });
    let (ca, _) =
        GatewayCa::load_or_create(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem"))
            .expect("CA");
    let cache = LeafCerts::new(ca, 1000, validity);
    cache.get(&host).expect("first mint");
    group.bench_function("cache hit", |b| b.iter(|| cache.get(&host).expect("hit")));
    group.finish();
}

criterion_group!(benches, leaves);
criterion_main!(benches);
