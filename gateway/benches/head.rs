//! Step 0's cost per request: reading and checking one HTTP/1 request head
//! (`framing::check_head`: the httparse parse, the framing rules and pingora's authority
//! check) before pingora parses it again; and finding a head's hop-by-hop headers
//! (`upstream::hop_by_hop_headers`), done for every request's head and its answer's.
//! Run: `cargo bench -p tollgate-gateway --bench head`.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_gateway::egress::framing::check_head;
use tollgate_gateway::egress::upstream::hop_by_hop_headers;

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
        let headers = header_map(head);
        c.bench_function(&format!("head/hop_by_hop/{name}"), |b| {
            b.iter(|| hop_by_hop_headers(&headers))
        });
    }
    let answer = b"HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 06:00:00 GMT\r\n\
                   Content-Type: application/json; charset=utf-8\r\nContent-Length: 1024\r\n\
                   Cache-Control: private, max-age=60\r\nETag: W/\"0f6c9a345d1e4a7b\"\r\n\
                   X-RateLimit-Remaining: 4999\r\nServer: github.com\r\n\r\n";
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut fields);
    assert!(matches!(
        response.parse(answer),
        Ok(httparse::Status::Complete(_))
    ));
    let headers = to_map(response.headers);
    c.bench_function("head/hop_by_hop/answer", |b| {
        b.iter(|| hop_by_hop_headers(&headers))
    });
}

/// A request head's header fields as the header map pingora would hand on.
fn header_map(head: &[u8]) -> http::HeaderMap {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut fields);
    assert!(matches!(
        request.parse(head),
        Ok(httparse::Status::Complete(_))
    ));
    to_map(request.headers)
}

fn to_map(fields: &[httparse::Header<'_>]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for field in fields {
        map.append(
            http::HeaderName::from_bytes(field.name.as_bytes()).expect("a header name"),
            http::HeaderValue::from_bytes(field.value).expect("a header value"),
        );
    }
    map
}

criterion_group!(benches, heads);
criterion_main!(benches);
