//! Property tests of the name and field rules against simple reference
//! models of the documented rules (README.md "Secrets"; the `names.rs`
//! module comment): arbitrary text never panics, is accepted exactly when
//! the model accepts it, and a refusal quotes it without control
//! characters.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::prop_support::{config, deceptive, text as name_like};

/// The secret name rule, written from the README ("Secrets"): segments of
/// `[A-Za-z0-9._-]` joined by `/`, no segment empty, `.`, `..` or starting
/// with `.`, at most 255 bytes a segment and 1024 in all.
fn secret_name_model(name: &str) -> bool {
    let segment_ok = |s: &str| {
        (1..=255).contains(&s.len())
            && s != "."
            && s != ".."
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
    };
    (1..=1024).contains(&name.len()) && name.split('/').all(segment_ok)
}

/// Client and group names: one segment of the same alphabet, not starting
/// with `.` or `-`, 1 to 128 bytes.
fn entity_name_model(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

fn assert_clear(err: &Error) -> Result<(), TestCaseError> {
    let msg = err.to_string();
    prop_assert!(!msg.chars().any(deceptive), "raw control text in {msg:?}");
    prop_assert!(msg.len() < 2048, "unbounded message: {} bytes", msg.len());
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_secret_names_follow_the_documented_rule(name in name_like()) {
        let got = check_secret_name(&name);
        prop_assert_eq!(got.is_ok(), secret_name_model(&name), "{:?}: {:?}", name, got);
        if let Err(e) = got {
            prop_assert!(e.to_string().contains(SECRET_RULE));
            assert_clear(&e)?;
        }
    }

    #[test]
    fn prop_entity_names_follow_the_documented_rule(name in name_like()) {
        for kind in ["client", "group"] {
            let got = check_entity_name(kind, &name);
            prop_assert_eq!(got.is_ok(), entity_name_model(&name), "{:?}: {:?}", name, got);
            if let Err(e) = got {
                prop_assert!(e.to_string().contains(ENTITY_RULE));
                assert_clear(&e)?;
            }
        }
    }

    #[test]
    fn prop_printable_is_bounded_escaped_and_a_prefix(s in any::<String>(), max in 0usize..200) {
        let full = printable(&s, usize::MAX);
        let cut = printable(&s, max);
        prop_assert!(!cut.chars().any(deceptive), "{:?} -> {:?}", s, cut);
        prop_assert!(cut.len() <= max + '…'.len_utf8());
        match cut.strip_suffix('…') {
            Some(head) if cut.len() != full.len() || cut != full => {
                prop_assert!(full.starts_with(head));
                prop_assert!(head.len() <= max);
            }
            _ => prop_assert_eq!(&cut, &full),
        }
    }

    #[test]
    fn prop_printable_keeps_plain_text_as_it_is(s in "[ -\\[\\]-~]{0,100}") {
        // Printable ASCII without the backslash escapes to itself.
        prop_assert_eq!(printable(&s, usize::MAX), s);
    }

    #[test]
    fn prop_descriptions(description in name_like()) {
        let ok = description.len() <= MAX_DESCRIPTION && !description.chars().any(char::is_control);
        let got = check_description(&description);
        prop_assert_eq!(got.is_ok(), ok);
        if let Err(e) = got {
            assert_clear(&e)?;
        }
    }

    #[test]
    fn prop_labels(labels in prop::collection::btree_map(name_like(), name_like(), 0..70)) {
        let key_ok = |k: &str| {
            (1..=63).contains(&k.len())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
        };
        let value_ok = |v: &str| v.len() <= 256 && !v.chars().any(char::is_control);
        let ok = labels.len() <= MAX_LABELS && labels.iter().all(|(k, v)| key_ok(k) && value_ok(v));
        let got = check_labels(&labels);
        prop_assert_eq!(got.is_ok(), ok, "{:?}", got);
        if let Err(e) = got {
            assert_clear(&e)?;
        }
    }

    #[test]
    fn prop_modes_and_times(mode in any::<u32>(), secs in any::<i64>()) {
        prop_assert_eq!(check_mode(mode).is_ok(), mode <= 0o777);
        prop_assert_eq!(check_mode(mode & 0o777).is_ok(), true);
        prop_assert_eq!(check_time("expiry", secs).is_ok(), (0..=MAX_TIME).contains(&secs));
    }
}

#[test]
fn the_models_agree_on_the_documented_examples() {
    // The reference models themselves, on the unit tests' examples.
    for good in ["a", "db/password", "a.b_c-d/E9", "x/y/z", "v1.2"] {
        assert!(secret_name_model(good), "{good}");
    }
    for bad in [
        "", "/a", "a/", "a//b", ".", "..", "a/../b", ".hidden", "a b", "é",
    ] {
        assert!(!secret_name_model(bad), "{bad}");
    }
    assert!(entity_name_model("web-1") && !entity_name_model("-a"));
    let labels = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
    check_labels(&labels).unwrap();
}
