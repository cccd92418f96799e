//! Facts → Cedar: the entities and context one request is evaluated with.
//!
//! Two entities per request: the agent (`Agent::"<id>"` with its run mode, scopes and tags)
//! and the host (`Host::"<name>"`, whose parents are a `Domain` for every suffix of its name).
//! Both are checked against the schema, so a value of the wrong shape is an error — and an
//! error denies.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::LazyLock;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression, Schema,
};

use crate::agent::{normalize_scope, AgentFacts};
use crate::classify::{ArmTarget, RequestFacts};
use crate::target::Host;

fn type_name(name: &str) -> EntityTypeName {
    // The names are constants of this module; a failure here is a build defect.
    EntityTypeName::from_str(name).unwrap_or_else(|e| panic!("entity type {name}: {e}"))
}

static AGENT: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Agent"));
static HOST: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Host"));
static DOMAIN: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Domain"));
static ACTION: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Action"));

/// `Agent::"<id>"`.
pub fn agent_uid(id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(AGENT.clone(), EntityId::new(id))
}

/// `Host::"<host>"`.
pub fn host_uid(host: &Host) -> EntityUid {
    EntityUid::from_type_name_and_id(HOST.clone(), EntityId::new(host_id(host)))
}

/// `Action::"read"` or `Action::"write"`.
pub fn action_uid(action: crate::classify::Action) -> EntityUid {
    EntityUid::from_type_name_and_id(ACTION.clone(), EntityId::new(action.as_str()))
}

/// `Domain::"<name>"`.
pub fn domain_uid(name: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(DOMAIN.clone(), EntityId::new(name))
}

/// The host's id: the name, or the IP address in canonical form (no brackets).
pub fn host_id(host: &Host) -> String {
    match host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    }
}

/// Every domain a host is in: `api.github.com` → `api.github.com`, `github.com`, `com`.
/// IP addresses are in no domain.
pub fn domains_of(host: &Host) -> Vec<&str> {
    match host {
        Host::Ip(_) => Vec::new(),
        Host::Name(name) => {
            let mut out = vec![name.as_str()];
            let mut rest = name.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                out.push(parent);
                rest = parent;
            }
            out
        }
    }
}

/// The agent and host entities for one request, checked against `schema`.
pub fn entities(agent: &AgentFacts<'_>, host: &Host, schema: &Schema) -> Result<Entities, String> {
    let scopes = RestrictedExpression::new_set(
        agent
            .scopes
            .iter()
            .map(|s| RestrictedExpression::new_string(normalize_scope(s))),
    );
    let attrs = HashMap::from([
        (
            "run_mode".to_string(),
            RestrictedExpression::new_string(agent.run_mode.as_str().to_string()),
        ),
        ("scopes".to_string(), scopes),
    ]);
    let tags = agent
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone())));
    let agent_entity = Entity::new_with_tags(agent_uid(agent.id), attrs, HashSet::new(), tags)
        .map_err(|e| format!("agent entity: {e}"))?;
    let parents: HashSet<EntityUid> = domains_of(host).into_iter().map(domain_uid).collect();
    let host_entity = Entity::new_no_attrs(host_uid(host), parents);
    Entities::from_entities([agent_entity, host_entity], Some(schema))
        .map_err(|e| format!("entities: {e}"))
}

/// Which of the context's attributes to build: those some policy about to be evaluated reads.
/// Cedar makes a context's record anew for every evaluation (about 2 µs with every attribute,
/// more than evaluating a small set of policies); an attribute no policy reads cannot change
/// a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextAttributes(u8);

impl ContextAttributes {
    /// The attributes of the schema's `RequestContext`, one bit each.
    const NAMES: [&'static str; 8] = [
        "method",
        "path",
        "port",
        "scheme",
        "approved",
        "tool_call",
        "arm",
        "upgrade",
    ];
    /// Every attribute (a policy that uses `context` whole, or the schema check).
    pub const ALL: ContextAttributes = ContextAttributes(u8::MAX);
    /// No attribute.
    pub const NONE: ContextAttributes = ContextAttributes(0);

    /// The attribute `name`; one the schema does not have reads everything, to be safe.
    pub fn named(name: &str) -> ContextAttributes {
        Self::NAMES
            .iter()
            .position(|n| *n == name)
            .map_or(Self::ALL, |bit| ContextAttributes(1 << bit))
    }

    /// Both sets of attributes.
    pub fn and(self, other: ContextAttributes) -> ContextAttributes {
        ContextAttributes(self.0 | other.0)
    }

    fn has(self, name: &str) -> bool {
        Self::named(name).0 & self.0 != 0
    }
}

