//! The closed-loop load generator: N keep-alive HTTP/1.1 connections, each sending its next
//! request as soon as the previous response has been read (or, paced, at its next turn), for
//! a fixed time. A connection
//! goes to the origin or a proxy in the clear, or through TLS — to the origin directly, or
//! inside a `CONNECT` tunnel through a proxy that intercepts (the client trusts the
//! proxy's CA, as a sandbox does).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::{content_length, find_head_end, status_code};

/// Where and how a load connection sends its requests.
#[derive(Clone)]
pub struct Target {
    /// The address connected to (the origin, or the proxy).
    pub connect: SocketAddr,
    /// `CONNECT authority` sent first, through a proxy.
    pub tunnel: Option<String>,
    /// TLS (inside the tunnel, if any): the client configuration and the server name.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The request, sent again and again.
    pub request: Arc<[u8]>,
}

/// One measured run.
#[derive(Clone)]
pub struct Round {
    /// Responses with status 200.
    pub requests: u64,
    /// Failed connections, requests, or other statuses.
    pub errors: u64,
    /// How long it ran.
    pub elapsed: Duration,
    /// Latency of each successful request, µs.
    pub latency_us: Histogram<u64>,
    /// CPU time the proxy (if any) spent meanwhile.
    pub proxy_cpu: Option<Duration>,
    /// The proxy's resident memory right after, KiB.
    pub proxy_rss_kib: Option<u64>,
}

impl Round {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// The proxy's CPU time per successful request, s.
    pub fn cpu_per_request(&self) -> Option<f64> {
        self.proxy_cpu
            .map(|c| c.as_secs_f64() / self.requests.max(1) as f64)
    }

    /// Latency at quantile `q`, ms.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Runs `connections` closed-loop clients against `target` for `duration`; with a `rate`
/// (requests per second, all connections together), each connection sends at most one
/// request per `connections / rate` seconds, so that a proxy that keeps up is not saturated
/// and its CPU time per request measures its work rather than its share of the machine.
pub async fn run_load(
    target: &Target,
    connections: usize,
    duration: Duration,
    rate: Option<u32>,
) -> anyhow::Result<Round> {
    let stop = Arc::new(AtomicBool::new(false));
    let interval = rate
        .filter(|&r| r > 0)
        .map(|r| Duration::from_secs_f64(connections as f64 / f64::from(r)));
    let mut tasks = Vec::new();
    for i in 0..connections {
        let stop = stop.clone();
        let target = target.clone();
        // Paced connections start spread over one interval, not all at once.
        let first = interval.map(|every| every.mul_f64(i as f64 / connections as f64));
        tasks.push(tokio::spawn(async move {
            client(&target, &stop, interval, first).await
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut errors) = (0, 0);
    for task in tasks {
        let (hist, ok, failed) = task.await?;
        latency_us.add(&hist)?;
        requests += ok;
        errors += failed;
    }
    Ok(Round {
        requests,
        errors,
        elapsed: started.elapsed(),
        latency_us,
        proxy_cpu: None,
        proxy_rss_kib: None,
    })
}

/// Opens one connection as `target` says: TCP, the tunnel, the TLS handshake.
async fn open(target: &Target) -> std::io::Result<Box<dyn Stream>> {
    let mut socket = TcpStream::connect(target.connect).await?;
    socket.set_nodelay(true)?;
    if let Some(authority) = &target.tunnel {
        let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        socket.write_all(head.as_bytes()).await?;
        // Read exactly the answer's head: the TLS handshake follows on the same bytes.
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while find_head_end(&answer).is_none() {
            if socket.read(&mut byte).await? == 0 || answer.len() > 8192 {
                return Err(std::io::Error::other("the proxy closed the tunnel"));
            }
            answer.push(byte[0]);
        }
        if status_code(&answer) != Some(200) {
            return Err(std::io::Error::other("CONNECT refused"));
        }
    }
    match &target.tls {
        None => Ok(Box::new(socket)),
        Some((config, name)) => {
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name.clone(), socket)
                .await?;
            Ok(Box::new(tls))
        }
    }
}

/// One keep-alive connection; reconnects after an error. Paced, it sends a request every
/// `interval` (never two at once to catch up), the first after `first`. Returns (latencies,
/// ok, errors).
async fn client(
    target: &Target,
    stop: &AtomicBool,
    interval: Option<Duration>,
    first: Option<Duration>,
) -> (Histogram<u64>, u64, u64) {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds are valid");
    let (mut ok, mut errors) = (0, 0);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut next_turn = tokio::time::Instant::now() + first.unwrap_or_default();
    'connections: while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = open(target).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        buf.clear();
        while !stop.load(Ordering::Relaxed) {
            if let Some(every) = interval {
                tokio::time::sleep_until(next_turn).await;
                next_turn = (next_turn + every).max(tokio::time::Instant::now());
            }
            let start = Instant::now();
            if stream.write_all(&target.request).await.is_err() || stream.flush().await.is_err() {
                errors += 1;
                continue 'connections;
            }
            // Read one response: head, then content-length bytes of body.
            let (head_end, body_len) = loop {
                if let Some(end) = find_head_end(&buf) {
                    match content_length(&buf[..end]) {
                        Some(len) => break (end, len),
                        None => {
                            errors += 1;
                            continue 'connections;
                        }
                    }
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        errors += 1;
                        continue 'connections;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            while buf.len() < head_end + body_len {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        errors += 1;
                        continue 'connections;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let status_ok = status_code(&buf[..head_end]) == Some(200);
            buf.drain(..head_end + body_len);
            if status_ok {
                ok += 1;
                let _ = hist.record(start.elapsed().as_micros().max(1) as u64);
            } else {
                errors += 1;
            }
        }
    }
    (hist, ok, errors)
}

/// The multi-threaded runtime a driver runs its load and servers on.
pub fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}
