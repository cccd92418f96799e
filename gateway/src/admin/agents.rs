//! The agent registry over the API: list, read, register or replace (stored durably, its
//! own listener bound in its sandbox's namespace before the answer), and remove.

use http::{Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;

use crate::agent::{Agent, AgentListenConfig};
use crate::egress::identity::RegistryError;
use crate::reply::{ErrorCode, Refusal};

use super::respond::{empty, json, method_not_allowed, no_agent, read_body, store_failed};
use super::AdminApi;

impl AdminApi {
    /// `GET /v1/agents`: every agent.
    pub(super) fn list_agents(&self) -> Response<Vec<u8>> {
        let agents: Vec<Agent> = self
            .registry
            .list()
            .iter()
            .map(|a| Agent::clone(a))
            .collect();
        json(StatusCode::OK, &serde_json::json!({ "agents": agents }))
    }

    /// `/v1/agents/{id}`: read, register or replace, remove.
    pub(super) async fn agent_route(
        &self,
        session: &mut ServerSession,
        method: &Method,
        id: &str,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        let id = id.to_string();
        match *method {
            Method::GET => self
                .registry
                .get(&id)
                .map(|a| json(StatusCode::OK, &*a))
                .ok_or_else(|| no_agent(&id)),
            Method::PUT => self.put_agent(session, id).await,
            Method::DELETE => self.remove_agent(&id).await,
            _ => Err(method_not_allowed(&[
                Method::GET,
                Method::PUT,
                Method::DELETE,
            ])),
        }
    }

    /// Removes an agent: its held requests are denied, its stored data, tool calls, tokens
    /// and listeners go.
    async fn remove_agent(&self, id: &str) -> Result<Response<Vec<u8>>, Refusal> {
        let Some(removed) = self.registry.remove(id) else {
            return Err(no_agent(id));
        };
        self.approvals
            .deny_all(&removed.id, "the agent was removed")
            .await;
        let store = self.store.clone();
        let gone = removed.id.clone();
        match tokio::task::spawn_blocking(move || store.remove_agent(&gone)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(store_failed(&e.to_string())),
            Err(e) => return Err(store_failed(&e.to_string())),
        }
        self.tool_calls.close_all(&removed.id);
        self.credentials.evict_agent(&removed.id);
        self.listeners.close_all(&removed.id);
        tracing::info!(agent = %removed.id, "agent removed");
        Ok(empty(StatusCode::NO_CONTENT))
    }

    /// Registers or replaces an agent: stored durably and its own listener bound before the
    /// answer, or undone.
    async fn put_agent(
        &self,
        session: &mut ServerSession,
        id: String,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        let body = read_body(session).await?;
        let mut agent: Agent = serde_json::from_slice(&body)
            .map_err(|e| Refusal::bad_request(format!("invalid agent JSON: {e}")))?;
        if agent.listen.as_ref().is_some_and(|l| l.netns.is_none()) {
            return Err(Refusal::bad_request(
                "an agent's own listener registered over the API must name the network \
                 namespace of its sandbox (listen.netns); one in the gateway's own namespace \
                 can only be configured in the config file",
            ));
        }
        if agent.id.is_empty() {
            agent.id = id.clone();
        } else if agent.id != id {
            return Err(Refusal::bad_request(format!(
                "the body names agent {:?} but the path names {id:?}",
                agent.id
            )));
        }
        let previous = self.registry.get(&id);
        let listen = agent.listen.clone();
        match self.registry.put(agent) {
            Ok(created) => {
                let stored = self.registry.get(&id).ok_or_else(|| no_agent(&id))?;
                // Durable before it is acknowledged; undone if it cannot be stored.
                let store = self.store.clone();
                let record = stored.clone();
                let persisted =
                    tokio::task::spawn_blocking(move || store.put_agent(&record.id, &*record))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = persisted {
                    self.restore(&id, previous.as_deref()).await;
                    return Err(store_failed(&e));
                }
                // Its own listener, in its sandbox's namespace: bound before the answer, so
                // the launcher may start the sandbox as soon as it has it.
                if let Err(refusal) = self.apply_listener(&id, listen.as_ref()).await {
                    self.restore(&id, previous.as_deref()).await;
                    return Err(refusal);
                }
                tracing::info!(agent = %id, created, "agent registered");
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(json(status, &*stored))
            }
            Err(e @ (RegistryError::InvalidId(_) | RegistryError::InvalidLimits { .. })) => {
                Err(Refusal::bad_request(e.to_string()))
            }
            Err(e @ RegistryError::PeerTaken { .. }) => {
                Err(Refusal::new(ErrorCode::Conflict, e.to_string()))
            }
        }
    }

    /// Opens, moves or closes `agent`'s own listener as its record now says.
    async fn apply_listener(
        &self,
        agent: &str,
        listen: Option<&AgentListenConfig>,
    ) -> Result<(), Refusal> {
        let Some(listen) = listen.cloned() else {
            self.listeners.close(agent);
            return Ok(());
        };
        let listeners = self.listeners.clone();
        let id = agent.to_string();
        match tokio::task::spawn_blocking(move || listeners.open(&id, &listen)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Refusal::bad_request(format!(
                "cannot open the agent's listener: {e}"
            ))),
            Err(e) => Err(Refusal::new(ErrorCode::InternalError, e.to_string())),
        }
    }

    /// Puts `agent` back as it was before a registration that failed half-way: its previous
    /// record (stored, with its listener) or nothing.
    async fn restore(&self, agent: &str, previous: Option<&Agent>) {
        match previous {
            Some(previous) => {
                let _ = self.registry.put(previous.clone());
                let store = self.store.clone();
                let record = previous.clone();
                let _ =
                    tokio::task::spawn_blocking(move || store.put_agent(&record.id, &record)).await;
                let _ = self.apply_listener(agent, previous.listen.as_ref()).await;
            }
            None => {
                self.registry.remove(agent);
                let store = self.store.clone();
                let id = agent.to_string();
                let _ = tokio::task::spawn_blocking(move || store.remove_agent(&id)).await;
                self.listeners.close(agent);
            }
        }
    }
}