/// The request context with `approved` set as given, with only the attributes in `read`.
pub fn context(
    request: &RequestFacts,
    approved: bool,
    read: ContextAttributes,
) -> Result<Context, String> {
    let mut pairs = Vec::with_capacity(8);
    let strings = [
        ("method", Some(request.method.as_str())),
        ("path", Some(request.path.as_str())),
        ("scheme", Some(request.target.scheme.as_str())),
        ("tool_call", request.tool_call.as_deref()),
        ("upgrade", request.upgrade.as_deref()),
    ];
    for (name, value) in strings {
        if let Some(value) = value.filter(|_| read.has(name)) {
            pairs.push((
                name.to_string(),
                RestrictedExpression::new_string(value.to_string()),
            ));
        }
    }
    if read.has("port") {
        let port = RestrictedExpression::new_long(i64::from(request.target.port));
        pairs.push(("port".to_string(), port));
    }
    if read.has("approved") {
        let approved = RestrictedExpression::new_bool(approved);
        pairs.push(("approved".to_string(), approved));
    }
    if let Some(arm) = request.arm.as_ref().filter(|_| read.has("arm")) {
        pairs.push(("arm".to_string(), arm_record(arm)?));
    }
    Context::from_pairs(pairs).map_err(|e| format!("context: {e}"))
}

fn arm_record(arm: &ArmTarget) -> Result<RestrictedExpression, String> {
    let mut fields = vec![(
        "scopes".to_string(),
        RestrictedExpression::new_set(
            arm.scopes
                .iter()
                .map(|s| RestrictedExpression::new_string(s.clone())),
        ),
    )];
    for (name, value) in [
        ("subscription", &arm.subscription),
        ("resource_group", &arm.resource_group),
        ("provider", &arm.provider),
        ("resource_type", &arm.resource_type),
        ("resource", &arm.resource),
        ("operation", &arm.operation),
    ] {
        if let Some(value) = value {
            fields.push((
                name.to_string(),
                RestrictedExpression::new_string(value.clone()),
            ));
        }
    }
    RestrictedExpression::new_record(fields).map_err(|e| format!("context.arm: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::RunMode;
    use crate::target::Target;

    #[test]
    fn every_shape_of_context_and_entities_conforms_to_the_schema() {
        // The engine builds requests without re-checking them against the schema on the hot
        // path; this is the check that they conform.
        let schema = crate::engine::schema().unwrap();
        let scopes = vec!["/Subscriptions/S/resourceGroups/RG/".to_string()];
        let tags = std::collections::BTreeMap::from([("team".to_string(), "x".to_string())]);
        let agent = AgentFacts {
            id: "a",
            revision: 1,
            run_mode: RunMode::Review,
            scopes: &scopes,
            tags: &tags,
        };
        for url in [
            "https://api.github.com/x?y",
            "http://10.0.0.1:8080/",
            "https://management.azure.com/subscriptions/s/resourceGroups/rg/providers/P/t/n/listKeys",
            "https://management.azure.com/providers/Microsoft.Resources/operations",
        ] {
            let (target, path) = Target::from_url(url).unwrap();
            for (tool_call, upgrade) in [
                (None, None),
                (Some("tc-1".to_string()), None),
                (None, Some("websocket")),
            ] {
                let mut facts = RequestFacts::new("POST", target.clone(), &path).expect(url);
                facts.tool_call = tool_call;
                if let Some(protocol) = upgrade {
                    facts = facts.upgrading(protocol);
                }
                let entities = entities(&agent, &facts.target.host, &schema).expect(url);
                for approved in [false, true] {
                    let request = cedar_policy::Request::new(
                        agent_uid("a"),
                        action_uid(facts.action),
                        host_uid(&facts.target.host),
                        context(&facts, approved, ContextAttributes::ALL).unwrap(),
                        Some(&schema),
                    );
                    assert!(request.is_ok(), "{url}: {request:?}");
                }
                drop(entities);
            }
        }
    }

    #[test]
    fn a_host_is_in_every_suffix_domain_and_nothing_else() {
        let host = Host::parse("api.github.com").unwrap();
        assert_eq!(domains_of(&host), ["api.github.com", "github.com", "com"]);
        let lookalike = Host::parse("github.com.evil.test").unwrap();
        assert_eq!(
            domains_of(&lookalike),
            ["github.com.evil.test", "com.evil.test", "evil.test", "test"]
        );
        assert!(!domains_of(&lookalike).contains(&"github.com"));
        assert!(domains_of(&Host::parse("10.0.0.1").unwrap()).is_empty());
    }
}
