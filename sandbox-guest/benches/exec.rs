//! The guest agent's share of an execution's round trip: `true` run in a session's shell state
//! (restore, run, save), called directly and through the agent's HTTP API on loopback. The
//! sandbox (a microVM's emulated CPU, or a namespace) and the sandbox service come on top.
//! Run: `cargo bench -p tollgate-guest --bench exec`.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_guest::exec::{AtTheEnd, Execution, Shell};
use tollgate_guest::files::Workspace;
use tollgate_guest::python::{Python, PythonCall};
use tollgate_guest::server::{serve, Agent};

const SECRET: &str = "bench-secret-0123456789";

fn shell(dir: &std::path::Path) -> Shell {
    let workspace = dir.join("workspace");
    let state = dir.join("state");
    std::fs::create_dir_all(&workspace).expect("workspace");
    std::fs::create_dir_all(&state).expect("state");
    Shell {
        workspace,
        state,
        run_as: None,
        max_output_bytes: 1 << 20,
        default_timeout: Duration::from_secs(10),
        max_timeout: Duration::from_secs(60),
    }
}

fn executions(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let shell = shell(dir.path());
    let truth = Execution {
        command: Some("true".into()),
        ..Execution::default()
    };
    c.bench_function("exec/true/direct", |b| {
        b.iter(|| shell.run(&truth, &mut AtTheEnd).expect("run"))
    });

    let python = Python::new(
        shell.workspace.clone(),
        None,
        1 << 20,
        (shell.default_timeout, shell.max_timeout),
    );
    let one_plus_one = PythonCall {
        code: "1+1".into(),
        timeout_secs: None,
    };
    c.bench_function("python/1+1/direct", |b| {
        b.iter(|| python.run(&one_plus_one, &mut AtTheEnd).expect("run"))
    });

    let workspace = Workspace::open(&shell.workspace, None, 1 << 20).expect("workspace");
    let python = Python::new(
        shell.workspace.clone(),
        None,
        1 << 20,
        (shell.default_timeout, shell.max_timeout),
    );
    let agent = Arc::new(Agent::new(
        SECRET.into(),
        (shell.clone(), python),
        workspace,
        1 << 20,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || serve(listener, agent));
    let body = r#"{"command":"true"}"#;
    let request = format!(
        "POST /exec HTTP/1.1\r\nHost: agent\r\nX-Tollgate-Secret: {SECRET}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.bench_function("exec/true/http", |b| {
        b.iter(|| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(request.as_bytes()).expect("write");
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).expect("read");
            assert!(answer.starts_with(b"HTTP/1.1 200"));
        })
    });
}

criterion_group!(benches, executions);
criterion_main!(benches);
