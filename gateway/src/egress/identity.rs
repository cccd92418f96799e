//! Step 1 of the data path: which agent sent this request.
//!
//! An agent is known by one of two things, both fixed before the first byte of a request is
//! read: the listener it connected to (an agent's own listener, typically bound inside its
//! microVM's network namespace) or its source address on the shared listener. Nothing the
//! sandbox sends in the request can change the answer.
//!
//! The registry is read on every request and written only by the admin API, so reads are a
//! lock-free snapshot load and writes copy the (small) snapshot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::agent::{validate_agent_id, Agent};

/// The source of agent revisions: every registry change in this process gets a new one.
static NEXT_REVISION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Why a registry change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// The id is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("agent id {0:?} is invalid: use 1 to 128 characters of A-Z a-z 0-9 . _ -")]
    InvalidId(String),
    /// A limit that would lock the agent out.
    #[error("agent {agent:?}: {reason}")]
    InvalidLimits {
        /// The agent.
        agent: String,
        /// Which limit, and why.
        reason: String,
    },
    /// Another agent already owns this source address.
    #[error("peer address {peer} already belongs to agent {owner:?}")]
    PeerTaken {
        /// The contested address.
        peer: IpAddr,
        /// The agent that has it.
        owner: String,
    },
}

#[derive(Default, Clone)]
struct Snapshot {
    agents: HashMap<String, Arc<Agent>>,
    by_peer: HashMap<IpAddr, Arc<Agent>>,
}

impl Snapshot {
    /// Adds or replaces `agent` (validated here); true if it was new.
    fn put(&mut self, mut agent: Agent) -> Result<bool, RegistryError> {
        validate_agent_id(&agent.id).map_err(|e| RegistryError::InvalidId(e.0))?;
        agent
            .limits
            .validate()
            .map_err(|reason| RegistryError::InvalidLimits {
                agent: agent.id.clone(),
                reason,
            })?;
        for peer in agent.peers.iter_mut() {
            *peer = canonical_ip(*peer);
        }
        for peer in &agent.peers {
            if let Some(owner) = self.by_peer.get(peer) {
                if owner.id != agent.id {
                    return Err(RegistryError::PeerTaken {
                        peer: *peer,
                        owner: owner.id.clone(),
                    });
                }
            }
        }
        let previous = self.agents.remove(&agent.id);
        if let Some(previous) = &previous {
            // A replaced agent keeps its own listener: listeners come from the config file.
            if agent.listen.is_none() {
                agent.listen = previous.listen.clone();
            }
            for peer in &previous.peers {
                self.by_peer.remove(peer);
            }
        }
        agent.revision = NEXT_REVISION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let agent = Arc::new(agent);
        for peer in &agent.peers {
            self.by_peer.insert(*peer, agent.clone());
        }
        self.agents.insert(agent.id.clone(), agent);
        Ok(previous.is_none())
    }
}

/// The agents the gateway serves, by id and by source address.
#[derive(Default)]
pub struct AgentRegistry {
    snapshot: ArcSwap<Snapshot>,
    writes: std::sync::Mutex<()>,
}

impl AgentRegistry {
    /// A registry holding `agents` (already validated by the config).
    pub fn new(agents: impl IntoIterator<Item = Agent>) -> Result<Self, RegistryError> {
        let registry = Self::default();
        registry.put_all(agents)?;
        Ok(registry)
    }

    /// The agent with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Agent>> {
        self.snapshot.load().agents.get(id).cloned()
    }

    /// The agent that owns this source address on the shared listener.
    pub fn by_peer(&self, ip: IpAddr) -> Option<Arc<Agent>> {
        self.snapshot.load().by_peer.get(&canonical_ip(ip)).cloned()
    }

    /// Every agent, sorted by id.
    pub fn list(&self) -> Vec<Arc<Agent>> {
        let mut all: Vec<_> = self.snapshot.load().agents.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Adds or replaces an agent. Returns true if it was new.
    pub fn put(&self, agent: Agent) -> Result<bool, RegistryError> {
        Ok(self.put_all([agent])? == 1)
    }

    /// Adds or replaces `agents`, in order, as one change: all of them or, on the first
    /// error, none. Returns how many were new. Each change copies the registry once, so
    /// loading many agents this way costs what one does, not one copy each.
    pub fn put_all(&self, agents: impl IntoIterator<Item = Agent>) -> Result<usize, RegistryError> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Snapshot::clone(&self.snapshot.load());
        let mut added = 0;
        for agent in agents {
            added += usize::from(next.put(agent)?);
        }
        self.snapshot.store(Arc::new(next));
        Ok(added)
    }
    /// Removes an agent; its source addresses stop being attributed to anyone.
    pub fn remove(&self, id: &str) -> Option<Arc<Agent>> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Snapshot::clone(&self.snapshot.load());
        let removed = next.agents.remove(id)?;
        for peer in &removed.peers {
            next.by_peer.remove(peer);
        }
        self.snapshot.store(Arc::new(next));
        Some(removed)
    }
}

/// What a listener knows about who connects to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerBinding {
    /// The shared listener: the agent is found by source address.
    Shared,
    /// An agent's own listener: every connection is this agent's.
    Agent(String),
    /// The listener of one of an agent's sessions (a conversation thread's sandbox): every
    /// connection is this agent's, in this session.
    Session {
        /// The agent.
        agent: String,
        /// The session.
        session: String,
    },
}

