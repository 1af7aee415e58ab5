//! [`PgError`], the PostgreSQL backend's errors, and [`mask_url`].
//!
//! No message ever carries the database password: URLs are shown through [`mask_url`], and
//! every message built from a driver error goes through [`Scrub`], which also replaces any
//! literal occurrence of the configured password (should a server or driver ever echo it).

use std::time::Duration;

use crate::storage::LeaseError;

/// Errors of the PostgreSQL storage backend. Messages never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL (or one of its options) cannot be used.
    #[error("invalid database URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, masked.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The TLS setup failed (CA file unreadable, no roots for a verifying mode).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server could not be reached or refused the session.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The URL, masked.
        url: String,
        /// The driver's reason.
        reason: String,
    },
    /// Another live daemon holds this node id (its session holds the node's advisory lock).
    #[error("node id `{0}` is held by another live daemon")]
    NodeTaken(String),
    /// The schema lacks tables or columns the backend needs (each named, e.g.
    /// `table proxy_pool`, `column proxy.latency_us`). Run with `migrate = true`, or apply
    /// `migrate.sql`.
    #[error(
        "database schema incomplete, missing: {}; start with migrate = true (or apply migrate.sql)",
        .0.join(", ")
    )]
    Schema(Vec<String>),
    /// The migration failed.
    #[error("migration failed: {0}")]
    Migrate(String),
    /// A statement failed (server error, lost connection).
    #[error("{op}: {reason}")]
    Statement {
        /// The operation (observer op name).
        op: &'static str,
        /// The driver's or server's reason.
        reason: String,
    },
    /// No connection of the pool became free, or could be made, in time.
    #[error("{op}: no database connection: {reason}")]
    Pool {
        /// The operation.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// The operation did not finish within the statement timeout.
    #[error("{op}: no answer from the database within {after:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The bound that passed.
        after: Duration,
    },
    /// The daemon's dedicated session (node lock, LISTEN) is down: no new leases until it
    /// is back and holds the node lock again.
    #[error("node `{0}` does not hold its node lock right now (reconnecting); not leasing")]
    NodeLockLost(String),
    /// The storage was closed.
    #[error("the PostgreSQL storage is closed")]
    Closed,
}

impl From<PgError> for LeaseError {
    fn from(e: PgError) -> Self {
        LeaseError::Backend(Box::new(e))
    }
}

/// Replaces the password in text shown to anyone.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scrub {
    password: Option<String>,
}

impl Scrub {
    /// Scrubs occurrences of `password` (when it is at least 4 characters: shorter ones
    /// would garble every message without protecting anything).
    pub fn new(password: Option<&[u8]>) -> Self {
        let password = password
            .and_then(|p| std::str::from_utf8(p).ok())
            .filter(|p| p.len() >= 4)
            .map(str::to_owned);
        Self { password }
    }

    /// Scrubs the password written in a URL's user info (for errors about a URL that could
    /// not be parsed, whose password the driver never read).
    pub fn for_url(url: &str) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = &rest[..rest.find('?').unwrap_or(rest.len())];
        let password = authority
            .rfind('@')
            .and_then(|at| authority[..at].split_once(':'))
            .map(|(_, p)| p.as_bytes());
        Self::new(password)
    }

    /// `text` without the password.
    pub fn text(&self, text: impl std::fmt::Display) -> String {
        let text = text.to_string();
        match &self.password {
            Some(p) => text.replace(p.as_str(), "***"),
            None => text,
        }
    }

    /// A driver error as text: the server's message, detail and code when there is one.
    pub fn db_error(&self, e: &tokio_postgres::Error) -> String {
        match e.as_db_error() {
            Some(db) => {
                let mut s = format!("{} ({})", db.message(), db.code().code());
                if let Some(d) = db.detail() {
                    s.push_str(": ");
                    s.push_str(d);
                }
                self.text(s)
            }
            None => self.text(chain(e)),
        }
    }
}

/// An error and its sources: `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// The URL with its password replaced by `***`: `postgres://user:***@host:port/db?…`.
/// Works on URLs (`postgres://`, `postgresql://`, also a `password=` query parameter) and
/// on key-value connection strings (`host=… password=…`).
pub fn mask_url(url: &str) -> String {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        mask_uri(url)
    } else {
        mask_key_values(url)
    }
}

fn mask_uri(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    let query_at = rest.find('?').unwrap_or(rest.len());
    let (authority_path, query) = rest.split_at(query_at);
    let masked_auth = match authority_path.rfind('@') {
        Some(at) => {
            let userinfo = &authority_path[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{masked}{}", &authority_path[at..])
        }
        None => authority_path.to_owned(),
    };
    let masked_query = if query.is_empty() {
        String::new()
    } else {
        let params: Vec<String> = query[1..]
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        format!("?{}", params.join("&"))
    };
    format!("{head}{masked_auth}{masked_query}")
}

/// Masks `password = value` in a libpq key-value string (value bare or single-quoted, with
/// backslash escapes).
fn mask_key_values(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        let at_word = i == 0 || bytes[i - 1].is_ascii_whitespace();
        if at_word && s[i..].to_ascii_lowercase().starts_with("password") {
            let mut j = i + "password".len();
            while j < bytes.len() && bytes[j] == b' ' {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'=' {
                out.push_str("password=***");
                i = skip_value(bytes, j + 1);
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The index after a key-value string's value that starts at or after `i`.
fn skip_value(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && bytes[i] == b' ' {
        i += 1;
    }
    let quoted = i < bytes.len() && bytes[i] == b'\'';
    if quoted {
        i += 1;
    }
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'\'' if quoted => return i + 1,
            c if !quoted && c.is_ascii_whitespace() => return i,
            _ => i += 1,
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_password_in_every_form() {
        let cases = [
            (
                "postgres://u:s3cr%40t@db:5432/x?sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            ("postgresql://u@db/x", "postgresql://u@db/x"),
            (
                "postgres://db/x?password=hunter22&a=b",
                "postgres://db/x?password=***&a=b",
            ),
            ("postgres://u:p/w@d@h/x", "postgres://u:***@h/x"),
            (
                "host=db password='a b\\' c' user=u",
                "host=db password=*** user=u",
            ),
            ("host=db password = hunter22", "host=db password=***"),
            ("host=db user=u", "host=db user=u"),
        ];
        for (url, want) in cases {
            assert_eq!(mask_url(url), want, "{url}");
        }
    }

    #[test]
    fn scrub_replaces_the_password() {
        let s = Scrub::new(Some(b"hunter22"));
        assert_eq!(s.text("bad hunter22!"), "bad ***!");
        let u = Scrub::for_url("postgres://u:hunter22@h/db?x=1");
        assert_eq!(u.text("x hunter22"), "x ***");
        assert_eq!(Scrub::new(Some(b"ab")).text("ab"), "ab");
    }
}
