//! Name rules for secrets, clients and groups.
//!
//! A secret name becomes a path in every mount, so the rule is strict:
//! segments of `[A-Za-z0-9._-]` joined by `/`, no segment `.`/`..` or
//! starting with `.` (those are the mount's own, e.g. `.secretfs/`), at most
//! 255 bytes a segment and 1024 in all. Client and group names are single
//! segments of the same alphabet, because a client name is also part of a
//! SPIFFE id and a file name (`NAME.pem`).

use std::collections::BTreeMap;

use crate::error::Error;

pub const MAX_NAME: usize = 1024;
/// How much of a refused name an error quotes.
const MAX_SHOWN_NAME: usize = 120;
pub const MAX_SEGMENT: usize = 255;

const SECRET_RULE: &str =
    "a secret name is segments of letters, digits, '.', '_' or '-' joined by '/', \
     with no empty segment, no segment '.' or '..' or starting with '.', \
     at most 255 bytes a segment and 1024 bytes in all (e.g. db/password)";

const ENTITY_RULE: &str =
    "letters, digits, '.', '_' or '-', not starting with '.' or '-', 1 to 128 bytes \
     (e.g. web-1)";

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Checks a secret name; the error quotes the name (names are not secret)
/// and the rule.
pub fn check_secret_name(name: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::InvalidName {
        kind: "secret",
        name: printable(name, MAX_SHOWN_NAME),
        why: format!("{why}; {SECRET_RULE}"),
    };
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(bad(&format!("the name is {} bytes long", name.len())));
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Err(bad("it starts or ends with '/'"));
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Err(bad("it has an empty segment ('//')"));
        }
        if segment.len() > MAX_SEGMENT {
            return Err(bad(&format!("a segment is {} bytes long", segment.len())));
        }
        if segment.starts_with('.') {
            return Err(bad(&format!("segment {segment:?} starts with '.'")));
        }
        if let Some(c) = segment.bytes().find(|b| !allowed(*b)) {
            return Err(bad(&format!("it contains the byte {c:#04x}")));
        }
    }
    Ok(())
}

/// The longest description a secret or group may carry.
pub const MAX_DESCRIPTION: usize = 1024;

/// Checks a description: printable text (no control characters, so a
/// description cannot drive the terminal of whoever runs `describe`), at
/// most [`MAX_DESCRIPTION`] bytes.
pub fn check_description(description: &str) -> Result<(), Error> {
    if description.len() > MAX_DESCRIPTION {
        return Err(Error::InvalidArgument(format!(
            "the description is {} bytes long, over the limit of {MAX_DESCRIPTION}; shorten it",
            description.len()
        )));
    }
    if let Some(c) = description.chars().find(|c| c.is_control()) {
        return Err(Error::InvalidArgument(format!(
            "the description holds the control character \"{}\"; descriptions are one line of printable text",
            printable(c.encode_utf8(&mut [0; 4]), MAX_SHOWN_NAME)
        )));
    }
    Ok(())
}

/// The latest time accepted anywhere (9999-12-31T23:59:59Z, unix
/// seconds): every client formats it as a date.
pub const MAX_TIME: i64 = 253_402_300_799;

/// Checks a time a caller gave (unix seconds): from 1970 to the end of
/// year 9999.
pub fn check_time(what: &str, secs: i64) -> Result<(), Error> {
    if !(0..=MAX_TIME).contains(&secs) {
        return Err(Error::InvalidArgument(format!(
            "{what} {secs} is not a time secretfs accepts: give unix seconds from 0 (1970) to {MAX_TIME} (year 9999)"
        )));
    }
    Ok(())
}

pub const MAX_LABELS: usize = 64;

/// Checks a secret's labels: keys like Kubernetes label keys, short values
/// without control characters.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Error> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_LABELS} labels per secret"
        )));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            return Err(Error::InvalidArgument(format!(
                "label key \"{}\" is not valid; use 1-63 letters, digits, '.', '_', '-' or '/'",
                printable(k, MAX_SHOWN_NAME)
            )));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "the value of label \"{k}\" is over 256 bytes or holds control characters"
            )));
        }
    }
    Ok(())
}

/// Checks a file mode: permission bits only.
pub fn check_mode(mode: u32) -> Result<(), Error> {
    if mode > 0o777 {
        return Err(Error::InvalidArgument(format!(
            "file mode {mode:#o} is not allowed; give permission bits only, 0 to 0777 (e.g. 0400)"
        )));
    }
    Ok(())
}

