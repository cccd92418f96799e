//! Step 2 of the data path: CONNECT and TLS interception.
//!
//! pingora's proxy answers CONNECT with 405, so the egress listener looks at the first bytes
//! of each connection itself. A CONNECT is answered here: the authority parsed, the agent
//! identified, the tunnel refused if the policies deny every request through it, `200
//! Connection Established` sent, and the TLS handshake run on the same
//! socket with a leaf certificate for the requested host. The decrypted stream then enters
//! the same pingora proxy pipeline as plain HTTP; since it is the same socket, the pipeline
//! still sees the sandbox's own address.
//!
//! The tunnel's target travels with the TLS session (an extension of pingora's SSL digest),
//! so the pipeline forwards to the host the sandbox named in its CONNECT, never to whatever
//! a `Host` header inside the tunnel says.

use std::any::Any;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{GetSocketDigest, Stream};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::egress::ca::LeafCerts;
use crate::observe::metrics::Metrics;
use crate::reply::{ErrorCode, Refusal};
use crate::target::{Host, Target};

/// Why a CONNECT was not let through: the answer, and the agent it came from if one was
/// identified (for the metrics).
#[derive(Debug)]
pub struct NotAdmitted {
    /// The agent, if known.
    pub agent: Option<String>,
    /// The answer to the CONNECT (boxed: it is the rare path).
    pub refusal: Box<Refusal>,
}

/// What the proxy pipeline learns about an intercepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// The origin named in the CONNECT request.
    pub target: Target,
}

/// Answers CONNECT requests and intercepts the TLS inside.
pub struct Interceptor {
    leaves: Arc<LeafCerts>,
    max_head_bytes: usize,
    handshake_timeout: Duration,
    /// Refused CONNECTs are counted here (no HTTP request exists for the proxy to count).
    metrics: Arc<Metrics>,
}

/// The first bytes of a CONNECT request.
const CONNECT_PREFIX: &[u8; 8] = b"CONNECT ";

/// Whether the connection starts with a CONNECT request (peeked, nothing consumed).
pub async fn starts_with_connect(stream: &mut Stream) -> std::io::Result<bool> {
    let mut first = [0u8; CONNECT_PREFIX.len()];
    let peeked = stream.try_peek(&mut first).await?;
    Ok(peeked && &first == CONNECT_PREFIX)
}

impl Interceptor {
    /// An interceptor minting leaves from `leaves`.
    pub fn new(
        leaves: Arc<LeafCerts>,
        max_head_bytes: usize,
        handshake_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Interceptor {
            leaves,
            max_head_bytes,
            handshake_timeout,
            metrics,
        }
    }

    /// Serves a CONNECT: returns the decrypted stream, or `None` once the connection has been
    /// refused (with an HTTP answer when one is still possible) and closed.
    ///
    /// `admit` is asked, with the sandbox's address and the CONNECT's target, whether this
    /// connection belongs to a known agent that may reach the target at all; a refusal ends
    /// the tunnel before anything is intercepted (no leaf is minted, no handshake run).
    pub async fn open(
        &self,
        stream: Stream,
        admit: impl FnOnce(Option<IpAddr>, &Target) -> Result<(), NotAdmitted>,
    ) -> Option<Stream> {
        let mut l4 = match stream.into_any().downcast::<L4Stream>() {
            Ok(l4) => l4,
            Err(_) => {
                tracing::error!("CONNECT on a stream that is not plain TCP; closing");
                return None;
            }
        };
        let peer = peer_ip(&l4);
        let started = std::time::Instant::now();
        let refuse_as = |l4, agent: Option<&str>, refusal: Refusal| {
            let decision = if refusal.error == "denied" {
                "deny"
            } else {
                "none"
            };
            self.metrics.record_request(
                agent.unwrap_or("(unknown)"),
                decision,
                refusal.status,
                started.elapsed(),
            );
            refuse(l4, peer, refusal)
        };
        // Refused before any agent was identified.
        let refuse = |l4, refusal: Refusal| refuse_as(l4, None, refusal);
        let head = tokio::time::timeout(self.handshake_timeout, self.read_head(&mut l4)).await;
        let target = match head {
            Ok(Ok(target)) => target,
            Ok(Err(refusal)) => return refuse(l4, refusal).await,
            Err(_) => {
                let refusal =
                    Refusal::new(ErrorCode::RequestTimeout, "the CONNECT head took too long");
                return refuse(l4, refusal).await;
            }
        };
        if let Err(not) = admit(peer, &target) {
            return refuse_as(l4, not.agent.as_deref(), *not.refusal).await;
        }
        if l4
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .is_err()
            || l4.flush().await.is_err()
        {
            return None;
        }

        let resolver = Arc::new(TunnelCertResolver {
            leaves: self.leaves.clone(),
            expected: target.host.clone(),
            refused: OnceLock::new(),
        });
        let tunnel = Arc::new(Tunnel {
            target: target.clone(),
        });
        let acceptor = {
            let mut settings = match TlsSettings::with_callbacks(Box::new(TunnelAttach(tunnel))) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build TLS settings for a tunnel");
                    return None;
                }
            };
            settings.set_cert_resolver(resolver.clone());
            settings.enable_h2();
            settings.build()
        };
        let handshake = tokio::time::timeout(self.handshake_timeout, acceptor.tls_handshake(*l4));
        match handshake.await {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                match resolver.refused.get() {
                    Some(why) => {
                        tracing::warn!(peer = ?peer, target = %target, "tunnel refused: {why}")
                    }
                    None => {
                        tracing::info!(peer = ?peer, target = %target, error = %e, "intercepted TLS handshake failed")
                    }
                }
                None
            }
            Err(_) => {
                tracing::info!(peer = ?peer, target = %target, "intercepted TLS handshake timed out");
                None
            }
        }
    }

    /// Reads and parses the CONNECT head; bytes after it stay in the stream.
    async fn read_head(&self, l4: &mut L4Stream) -> Result<Target, Refusal> {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            let n = l4.read(&mut chunk).await.map_err(|e| {
                Refusal::bad_request(format!("reading the CONNECT head failed: {e}"))
            })?;
            if n == 0 {
                return Err(Refusal::bad_request(
                    "the connection closed inside the CONNECT head",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    // httparse takes a bare LF as a line end; the proxy's own framing does
                    // not (a CONNECT is framed like any other head).
                    if crate::egress::framing::has_bare_lf(&buf[..head_len]) {
                        return Err(Refusal::bad_request(
                            "a line of the CONNECT head ends in LF without CR",
                        ));
                    }
                    let target = connect_target(&request)?;
                    l4.rewind(&buf[head_len..]);
                    return Ok(target);
                }
                Ok(httparse::Status::Partial) if buf.len() <= self.max_head_bytes => continue,
                Ok(httparse::Status::Partial) => {
                    return Err(Refusal::new(
                        ErrorCode::RequestHeaderFieldsTooLarge,
                        format!(
                            "the CONNECT head is larger than {} bytes",
                            self.max_head_bytes
                        ),
                    ))
                }
                Err(e) => {
                    return Err(Refusal::bad_request(format!(
                        "malformed CONNECT request: {e}"
                    )))
                }
            }
        }
    }
}

