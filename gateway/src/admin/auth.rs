//! Who is calling: the admin token opens every route; a named approver's token opens the
//! approval routes only. Tokens are compared in constant time.

use pingora::protocols::http::ServerSession;
use subtle::ConstantTimeEq;

use crate::reply::{ErrorCode, Refusal};

use super::AdminApi;

/// Who may call the admin API: the admin token, and the named approvers' tokens.
pub struct Approvers {
    admin_token: String,
    named: Vec<(String, String)>,
}

impl Approvers {
    /// The admin token plus `(name, token)` pairs of approvers.
    pub fn new(admin_token: String, named: Vec<(String, String)>) -> Self {
        Approvers { admin_token, named }
    }

    /// The caller a bearer token belongs to. Every token is compared (in constant time), so
    /// the time taken does not tell which one nearly matched.
    fn caller(&self, presented: &str) -> Option<Caller> {
        let mut found = None;
        if bool::from(presented.as_bytes().ct_eq(self.admin_token.as_bytes())) {
            found = Some(Caller {
                name: "admin".to_string(),
                admin: true,
            });
        }
        for (name, token) in &self.named {
            if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) && found.is_none() {
                found = Some(Caller {
                    name: name.clone(),
                    admin: false,
                });
            }
        }
        found
    }
}

/// Whom a request's bearer token belongs to: the admin, or a named approver.
pub(super) struct Caller {
    /// Recorded on approvals they settle.
    pub(super) name: String,
    /// Whether every route is open to them (else only approvals).
    pub(super) admin: bool,
}

impl AdminApi {
    /// The caller the request's bearer token belongs to, or 401.
    pub(super) fn authorized(&self, session: &ServerSession) -> Result<Caller, Refusal> {
        let header = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(header) = header else {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                "send the admin token as 'Authorization: Bearer <token>' (see admin-token in the data directory)",
            ));
        };
        let presented = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .unwrap_or("");
        self.callers.caller(presented).ok_or_else(|| {
            Refusal::new(
                ErrorCode::Unauthorized,
                "the token is neither the admin token nor an approver's",
            )
        })
    }
}
