//! The statement texts, loaded by name from `statements.sql` (the SQL lab's file, adapted:
//! every adaptation is marked `RUST:` there), and `migrate.sql`, run as is.
//!
//! A statement starts at a line `-- name: NAME` and ends with the first line ending in `;`
//! (the lab's format). Acquire statements carry the token [`FILTER_TOKEN`] where the
//! generated filter fragment goes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::LazyLock;

use crate::selector::Selector;

/// The statements file.
const STATEMENTS: &str = include_str!("statements.sql");

/// The migration (one transaction, idempotent, serialised by an advisory lock).
pub(crate) const MIGRATE: &str = include_str!("migrate.sql");

/// Placeholder for the filter fragment in the acquire statements.
pub(crate) const FILTER_TOKEN: &str = "TRUE /*FILTER*/";

/// The acquire statements' `exclude` clause (`$8`), left out of the text when there is
/// nothing to exclude, and their `only` clause (`$9`), left out when there is no such set.
/// With them, a generic plan cannot know that they filter nothing, estimates a pool's
/// eligible rows at one and sorts the pool (bitmap scan + sort) instead of walking the
/// selector's index to the first free proxy; so PostgreSQL kept planning every execution
/// (custom plans), which was most of an acquire's server time. Without them the generic plan
/// walks the index, and the statement is planned once per connection.
pub(crate) const EXCLUDE_CLAUSE: &str = "AND p.id <> ALL (coalesce($8::uuid[], '{}'))";
pub(crate) const ONLY_CLAUSE: &str = "AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))";

/// Each selector's acquire text (in [`Selector::ALL`] order) with and without the `exclude`
/// and `only` clauses, indexed by `has_exclude as usize * 2 + has_only as usize`: made once,
/// not on every acquire.
static SHAPES: LazyLock<Vec<[String; 4]>> = LazyLock::new(|| {
    Selector::ALL
        .iter()
        .map(|&s| {
            std::array::from_fn(|i| {
                let mut text = acquire(s).to_string();
                if i & 2 == 0 {
                    text = text.replace(EXCLUDE_CLAUSE, "");
                }
                if i & 1 == 0 {
                    text = text.replace(ONLY_CLAUSE, "");
                }
                text
            })
        })
        .collect()
});

/// An acquire statement's text for one request shape: the clauses that filter nothing out,
/// the filter fragment in (borrowed as is without a filter: the token is valid SQL). The
/// parameters keep their numbers (their types are given at prepare, see [`ACQUIRE_TYPES`]).
pub(crate) fn acquire_text(
    selector: Selector,
    filter: &str,
    has_exclude: bool,
    has_only: bool,
) -> Cow<'static, str> {
    let at = Selector::ALL
        .iter()
        .position(|&s| s == selector)
        .expect("every selector is in Selector::ALL");
    let text = &SHAPES[at][usize::from(has_exclude) * 2 + usize::from(has_only)];
    if filter == NO_FILTER {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.replace(FILTER_TOKEN, filter))
    }
}

/// The fragment of an empty filter.
const NO_FILTER: &str = "TRUE";

/// Types of the acquire statements' parameters `$1`..`$9` (the rest are inferred), given at
/// prepare since a text without the `exclude` or `only` clause does not mention `$8` / `$9`.
pub(crate) const ACQUIRE_TYPES: &[tokio_postgres::types::Type] = {
    use tokio_postgres::types::Type;
    &[
        Type::TEXT,
        Type::UUID,
        Type::UUID,
        Type::FLOAT8,
        Type::TEXT,
        Type::BOOL,
        Type::TEXT_ARRAY,
        Type::UUID_ARRAY,
        Type::UUID_ARRAY,
    ]
};

static BY_NAME: LazyLock<HashMap<&'static str, &'static str>> = LazyLock::new(|| parse(STATEMENTS));