/// Validates a parsed CONNECT request and returns its target.
fn connect_target(request: &httparse::Request<'_, '_>) -> Result<Target, Refusal> {
    if request.method != Some("CONNECT") {
        return Err(Refusal::bad_request("expected a CONNECT request"));
    }
    // HTTP/1.0 CONNECT is what some clients still send (openssl s_client, Java's older
    // clients); the tunnel is the same. httparse knows no other versions.
    if !matches!(request.version, Some(0 | 1)) {
        return Err(Refusal::new(
            ErrorCode::HttpVersionNotSupported,
            "CONNECT must be sent as HTTP/1.1 or HTTP/1.0",
        ));
    }
    let authority = request.path.unwrap_or_default();
    Target::from_connect_authority(authority)
        .map_err(|e| Refusal::bad_request(format!("bad CONNECT authority: {e}")))
}

fn peer_ip(l4: &L4Stream) -> Option<IpAddr> {
    l4.get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
}

async fn refuse(mut l4: Box<L4Stream>, peer: Option<IpAddr>, refusal: Refusal) -> Option<Stream> {
    tracing::warn!(peer = ?peer, status = refusal.status, error = refusal.error, detail = %refusal.detail, "CONNECT refused");
    crate::reply::answer_raw_and_close(&mut l4, &refusal).await;
    None
}

/// Picks the leaf for one tunnel: only for the host named in the CONNECT.
///
/// A ClientHello whose SNI names another host is refused before anything is minted, so a
/// sandbox cannot CONNECT to an allowed host and then speak TLS to a different one. A
/// ClientHello without SNI is accepted only for an IP-literal CONNECT (clients send no SNI
/// for IP addresses).
struct TunnelCertResolver {
    leaves: Arc<LeafCerts>,
    expected: Host,
    refused: OnceLock<String>,
}

impl std::fmt::Debug for TunnelCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelCertResolver")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for TunnelCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acceptable = match hello.server_name() {
            Some(sni) => match Host::parse(sni) {
                Ok(host) if host == self.expected => true,
                _ => {
                    let _ = self.refused.set(format!(
                        "TLS server name {sni:?} does not match the CONNECT authority {}",
                        self.expected
                    ));
                    false
                }
            },
            None if matches!(self.expected, Host::Ip(_)) => true,
            None => {
                let _ = self.refused.set(format!(
                    "the TLS ClientHello has no server name; CONNECT named {}",
                    self.expected
                ));
                false
            }
        };
        if !acceptable {
            return None;
        }
        match self.leaves.get(&self.expected) {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                let _ = self.refused.set(e.to_string());
                None
            }
        }
    }
}

/// Attaches the tunnel to the TLS session once the handshake is done.
struct TunnelAttach(Arc<Tunnel>);

#[async_trait]
impl TlsAccept for TunnelAttach {
    async fn handshake_complete_callback(
        &self,
        _tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        Some(self.0.clone())
    }
}
