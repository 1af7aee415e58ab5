//! Errors the proxy answers to its clients, and the one place they become responses: status,
//! `X-Pharox-Error` code, short text body, `Proxy-Authenticate` on 407, `Retry-After` on 503.

use std::fmt::Write as _;

/// How an upstream failed, as far as a client's answer goes (SOCKS5 tells these apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFault {
    /// Refused, reset, rejected the request, or answered nonsense.
    Refused,
    /// Could not reach the destination (its name did not resolve, no route).
    Unreachable,
}

/// An error answered to a proxy client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No credentials where they are required.
    #[error("proxy credentials required")]
    AuthRequired,
    /// Credentials that do not match a consumer.
    #[error("proxy credentials rejected")]
    AuthFailed,
    /// A request that cannot be handled.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A request head over the size limit (431, code `bad_request`).
    #[error("request head too large: {0}")]
    HeadTooLarge(String),
    /// A request framed with a transfer coding pharox does not implement (501, code
    /// `bad_request`; still the client's fault).
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// A username that does not follow the grammar, or a bad parameter value.
    #[error("bad user name: {0}")]
    BadUsername(String),
    /// A pool the consumer may not use.
    #[error("pool `{0}` is not allowed for this consumer")]
    PoolForbidden(String),
    /// A pool that does not exist.
    #[error("unknown pool `{0}`")]
    UnknownPool(String),
    /// A destination refused by policy.
    #[error("destination denied: {0}")]
    DestinationDenied(String),
    /// A `-lease-ID` username naming a lease this consumer may not use (unknown, another
    /// consumer's, or one the daemon holds for a connection of its own).
    #[error("lease {0} is not yours to use")]
    LeaseForbidden(String),
    /// A `-lease-ID` username naming a lease that has ended (released or expired).
    #[error("lease {0} has ended")]
    LeaseExpired(String),
    /// The consumer already has `limits.max_sessions_per_consumer` sticky sessions.
    #[error("too many sticky sessions for this consumer (at most {0})")]
    SessionLimit(usize),
    /// No upstream free after every retry.
    #[error("pool `{pool}` exhausted")]
    PoolExhausted {
        /// The pool.
        pool: String,
        /// Seconds to suggest in `Retry-After`.
        retry_after: u64,
    },
    /// The lease storage (the database in fleet mode) did not answer in time or failed.
    #[error("lease storage unavailable: {0}")]
    StorageUnavailable(String),
    /// The daemon ran out of a local resource (file descriptors, buffers, local ports).
    #[error("out of local resources: {0}")]
    ResourceExhausted(String),
    /// The daemon already serves `limits.max_connections` connections.
    #[error("too many open connections")]
    TooManyConnections,
    /// Every upstream tried failed or refused.
    #[error("upstream failed: {detail}")]
    UpstreamFailed {
        /// How it failed.
        fault: UpstreamFault,
        /// What happened, per upstream tried.
        detail: String,
    },
    /// The upstream did not answer in time.
    #[error("upstream timed out: {0}")]
    UpstreamTimeout(String),
}

impl ProxyError {
    /// An upstream failure of the `Refused` kind.
    pub fn upstream(detail: impl Into<String>) -> Self {
        ProxyError::UpstreamFailed {
            fault: UpstreamFault::Refused,
            detail: detail.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::AuthRequired | ProxyError::AuthFailed => 407,
            ProxyError::BadRequest(_) | ProxyError::BadUsername(_) => 400,
            ProxyError::HeadTooLarge(_) => 431,
            ProxyError::NotImplemented(_) => 501,
            ProxyError::PoolForbidden(_)
            | ProxyError::UnknownPool(_)
            | ProxyError::DestinationDenied(_)
            | ProxyError::LeaseForbidden(_) => 403,
            ProxyError::LeaseExpired(_) => 410,
            ProxyError::SessionLimit(_) => 429,
            ProxyError::PoolExhausted { .. }
            | ProxyError::StorageUnavailable(_)
            | ProxyError::ResourceExhausted(_)
            | ProxyError::TooManyConnections => 503,
            ProxyError::UpstreamFailed { .. } => 502,
            ProxyError::UpstreamTimeout(_) => 504,
        }
    }

