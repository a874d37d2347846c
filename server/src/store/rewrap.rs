//! A rekey's batch, the same for every backend: where the last batch
//! stopped (the meta row [`crate::rekey::META_CURSOR`]) and one version's data key moved
//! over to the new master key.

use crate::envelope::{Binding, MasterKey};
use crate::keys::Keys;
use crate::store::{Result, StoreError};

/// Where the last batch stopped, from [`crate::rekey::META_CURSOR`]'s value: `(secret
/// id, version)`; `(-1, -1)` (before every version) when there is none
/// or it is not 16 bytes.
pub fn cursor_of(value: Option<&[u8]>) -> (i64, i64) {
    match value {
        Some(b) if b.len() == 16 => (
            i64::from_be_bytes(b[..8].try_into().unwrap_or_default()),
            i64::from_be_bytes(b[8..].try_into().unwrap_or_default()),
        ),
        _ => (-1, -1),
    }
}

/// [`crate::rekey::META_CURSOR`]'s value after `(secret id, version)`:
/// `secret_id || version`, big-endian.
pub fn cursor_at(id: i64, version: i64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..8].copy_from_slice(&id.to_be_bytes());
    c[8..].copy_from_slice(&version.to_be_bytes());
    c
}

/// What one version's data key is sealed to, from its stored columns.
pub fn binding(id: i64, name: &str, version: i64) -> Binding<'_> {
    Binding {
        secret_id: id as u64,
        name,
        version: version as u64,
    }
}

/// Whether one version's wrapped data key opens under `key`.
pub fn opens(key: &MasterKey, id: i64, name: &str, version: i64, wrapped: &[u8]) -> bool {
    key.opens_wrapped(binding(id, name, version), wrapped)
}

/// One version's wrapped data key under the current master key, when it
/// must be written (`None`: already there, no rekey under way, or opens
/// under neither key: damaged before the rekey, it did not read before
/// and does not now, and is left as it is with a warning).
pub fn rewrap_version(
    keys: &Keys,
    id: i64,
    name: &str,
    version: i64,
    wrapped: &[u8],
) -> Result<Option<Vec<u8>>> {
    let Some(previous) = &keys.previous else {
        return Ok(None);
    };
    match keys
        .current
        .master()
        .rewrap(previous.master(), binding(id, name, version), wrapped)
    {
        Ok(new) => Ok(new),
        Err(crate::error::Error::Integrity { .. }) => {
            tracing::warn!(secret = %name, version, "rekey: this version's data key opens under neither master key; left as it was");
            Ok(None)
        }
        Err(e) => Err(StoreError::Seal(Box::new(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_a_bad_one_starts_over() {
        let c = cursor_at(7, 3);
        assert_eq!(cursor_of(Some(&c)), (7, 3));
        assert_eq!(cursor_of(None), (-1, -1));
        assert_eq!(cursor_of(Some(&c[..15])), (-1, -1));
    }
}
