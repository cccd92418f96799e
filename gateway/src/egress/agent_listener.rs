//! Agents' own egress listeners, opened and closed while the gateway runs.
//!
//! A listener of an agent's own is bound inside the network namespace of that agent's
//! sandbox (its microVM's), so whatever connects to it can only be that agent: identity is
//! bound to the VM, and nothing the guest sends can change it. The sandbox launcher creates
//! the namespace, then registers the agent over the admin API naming it; the gateway binds
//! there and serves the socket from its own process. Removing the agent, or registering it
//! again without a listener, closes the listener — unless it comes from the config file:
//! those live as long as the gateway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use tokio::sync::watch;

use crate::agent::AgentListenConfig;
use crate::egress::identity::ListenerBinding;
use crate::egress::intercept::Interceptor;
use crate::egress::listener::{self, EgressApp, ListenerError};
use crate::egress::proxy::{Egress, Shared};

/// Builds the egress app of a listener: the same pipeline for every listener, told apart
/// only by its binding (shared, or one agent's).
pub struct EgressApps {
    /// The pipeline's shared state.
    pub shared: Arc<Shared>,
    /// CONNECT handling and TLS interception.
    pub interceptor: Arc<Interceptor>,
    /// pingora's settings for the proxy.
    pub server_conf: Arc<ServerConf>,
    /// How long a new connection may take to send its first bytes.
    pub first_bytes_timeout: Duration,
    /// Time a request head may take (`limits.request_head_timeout_ms`).
    pub request_head_timeout: Duration,
}

impl EgressApps {
    /// The app for a listener with `binding`.
    pub fn app(&self, binding: ListenerBinding) -> EgressApp {
        let mut proxy = HttpProxy::new(
            Egress::new(self.shared.clone(), binding.clone()),
            self.server_conf.clone(),
        );
        proxy.h2_options = Some(h2_options());
        proxy.handle_init_modules();
        EgressApp::new(
            Arc::new(proxy),
            self.interceptor.clone(),
            self.shared.clone(),
            binding,
            self.first_bytes_timeout,
            self.request_head_timeout,
        )
    }
}

/// Most streams one HTTP/2 connection inside a tunnel may have open at once (announced in
/// SETTINGS_MAX_CONCURRENT_STREAMS); streams beyond it are refused (`REFUSED_STREAM`) before
/// anything is decided or forwarded. pingora's default, set here so it cannot change under us.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// Streams a client may reset before the gateway has even taken them up, per HTTP/2
/// connection: one more and the connection gets GOAWAY (`ENHANCE_YOUR_CALM`). This is h2's
/// answer to "rapid reset" (CVE-2023-44487): opening and cancelling streams costs the client
/// nothing and the server work, and reset streams do not count against the stream limit.
pub const H2_MAX_PENDING_RESET_STREAMS: usize = 20;

/// Streams the gateway may reset itself because the client broke the protocol on them
/// (e.g. streams over the limit), per HTTP/2 connection; one more and the connection gets
/// GOAWAY (`ENHANCE_YOUR_CALM`).
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// HTTP/2 server settings for the tunnels: pingora's bounded defaults (64 KiB of decoded
/// headers, the stream limit) and the reset limits above, all explicit.
fn h2_options() -> pingora::protocols::http::v2::server::H2Options {
    let mut options = pingora::protocols::http::v2::server::default_h2_options();
    options
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESET_STREAMS)
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_ERROR_RESET_STREAMS));
    options
}

/// Whose a listener is: an agent's own, or one of its sessions'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Owner {
    agent: String,
    session: Option<String>,
}

impl Owner {
    fn binding(&self) -> ListenerBinding {
        match &self.session {
            None => ListenerBinding::Agent(self.agent.clone()),
            Some(session) => ListenerBinding::Session {
                agent: self.agent.clone(),
                session: session.clone(),
            },
        }
    }
}

/// The agents' (and their sessions') listeners that are open now.
pub struct AgentListeners {
    apps: EgressApps,
    /// Fires when the whole gateway stops.
    gateway_stopping: watch::Receiver<bool>,
    open: Mutex<HashMap<Owner, Open>>,
}

/// One open listener.
struct Open {
    config: AgentListenConfig,
    address: SocketAddr,
    stop: Arc<watch::Sender<bool>>,
    /// From the config file: it lives as long as the gateway (an agent removed over the API
    /// then gets 403 on it, and its port is never left for another process to take).
    configured: bool,
}

