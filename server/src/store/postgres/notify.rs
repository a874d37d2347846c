//! The notification every change sends in its own transaction
//! (`pg_notify(CHANNEL, payload)`), delivered by PostgreSQL to every
//! replica's listener when, and only when, the transaction commits.
//!
//! The payload is `REVISION KIND [ID]`: the revision the change committed
//! at, then what changed (the [`Change`] variants). Revisions are one
//! sequence across replicas with no gaps (every change takes the next one
//! under the revision row's lock, and notifications arrive in commit
//! order), so a listener that sees a gap knows it missed something.

use crate::store::Change;

/// The channel every replica listens on.
pub const CHANNEL: &str = "secretfs_changes";

/// The payload announcing `change`.
pub fn payload(change: &Change) -> String {
    match *change {
        Change::Secret { id, revision } => format!("{revision} secret {id}"),
        Change::SecretDeleted { id, revision } => format!("{revision} secret_deleted {id}"),
        Change::Access { revision } => format!("{revision} access"),
        Change::ClientAdded { revision } => format!("{revision} client_added"),
        Change::ClientRemoved { revision } => format!("{revision} client_removed"),
        Change::Resync { revision } => format!("{revision} resync"),
    }
}

/// The change a payload announces; `None` for one this version does not
/// know (a newer replica's): the listener then resyncs.
pub fn parse(payload: &str) -> Option<Change> {
    let mut words = payload.split(' ');
    let revision = words.next()?.parse().ok()?;
    let kind = words.next()?;
    let id = words.next().map(str::parse::<u64>);
    let change = match (kind, id) {
        ("secret", Some(Ok(id))) => Change::Secret { id, revision },
        ("secret_deleted", Some(Ok(id))) => Change::SecretDeleted { id, revision },
        ("access", None) => Change::Access { revision },
        ("client_added", None) => Change::ClientAdded { revision },
        ("client_removed", None) => Change::ClientRemoved { revision },
        ("resync", None) => Change::Resync { revision },
        _ => return None,
    };
    words.next().is_none().then_some(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_round_trips_and_junk_is_unknown() {
        for change in [
            Change::Secret { id: 7, revision: 9 },
            Change::SecretDeleted {
                id: 7,
                revision: 10,
            },
            Change::Access { revision: 11 },
            Change::ClientAdded { revision: 12 },
            Change::ClientRemoved { revision: 13 },
            Change::Resync { revision: 14 },
        ] {
            assert_eq!(parse(&payload(&change)), Some(change));
        }
        for junk in [
            "",
            "1",
            "x secret 1",
            "1 secret",
            "1 access 2",
            "1 secret 1 2",
            "1 nova",
        ] {
            assert_eq!(parse(junk), None, "{junk:?}");
        }
    }
}
