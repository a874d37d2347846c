//! The audit details a change's entry carries, worded once for every
//! backend: names and counts, never a secret's content, a label's value
//! or a description's text.

use super::{shown_expiry, some_names};

/// How many names a removal's detail lists before "and N more".
const NAMES: usize = 20;

/// The detail of a change that changed nothing (a member added twice or
/// taken out when not there, an update to the values already held).
pub const NO_CHANGE: &str = "no change";

/// A rotation's detail when the expiry moved (`None` when it did not):
/// `asked` is what the rotation set (`None`: keep), `before` and `after`
/// the secret's expiry either side of it. An expiry kept but already
/// passed is cleared, and said so.
pub fn expiry_moved(
    asked: Option<Option<i64>>,
    before: Option<i64>,
    after: Option<i64>,
) -> Option<String> {
    if after == before {
        return None;
    }
    Some(match (asked, before) {
        (None, Some(t)) => format!("expiry {} had passed: cleared", shown_expiry(Some(t))),
        _ => format!("expiry {} -> {}", shown_expiry(before), shown_expiry(after)),
    })
}

/// A rollback's detail: the version current before it.
pub fn rolled_back_from(version: u64) -> String {
    format!("from version {version}")
}

/// An update's detail: what changed ([`super::SecretUpdate::apply`]), or
/// [`NO_CHANGE`].
pub fn updated(changed: &[String]) -> String {
    if changed.is_empty() {
        NO_CHANGE.to_owned()
    } else {
        changed.join(", ")
    }
}

/// A deleted secret's detail: how many versions went and which groups it
/// was granted to.
pub fn secret_deleted(versions: i64, groups: &[String]) -> String {
    format!(
        "removed {versions} version{}; granted to {}",
        if versions == 1 { "" } else { "s" },
        if groups.is_empty() {
            "no group".to_owned()
        } else {
            format!("groups {}", some_names(groups, NAMES))
        }
    )
}

/// A removed client's detail: the groups it was in.
pub fn client_removed(groups: &[String]) -> String {
    if groups.is_empty() {
        "was in no group".to_owned()
    } else {
        format!("was in groups {}", some_names(groups, NAMES))
    }
}

/// A removed group's detail: its clients and secrets.
pub fn group_removed(clients: &[String], secrets: &[String]) -> String {
    let list = |what: &str, names: &[String]| match names.len() {
        0 => format!("no {what}s"),
        1 => format!("1 {what} ({})", some_names(names, NAMES)),
        n => format!("{n} {what}s ({})", some_names(names, NAMES)),
    };
    format!(
        "removed with {} and {}",
        list("client", clients),
        list("secret", secrets)
    )
}

/// `server verify --accept`'s detail: the revision whose rows became the
/// row set.
pub fn row_set_accepted(at: u64) -> String {
    format!("the rows as they are at revision {at} accepted as the row set")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn wordings() {
        assert_eq!(expiry_moved(None, None, None), None);
        assert_eq!(expiry_moved(Some(Some(5)), Some(5), Some(5)), None);
        assert_eq!(
            expiry_moved(None, Some(0), None).as_deref(),
            Some("expiry 1970-01-01T00:00:00Z had passed: cleared")
        );
        assert_eq!(
            expiry_moved(Some(None), Some(0), None).as_deref(),
            Some("expiry 1970-01-01T00:00:00Z -> none")
        );
        assert_eq!(rolled_back_from(3), "from version 3");
        assert_eq!(updated(&[]), "no change");
        assert_eq!(updated(&names(2)), "n0, n1");
        assert_eq!(
            secret_deleted(1, &[]),
            "removed 1 version; granted to no group"
        );
        assert_eq!(
            secret_deleted(2, &names(1)),
            "removed 2 versions; granted to groups n0"
        );
        assert_eq!(client_removed(&[]), "was in no group");
        assert_eq!(client_removed(&names(2)), "was in groups n0, n1");
        assert_eq!(
            group_removed(&[], &names(1)),
            "removed with no clients and 1 secret (n0)"
        );
        assert_eq!(
            group_removed(&names(21), &names(2)),
            "removed with 21 clients (n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, n12, \
             n13, n14, n15, n16, n17, n18, n19 and 1 more) and 2 secrets (n0, n1)"
        );
    }
}