impl AgentListeners {
    /// No listeners yet; each one opened later stops with the gateway.
    pub fn new(apps: EgressApps, gateway_stopping: watch::Receiver<bool>) -> AgentListeners {
        AgentListeners {
            apps,
            gateway_stopping,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Binds `listen` (in its namespace) for `agent`, now, and serves it; returns the bound
    /// address. Blocks briefly (entering a namespace takes a thread of its own). An agent
    /// that already listens there keeps its listener; one that listens elsewhere moves, and
    /// its old listener closes only once the new one is bound.
    pub fn open(
        &self,
        agent: &str,
        listen: &AgentListenConfig,
    ) -> Result<SocketAddr, ListenerError> {
        self.open_for(
            Owner {
                agent: agent.to_string(),
                session: None,
            },
            listen,
        )
    }

    /// Like [`AgentListeners::open`], for one of `agent`'s sessions: every connection to it
    /// is the agent's, in that session.
    pub fn open_session(
        &self,
        agent: &str,
        session: &str,
        listen: &AgentListenConfig,
    ) -> Result<SocketAddr, ListenerError> {
        self.open_for(
            Owner {
                agent: agent.to_string(),
                session: Some(session.to_string()),
            },
            listen,
        )
    }

    fn open_for(
        &self,
        owner: Owner,
        listen: &AgentListenConfig,
    ) -> Result<SocketAddr, ListenerError> {
        if let Some(open) = self.open.lock().get(&owner) {
            if open.config == *listen {
                return Ok(open.address);
            }
            if open.configured {
                return Err(ListenerError::Configured { agent: owner.agent });
            }
        }
        let socket = listener::bind(listen.address, listen.netns.as_deref())?;
        self.serve_for(owner, listen.clone(), socket, false)
    }

    /// Serves `socket`, already bound as `listen` says, as `agent`'s listener; `configured`
    /// for one from the config file, which stays open as long as the gateway runs.
    pub fn serve(
        &self,
        agent: &str,
        listen: AgentListenConfig,
        socket: std::net::TcpListener,
        configured: bool,
    ) -> Result<SocketAddr, ListenerError> {
        let owner = Owner {
            agent: agent.to_string(),
            session: None,
        };
        self.serve_for(owner, listen, socket, configured)
    }

    fn serve_for(
        &self,
        owner: Owner,
        listen: AgentListenConfig,
        socket: std::net::TcpListener,
        configured: bool,
    ) -> Result<SocketAddr, ListenerError> {
        let address = socket.local_addr().map_err(|source| ListenerError::Bind {
            address: listen.address,
            netns: listen.netns.clone(),
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let stop = Arc::new(stop);
        let app = self.apps.app(owner.binding());
        let name = match &owner.session {
            None => format!("agent-{}", owner.agent),
            Some(session) => format!("session-{}-{session}", owner.agent),
        };
        listener::serve(&name, socket, app, None, stopped);
        // The listener also stops with the gateway.
        let mut gateway_stopping = self.gateway_stopping.clone();
        let stop_on_exit = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = gateway_stopping.changed() => { let _ = stop_on_exit.send(true); }
                _ = stop_on_exit.closed() => {}
            }
        });
        tracing::info!(agent = owner.agent, session = ?owner.session, %address, "listener open");
        let previous = self.open.lock().insert(
            owner,
            Open {
                config: listen,
                address,
                stop,
                configured,
            },
        );
        if let Some(previous) = previous {
            let _ = previous.stop.send(true);
        }
        Ok(address)
    }

    /// Closes `agent`'s own listener, if it has one that was not configured in the file.
    pub fn close(&self, agent: &str) {
        self.close_where(|owner| owner.agent == agent && owner.session.is_none());
    }

    /// Closes every listener of `agent`: its own (unless configured) and its sessions' (the
    /// agent was removed).
    pub fn close_all(&self, agent: &str) {
        self.close_where(|owner| owner.agent == agent);
    }

    fn close_where(&self, which: impl Fn(&Owner) -> bool) {
        self.open.lock().retain(|owner, listener| {
            let closes = which(owner) && !listener.configured;
            if closes {
                let _ = listener.stop.send(true);
                tracing::info!(agent = owner.agent, session = ?owner.session, address = %listener.address, "listener closed");
            }
            !closes
        });
    }

    /// Closes the listener of `agent`'s `session`; whether it had one.
    pub fn close_session(&self, agent: &str, session: &str) -> bool {
        let owner = Owner {
            agent: agent.to_string(),
            session: Some(session.to_string()),
        };
        match self.open.lock().remove(&owner) {
            Some(closed) => {
                let _ = closed.stop.send(true);
                tracing::info!(agent, session, address = %closed.address, "session listener closed");
                true
            }
            None => false,
        }
    }

    /// `agent`'s sessions that have a listener: session and address.
    pub fn sessions(&self, agent: &str) -> Vec<(String, SocketAddr)> {
        let mut all: Vec<_> = self
            .open
            .lock()
            .iter()
            .filter(|(owner, _)| owner.agent == agent)
            .filter_map(|(owner, open)| Some((owner.session.clone()?, open.address)))
            .collect();
        all.sort();
        all
    }

    /// Every agent's own open listener: agent and address.
    pub fn addresses(&self) -> Vec<(String, SocketAddr)> {
        let mut all: Vec<_> = self
            .open
            .lock()
            .iter()
            .filter(|(owner, _)| owner.session.is_none())
            .map(|(owner, open)| (owner.agent.clone(), open.address))
            .collect();
        all.sort();
        all
    }
}
