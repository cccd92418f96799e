//! What a held Azure Resource Manager request would do, in a line a person can decide on:
//! "delete microsoft.compute/virtualmachines vm1 in resource group rg-a of subscription 1111"
//! rather than a long URL. Made from the approval's method and URL with the classification
//! the policies use (`tollgate_policy::classify`), and from the agent's RBAC scopes as they
//! are now: an ARM write outside them is why an on-behalf-of approval is asked.

use serde::Serialize;
use tollgate_policy::classify::{ArmTarget, RequestFacts};
use tollgate_policy::target::Target;

/// An ARM request, summarized for an approver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArmOperation {
    /// The whole line.
    pub summary: String,
    /// `read`, `create or update`, `delete`, or `action <name>` (e.g. `action listkeys`).
    pub operation: String,
    /// The resource type (provider namespace and type, nested types joined by `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// The resource's name (nested names joined by `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The resource group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_group: Option<String>,
    /// The subscription id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
    /// Whether one of the agent's RBAC scopes covers it (if not, its own identity lacks
    /// permission: that is why an on-behalf-of approval asks for the approver's).
    pub inside_agent_scopes: bool,
}

/// The summary of a held request to `url` with `method` (as the approval record shows it,
/// an override included), for an agent holding `scopes`; `None` when it is not an ARM
/// request.
pub fn of(method: &str, url: &str, scopes: &[String]) -> Option<ArmOperation> {
    let (target, path) = Target::from_url(url).ok()?;
    let method = effective_method(method);
    let request = RequestFacts::new(method, target, &path).ok()?;
    let arm = request.arm.as_ref()?;
    let operation = operation(method, arm);
    Some(ArmOperation {
        summary: summary(&operation, arm),
        inside_agent_scopes: !request.outside_scopes(scopes),
        operation,
        resource_type: arm.resource_type.as_ref().map(|ty| match &arm.provider {
            Some(provider) => format!("{provider}/{ty}"),
            None => ty.clone(),
        }),
        resource: arm.resource.clone(),
        resource_group: arm.resource_group.clone(),
        subscription: arm.subscription.clone(),
    })
}

/// The method that decides what the request does: the one an override header names when
/// the record shows one (`GET (x-http-method-override: DELETE)`), else the one sent.
fn effective_method(shown: &str) -> &str {
    match shown.split_once(": ") {
        Some((_, overridden)) => overridden.trim_end_matches(')').trim(),
        None => shown.trim(),
    }
}

fn operation(method: &str, arm: &ArmTarget) -> String {
    match method.to_ascii_uppercase().as_str() {
        "PUT" | "PATCH" => "create or update".into(),
        "DELETE" => "delete".into(),
        "GET" | "HEAD" | "OPTIONS" => "read".into(),
        other => match &arm.operation {
            Some(action) => format!("action {action}"),
            None => other.to_ascii_lowercase(),
        },
    }
}

fn summary(operation: &str, arm: &ArmTarget) -> String {
    let mut line = operation.to_string();
    match (&arm.resource_type, &arm.resource) {
        (Some(ty), Some(name)) => {
            let ty = match &arm.provider {
                Some(provider) => format!("{provider}/{ty}"),
                None => ty.clone(),
            };
            line.push_str(&format!(" {ty} {name}"));
        }
        _ => match (&arm.resource_group, &arm.subscription) {
            (Some(_), _) => line.push_str(" on the resource group"),
            (None, Some(_)) => line.push_str(" on the subscription"),
            (None, None) => line.push_str(" at tenant level"),
        },
    }
    if let Some(rg) = &arm.resource_group {
        line.push_str(&format!(" in resource group {rg}"));
    }
    if let Some(subscription) = &arm.subscription {
        line.push_str(&format!(" of subscription {subscription}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "https://management.azure.com/subscriptions/1111/resourceGroups/rg-a/providers/Microsoft.Compute/virtualMachines/vm1?api-version=2024-03-01";

    #[test]
    fn an_arm_delete_reads_as_what_it_deletes_and_where() {
        let op = of("DELETE", VM, &[]).expect("an ARM request");
        assert_eq!(
            op.summary,
            "delete microsoft.compute/virtualmachines vm1 in resource group rg-a of subscription 1111"
        );
        assert_eq!(
            (
                op.operation.as_str(),
                op.resource.as_deref(),
                op.resource_group.as_deref()
            ),
            ("delete", Some("vm1"), Some("rg-a"))
        );
        assert!(!op.inside_agent_scopes);
        let scoped = of(
            "DELETE",
            VM,
            &["/subscriptions/1111/resourceGroups/RG-A".into()],
        )
        .expect("an ARM request");
        assert!(scoped.inside_agent_scopes);
    }

    #[test]
    fn actions_overrides_and_scopes_without_a_resource() {
        let keys = "https://management.azure.com/subscriptions/1111/resourceGroups/rg-a/providers/Microsoft.Storage/storageAccounts/acct/listKeys";
        let op = of("POST", keys, &[]).expect("an ARM request");
        assert_eq!(
            op.summary,
            "action listkeys microsoft.storage/storageaccounts acct in resource group rg-a of subscription 1111"
        );
        let overridden = of("POST (x-http-method-override: DELETE)", VM, &[]).expect("ARM");
        assert_eq!(overridden.operation, "delete");
        let group = "https://management.azure.com/subscriptions/1111/resourcegroups/rg-b";
        assert_eq!(
            of("PUT", group, &[]).expect("ARM").summary,
            "create or update on the resource group in resource group rg-b of subscription 1111"
        );
    }

    #[test]
    fn other_hosts_have_no_summary() {
        assert_eq!(of("DELETE", "https://api.github.com/repos/a/b", &[]), None);
        assert_eq!(of("DELETE", "not a url", &[]), None);
    }
}
