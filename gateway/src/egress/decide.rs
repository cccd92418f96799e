//! Step 4 of the data path: the policy decision, and the policy set behind it.
//!
//! The active set is an immutable [`PolicyEngine`] behind an atomic pointer: a decision loads
//! it without locking, and a reload builds and validates a whole new engine before swapping it
//! in. An invalid set is never swapped in: the previous one stays in force, and the problems
//! are reported (admin API, log) with file, line and reason.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tollgate_policy::{Decision, LoadError, PolicyEngine, PolicySources, Problem, RequestFacts};

use crate::target::Target;

use crate::agent::Agent;

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    /// The version in force now.
    pub version: String,
    /// The version before.
    pub previous: String,
    /// Whether the set changed.
    pub changed: bool,
}

/// What the admin API shows of the policy set.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStatus {
    /// The version in force (content hash).
    pub version: String,
    /// Where it was loaded from.
    pub origin: String,
    /// Policy id → file.
    pub policies: std::collections::BTreeMap<String, String>,
    /// Validator warnings of the set in force.
    pub warnings: Vec<Problem>,
    /// Problems of the last rejected reload, if the newest files are invalid.
    pub rejected: Option<Vec<Problem>>,
}

/// The policy set in force, and where to reload it from.
pub struct PolicyStore {
    current: ArcSwap<PolicyEngine>,
    dir: Option<PathBuf>,
    /// Problems of the newest rejected version (version, problems).
    rejected: Mutex<Option<(String, Vec<Problem>)>>,
    reloading: Mutex<()>,
}

impl PolicyStore {
    /// Loads the set in `dir`, or the embedded default set when `dir` is `None`.
    pub fn load(dir: Option<&Path>) -> Result<PolicyStore, LoadError> {
        let sources = match dir {
            Some(dir) => PolicySources::from_dir(dir)?,
            None => PolicySources::embedded_default(),
        };
        let engine = PolicyEngine::load(&sources)?;
        for warning in engine.warnings() {
            tracing::warn!(%warning, "policy warning");
        }
        Ok(PolicyStore {
            current: ArcSwap::from_pointee(engine),
            dir: dir.map(Path::to_path_buf),
            rejected: Mutex::new(None),
            reloading: Mutex::new(()),
        })
    }

    /// Decides one request with the set in force; returns the decision and the set's version.
    pub fn decide(&self, agent: &Agent, request: &RequestFacts) -> (Decision, Arc<PolicyEngine>) {
        let engine = self.current.load_full();
        (engine.decide(&agent.facts(), request), engine)
    }

    /// Decides a CONNECT to `target` before anything inside the tunnel is seen: a deny when
    /// the set in force denies every request the agent could send through it
    /// ([`PolicyEngine::decide_tunnel`]), with the set's version.
    pub fn decide_tunnel(&self, agent: &Agent, target: &Target) -> Option<(Decision, String)> {
        let engine = self.current.load();
        engine
            .decide_tunnel(&agent.facts(), target)
            .map(|decision| (decision, engine.version().to_string()))
    }

    /// The set in force.
    pub fn engine(&self) -> Arc<PolicyEngine> {
        self.current.load_full()
    }

    /// Re-reads the policy directory; a valid changed set replaces the one in force, an
    /// invalid one is rejected and the one in force stays.
    pub fn reload(&self) -> Result<Reloaded, LoadError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.current.load().version().to_string();
        let Some(dir) = &self.dir else {
            // The embedded default set cannot change while the gateway runs.
            return Ok(Reloaded {
                version: previous.clone(),
                previous,
                changed: false,
            });
        };
        let sources = PolicySources::from_dir(dir)?;
        let version = sources.version();
        if version == previous {
            *self.rejected.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(Reloaded {
                version,
                previous,
                changed: false,
            });
        }
        match PolicyEngine::load(&sources) {
            Ok(engine) => {
                for warning in engine.warnings() {
                    tracing::warn!(%warning, "policy warning");
                }
                self.current.store(Arc::new(engine));
                *self.rejected.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(%version, %previous, "policy set reloaded");
                Ok(Reloaded {
                    version,
                    previous,
                    changed: true,
                })
            }
            Err(e) => {
                let mut rejected = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
                let already_reported = rejected.as_ref().is_some_and(|(v, _)| *v == version);
                if let LoadError::Invalid { problems, .. } = &e {
                    if !already_reported {
                        tracing::warn!(
                            rejected = %version, in_force = %previous,
                            "invalid policy set rejected; the previous set stays in force:\n{}",
                            problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
                        );
                    }
                    *rejected = Some((version, problems.clone()));
                }
                Err(e)
            }
        }
    }

    /// The set in force, and the problems of a rejected newer one.
    pub fn status(&self) -> PolicyStatus {
        let engine = self.current.load();
        PolicyStatus {
            version: engine.version().to_string(),
            origin: engine.origin().to_string(),
            policies: engine.policies().clone(),
            warnings: engine.warnings().to_vec(),
            rejected: self
                .rejected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|(_, problems)| problems.clone()),
        }
    }

    /// Watches the policy directory: every `interval`, a changed set is reloaded (the content
    /// hash tells whether anything changed). Ends when `shutdown` turns true.
    pub fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.dir.as_ref()?;
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.changed() => return,
                }
                let store = self.clone();
                // Reading the directory is blocking file I/O: keep it off the proxy workers.
                let result = tokio::task::spawn_blocking(move || store.reload()).await;
                if let Ok(Err(LoadError::Io { path, source })) = result {
                    tracing::warn!(path = %path.display(), error = %source, "cannot read the policy directory");
                }
            }
        }))
    }
}
