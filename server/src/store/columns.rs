//! The SQL text both stores' reads share: the columns a row's MAC covers
//! (`integrity`), and the selects of secrets built on them. Each store
//! names its own placeholders (`?1` in SQLite, `$1` in PostgreSQL); the
//! rest of a query follows. Macros rather than consts so queries are
//! `concat!`ed at compile time, not formatted per call.

/// The `secrets` columns a row's MAC covers, then its MAC: 13 columns, as
/// each store's `rows::secret_at` reads them.
macro_rules! secret_cols {
    () => {
        "s.id, s.name, s.description, s.labels, s.mode, s.owner, s.grp, s.expires_at, \
         s.current_version, s.version_count, s.created_at, s.updated_at, s.mac"
    };
}

/// The `clients` columns a row's MAC covers, then its MAC: 7 columns, as
/// each store's `rows::client_at` reads them.
macro_rules! client_cols {
    () => {
        "c.id, c.name, c.admin, c.enabled, c.pinned, c.created_at, c.mac"
    };
}

/// `SELECT` of secrets with their current version's size and time, as
/// each store's `rows::secret` maps them; the rest of the query follows.
macro_rules! select_secrets {
    ($($rest:tt)*) => {
        concat!(
            "SELECT ", $crate::store::columns::secret_cols!(), ", v.size, v.created_at \
             FROM secrets s \
             JOIN secret_versions v ON v.secret_id = s.id AND v.version = s.current_version ",
            $($rest)*
        )
    };
}

/// The secrets client `$client` may read, each with the path it may read
/// it by (group id, both membership rows' MACs) after the `$extra`
/// columns: what [`select_granted`] and [`select_granted_sealed`] are.
macro_rules! granted {
    ($extra:literal; $client:literal; $($rest:tt)*) => {
        concat!(
            "SELECT ", $crate::store::columns::secret_cols!(), ", v.size, v.created_at, ",
            $extra,
            "gs.group_id, gs.mac, gc.mac FROM secrets s \
             JOIN secret_versions v ON v.secret_id = s.id AND v.version = s.current_version \
             JOIN group_secrets gs ON gs.secret_id = s.id \
             JOIN group_clients gc ON gc.group_id = gs.group_id AND gc.client_id = ",
            $client,
            " ",
            $($rest)*
        )
    };
}

/// As [`select_secrets`], with each path by which the client (placeholder
/// `$client`) may read the secret (the group, and both membership rows'
/// MACs, at [`VIEW_PATH`]).
macro_rules! select_granted {
    ($client:literal; $($rest:tt)*) => {
        $crate::store::columns::granted!(""; $client; $($rest)*)
    };
}

/// As [`select_granted`], with the current version's sealed content, as
/// each store's `rows::sealed_secret` maps it (the path at
/// [`SEALED_PATH`]).
macro_rules! select_granted_sealed {
    ($client:literal; $($rest:tt)*) => {
        $crate::store::columns::granted!("v.wrapped_key, v.ciphertext, "; $client; $($rest)*)
    };
}

pub(crate) use {
    client_cols, granted, secret_cols, select_granted, select_granted_sealed, select_secrets,
};

/// Where the path columns start in [`select_granted`] and
/// [`select_granted_sealed`].
pub const VIEW_PATH: usize = 15;
pub const SEALED_PATH: usize = 17;

#[cfg(test)]
mod tests {
    /// The text the stores ran before these were shared, placeholder and
    /// spacing included.
    #[test]
    fn the_selects_read_as_before() {
        let cols = "s.id, s.name, s.description, s.labels, s.mode, s.owner, s.grp, \
                    s.expires_at, s.current_version, s.version_count, s.created_at, \
                    s.updated_at, s.mac";
        assert_eq!(secret_cols!(), cols);
        assert_eq!(
            select_secrets!("ORDER BY s.name"),
            format!(
                "SELECT {cols}, v.size, v.created_at FROM secrets s JOIN secret_versions v \
                 ON v.secret_id = s.id AND v.version = s.current_version ORDER BY s.name"
            )
        );
        assert_eq!(
            select_granted!("$1"; "ORDER BY s.name"),
            format!(
                "SELECT {cols}, v.size, v.created_at, gs.group_id, gs.mac, gc.mac FROM secrets \
                 s JOIN secret_versions v ON v.secret_id = s.id AND v.version = \
                 s.current_version JOIN group_secrets gs ON gs.secret_id = s.id JOIN \
                 group_clients gc ON gc.group_id = gs.group_id AND gc.client_id = $1 ORDER \
                 BY s.name"
            )
        );
        assert_eq!(
            select_granted_sealed!("?1"; "WHERE s.id = ?2"),
            format!(
                "SELECT {cols}, v.size, v.created_at, v.wrapped_key, v.ciphertext, \
                 gs.group_id, gs.mac, gc.mac FROM secrets s JOIN secret_versions v ON \
                 v.secret_id = s.id AND v.version = s.current_version JOIN group_secrets gs \
                 ON gs.secret_id = s.id JOIN group_clients gc ON gc.group_id = gs.group_id \
                 AND gc.client_id = ?1 WHERE s.id = ?2"
            )
        );
    }
}
