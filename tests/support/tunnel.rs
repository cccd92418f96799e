//! Tunnels through the gateway from the test itself: `CONNECT`, then TLS with the gateway's
//! CA, as a sandbox's client does (rustls; a choice of SNI and ALPN).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use pingora::tls::TlsConnector;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Gateway;

/// Sends `CONNECT authority` and returns the answer's head and the connection.
pub async fn connect(proxy: SocketAddr, authority: &str) -> (String, TcpStream) {
    let mut tcp = TcpStream::connect(proxy).await.expect("connect to gateway");
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write CONNECT");
    // Byte by byte: nothing after the head may be consumed (the TLS handshake follows).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match tcp.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    (String::from_utf8_lossy(&head).to_string(), tcp)
}

/// A rustls client config trusting the gateway's CA, offering `alpn`, sending SNI or not.
pub fn client_config(gw_ca: &Path, sni: bool, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read_to_string(gw_ca).expect("gateway CA");
    let der = pem::parse(pem).expect("CA PEM");
    roots
        .add(der.contents().to_vec().into())
        .expect("add gateway CA");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.enable_sni = sni;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

pub type Tls = pingora::tls::ClientTlsStream<TcpStream>;

/// CONNECT to `authority`, then TLS with the gateway verifying as `name` (and sending it as
/// SNI when `sni` and it is a DNS name; rustls never sends an IP address as SNI).
pub async fn tunnel(
    gw: &Gateway,
    authority: &str,
    name: &str,
    sni: bool,
    alpn: &[&[u8]],
) -> Result<Tls, String> {
    let (head, tcp) = connect(gw.egress, authority).await;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("CONNECT answered {head:?}"));
    }
    let connector = TlsConnector::from(client_config(&gw.ca_cert(), sni, alpn));
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}
