//! Start-up: from a [`Config`] to running listeners.
//!
//! Everything that can fail — the data directory, the CA, the admin token, the upstream trust
//! bundle, every bind — is done before the first connection is accepted, so a gateway either
//! starts completely or not at all, with an error that names what to fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::server::configuration::ServerConf;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tollgate_storage::{now_millis, Store};

use crate::admin::{AdminApi, AdminApp, Approvers};
use crate::agent::Agent;
use crate::config::Config;
use crate::datadir::{self, FileError};
use crate::egress::agent_listener::{AgentListeners, EgressApps};
use crate::egress::approval::Approvals;
use crate::egress::ca::{CaError, GatewayCa, LeafCerts};
use crate::egress::credentials::Credentials;
use crate::egress::decide::PolicyStore;
use crate::egress::head::HeadDeadlines;
use crate::egress::identity::{AgentRegistry, ListenerBinding, RegistryError};
use crate::egress::intercept::Interceptor;
use crate::egress::listener::{self, ListenerError};
use crate::egress::obo::OboSealer;
use crate::egress::proxy::Shared;
use crate::egress::toolcall::ToolCalls;
use crate::egress::upstream::Upstream;
use crate::observe::audit::AuditTrail;
use crate::observe::metrics::{GaugeSources, Metrics};
use crate::observe::telemetry::Telemetry;
use crate::observe::webhook::{self, Webhook};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file in the data directory could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The gateway CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A listener (egress, admin or an agent's own) could not be bound.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The registry refused the agents in the config or in the store.
    #[error("agents: {0}")]
    Registry(#[from] RegistryError),
    /// The CAs trusted for origin TLS could not be read or written as one bundle.
    #[error("upstream trust: {0}")]
    Trust(String),
    /// The Cedar policy set could not be read or is invalid.
    #[error(transparent)]
    Policy(#[from] tollgate_policy::LoadError),
    /// An identity provider or credential rule could not be set up (e.g. a secret unreadable).
    #[error(transparent)]
    Credentials(#[from] crate::egress::credentials::CredentialsError),
    /// The durable store could not be opened, read or written.
    #[error(transparent)]
    Storage(#[from] tollgate_storage::StoreError),
    /// The key sealing lent tokens could not be loaded or created.
    #[error(transparent)]
    Seal(#[from] crate::egress::obo::SealError),
    /// The audit writer thread could not be spawned.
    #[error("cannot start the audit writer: {0}")]
    AuditWriter(std::io::Error),
    /// An approver's token could not be read from its file or environment variable.
    #[error("admin.approvers: {0}")]
    Approver(String),
    /// A webhook's URL is not accepted, or its secret could not be read.
    #[error("approvals.webhooks: {0}")]
    Webhook(String),
}

/// A running gateway: where it listens, and the handle to stop it.
pub struct RunningGateway {
    /// The shared egress listener's address.
    pub egress: SocketAddr,
    /// The admin API's bound address (the real port when the config gave port 0).
    pub admin: SocketAddr,
    /// Agents' own listeners: (agent id, address).
    pub agent_listeners: Vec<(String, SocketAddr)>,
    /// The CA certificate sandboxes must trust.
    pub ca_cert: PathBuf,
    /// Whether the CA was created by this start.
    pub ca_created: bool,
    /// The file holding the admin bearer token (the start-up banner names it).
    pub admin_token: PathBuf,
    /// Whether the admin token was created by this start.
    pub admin_token_created: bool,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningGateway {
    /// Stops accepting connections and waits (up to `grace`) for the listeners to close.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let all = futures_join(self.tasks);
        let _ = tokio::time::timeout(grace, all).await;
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// Starts the gateway described by `config` on the current tokio runtime, reporting to
/// `telemetry` (started before, so that start-up is logged through it too).
pub async fn start(
    config: &Config,
    telemetry: Arc<Telemetry>,
) -> Result<RunningGateway, StartError> {
    if crate::egress::panics::armed() {
        tracing::warn!(
            "fault injection is armed (TOLLGATE_FAULT_INJECTION=1 in a test build): requests \
             to /__tollgate_fault/panic/… panic on purpose; never run this in production"
        );
    }
    datadir::ensure_dir(&config.data_dir)?;
    let (ca, ca_created) =
        GatewayCa::load_or_create(&config.ca_cert_path(), &config.ca_key_path())?;
    let ca_cert = ca.cert_path().to_path_buf();
    let (token, admin_token_created) = datadir::load_or_create_token(&config.admin_token_path())?;
    // Approval records name what agents asked for: the store is the gateway's alone (0700).
    let store_dir = config.data_dir.join("store");
    datadir::ensure_dir(&store_dir)?;
    let store = Store::open(&store_dir)?;
    // No connection survives a restart: requests still held by the previous process are gone.
    let abandoned = store.abandon_all_pending()?;
    if abandoned > 0 {
        tracing::info!(
            abandoned,
            "approvals pending at the last stop were marked abandoned"
        );
    }
    // The config's agents first, then those the admin API stored (their latest version).
    let registry = Arc::new(AgentRegistry::new(config.agents.iter().cloned())?);
    registry.put_all(store.agents::<Agent>()?)?;
    let approvers = load_approvers(config)?;
    let webhooks = config
        .approvals
        .webhooks
        .iter()
        .enumerate()
        .map(|(index, hook)| Webhook::load(index, hook))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StartError::Webhook)?;
    let policies = Arc::new(PolicyStore::load(config.policy.dir.as_deref())?);

    let server_conf = Arc::new(ServerConf {
        ca_file: upstream_trust_file(config)?.map(|p| p.display().to_string()),
        upstream_keepalive_pool_size: config.upstream.keepalive_pool_size,
        ..ServerConf::default()
    });
    let tool_calls = Arc::new(ToolCalls::default());
    // Token endpoints are reached with the same trusted roots as origins.
    let token_connector = pingora::connectors::http::Connector::new(Some(
        pingora::connectors::ConnectorOptions::from_server_conf(&server_conf),
    ));
    let credentials = Arc::new(Credentials::new(config, token_connector)?);
    let sealer = OboSealer::load(&config.obo_key_path())?;
    let approvals = Arc::new(Approvals::new(
        store.clone(),
        config.approvals.clone(),
        sealer,
        registry.clone(),
    ));
    // Lent tokens live as long as their tool call, and no tool call survives a restart.
    approvals.forget_expired_tokens(true)?;
    let leaves = LeafCerts::new(
        ca,
        config.tls.leaf_cache_capacity,
        Duration::from_secs(config.tls.leaf_validity_hours * 3600),
    );
    let leaves = Arc::new(leaves);
    let metrics = Arc::new(Metrics::default());
    let interceptor = Arc::new(Interceptor::new(
        leaves.clone(),
        config.limits.max_connect_head_bytes,
        config.limits.handshake_timeout(),
        metrics.clone(),
    ));

    // Bind everything before serving anything: a bind error starts nothing.
    let egress_socket = listener::bind(config.egress.listen, None)?;
    let admin_socket = listener::bind(config.admin.listen, None)?;
    let mut agent_sockets = Vec::new();
    for agent in &config.agents {
        if let Some(listen) = &agent.listen {
            let socket = listener::bind(listen.address, listen.netns.as_deref())?;
            agent_sockets.push((agent.id.clone(), listen.clone(), socket));
        }
    }
    let local = |s: &std::net::TcpListener, address: SocketAddr| {
        s.local_addr().map_err(|source| {
            StartError::Listener(ListenerError::Bind {
                address,
                netns: None,
                source,
            })
        })
    };
    let egress = local(&egress_socket, config.egress.listen)?;
    let admin = local(&admin_socket, config.admin.listen)?;
    // Sandboxes never reach the gateway's own listeners through it, whatever
    // upstream.allow_networks says: no loops, and no way to the admin API.
    let audit = Arc::new(AuditTrail::start(store.clone()).map_err(StartError::AuditWriter)?);
    let mut own_addresses = vec![egress, admin];
    for (_, listen, socket) in &agent_sockets {
        own_addresses.push(local(socket, listen.address)?);
    }
    let quotas = Arc::new(crate::egress::quota::Quotas::new(
        config.limits.agent_defaults(&config.approvals),
    ));
    let shared = Arc::new(Shared {
        registry: registry.clone(),
        policies: policies.clone(),
        tool_calls: tool_calls.clone(),
        credentials: credentials.clone(),
        upstream: Upstream::new(&config.upstream).refusing(own_addresses),
        approvals: approvals.clone(),
        connector: pingora::connectors::http::Connector::new(Some(
            pingora::connectors::ConnectorOptions::from_server_conf(&server_conf),
        )),
        audit: audit.clone(),
        metrics: metrics.clone(),
        telemetry: telemetry.clone(),
        quotas: quotas.clone(),
    });

    let (shutdown, watch) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(false));
    let apps = EgressApps {
        shared: shared.clone(),
        interceptor: interceptor.clone(),
        server_conf: server_conf.clone(),
        first_bytes_timeout: config.limits.handshake_timeout(),
        request_head_timeout: config.limits.request_head_timeout(),
    };
    let mut tasks = vec![listener::serve(
        "egress",
        egress_socket,
        apps.app(ListenerBinding::Shared),
        None,
        watch.clone(),
    )];
    let agent_listeners = Arc::new(AgentListeners::new(apps, watch.clone()));
    for (agent_id, listen, socket) in agent_sockets {
        agent_listeners.serve(&agent_id, listen, socket, true)?;
    }
    // Agents registered over the admin API with a listener in their sandbox's namespace:
    // the namespace may have gone with its sandbox while the gateway was down.
    for agent in registry.list() {
        let Some(listen) = &agent.listen else {
            continue;
        };
        if config.agents.iter().any(|a| a.id == agent.id) {
            continue;
        }
        if let Err(e) = agent_listeners.open(&agent.id, listen) {
            tracing::warn!(agent = %agent.id, error = %e, "cannot reopen the agent's listener; it has none until it is registered again");
        }
    }
    if config.policy.watch_interval_ms > 0 {
        let interval = Duration::from_millis(config.policy.watch_interval_ms);
        tasks.extend(policies.clone().watch(interval, watch.clone()));
    }
    tasks.push(sweep_tool_calls(
        tool_calls.clone(),
        credentials.clone(),
        approvals.clone(),
        watch.clone(),
    ));
    tasks.push(prune_history(
        store.clone(),
        Duration::from_secs(config.storage.retention_days * 86_400),
        watch.clone(),
    ));
    // Webhooks reach the platform with the same trusted roots as origins.
    let webhook_connector = Arc::new(pingora::connectors::http::Connector::new(Some(
        pingora::connectors::ConnectorOptions::from_server_conf(&server_conf),
    )));
    tasks.extend(webhook::spawn(
        webhooks,
        approvals.clone(),
        webhook_connector,
        watch.clone(),
    ));
    let gauges = Arc::new(GaugeSources {
        approvals: approvals.clone(),
        credentials: credentials.clone(),
        leaves,
        policies: policies.clone(),
        audit,
        store: store.clone(),
        telemetry: telemetry.dropped(),
    });
    telemetry.observe(metrics.clone(), gauges.clone());
    let admin_api = AdminApi {
        listeners: agent_listeners.clone(),
        callers: Approvers::new(token, approvers),
        registry: registry.clone(),
        policies: policies.clone(),
        tool_calls,
        quotas,
        credentials,
        approvals,
        store,
        metrics,
        gauges,
        ready: ready.clone(),
    };
    let admin_app = AdminApp::new(
        admin_api,
        HeadDeadlines {
            first_byte: config.limits.handshake_timeout(),
            head: config.limits.request_head_timeout(),
        },
    );
    tasks.push(listener::serve(
        "admin",
        admin_socket,
        admin_app,
        None,
        watch.clone(),
    ));
    ready.store(true, Ordering::Release);

    Ok(RunningGateway {
        egress,
        admin,
        agent_listeners: agent_listeners.addresses(),
        ca_cert,
        ca_created,
        admin_token: config.admin_token_path(),
        admin_token_created,
        shutdown,
        tasks,
    })
}

/// Closes tool calls whose TTL has passed, and drops their tokens, once a second; deletes
/// stored lent tokens past their lifetime every ten seconds.
fn sweep_tool_calls(
    tool_calls: Arc<ToolCalls>,
    credentials: Arc<Credentials>,
    approvals: Arc<Approvals>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for tick in 1u64.. {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            for (agent, serial, id) in tool_calls.sweep_expired() {
                approvals
                    .end_tool_call(&credentials, &agent, serial, &id)
                    .await;
                tracing::info!(agent, tool_call = id, "tool call expired");
            }
            if tick % 10 == 0 {
                let approvals = approvals.clone();
                match tokio::task::spawn_blocking(move || approvals.forget_expired_tokens(false))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not delete expired lent tokens")
                    }
                    Err(e) => tracing::warn!(error = %e, "could not delete expired lent tokens"),
                }
            }
        }
    })
}

/// Deletes audit records and settled approvals older than the retention, at start and hourly.
fn prune_history(
    store: Arc<Store>,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let before = now_millis().saturating_sub(retention.as_millis() as u64);
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.prune(before)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(pruned)) => tracing::info!(pruned, "pruned history past its retention"),
                Ok(Err(e)) => tracing::warn!(error = %e, "pruning history failed"),
                Err(e) => tracing::warn!(error = %e, "pruning history failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// Reads every named approver's token.
fn load_approvers(config: &Config) -> Result<Vec<(String, String)>, StartError> {
    config
        .admin
        .approvers
        .iter()
        .map(|a| {
            crate::egress::credentials::provider::read_secret(
                &a.token,
                &format!("approver {:?}", a.name),
            )
            .map(|token| (a.name.clone(), token.expose().to_string()))
            .map_err(StartError::Approver)
        })
        .collect()
}

/// The CA bundle origin certificates are checked against, or `None` for the system roots
/// alone (pingora loads those itself, honouring `SSL_CERT_FILE`).
///
/// With an extra CA file and system roots both wanted, the two are written together to
/// `<data_dir>/upstream-trust.pem` (public certificates only), because pingora takes one file.
fn upstream_trust_file(config: &Config) -> Result<Option<PathBuf>, StartError> {
    let Some(extra) = &config.upstream.extra_ca_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(extra).map_err(|e| {
        StartError::Trust(format!(
            "cannot read upstream.extra_ca_file {}: {e}",
            extra.display()
        ))
    })?;
    let extra_certs: Vec<pem::Pem> = pem::parse_many(&text)
        .map_err(|e| StartError::Trust(format!("{} is not PEM: {e}", extra.display())))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .collect();
    if extra_certs.is_empty() {
        return Err(StartError::Trust(format!(
            "upstream.extra_ca_file {} holds no CERTIFICATE block",
            extra.display()
        )));
    }
    if !config.upstream.system_roots {
        return Ok(Some(extra.clone()));
    }
    let system = pingora::tls::load_native_certs()
        .map_err(|e| StartError::Trust(format!("cannot load the system root certificates: {e}")))?;
    let mut bundle: Vec<pem::Pem> = system
        .iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.to_vec()))
        .collect();
    bundle.extend(extra_certs);
    let path = config.data_dir.join("upstream-trust.pem");
    let tmp = config.data_dir.join("upstream-trust.pem.tmp");
    let write_err =
        |e: std::io::Error| StartError::Trust(format!("cannot write {}: {e}", path.display()));
    std::fs::write(&tmp, pem::encode_many(&bundle)).map_err(write_err)?;
    std::fs::rename(&tmp, &path).map_err(write_err)?;
    Ok(Some(path))
}