fn parse(text: &'static str) -> HashMap<&'static str, &'static str> {
    let mut out = HashMap::new();
    let mut current: Option<(&'static str, usize)> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        offset += line.len();
        if let Some(name) = line.trim_start().strip_prefix("-- name:") {
            current = Some((name.trim(), offset));
            continue;
        }
        if let Some((name, body)) = current
            && line.trim_end().ends_with(';')
        {
            out.insert(name, text[body..offset].trim());
            current = None;
        }
    }
    out
}

/// The text of statement `name`. Panics on an unknown name (a programming error, caught by
/// the unit test that loads every name the backend uses).
pub(crate) fn stmt(name: &str) -> &'static str {
    BY_NAME
        .get(name)
        .unwrap_or_else(|| panic!("statements.sql has no statement `{name}`"))
}

/// The acquire statement of a selector.
pub(crate) fn acquire(selector: Selector) -> &'static str {
    stmt(match selector {
        Selector::FirstAvailable => "acquire_first_available",
        Selector::LeastUsed => "acquire_least_used",
        Selector::RoundRobin => "acquire_round_robin",
        Selector::LowestLatency => "acquire_lowest_latency",
        Selector::Random => "acquire_random",
    })
}

/// Where an acquire statement's filter parameters start (`round_robin` has `$10 strict`).
pub(crate) fn filter_start(selector: Selector) -> usize {
    if selector == Selector::RoundRobin {
        11
    } else {
        10
    }
}

/// Every statement name the backend uses.
#[cfg(test)]
pub(crate) const USED: &[&str] = &[
    "acquire_first_available",
    "acquire_least_used",
    "acquire_round_robin",
    "acquire_lowest_latency",
    "acquire_random",
    "acquire_probe",
    "rr_cursor_init",
    "release",
    "renew_batch",
    "sweep",
    "rest_end",
    "prune_released",
    "node_claim",
    "node_holder",
    "node_register",
    "session_pid",
    "terminate_own_session",
    "node_heartbeat",
    "release_holder_batch",
    "notify_capacity",
    "listen_capacity",
    "consumer_upsert",
    "pool_stats",
    "list_leases",
    "get_lease",
    "list_proxies",
    "get_proxy",
    "pool_lookup",
    "pool_name_of",
    "audit_counters",
    "pool_upsert",
    "proxy_upsert_batch",
    "proxy_remove",
    "pool_withdraw",
    "inventory_duplicates",
    "proxy_health",
    "proxy_rest",
    "schema_missing",
    "migrations_table",
    "server_info",
    "migration_version",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_used_statement_is_there_and_acquires_take_filters() {
        for name in USED {
            let text = stmt(name);
            assert!(text.ends_with(';'), "{name}");
            assert!(!text.contains("-- name:"), "{name}");
        }
        for &s in Selector::ALL {
            assert!(acquire(s).contains(FILTER_TOKEN), "{s}");
            assert!(
                !acquire(s).contains("contended"),
                "{s}: the probe is its own statement"
            );
        }
        assert_eq!(stmt("acquire_probe").matches(FILTER_TOKEN).count(), 1);
        for &s in Selector::ALL {
            // Every pick has the clauses, and `$8` / `$9` appear nowhere else.
            let text = acquire(s);
            let picks = text.matches(FILTER_TOKEN).count();
            assert_eq!(text.matches(EXCLUDE_CLAUSE).count(), picks, "{s}");
            assert_eq!(text.matches(ONLY_CLAUSE).count(), picks, "{s}");
            let bare = acquire_text(s, "TRUE", false, false);
            assert!(matches!(bare, Cow::Borrowed(_)), "{s}: no filter, no copy");
            assert!(!bare.contains("$8") && !bare.contains("$9"), "{s}");
            assert_eq!(acquire_text(s, FILTER_TOKEN, true, true), text, "{s}");
        }
        assert!(MIGRATE.contains("COMMIT;"));
    }
}
