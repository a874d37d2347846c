//! Property tests of reading mount points from `/proc/self/mountinfo`:
//! the kernel escapes space, tab, newline and backslash as `\ooo`; what it
//! wrote reads back exactly, and no text whatever panics.

use proptest::prelude::*;

use super::*;
use crate::prop_support::config;

/// The kernel's escaping (`seq_path` with " \t\n\\").
fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_escaped_mount_points_read_back(path in prop_oneof![
        "/[a-z \t\n\\\\]{0,20}",
        any::<String>(),
    ]) {
        prop_assert_eq!(unescape_mountinfo(&escape(&path)), path.as_bytes());
    }

    #[test]
    fn prop_any_text_unescapes_without_panic(text in prop_oneof![
        "[\\\\0-9a]{0,16}",
        any::<String>(),
    ]) {
        let out = unescape_mountinfo(&text);
        // Escapes only shorten.
        prop_assert!(out.len() <= text.len());
        if !text.contains('\\') {
            prop_assert_eq!(out, text.as_bytes());
        }
    }
}