impl ListenerBinding {
    /// The session every connection to this listener belongs to, if it is a session's.
    pub fn session(&self) -> Option<&str> {
        match self {
            ListenerBinding::Session { session, .. } => Some(session),
            _ => None,
        }
    }
}

/// Why a connection could not be attributed to an agent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// No agent owns the source address.
    #[error("no agent is registered for source address {0}")]
    UnknownPeer(IpAddr),
    /// The peer address could not be read from the socket.
    #[error("the connection's source address is unknown")]
    NoPeerAddress,
    /// The listener's agent is no longer in the registry.
    #[error("agent {0:?} of this listener is not registered")]
    UnknownAgent(String),
}

/// Finds the agent behind a connection.
pub fn identify(
    registry: &AgentRegistry,
    binding: &ListenerBinding,
    peer: Option<IpAddr>,
) -> Result<Arc<Agent>, IdentityError> {
    match binding {
        ListenerBinding::Agent(id) | ListenerBinding::Session { agent: id, .. } => registry
            .get(id)
            .ok_or_else(|| IdentityError::UnknownAgent(id.clone())),
        ListenerBinding::Shared => {
            let ip = peer.ok_or(IdentityError::NoPeerAddress)?;
            registry
                .by_peer(ip)
                .ok_or(IdentityError::UnknownPeer(canonical_ip(ip)))
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are the IPv4 address they map.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::agent::{AgentLimits, RunMode};

    fn agent(id: &str, peers: &[&str]) -> Agent {
        Agent {
            id: id.into(),
            run_mode: RunMode::Review,
            scopes: vec![],
            identity: None,
            tags: BTreeMap::new(),
            peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
            listen: None,
            limits: AgentLimits::default(),
            revision: 0,
        }
    }

    #[test]
    fn peers_map_to_their_agent_and_mapped_v6_is_v4() {
        let r =
            AgentRegistry::new([agent("a", &["127.0.0.2"]), agent("b", &["127.0.0.3"])]).unwrap();
        let got = identify(
            &r,
            &ListenerBinding::Shared,
            Some("127.0.0.3".parse().unwrap()),
        );
        assert_eq!(got.unwrap().id, "b");
        let mapped = identify(
            &r,
            &ListenerBinding::Shared,
            Some("::ffff:127.0.0.2".parse().unwrap()),
        );
        assert_eq!(mapped.unwrap().id, "a");
        let unknown = identify(
            &r,
            &ListenerBinding::Shared,
            Some("127.0.0.9".parse().unwrap()),
        );
        assert_eq!(
            unknown.unwrap_err(),
            IdentityError::UnknownPeer("127.0.0.9".parse().unwrap())
        );
    }

    #[test]
    fn a_bound_listener_ignores_the_peer_address() {
        let r = AgentRegistry::new([agent("a", &["127.0.0.2"]), agent("b", &[])]).unwrap();
        let got = identify(
            &r,
            &ListenerBinding::Agent("b".into()),
            Some("127.0.0.2".parse().unwrap()),
        );
        assert_eq!(got.unwrap().id, "b");
        r.remove("b");
        let gone = identify(&r, &ListenerBinding::Agent("b".into()), None);
        assert_eq!(gone.unwrap_err(), IdentityError::UnknownAgent("b".into()));
    }

    #[test]
    fn replacing_an_agent_moves_its_peers_and_conflicts_are_refused() {
        let r = AgentRegistry::new([agent("a", &["127.0.0.2"])]).unwrap();
        assert!(!r.put(agent("a", &["127.0.0.4"])).unwrap());
        assert!(r.by_peer("127.0.0.2".parse().unwrap()).is_none());
        assert_eq!(r.by_peer("127.0.0.4".parse().unwrap()).unwrap().id, "a");
        let err = r.put(agent("b", &["127.0.0.4"])).unwrap_err();
        assert!(matches!(err, RegistryError::PeerTaken { .. }));
        assert!(r.get("b").is_none(), "a refused put changes nothing");
        r.remove("a");
        assert!(r.by_peer("127.0.0.4".parse().unwrap()).is_none());
    }

    #[test]
    fn agents_put_together_go_in_all_or_none() {
        let r = AgentRegistry::new([agent("a", &["127.0.0.2"])]).unwrap();
        let added = r
            .put_all([agent("b", &["127.0.0.3"]), agent("a", &["127.0.0.5"])])
            .unwrap();
        assert_eq!(added, 1, "b is new, a replaced");
        assert_eq!(r.by_peer("127.0.0.5".parse().unwrap()).unwrap().id, "a");
        // The second takes the first's address: neither goes in.
        let err = r
            .put_all([agent("c", &["127.0.0.6"]), agent("d", &["127.0.0.6"])])
            .unwrap_err();
        assert!(matches!(err, RegistryError::PeerTaken { .. }));
        assert!(r.get("c").is_none() && r.get("d").is_none());
        assert!(r.by_peer("127.0.0.6".parse().unwrap()).is_none());
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_agent_id("agent-1.prod_x").is_ok());
        for bad in ["", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(validate_agent_id(bad).is_err(), "{bad:?}");
        }
    }
}
