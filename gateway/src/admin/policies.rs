//! The policy set over the API: the set in force, and reloading it.

use http::{Response, StatusCode};
use tollgate_policy::LoadError;

use crate::reply::{ErrorCode, Refusal};

use super::respond::json;
use super::AdminApi;

impl AdminApi {
    /// `POST /v1/policies/reload`: reads the policy directory now; an invalid set is refused
    /// (422, with its problems) and the set in force stays.
    pub(super) async fn reload_policies(&self) -> Result<Response<Vec<u8>>, Refusal> {
        let store = self.policies.clone();
        // Reading and validating the files is blocking work: keep it off the runtime.
        let result = tokio::task::spawn_blocking(move || store.reload())
            .await
            .map_err(|_| Refusal::new(ErrorCode::InternalError, "the reload task failed"))?;
        match result {
            Ok(reloaded) => Ok(json(StatusCode::OK, &reloaded)),
            Err(LoadError::Invalid { problems, .. }) => {
                let mut refusal = Refusal::new(
                    ErrorCode::InvalidPolicies,
                    format!(
                        "the new policy set is invalid ({} problem(s)); the set in force ({}) stays",
                        problems.len(),
                        self.policies.engine().version()
                    ),
                );
                let mut extra = serde_json::Map::new();
                extra.insert(
                    "problems".into(),
                    serde_json::to_value(&problems).unwrap_or_default(),
                );
                refusal.extra = Some(Box::new(extra));
                Err(refusal)
            }
            Err(e @ LoadError::Io { .. }) => {
                Err(Refusal::new(ErrorCode::PolicyDirUnreadable, e.to_string()))
            }
        }
    }
}
