//! An approval as approvers and the agent platform see it: the stored record without its
//! sealed token, plus what a person needs to decide — for an Azure Resource Manager request
//! what it would do (`operation`), and while this process holds the
//! request a preview of its body, from memory (`preview`). The admin API's
//! answers and the live feed's events are both made here, so they never differ.

use tollgate_storage::ApprovalRecord;

use super::{operation, preview};

/// The record as approvers see it: without its sealed token (they see only whether one is
/// held).
pub fn settled(record: &ApprovalRecord) -> serde_json::Value {
    let obo_token_held = record.sealed_obo_token.is_some();
    let mut view = serde_json::to_value(record).unwrap_or_default();
    if let Some(fields) = view.as_object_mut() {
        fields.remove("sealed_obo_token");
        fields.insert("obo_token_held".into(), obo_token_held.into());
    }
    view
}

/// The record with its details: the ARM summary for an agent holding `scopes`, and the
/// preview of `held_body` (the request's body while it is held, else `None`) within
/// `preview_bytes`.
pub fn detailed(
    record: &ApprovalRecord,
    scopes: &[String],
    held_body: Option<&[u8]>,
    preview_bytes: usize,
) -> serde_json::Value {
    let mut view = settled(record);
    let preview = held_body.and_then(|body| preview::of(body, preview_bytes));
    let arm = operation::of(&record.method, &record.url, scopes);
    if let Some(fields) = view.as_object_mut() {
        if let Some(preview) = preview {
            fields.insert(
                "body_preview".into(),
                serde_json::to_value(preview).unwrap_or_default(),
            );
        }
        if let Some(arm) = arm {
            fields.insert("arm".into(), serde_json::to_value(arm).unwrap_or_default());
        }
    }
    view
}
