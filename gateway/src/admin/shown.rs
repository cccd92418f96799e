//! Text that came from a sandbox, shown to a person (the approvals page, the CLI).
//!
//! A URL or method is what an approver decides on, so it must read as what it is. Control
//! characters could rewrite a terminal line, and Unicode bidirectional formatting characters
//! (a right-to-left override, U+202E) or invisible ones make text display as something else
//! ("/a/" U+202E "exe.txt" shows as "/a/txt.exe"). Each is shown as its escape, `\u{202E}`, instead.
//! The approvals page applies the same rule in its script (`shown`).

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` would not show as itself: a control character, a bidirectional formatting
/// character, or an invisible one.
pub fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// `text` with every character that would not show as itself escaped (`\u{202E}`).
pub fn for_person(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_deceptive) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_deceptive(c) {
            let _ = write!(out, "\\u{{{:04X}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_would_not_show_as_itself_is_escaped() {
        assert_eq!(for_person("/a/b?x=1"), "/a/b?x=1");
        assert!(matches!(for_person("/café"), Cow::Borrowed(_)));
        assert_eq!(for_person("/a/\u{202E}exe.txt"), "/a/\\u{202E}exe.txt");
        assert_eq!(
            for_person("GET\r\n\u{1b}[2K"),
            "GET\\u{000D}\\u{000A}\\u{001B}[2K"
        );
        assert_eq!(
            for_person("\u{2066}x\u{2069}\u{200B}\u{FEFF}"),
            "\\u{2066}x\\u{2069}\\u{200B}\\u{FEFF}"
        );
    }
}
