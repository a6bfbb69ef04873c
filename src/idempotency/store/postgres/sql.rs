//! The SQL text of the PostgreSQL store, built once per table name.
//!
//! Every expiry compares with the database's `now()`, never the caller's clock, so
//! replicas whose clocks disagree still agree on when a lease or a replay record expires.
//! TTLs are bound as whole microseconds (`$n::bigint * interval '1 microsecond'`).

/// The maximum table name length in bytes, so that the index name `<table>_expires_at`
/// fits PostgreSQL's 63-byte identifier limit.
const MAX_TABLE_NAME: usize = 63 - "_expires_at".len();

/// The statements for one table.
#[derive(Debug)]
pub(super) struct Statements {
    /// The table name as given, for `Debug` output and error messages.
    pub(super) table: String,
    pub(super) create_table: String,
    pub(super) create_index: String,
    pub(super) claim: String,
    pub(super) read: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) renew: String,
    pub(super) sweep: String,
}

/// The `state` column of a claim that has not completed.
pub(super) const IN_FLIGHT: &str = "in_flight";
/// The `state` column of a completed record.
pub(super) const COMPLETED: &str = "completed";

impl Statements {
    /// Builds the statements for `name`, a table name with an optional schema
    /// (`records` or `app.records`).
    ///
    /// # Errors
    ///
    /// A message naming the rule that `name` breaks.
    pub(super) fn new(name: &str) -> Result<Self, String> {
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, name),
        };
        if let Some(schema) = schema {
            validate_identifier(schema, 63)?;
        }
        validate_identifier(table, MAX_TABLE_NAME)?;

        // Both parts contain only lowercase letters, digits and underscores, so quoting
        // cannot change their meaning. It only lets a reserved word such as `user` be a
        // table name.
        let qualified = match schema {
            Some(schema) => format!("\"{schema}\".\"{table}\""),
            None => format!("\"{table}\""),
        };
        let index = format!("\"{table}_expires_at\"");

        Ok(Statements {
            table: name.to_owned(),
            create_table: create_table(&qualified),
            create_index: format!("CREATE INDEX IF NOT EXISTS {index} ON {qualified} (expires_at)"),
            claim: claim(&qualified),
            read: read(&qualified),
            complete: complete(&qualified),
            release: format!(
                "DELETE FROM {qualified} \
                 WHERE scope = $1 AND key = $2 AND owner = $3 AND state = '{IN_FLIGHT}'"
            ),
            renew: format!(
                "UPDATE {qualified} \
                 SET expires_at = now() + $4::bigint * interval '1 microsecond' \
                 WHERE scope = $1 AND key = $2 AND owner = $3 AND state = '{IN_FLIGHT}'"
            ),
            sweep: sweep(&qualified),
        })
    }
}

/// Checks that `name` is a lowercase PostgreSQL identifier that needs no escaping.
fn validate_identifier(name: &str, max_len: usize) -> Result<(), String> {
    let mut chars = name.chars();
    let starts_well = chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first == '_');
    let rest_valid = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !starts_well || !rest_valid {
        return Err(format!(
            "invalid table name part {name:?}: expected a lowercase letter or underscore, \
             then lowercase letters, digits or underscores"
        ));
    }
    if name.len() > max_len {
        return Err(format!(
            "invalid table name part {name:?}: {} bytes, the maximum is {max_len}",
            name.len()
        ));
    }
    Ok(())
}

/// Returns the `CREATE TABLE` statement. `owner` is kept after completion for inspection,
/// but only a row in the `in_flight` state belongs to its owner. A completed row with a
/// NULL `body` completed without a replayable body.
fn create_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            scope       text        NOT NULL,
            key         text        NOT NULL,
            fingerprint bytea       NOT NULL,
            owner       text        NOT NULL,
            state       text        NOT NULL CHECK (state IN ('{IN_FLIGHT}', '{COMPLETED}')),
            status      smallint,
            headers     bytea,
            body        bytea,
            expires_at  timestamptz NOT NULL,
            PRIMARY KEY (scope, key)
        )"
    )
}

