//! The origin the benchmarks send their requests to: on loopback, in the driver's process,
//! it answers every request on a keep-alive connection with the same 200 response.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::http::{content_length, find_head_end};

/// Starts the origin on an ephemeral loopback port, on the current Tokio runtime: every
/// request (its body, if it has a `Content-Length`, read and dropped) is answered with a
/// 200 carrying `body`.
pub async fn start_origin(body: Vec<u8>) -> anyhow::Result<SocketAddr> {
    start(body, None).await
}

/// The same origin speaking TLS with `config`.
pub async fn start_tls_origin(
    body: Vec<u8>,
    config: Arc<rustls::ServerConfig>,
) -> anyhow::Result<SocketAddr> {
    start(body, Some(tokio_rustls::TlsAcceptor::from(config))).await
}

async fn start(
    body: Vec<u8>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    let response: Arc<[u8]> = response.into();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            let response = response.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve(socket, &response).await,
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(socket).await {
                            serve(stream, &response).await;
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Answers every complete request on `socket` with `response` until the peer closes.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut socket: S, response: &[u8]) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Answer each complete request.
        while let Some(end) = find_head_end(&buf) {
            let len = end + content_length(&buf[..end]).unwrap_or(0);
            if buf.len() < len {
                break;
            }
            buf.drain(..len);
            if socket.write_all(response).await.is_err() {
                return;
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