/// Checks a client or group name.
pub fn check_entity_name(kind: &'static str, name: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::InvalidName {
        kind,
        name: printable(name, MAX_SHOWN_NAME),
        why: format!("{why}; a {kind} name is {ENTITY_RULE}"),
    };
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.len() > 128 {
        return Err(bad(&format!("the name is {} bytes long", name.len())));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(bad("it starts with '.' or '-'"));
    }
    if let Some(c) = name.bytes().find(|b| !allowed(*b)) {
        return Err(bad(&format!("it contains the byte {c:#04x}")));
    }
    Ok(())
}

/// A bounded, escaped form of a rejected name for error messages.
/// `s` for a log line or an error: escaped as Debug escapes it (control
/// characters `\n` and `\u{1b}`, Unicode format characters such as the
/// bidi override `\u{202e}` and zero-width ones, and the backslash, so
/// no text can pass for an escape or reorder what an operator reads),
/// except quotes and apostrophes (`mount's`, not Debug's `mount\'s`), cut
/// to at most `max` bytes after escaping (so the result is bounded
/// whatever `s` holds), with `…` where it was cut.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let piece: String = if c == '\'' || c == '"' {
            c.into()
        } else {
            c.escape_debug().collect()
        };
        if out.len() + piece.len() > max {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_secret_names() {
        for n in ["a", "db/password", "a.b_c-d/E9", "x/y/z", "v1.2"] {
            check_secret_name(n).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        check_secret_name(&"a".repeat(255)).unwrap();
        let long = vec!["a".repeat(255); 4].join("/");
        assert_eq!(long.len(), 1023);
        check_secret_name(&long).unwrap();
    }

    #[test]
    fn bad_secret_names() {
        let cases = [
            "", "/a", "a/", "a//b", ".", "..", "a/../b", "a/./b", ".hidden", "a/.x", "a b", "a\0b",
            "é", "a\\b", "a:b", "*",
        ];
        for n in cases {
            let err = check_secret_name(n).expect_err(n).to_string();
            assert!(err.contains("segments of letters"), "{n}: {err}");
        }
        assert!(check_secret_name(&"a".repeat(256)).is_err());
        assert!(check_secret_name(&vec!["a".repeat(200); 6].join("/")).is_err());
    }

    #[test]
    fn nul_is_escaped_in_messages() {
        let err = check_secret_name("a\0b").unwrap_err().to_string();
        assert!(!err.contains('\0'));
        assert!(err.contains("\\0"));
    }

    #[test]
    fn printable_escapes_control_characters_and_keeps_quotes() {
        assert_eq!(
            printable("not in the mount's \"container\"", 100),
            "not in the mount's \"container\""
        );
        assert_eq!(printable("a\nb\u{1b}[2J", 100), "a\\nb\\u{1b}[2J");
        assert_eq!(printable("abcdef", 4), "abcd…");
    }

    #[test]
    fn printable_escapes_what_could_spoof_the_audit_output() {
        // A container controls refusal paths that land in audit details:
        // a bidi override, a zero-width space or a backslash must not pass
        // through as they are; apostrophes and quotes stay readable.
        assert_eq!(
            printable("a\u{202e}txt.exe\u{200b}\\n'\"", 100),
            "a\\u{202e}txt.exe\\u{200b}\\\\n'\""
        );
    }

    #[test]
    fn a_bad_label_key_or_description_is_escaped_once() {
        let labels = BTreeMap::from([("a\nb\\c".to_owned(), "v".to_owned())]);
        let err = check_labels(&labels).unwrap_err().to_string();
        assert!(
            err.contains("label key \"a\\nb\\\\c\" is not valid"),
            "{err}"
        );
        let err = check_description("x\u{1b}[2J").unwrap_err().to_string();
        assert!(err.contains("the control character \"\\u{1b}\";"), "{err}");
        // A long key is quoted in part.
        let long = BTreeMap::from([("é".repeat(1000), "v".to_owned())]);
        assert!(check_labels(&long).unwrap_err().to_string().len() < 400);
    }

    #[test]
    fn entity_names() {
        check_entity_name("client", "web-1").unwrap();
        check_entity_name("group", "db.readers").unwrap();
        for n in ["", ".a", "-a", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_entity_name("client", n).is_err(), "{n}");
        }
    }
}

#[cfg(test)]
mod prop_tests;
