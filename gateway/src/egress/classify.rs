//! Step 3 of the data path: what a request asks for.
//!
//! The policies decide on an action — read, write or upgrade — so the action must be what the
//! request can do at the origin, not what its method line claims. Three ways a write can pass
//! as a read are closed here, before the policies see the request:
//!
//! - a **method-override header** (`X-HTTP-Method-Override`, `X-HTTP-Method`,
//!   `X-Method-Override`), which many frameworks honour: the policies see the method it names,
//!   and the request is a write if either method writes — an origin may honour the header or
//!   not (and a sandbox can have the header dropped on the way by naming it in `Connection`),
//!   so `DELETE` overridden to `GET` is no more a read than `GET` overridden to `DELETE`;
//!   headers that disagree are refused (400 `ambiguous_method`);
//! - a **body** on a read: an origin may act on what it is sent, so it is a write;
//! - an **`Upgrade`** header: once the origin answers 101, bytes flow both ways uninspected, so
//!   it is an action of its own (`upgrade`), and it may not carry a body.
//!
//! `TRACE` and `TRACK` ask the origin to echo the request — an injected credential included —
//! back to the sandbox, so they are refused outright (405), whichever way they are asked for.
//! The parsing of the target and path is the policy crate's
//! ([`tollgate_policy::classify`]).

use http::HeaderMap;
use tollgate_policy::{Action, RequestFacts};

use crate::reply::{ErrorCode, Refusal};
use crate::target::Target;

