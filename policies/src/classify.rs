//! Step 3 of the data path: what a request asks for.
//!
//! A request becomes an [`Action`] (read, write or upgrade) and, when it goes to an Azure
//! Resource Manager endpoint, an [`ArmTarget`] parsed from its path: the subscription,
//! resource group, provider, resource and operation it touches, and every RBAC scope that
//! contains it. Policies compare those scopes with the agent's own.
//!
//! The action is what the request can do, not what its method claims: a read that carries a
//! body, or that one of its methods — the one it is sent with, or the one an override header
//! names — makes a write, is a write ([`RequestFacts::as_write`]); and a protocol upgrade is
//! an action of its own ([`RequestFacts::upgrading`]), since after it the bytes flow
//! uninspected.

use crate::target::{Host, Target};

/// What a request can do, as the Cedar action policies match (`Action::"read"` and so on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// GET, HEAD, OPTIONS without a body.
    Read,
    /// Every other method, and a read that carries a body.
    Write,
    /// A protocol upgrade (`Upgrade: websocket`): once the origin agrees, bytes flow both
    /// ways without being inspected, so no policy for reads or writes covers it.
    Upgrade,
}

impl Action {
    /// The action for an HTTP method. Anything but GET, HEAD and OPTIONS writes (an ARM
    /// `POST .../listKeys` included: it returns secrets).
    pub fn of_method(method: &str) -> Action {
        match method {
            "GET" | "HEAD" | "OPTIONS" => Action::Read,
            _ => Action::Write,
        }
    }

    /// Every action, in the order of their Cedar ids.
    pub const ALL: [Action; 3] = [Action::Read, Action::Write, Action::Upgrade];

    /// The Cedar action id: `read`, `write` or `upgrade`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Write => "write",
            Action::Upgrade => "upgrade",
        }
    }

    /// The action with Cedar id `id`.
    pub fn from_id(id: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == id)
    }
}

/// Host names of Azure Resource Manager endpoints (public, US Government, China clouds).
pub const ARM_HOSTS: [&str; 3] = [
    "management.azure.com",
    "management.usgovcloudapi.net",
    "management.chinacloudapi.cn",
];

/// Whether `host` is an Azure Resource Manager endpoint.
pub fn is_arm_host(host: &Host) -> bool {
    matches!(host, Host::Name(name) if ARM_HOSTS.contains(&name.as_str()))
}

/// What an ARM request targets. All values are lower-case (ARM ids are case-insensitive).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ArmTarget {
    /// Every scope the target lies in, outermost first.
    pub scopes: Vec<String>,
    /// The subscription id, from `/subscriptions/<id>`.
    pub subscription: Option<String>,
    /// The resource group's name, from `/resourceGroups/<name>`.
    pub resource_group: Option<String>,
    /// The resource provider namespace.
    pub provider: Option<String>,
    /// The resource type; nested types joined by `/`.
    pub resource_type: Option<String>,
    /// The resource name; nested names joined by `/`.
    pub resource: Option<String>,
    /// A trailing operation on a resource or scope (e.g. `listkeys`).
    pub operation: Option<String>,
}

impl ArmTarget {
    /// Parses an ARM request path (without query). Paths that do not start with
    /// `/subscriptions/<id>` (tenant-level and provider-level calls) have no scopes.
    pub fn parse(path: &str) -> ArmTarget {
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let mut arm = ArmTarget::default();
        let mut rest = segments.as_slice();
        let mut scope = match rest {
            [kw, sub, tail @ ..] if kw == "subscriptions" => {
                arm.subscription = Some(sub.clone());
                rest = tail;
                format!("/subscriptions/{sub}")
            }
            _ => {
                // Tenant- or provider-level: no scope to compare.
                arm.operation = rest.last().cloned();
                return arm;
            }
        };
        arm.scopes.push(scope.clone());
        if let [kw, rg, tail @ ..] = rest {
            if kw == "resourcegroups" {
                arm.resource_group = Some(rg.clone());
                scope = format!("{scope}/resourcegroups/{rg}");
                arm.scopes.push(scope.clone());
                rest = tail;
            }
        }
        if let [kw, namespace, tail @ ..] = rest {
            if kw == "providers" {
                arm.provider = Some(namespace.clone());
                scope = format!("{scope}/providers/{namespace}");
                rest = tail;
                let (mut types, mut names) = (Vec::new(), Vec::new());
                while let [ty, name, tail @ ..] = rest {
                    scope = format!("{scope}/{ty}/{name}");
                    arm.scopes.push(scope.clone());
                    types.push(ty.clone());
                    names.push(name.clone());
                    rest = tail;
                }
                if !types.is_empty() {
                    arm.resource_type = Some(types.join("/"));
                    arm.resource = Some(names.join("/"));
                }
            }
        }
        // What is left is an operation (listKeys) or a collection (resources, deployments).
        if let [.., last] = rest {
            arm.operation = Some(last.clone());
        }
        arm
    }
}

