//! What an approver reads of a held request's body: a hash says nothing to a person, the
//! bytes do. The preview is made on demand from the body the gateway holds in memory anyway
//! (for exactly-once release), for the admin API only: it is never stored, logged or
//! exported, and gone once the request is settled.
//!
//! JSON is pretty-printed, other UTF-8 text shown as it is, both cut at
//! `approvals.preview_bytes` on a character boundary and marked when cut; a body with bytes
//! that are neither (invalid UTF-8, control characters other than tab and line breaks) is
//! named binary and not shown.

use serde::Serialize;

/// A held body as an approver is shown it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BodyPreview {
    /// `json`, `text` or `binary`.
    pub kind: &'static str,
    /// What the approver reads; none for a binary body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Whether `text` is only the start of it.
    pub truncated: bool,
}

/// The preview of `body` within `limit` bytes of text; `None` for an empty body, or when
/// previews are off (`limit` 0).
pub fn of(body: &[u8], limit: usize) -> Option<BodyPreview> {
    if body.is_empty() || limit == 0 {
        return None;
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Ok(pretty) = serde_json::to_string_pretty(&value) {
            let (text, truncated) = cut(&pretty, limit);
            return Some(BodyPreview {
                kind: "json",
                text: Some(text.to_string()),
                truncated,
            });
        }
    }
    let head = &body[..body.len().min(limit)];
    // A cut may split the last character: what precedes it is still text.
    let text = match std::str::from_utf8(head) {
        Ok(text) => text,
        Err(e) if e.error_len().is_none() && head.len() < body.len() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return Some(binary()),
    };
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Some(binary());
    }
    Some(BodyPreview {
        kind: "text",
        text: Some(text.to_string()),
        truncated: text.len() < body.len(),
    })
}

fn binary() -> BodyPreview {
    BodyPreview {
        kind: "binary",
        text: None,
        truncated: false,
    }
}

/// `text` cut to at most `limit` bytes on a character boundary, and whether it was cut.
fn cut(text: &str, limit: usize) -> (&str, bool) {
    if text.len() <= limit {
        return (text, false);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_pretty_printed_and_text_shown_as_it_is() {
        let json = of(br#"{"name":"vm1","size":3}"#, 4096).expect("preview");
        assert_eq!(json.kind, "json");
        assert_eq!(
            json.text.as_deref(),
            Some("{\n  \"name\": \"vm1\",\n  \"size\": 3\n}")
        );
        assert!(!json.truncated);
        let text = of(b"hello,\napprover", 4096).expect("preview");
        assert_eq!(
            (text.kind, text.text.as_deref(), text.truncated),
            ("text", Some("hello,\napprover"), false)
        );
    }

    #[test]
    fn a_long_body_is_cut_on_a_character_boundary_and_says_so() {
        // "é" is two bytes: a cut after 5 bytes would split the third.
        let text = of("ééééé".as_bytes(), 5).expect("preview");
        assert_eq!(
            (text.kind, text.text.as_deref(), text.truncated),
            ("text", Some("éé"), true)
        );
        let json = of(br#"{"a":"0123456789"}"#, 8).expect("preview");
        assert_eq!(
            (json.kind, json.text.as_deref(), json.truncated),
            ("json", Some("{\n  \"a\":"), true)
        );
    }

    #[test]
    fn binary_bodies_are_named_not_shown() {
        for body in [
            &b"\x00\x01\x02"[..],
            b"\xff\xfe text",
            b"text with \x1b[2J escape",
        ] {
            let preview = of(body, 4096).expect("preview");
            assert_eq!((preview.kind, preview.text), ("binary", None), "{body:?}");
        }
    }

    #[test]
    fn no_preview_for_an_empty_body_or_when_turned_off() {
        assert_eq!(of(b"", 4096), None);
        assert_eq!(of(b"hello", 0), None);
    }
}