/// Headers that name the method a request should be taken as (framework conventions).
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Methods that echo the request back (RFC 9110 §9.3.8; `TRACK` is IIS's).
const ECHO_METHODS: [&str; 2] = ["TRACE", "TRACK"];

/// What one request asks for.
#[derive(Debug, Clone)]
pub struct Classified {
    /// The facts the policies decide on (action, method, target, path, ARM target, upgrade).
    pub facts: RequestFacts,
    /// With a method-override header: the method as records show it, the one sent and the one
    /// named (`GET (X-HTTP-Method-Override: DELETE)`), so an approver and the audit trail see
    /// both. `None` (and no allocation) without one: records show the method sent.
    pub overridden: Option<String>,
}

impl Classified {
    /// Whether the request asks to switch protocols.
    pub fn is_upgrade(&self) -> bool {
        self.facts.upgrade.is_some()
    }
}

/// Classifies a request `method` with `headers` to `target` at `path`; `has_body` says
/// whether it carries a body (a declared length over 0, chunked framing, or HTTP/2 data).
pub fn classify(
    method: &str,
    headers: &HeaderMap,
    has_body: bool,
    target: Target,
    path: &str,
) -> Result<Classified, Refusal> {
    let overridden = method_override(headers)?;
    let asked = overridden.as_ref().map_or(method, |(_, m)| m.as_str());
    for m in [method, asked] {
        if ECHO_METHODS.iter().any(|echo| m.eq_ignore_ascii_case(echo)) {
            return Err(Refusal::new(
                ErrorCode::MethodNotAllowed,
                format!(
                    "{} asks the origin to echo the request back, credentials included; the \
                     gateway never forwards it",
                    m.to_ascii_uppercase()
                ),
            ));
        }
    }
    let mut facts = RequestFacts::new(asked, target, path)
        .map_err(|e| Refusal::new(ErrorCode::AmbiguousPath, e.to_string()))?;
    let sent_writes = Action::of_method(&method.to_ascii_uppercase()) != Action::Read;
    if has_body || sent_writes {
        facts = facts.as_write();
    }
    if let Some(upgrade) = headers.get(http::header::UPGRADE) {
        if has_body {
            return Err(Refusal::bad_request(
                "a request that asks for a protocol upgrade cannot carry a body",
            ));
        }
        let protocol = upgrade
            .to_str()
            .map_err(|_| Refusal::bad_request("the Upgrade header is not visible ASCII"))?;
        facts = facts.upgrading(protocol);
    }
    let overridden = overridden.map(|(header, m)| format!("{method} ({header}: {m})"));
    Ok(Classified { facts, overridden })
}

/// The method an override header names (upper case), and the header that named it; `None`
/// without one. Several override headers (or values) must name the same method.
fn method_override(headers: &HeaderMap) -> Result<Option<(&'static str, String)>, Refusal> {
    let mut named: Option<(&'static str, String)> = None;
    for header in METHOD_OVERRIDE_HEADERS {
        for value in headers.get_all(header) {
            let method = value
                .to_str()
                .ok()
                .map(|v| v.trim().to_ascii_uppercase())
                .filter(|v| !v.is_empty() && v.bytes().all(is_token_byte))
                .ok_or_else(|| {
                    Refusal::new(
                        ErrorCode::AmbiguousMethod,
                        format!("the {header} header does not name one method"),
                    )
                })?;
            match &named {
                Some((_, earlier)) if *earlier != method => {
                    return Err(Refusal::new(
                        ErrorCode::AmbiguousMethod,
                        format!(
                            "method-override headers name different methods ({earlier} and \
                             {method}); send one"
                        ),
                    ))
                }
                Some(_) => {}
                None => named = Some((header, method)),
            }
        }
    }
    Ok(named)
}

/// RFC 9110 `tchar`: the characters a method name is made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Scheme;

    fn target() -> Target {
        Target::from_url_authority(Scheme::Https, "api.github.com").unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn classified(method: &str, pairs: &[(&str, &str)], body: bool) -> Result<Classified, Refusal> {
        classify(method, &headers(pairs), body, target(), "/x")
    }

    #[test]
    fn a_method_override_is_decided_as_the_method_it_names() {
        for header in METHOD_OVERRIDE_HEADERS {
            let c = classified("GET", &[(header, " delete ")], false).unwrap();
            assert_eq!(c.facts.action, Action::Write, "{header}");
            assert_eq!(c.facts.method, "DELETE");
            assert_eq!(c.overridden, Some(format!("GET ({header}: DELETE)")));
        }
        let agreeing = classified(
            "GET",
            &[("x-http-method", "GET"), ("x-method-override", "get")],
            false,
        )
        .unwrap();
        assert_eq!(agreeing.facts.action, Action::Read);
        // An override never makes a write a read: the origin may not honour it (or never see
        // it, when the sandbox names it in Connection).
        for sent in ["POST", "DELETE", "PUT"] {
            let c = classified(sent, &[("x-http-method-override", "GET")], false).unwrap();
            assert_eq!(
                (c.facts.action, c.facts.method.as_str()),
                (Action::Write, "GET")
            );
        }
        assert_eq!(classified("GET", &[], false).unwrap().overridden, None);
        for pairs in [
            vec![("x-http-method", "GET"), ("x-method-override", "DELETE")],
            vec![
                ("x-http-method-override", "PUT"),
                ("x-http-method-override", "GET"),
            ],
            vec![("x-http-method-override", "DELETE, GET")],
            vec![("x-http-method-override", "")],
        ] {
            let refusal = classified("GET", &pairs, false).unwrap_err();
            assert_eq!(
                (refusal.status, refusal.error),
                (400, "ambiguous_method"),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn trace_and_track_are_refused_also_through_an_override() {
        for (method, pairs) in [
            ("TRACE", vec![]),
            ("track", vec![]),
            ("GET", vec![("x-http-method-override", "TRACE")]),
            ("POST", vec![("x-method-override", "track")]),
        ] {
            let refusal = classified(method, &pairs, false).unwrap_err();
            assert_eq!((refusal.status, refusal.error), (405, "method_not_allowed"));
        }
    }

    #[test]
    fn a_read_with_a_body_is_a_write_and_an_upgrade_may_not_carry_one() {
        assert_eq!(
            classified("GET", &[], false).unwrap().facts.action,
            Action::Read
        );
        assert_eq!(
            classified("OPTIONS", &[], true).unwrap().facts.action,
            Action::Write
        );
        let ws = classified("GET", &[("upgrade", "websocket")], false).unwrap();
        assert_eq!(ws.facts.action, Action::Upgrade);
        assert!(ws.is_upgrade());
        assert_eq!(ws.facts.upgrade.as_deref(), Some("websocket"));
        let refusal = classified("GET", &[("upgrade", "websocket")], true).unwrap_err();
        assert_eq!(refusal.status, 400);
    }
}