/// Inserts a claim, or takes over a row whose lease or replay TTL passed. Returns one
/// row when the caller now owns the key and none otherwise.
///
/// Why exactly one of N concurrent claimers of a key wins, under READ COMMITTED:
///
/// - Absent key: each `INSERT` first inserts into the primary key index speculatively.
///   One succeeds, and the others find its uncommitted entry and wait for its
///   transaction. When it commits, each waiter detects the conflict, locks the committed
///   row and evaluates the `DO UPDATE ... WHERE` against that row. Its `expires_at` lies in the
///   future, so the condition is false, nothing is updated and nothing is returned. If
///   the first inserter rolls back instead, the waiters retry their insertion and one of
///   them wins in the same way.
/// - Expired row: every claimer conflicts and tries to lock the row. The first to lock
///   it updates it and the others wait for that transaction. ON CONFLICT DO UPDATE then
///   re-reads the newest committed version of the row, even one that the waiting
///   statement's snapshot cannot see, so each waiter evaluates the `WHERE` against the
///   new lease, finds it live and returns nothing.
/// - Row deleted while a claimer waits for its lock (a release or a sweep): PostgreSQL
///   retries that claimer's insertion, which brings it back to the first case.
///
/// A TTL of zero makes a claim that is expired at once, and the next claimer may take it
/// over, as a lease that already ran out should allow.
///
/// Sources: the PostgreSQL documentation on Read Committed isolation, which says that an
/// `INSERT ... ON CONFLICT DO UPDATE` updates a conflicting row even when no version of
/// it is visible to the command, and the isolation test
/// `src/test/isolation/specs/insert-conflict-do-update-3.spec` in the PostgreSQL source,
/// which states that the `WHERE` is evaluated once, on the locked newest version.
fn claim(table: &str) -> String {
    format!(
        "INSERT INTO {table} AS r (scope, key, fingerprint, owner, state, expires_at)
         VALUES ($1, $2, $3, $4, '{IN_FLIGHT}', now() + $5::bigint * interval '1 microsecond')
         ON CONFLICT (scope, key) DO UPDATE SET
             fingerprint = EXCLUDED.fingerprint,
             owner = EXCLUDED.owner,
             state = EXCLUDED.state,
             status = NULL,
             headers = NULL,
             body = NULL,
             expires_at = EXCLUDED.expires_at
         WHERE r.expires_at <= now()
         RETURNING 1"
    )
}

/// Reads the row that kept a claim from succeeding, with the microseconds until it
/// expires (zero or less once it has).
///
/// This runs as its own statement because a statement under READ COMMITTED reads from a
/// snapshot taken when it starts. A `SELECT` inside the claiming statement could miss a
/// row that a concurrent transaction committed while the claim waited for it.
fn read(table: &str) -> String {
    format!(
        "SELECT fingerprint, state, status, headers, body,
                (extract(epoch FROM expires_at - now()) * 1000000)::bigint AS expires_in
         FROM {table}
         WHERE scope = $1 AND key = $2"
    )
}

/// Stores the response if the claim is still in flight for the owner. An expired claim
/// that no other request took over still belongs to its owner, as in `MemoryStore`.
fn complete(table: &str) -> String {
    format!(
        "UPDATE {table}
         SET state = '{COMPLETED}', status = $4, headers = $5, body = $6,
             expires_at = now() + $7::bigint * interval '1 microsecond'
         WHERE scope = $1 AND key = $2 AND owner = $3 AND state = '{IN_FLIGHT}'"
    )
}

/// Deletes up to `$1` expired rows.
///
/// `FOR UPDATE SKIP LOCKED` passes over rows that a claim or a completion has locked, so
/// a sweep does not wait for the row locks of requests. Under READ COMMITTED, locking a row that changed
/// since the snapshot re-checks `expires_at` on its newest version, so a row that a
/// takeover just renewed is not deleted.
fn sweep(table: &str) -> String {
    format!(
        "DELETE FROM {table}
         WHERE (scope, key) IN (
             SELECT scope, key FROM {table}
             WHERE expires_at <= now()
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         )"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_accepted() {
        for name in ["records", "_r2", "app.records", "user", &"a".repeat(52)] {
            assert!(Statements::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn invalid_names_rejected() {
        let too_long = "a".repeat(53);
        for name in [
            "",
            "Records",
            "2records",
            "rec-ords",
            "rec\"ords",
            "a.b.c",
            ".records",
            "records.",
            "r\u{e9}cords",
            &too_long,
        ] {
            assert!(Statements::new(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn names_are_quoted() {
        let statements = Statements::new("app.user").unwrap();
        assert!(statements.create_table.contains("\"app\".\"user\""));
        assert!(statements.create_index.contains("\"user_expires_at\""));
    }
}
