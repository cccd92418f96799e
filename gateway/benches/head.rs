//! Step 0's cost per request: reading and checking one HTTP/1 request head
//! (`framing::check_head`: the httparse parse, the framing rules and pingora's authority
//! check) before pingora parses it again. Run: `cargo bench -p tollgate-gateway --bench head`.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_gateway::egress::framing::check_head;

fn heads(c: &mut Criterion) {
    let curl = b"GET http://api.github.com/repos/octo/hello HTTP/1.1\r\nHost: api.github.com\r\n\
                 User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
    let browser = b"GET /repos/octo/hello/issues?state=open&per_page=100 HTTP/1.1\r\n\
                    Host: api.github.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36\r\n\
                    Accept: application/vnd.github+json\r\nAccept-Language: en-US,en;q=0.9\r\n\
                    Accept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n\
                    Cache-Control: no-cache\r\nPragma: no-cache\r\nSec-Fetch-Dest: empty\r\n\
                    Sec-Fetch-Mode: cors\r\nSec-Fetch-Site: same-origin\r\n\
                    X-GitHub-Api-Version: 2022-11-28\r\nIf-None-Match: W/\"0f6c9a345d1e4a7b\"\r\n\
                    Cookie: _octo=GH1.1.1234567890.1700000000; logged_in=no\r\n\r\n";
    for (name, head) in [("curl", &curl[..]), ("browser", &browser[..])] {
        assert!(
            matches!(check_head(head), Ok(Some(_))),
            "{name} head passes"
        );
        c.bench_function(&format!("head/check/{name}"), |b| {
            b.iter(|| check_head(head))
        });
    }
}

criterion_group!(benches, heads);
criterion_main!(benches);