/// Why a request path was refused: read one way by the policies and possibly another way by
/// the origin, it could carry a request past a rule written for the path it appears to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `.` or `..` segment, as sent or percent-encoded: origins resolve them, so
    /// `/subscriptions/a/../b` would be checked as `a` and run against `b`.
    #[error("the path has a dot segment (`.` or `..`): send the resolved path instead")]
    DotSegment,
    /// A percent-encoded `/` or `\`, or a raw `\`: some origins treat them as separators.
    #[error("the path has an encoded or backslash path separator (%2F, %5C or \\)")]
    HiddenSeparator,
    /// `%` not followed by two hex digits.
    #[error("the path has a malformed percent-escape (% must be followed by two hex digits)")]
    BadEscape,
    /// A control character (including an encoded NUL) or unencoded whitespace: not part of
    /// any valid path, and parsers disagree on where it ends one.
    #[error("the path has a control character or unencoded whitespace")]
    ForbiddenCharacter,
    /// A raw byte outside ASCII anywhere in the target (RFC 3986 allows none): origins
    /// decode it differently, and as text it can show a person another path (a Unicode
    /// direction override).
    #[error("the request target has a raw non-ASCII character: percent-encode it")]
    NonAscii,
}

/// The path (query and fragment dropped) in the one spelling the policies compare:
/// percent-encoded unreserved characters decoded (`%41` is `A`, as RFC 3986 §6.2.2.2 makes
/// them the same), every other escape kept with upper-case hex. Anything an origin might
/// resolve differently — dot segments, encoded separators, backslashes, control
/// characters, broken escapes — is an error rather than a guess, because a policy on
/// `/subscriptions/a` must not be passed by a request that the origin runs against `b`.
pub fn canonical_path(raw: &str) -> Result<String, PathError> {
    if !raw.is_ascii() {
        return Err(PathError::NonAscii);
    }
    let raw = raw.split(['?', '#']).next().unwrap_or_default();
    if raw.is_empty() {
        return Ok("/".to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            '%' => {
                let hex = rest
                    .get(..2)
                    .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or(PathError::BadEscape)?;
                let byte = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
                rest = &rest[2..];
                match byte {
                    b'/' | b'\\' => return Err(PathError::HiddenSeparator),
                    b if b.is_ascii_control() => return Err(PathError::ForbiddenCharacter),
                    b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                        out.push(char::from(b))
                    }
                    b => {
                        out.push('%');
                        out.push_str(&format!("{b:02X}"));
                    }
                }
            }
            '\\' => return Err(PathError::HiddenSeparator),
            c if c.is_control() || c.is_whitespace() => return Err(PathError::ForbiddenCharacter),
            c => out.push(c),
        }
    }
    if out
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(PathError::DotSegment);
    }
    Ok(out)
}

/// Everything the policies are told about one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestFacts {
    /// Read, write or upgrade: what the request can do, not only what its method says.
    pub action: Action,
    /// The HTTP method, upper-case.
    pub method: String,
    /// The origin it goes to (scheme, host, port): the Cedar resource.
    pub target: Target,
    /// The path, without the query.
    pub path: String,
    /// The ARM target parsed from the path, for [`ARM_HOSTS`] only.
    pub arm: Option<ArmTarget>,
    /// The agent's open tool call, if any.
    pub tool_call: Option<String>,
    /// The protocol an upgrade asks for (lower case, as the `Upgrade` header lists it).
    pub upgrade: Option<String>,
}

impl RequestFacts {
    /// Classifies a request: `path` may carry a query, which is dropped. The path the
    /// policies see is its [`canonical_path`]; a path that an origin could read as another
    /// one is refused.
    pub fn new(method: &str, target: Target, path: &str) -> Result<RequestFacts, PathError> {
        let method = method.to_ascii_uppercase();
        let path = canonical_path(path)?;
        let arm = is_arm_host(&target.host).then(|| ArmTarget::parse(&path));
        Ok(RequestFacts {
            action: Action::of_method(&method),
            method,
            target,
            path,
            arm,
            tool_call: None,
            upgrade: None,
        })
    }

    /// The same request decided as a write if it was a read: one that carries a body, or
    /// whose other method (the one sent, or the one an override header names) writes, since
    /// an origin may act on either whatever the method the policies see says.
    pub fn as_write(mut self) -> RequestFacts {
        if self.action == Action::Read {
            self.action = Action::Write;
        }
        self
    }

