//! Listeners: binding sockets (inside an agent's network namespace when asked) and serving
//! them with pingora.
//!
//! Sockets are bound here rather than by pingora so that bind errors are reported clearly at
//! start-up, port 0 works (tests), and a socket can be bound in another network namespace:
//! a short-lived thread enters the namespace, binds, and exits; the listening socket stays in
//! that namespace while this process accepts on it. The bound socket is handed to a pingora
//! listening service through its file-descriptor table, so accepting, buffering and
//! per-connection tasks are pingora's own.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::{Fds, ListenFds, ShutdownWatch};
use pingora::services::listening::Service;
use pingora::services::Service as _;

use crate::egress::h2_watch::{H2Watch, RefusedStream};
use crate::egress::head;
use crate::egress::identity::{self, ListenerBinding};
use crate::egress::intercept::{self, Interceptor, NotAdmitted, Tunnel};
use crate::egress::proxy::{identity_refusal, record_refused_head, Egress, Shared};
use crate::egress::quota::ConnectionPermit;
use crate::observe::audit;
use crate::reply::{self, Refusal};
use crate::target::Target;

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// bind() or listen() failed.
    #[error("cannot listen on {address}{}: {source}", netns_suffix(.netns))]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The namespace, if any.
        netns: Option<PathBuf>,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The agent's listener is set in the config file.
    #[error(
        "agent {agent}'s listener is set in the config file and cannot be changed over the API"
    )]
    Configured {
        /// The agent.
        agent: String,
    },
    /// The network namespace could not be entered.
    #[error("cannot enter network namespace {netns}: {reason} (binding in a namespace needs root or CAP_SYS_ADMIN)")]
    Netns {
        /// The namespace file.
        netns: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn netns_suffix(netns: &Option<PathBuf>) -> String {
    netns
        .as_ref()
        .map(|p| format!(" in network namespace {}", p.display()))
        .unwrap_or_default()
}

/// Binds a TCP listener at `address`, inside the network namespace `netns` if given.
pub fn bind(address: SocketAddr, netns: Option<&Path>) -> Result<TcpListener, ListenerError> {
    let listener = match netns {
        None => bind_here(address),
        Some(ns) => {
            let ns = ns.to_path_buf();
            std::thread::spawn(move || -> Result<TcpListener, ListenerError> {
                enter_netns(&ns)?;
                // This thread now lives in the namespace and ends right after binding, so the
                // process's other threads never see it.
                bind_here(address).map_err(|e| match e {
                    ListenerError::Bind {
                        address, source, ..
                    } => ListenerError::Bind {
                        address,
                        netns: Some(ns.clone()),
                        source,
                    },
                    other => other,
                })
            })
            .join()
            .map_err(|_| ListenerError::Netns {
                netns: netns.map(Path::to_path_buf).unwrap_or_default(),
                reason: "the binding thread panicked".into(),
            })?
        }
    }?;
    Ok(listener)
}

fn bind_here(address: SocketAddr) -> Result<TcpListener, ListenerError> {
    let bind_err = |source| ListenerError::Bind {
        address,
        netns: None,
        source,
    };
    let listener = TcpListener::bind(address).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

fn enter_netns(ns: &Path) -> Result<(), ListenerError> {
    let netns_err = |reason: String| ListenerError::Netns {
        netns: ns.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(ns).map_err(|e| netns_err(e.to_string()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| netns_err(e.to_string()))
}

/// Bytes each accepted connection reads ahead, into a buffer of pingora's: none. Every
/// reader of a connection reads into a buffer of its own at least this large — request heads
/// 4 KiB at a time (`head`), bodies, TLS records, a CONNECT head 1 KiB at a time — and a read
/// that asks for as much as the read-ahead buffer holds bypasses it, so it saved no system
/// call; it only kept its bytes, zeroed at accept, for as long as the connection lived, idle
/// or held for approval. (pingora's default is 64 KiB.)
pub const CONNECTION_READ_BUFFER: usize = 0;

/// Serves `listener` with `app` until `shutdown` turns true; with `tls`, connections are TLS.
pub fn serve<A>(
    name: &str,
    listener: TcpListener,
    app: A,
    tls: Option<TlsSettings>,
    shutdown: ShutdownWatch,
) -> tokio::task::JoinHandle<()>
where
    A: ServerApp + Send + Sync + 'static,
{
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| name.to_string());
    let mut fds = Fds::new();
    fds.add(address.clone(), listener.into_raw_fd());
    let fds: ListenFds = Arc::new(parking_lot::Mutex::new(fds));
    let mut service = Service::new(name.to_string(), app);
    let endpoint = ListenerConfig::tcp(address).l4_buffer(L4BufferSettings::new(
        CONNECTION_READ_BUFFER,
        DEFAULT_L4_WRITE_BUFFER_SIZE,
    ));
    service.add_listener(match tls {
        Some(settings) => endpoint.tls(settings),
        None => endpoint,
    });
    tokio::spawn(async move {
        service.start_service(Some(fds), shutdown, 1).await;
    })
}

/// The application behind an egress listener: CONNECT goes to the interceptor, everything
/// else (and the decrypted tunnel) to the proxy pipeline.
pub struct EgressApp {
    proxy: Arc<HttpProxy<Egress>>,
    interceptor: Arc<Interceptor>,
    shared: Arc<Shared>,
    binding: ListenerBinding,
    first_bytes_timeout: Duration,
    request_head_timeout: Duration,
}

impl EgressApp {
    /// The app for one listener.
    pub fn new(
        proxy: Arc<HttpProxy<Egress>>,
        interceptor: Arc<Interceptor>,
        shared: Arc<Shared>,
        binding: ListenerBinding,
        first_bytes_timeout: Duration,
        request_head_timeout: Duration,
    ) -> Self {
        EgressApp {
            proxy,
            interceptor,
            shared,
            binding,
            first_bytes_timeout,
            request_head_timeout,
        }
    }
}

impl EgressApp {
    fn deadlines(&self) -> head::HeadDeadlines {
        head::HeadDeadlines {
            first_byte: self.first_bytes_timeout,
            head: self.request_head_timeout,
        }
    }
}

#[async_trait]
impl ServerApp for EgressApp {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The agent's connection limit: who it is is known from the listener or the source
        // address before anything is parsed. Unknown sources are refused per request (403).
        let agent = identity::identify(&self.shared.registry, &self.binding, peer_ip(&stream));
        let permit = match agent
            .as_ref()
            .map(|agent| self.shared.quotas.open_connection(agent))
        {
            Ok(Err(refusal)) => {
                tracing::warn!(status = refusal.status, error = refusal.error, detail = %refusal.detail, "connection refused");
                reply::answer_raw_and_close(&mut stream, &refusal).await;
                return None;
            }
            Ok(Ok(permit)) => Some(permit),
            Err(_) => None,
        };
        let first = tokio::time::timeout(
            self.first_bytes_timeout,
            intercept::starts_with_connect(&mut stream),
        )
        .await;
        let is_connect = match first {
            Ok(Ok(is_connect)) => is_connect,
            // Closed, failed or silent before sending 8 bytes: nothing to answer.
            _ => return None,
        };
        if !is_connect {
            self.serve_apart(stream, agent.ok(), None, permit, shutdown);
            return None;
        }
        // Who it is, and whether the policies leave anything inside this tunnel allowed: a
        // CONNECT to a host (or port) every request to which is denied is refused here,
        // before a leaf is minted or a handshake run.
        let admit =
            |peer: Option<IpAddr>, target: &Target| {
                let agent = identity::identify(&self.shared.registry, &self.binding, peer)
                    .map_err(|e| NotAdmitted {
                        agent: None,
                        refusal: Box::new(identity_refusal(&e)),
                    })?;
                let refused = |refusal: Refusal, policies: Vec<String>| {
                    let session = self.binding.session();
                    let tool_call = self.shared.tool_calls.current(&agent.id, session, None);
                    self.shared.audit.record(audit::refused_tunnel(
                        &agent.id,
                        session,
                        tool_call.map(|tc| tc.id),
                        target,
                        policies,
                        &refusal,
                    ));
                    Err(NotAdmitted {
                        agent: Some(agent.id.clone()),
                        refusal: Box::new(refusal),
                    })
                };
                // A tunnel counts against the agent's request rate: its leaf certificate and
                // handshake are the most a sandbox can make the gateway do.
                if let Err(refusal) = self.shared.quotas.start_request(&agent) {
                    return refused(refusal, Vec::new());
                }
                match self.shared.policies.decide_tunnel(&agent, target) {
                    None => Ok(()),
                    Some((decision, version)) => refused(
                        Refusal::for_decision(&decision, &version),
                        decision.policies,
                    ),
                }
            };
        // Boxed: the handshake's state would otherwise stay in every connection's future,
        // plain HTTP ones included.
        let decrypted = Box::pin(self.interceptor.open(stream, admit)).await?;
        let tunnel = decrypted
            .get_ssl_digest()
            .and_then(|d| d.extension.get::<Tunnel>().map(|t| t.target.clone()));
        // HTTP/2 frames its own heads (and has its own limits); the streams its layer refuses
        // by itself are recorded from the frames it writes. HTTP/1 inside the tunnel has its
        // heads read and checked like plain HTTP.
        if decrypted.selected_alpn_proto() == Some(ALPN::H2) {
            let (shared, known, tunnel) = (self.shared.clone(), agent.ok(), tunnel);
            let session = self.binding.session().map(str::to_string);
            let recorded = Arc::new(move |refused: RefusedStream| {
                record_refused_head(
                    &shared,
                    known.as_deref(),
                    session.as_deref(),
                    tunnel.as_ref(),
                    &head::RefusedHead::of_http2(refused),
                )
            });
            return self
                .proxy
                .process_new(H2Watch::wrap(decrypted, recorded), shutdown)
                .await;
        }
        self.serve_apart(decrypted, agent.ok(), tunnel, permit, shutdown);
        None
    }
}

impl EgressApp {
    /// Serves the HTTP/1 requests of a connection in a task of its own. pingora's task for
    /// the connection ends here, and with it its state and this app's (a TLS handshake's, an
    /// interception's): a connection that waits — between requests, or with a request
    /// parked for approval — keeps only the connection loop's own.
    fn serve_apart(
        self: &Arc<Self>,
        stream: Stream,
        known: Option<Arc<crate::agent::Agent>>,
        tunnel: Option<Target>,
        permit: Option<ConnectionPermit>,
        shutdown: &ShutdownWatch,
    ) {
        let app = self.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // The agent's connection counts until the connection ends.
            let _permit = permit;
            head::serve_http1(&app.proxy, stream, app.deadlines(), &shutdown, |refused| {
                record_refused_head(
                    &app.shared,
                    known.as_deref(),
                    app.binding.session(),
                    tunnel.as_ref(),
                    refused,
                )
            })
            .await;
        });
    }
}

/// The client's IP address, from the socket.
fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    stream
        .get_socket_digest()
        .and_then(|digest| digest.peer_addr().cloned())
        .and_then(|addr| addr.as_inet().map(|inet| inet.ip()))
}