    /// The `X-Pharox-Error` code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::AuthRequired => "auth_required",
            ProxyError::AuthFailed => "auth_failed",
            ProxyError::BadRequest(_)
            | ProxyError::HeadTooLarge(_)
            | ProxyError::NotImplemented(_) => "bad_request",
            ProxyError::BadUsername(_) => "bad_username",
            ProxyError::PoolForbidden(_) => "pool_forbidden",
            ProxyError::UnknownPool(_) => "unknown_pool",
            ProxyError::DestinationDenied(_) => "destination_denied",
            ProxyError::LeaseForbidden(_) => "lease_forbidden",
            ProxyError::LeaseExpired(_) => "lease_expired",
            ProxyError::SessionLimit(_) => "session_limit",
            ProxyError::PoolExhausted { .. } => "pool_exhausted",
            ProxyError::StorageUnavailable(_) => "storage_unavailable",
            ProxyError::ResourceExhausted(_) => "resource_exhausted",
            ProxyError::TooManyConnections => "too_many_connections",
            ProxyError::UpstreamFailed { .. } => "upstream_failed",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
        }
    }

    /// The reply field of a SOCKS5 answer for this error (RFC 1928 §6).
    pub fn socks_reply(&self) -> u8 {
        match self {
            ProxyError::PoolExhausted { .. }
            | ProxyError::PoolForbidden(_)
            | ProxyError::UnknownPool(_)
            | ProxyError::DestinationDenied(_)
            | ProxyError::SessionLimit(_)
            | ProxyError::LeaseForbidden(_)
            | ProxyError::LeaseExpired(_) => socks_reply::NOT_ALLOWED,
            ProxyError::UpstreamTimeout(_) => socks_reply::TTL_EXPIRED,
            ProxyError::UpstreamFailed {
                fault: UpstreamFault::Unreachable,
                ..
            } => socks_reply::HOST_UNREACHABLE,
            ProxyError::UpstreamFailed { .. } => socks_reply::REFUSED,
            _ => socks_reply::GENERAL,
        }
    }

    /// Extra headers beyond the code.
    pub fn extra_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ProxyError::AuthRequired | ProxyError::AuthFailed => {
                vec![("Proxy-Authenticate", "Basic realm=\"pharox\"".into())]
            }
            ProxyError::PoolExhausted { retry_after, .. } => {
                vec![("Retry-After", retry_after.to_string())]
            }
            ProxyError::StorageUnavailable(_)
            | ProxyError::ResourceExhausted(_)
            | ProxyError::TooManyConnections => vec![("Retry-After", "1".into())],
            _ => Vec::new(),
        }
    }

    /// True when the fault is the client's (logged at debug), false for upstream trouble.
    pub fn is_client_fault(&self) -> bool {
        self.status() < 500 || matches!(self, ProxyError::NotImplemented(_))
    }

    /// The short text body.
    pub fn body(&self) -> String {
        format!("{}: {self}\n", self.code())
    }

    /// A complete HTTP/1.1 response that closes the connection.
    pub fn to_http(&self) -> String {
        let body = self.body();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nX-Pharox-Error: {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status(),
            reason(self.status()),
            self.code(),
            body.len()
        );
        for (k, v) in self.extra_headers() {
            let _ = write!(out, "{k}: {v}\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out
    }
}

/// Reason phrase of the statuses pharox sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        407 => "Proxy Authentication Required",
        410 => "Gone",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Reply codes of a SOCKS5 answer (RFC 1928 §6).
pub mod socks_reply {
    /// Succeeded.
    pub const OK: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const REFUSED: u8 = 0x05;
    /// TTL expired (used for timeouts).
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS: u8 = 0x08;
}