    /// The same request asking to switch to `protocol` (the `Upgrade` header's value): its
    /// action is [`Action::Upgrade`] whatever its method.
    pub fn upgrading(mut self, protocol: &str) -> RequestFacts {
        self.action = Action::Upgrade;
        self.upgrade = Some(
            protocol
                .split(',')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(", ")
                .to_ascii_lowercase(),
        );
        self
    }

    /// Whether this is an ARM request none of whose scopes the agent's RBAC `scopes` cover:
    /// the agent's own identity would lack permission, so approving it means acting on a
    /// person's behalf.
    pub fn outside_scopes(&self, scopes: &[String]) -> bool {
        self.arm.as_ref().is_some_and(|arm| {
            !scopes
                .iter()
                .map(|s| crate::agent::normalize_scope(s))
                .any(|held| arm.scopes.contains(&held))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Scheme;

    #[test]
    fn arm_requests_outside_the_agents_scopes_are_recognised() {
        let target = Target::from_url_authority(Scheme::Https, "management.azure.com").unwrap();
        let path = "/subscriptions/sub-1/resourceGroups/rg-b/providers/Microsoft.Storage/storageAccounts/x";
        let request = RequestFacts::new("PUT", target.clone(), path).unwrap();
        let rg_a = vec!["/subscriptions/sub-1/resourceGroups/RG-A".to_string()];
        let sub = vec!["/Subscriptions/SUB-1/".to_string()];
        assert!(request.outside_scopes(&rg_a));
        assert!(!request.outside_scopes(&sub));
        let github = Target::from_url_authority(Scheme::Https, "api.github.com").unwrap();
        assert!(!RequestFacts::new("POST", github, "/repos")
            .unwrap()
            .outside_scopes(&[]));
    }

    #[test]
    fn a_read_with_a_body_is_a_write_and_an_upgrade_is_its_own_action() {
        let target = Target::from_url_authority(Scheme::Https, "api.github.com").unwrap();
        let get = RequestFacts::new("GET", target.clone(), "/").unwrap();
        assert_eq!(get.clone().as_write().action, Action::Write);
        let delete = RequestFacts::new("DELETE", target.clone(), "/").unwrap();
        assert_eq!(delete.as_write().action, Action::Write);
        let ws = get.upgrading(" WebSocket ,h2c");
        assert_eq!(ws.action, Action::Upgrade);
        assert_eq!(ws.upgrade.as_deref(), Some("websocket, h2c"));
        assert_eq!(
            ws.as_write().action,
            Action::Upgrade,
            "an upgrade stays one"
        );
        for action in Action::ALL {
            assert_eq!(Action::from_id(action.as_str()), Some(action));
        }
        assert_eq!(Action::from_id("delete"), None);
    }

    #[test]
    fn methods_map_to_read_or_write() {
        for m in ["GET", "HEAD", "OPTIONS"] {
            assert_eq!(Action::of_method(m), Action::Read, "{m}");
        }
        for m in ["POST", "PUT", "PATCH", "DELETE", "PROPFIND", "get"] {
            assert_eq!(Action::of_method(m), Action::Write, "{m}");
        }
    }

    #[test]
    fn a_resource_path_yields_every_enclosing_scope() {
        let arm = ArmTarget::parse(
            "/subscriptions/SUB-1/resourceGroups/RG-A/providers/Microsoft.Storage/storageAccounts/Acct/listKeys",
        );
        assert_eq!(arm.subscription.as_deref(), Some("sub-1"));
        assert_eq!(arm.resource_group.as_deref(), Some("rg-a"));
        assert_eq!(arm.provider.as_deref(), Some("microsoft.storage"));
        assert_eq!(arm.resource_type.as_deref(), Some("storageaccounts"));
        assert_eq!(arm.resource.as_deref(), Some("acct"));
        assert_eq!(arm.operation.as_deref(), Some("listkeys"));
        assert_eq!(
            arm.scopes,
            [
                "/subscriptions/sub-1",
                "/subscriptions/sub-1/resourcegroups/rg-a",
                "/subscriptions/sub-1/resourcegroups/rg-a/providers/microsoft.storage/storageaccounts/acct",
            ]
        );
    }

    #[test]
    fn nested_resources_and_collections() {
        let arm = ArmTarget::parse(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/a/blobServices/default",
        );
        assert_eq!(
            arm.resource_type.as_deref(),
            Some("storageaccounts/blobservices")
        );
        assert_eq!(arm.resource.as_deref(), Some("a/default"));
        assert_eq!(arm.operation, None);
        assert_eq!(arm.scopes.len(), 4);

        let list = ArmTarget::parse("/subscriptions/s/resourceGroups/rg/resources");
        assert_eq!(list.scopes.len(), 2);
        assert_eq!(list.operation.as_deref(), Some("resources"));

        let sub_provider =
            ArmTarget::parse("/subscriptions/s/providers/Microsoft.Compute/virtualMachines");
        assert_eq!(sub_provider.provider.as_deref(), Some("microsoft.compute"));
        assert_eq!(sub_provider.resource_type, None);
        assert_eq!(sub_provider.operation.as_deref(), Some("virtualmachines"));
        assert_eq!(sub_provider.scopes, ["/subscriptions/s"]);
    }

    #[test]
    fn tenant_level_paths_have_no_scope() {
        let arm = ArmTarget::parse("/providers/Microsoft.Resources/operations");
        assert!(arm.scopes.is_empty());
        assert_eq!(arm.subscription, None);
        let root = ArmTarget::parse("/");
        assert!(root.scopes.is_empty());
        let sub_only = ArmTarget::parse("/subscriptions");
        assert!(sub_only.scopes.is_empty());
    }

    #[test]
    fn only_arm_hosts_get_an_arm_target_and_the_query_is_dropped() {
        let arm_host = Target::from_url_authority(Scheme::Https, "MANAGEMENT.azure.com").unwrap();
        let facts = RequestFacts::new(
            "post",
            arm_host,
            "/subscriptions/s/resourceGroups/rg?api-version=1",
        )
        .unwrap();
        assert_eq!(facts.method, "POST");
        assert_eq!(facts.action, Action::Write);
        assert_eq!(facts.path, "/subscriptions/s/resourceGroups/rg");
        assert_eq!(facts.arm.unwrap().resource_group.as_deref(), Some("rg"));
        let other =
            Target::from_url_authority(Scheme::Https, "management.azure.com.evil.test").unwrap();
        assert!(RequestFacts::new("GET", other, "/subscriptions/s")
            .unwrap()
            .arm
            .is_none());
    }

    #[test]
    fn paths_are_canonical_or_refused() {
        for (raw, canonical) in [
            ("", "/"),
            ("/a/b?x=1#f", "/a/b"),
            ("/%41%62%2d%2E%5f%7E", "/Ab-._~"),
            ("/a%2fb%20c", "/a%2Fb%20c"),
            ("/a%20b/%e2%82%ac", "/a%20b/%E2%82%AC"),
            ("//a/.../b.", "//a/.../b."),
        ] {
            let got = canonical_path(raw);
            if raw.contains("%2f") {
                assert_eq!(got, Err(PathError::HiddenSeparator), "{raw}");
                continue;
            }
            assert_eq!(got.as_deref(), Ok(canonical), "{raw}");
            assert_eq!(
                canonical_path(canonical).as_deref(),
                Ok(canonical),
                "idempotent"
            );
        }
        for (raw, why) in [
            ("/subscriptions/a/../b", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/a/..", PathError::DotSegment),
            ("/a/%2e%2E/b", PathError::DotSegment),
            ("/a/.%2e", PathError::DotSegment),
            ("/a%5Cb", PathError::HiddenSeparator),
            ("/a\\..\\b", PathError::HiddenSeparator),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%+1", PathError::BadEscape),
            ("/a%00", PathError::ForbiddenCharacter),
            ("/a\tb", PathError::ForbiddenCharacter),
            ("/subscriptions/s /x", PathError::ForbiddenCharacter),
            ("/a\u{a0}b", PathError::NonAscii),
            ("/caf\u{e9}", PathError::NonAscii),
            ("/a/\u{202e}fdp.exe", PathError::NonAscii),
            ("/a?q=\u{e9}", PathError::NonAscii),
        ] {
            assert_eq!(canonical_path(raw), Err(why), "{raw:?}");
        }
    }

    #[test]
    fn an_encoded_arm_path_is_classified_as_the_origin_reads_it() {
        let target = Target::from_url_authority(Scheme::Https, "management.azure.com").unwrap();
        let facts = RequestFacts::new(
            "POST",
            target.clone(),
            "/subscriptions/s/resourceGroups/%72g-b/providers/P/t/n/%6cist%4Beys",
        )
        .unwrap();
        let arm = facts.arm.unwrap();
        assert_eq!(arm.resource_group.as_deref(), Some("rg-b"));
        assert_eq!(arm.operation.as_deref(), Some("listkeys"));
        assert_eq!(
            RequestFacts::new(
                "PUT",
                target,
                "/subscriptions/s/resourceGroups/rg-a/../../../subscriptions/t/resourceGroups/x"
            ),
            Err(PathError::DotSegment)
        );
    }
}
