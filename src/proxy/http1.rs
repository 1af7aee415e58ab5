//! pharox's own HTTP/1 framing (RFC 9112), the core of the plain-HTTP relay: everything
//! about where messages start and end on a connection, and nothing about leases or upstreams.
//!
//! - `head`: strict request and response head parsing ([`parse_request`], [`take_request`],
//!   [`parse_response`]), spans over the raw bytes instead of a copy per header.
//! - `framing`: how long each body is ([`BodyFraming`]), refusing every ambiguous form that
//!   request smuggling lives on.
//! - `chunked`: [`ChunkedDecoder`] validates a chunked body and only measures it, so the relay
//!   forwards bodies byte for byte; [`copy_body`] moves one body between two streams.
//! - `rewrite`: [`write_request_head`] and [`write_response_head`] never emit an invalid head
//!   from their input; [`RequestRewrite`] and [`ResponseRewrite`] turn a client's request into
//!   the upstream's and an upstream's response into the client's.
//! - `uri`: [`AbsoluteUri`] parses an absolute-form target strictly.
//!
//! Everything refuses rather than guesses: a message two implementations could read two ways
//! is an error. A client's error answers 400, 431 (head over the limit) or 501 (a transfer
//! coding other than `chunked`), all with code `bad_request`, through
//! `From<FramingError> for ProxyError`; the connection closes after it. An upstream's faulty
//! response is the caller's 502.

mod chunked;
mod framing;
mod head;
mod rewrite;
mod uri;

pub use chunked::{
    BodyError, ChunkFault, ChunkedDecoder, MAX_EXTENSIONS, MAX_TRAILERS, Progress, copy_body,
};
pub(crate) use head::{Fields, take_request_reusing, take_response_reusing};
pub use head::{
    RequestHead, ResponseHead, parse_request, parse_response, take_request, take_response,
};
pub use rewrite::{
    BuildError, HeaderLines, RequestRewrite, ResponseRewrite, TargetForm, write_request_head,
    write_response_head,
};
pub use uri::{AbsoluteUri, Scheme, UriError};

use crate::error::ProxyError;

/// Most header lines accepted in one head.
pub const MAX_HEADERS: usize = 128;

/// Why a head or a body cannot be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// No complete head within the size limit (431).
    #[error("head larger than {limit} bytes")]
    HeadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A line of the head ends in LF without CR.
    #[error("line ending without CR")]
    BareLf,
    /// A header line starts with whitespace (obsolete line folding).
    #[error("obsolete line folding")]
    ObsFold,
    /// Whitespace between a header name and its colon.
    #[error("whitespace before a header colon")]
    SpaceBeforeColon,
    /// A header name that is not a token, or a line without a colon.
    #[error("invalid header name")]
    InvalidHeaderName,
    /// A control byte (NUL, CR, LF, ...) in a header value.
    #[error("invalid byte in a header value")]
    InvalidHeaderValue,
    /// More than [`MAX_HEADERS`] header lines.
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    /// A start line that is not three parts separated by single spaces.
    #[error("malformed start line")]
    InvalidStartLine,
    /// A method that is not a token.
    #[error("invalid method")]
    InvalidMethod,
    /// A request target that is empty or not visible ASCII.
    #[error("invalid request target")]
    InvalidTarget,
    /// A version other than HTTP/1.0 and HTTP/1.1.
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    /// A status code that is not three digits from 100.
    #[error("invalid status code")]
    InvalidStatus,
    /// A control byte in the reason phrase.
    #[error("invalid reason phrase")]
    InvalidReason,
    /// More than one `Host` header in a request.
    #[error("more than one Host header")]
    DuplicateHost,
    /// `Content-Length` and `Transfer-Encoding` in one message.
    #[error("Content-Length together with Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    /// More than one `Content-Length` header, even with equal values.
    #[error("more than one Content-Length header")]
    DuplicateContentLength,
    /// A `Content-Length` that is a list (`5, 6`, even `5, 5`).
    #[error("Content-Length is a list")]
    ContentLengthList,
    /// A `Content-Length` that is not a u64 in ASCII digits.
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// More than one `Transfer-Encoding` header.
    #[error("more than one Transfer-Encoding header")]
    DuplicateTransferEncoding,
    /// A `Transfer-Encoding` that is not a list of tokens, or names `chunked` twice.
    #[error("malformed Transfer-Encoding")]
    InvalidTransferEncoding,
    /// A request whose final transfer coding is not `chunked`.
    #[error("Transfer-Encoding does not end in chunked")]
    NotChunked,
    /// A request with transfer codings besides `chunked` (501).
    #[error("transfer coding other than chunked")]
    UnsupportedTransferCoding,
    /// `Transfer-Encoding` in an HTTP/1.0 message.
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    TransferEncodingHttp10,
    /// A request header spelt like a framing header with `_` for `-` (`Transfer_Encoding`),
    /// which some servers read as the real one.
    #[error("a framing header spelt with `_`")]
    FramingAlias,
    /// A chunked body that breaks the grammar at byte `offset` of the body.
    #[error("malformed chunked body at byte {offset}: {fault}")]
    Chunked {
        /// Position of the offending byte, counted from the first byte of the body.
        offset: u64,
        /// What is wrong there.
        fault: ChunkFault,
    },
}

impl FramingError {
    /// The status answered to a client whose request this is: 431 for a head over the limit,
    /// 501 for a transfer coding other than `chunked`, 400 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            FramingError::HeadTooLarge { .. } => 431,
            FramingError::UnsupportedTransferCoding => 501,
            _ => 400,
        }
    }
}

impl From<FramingError> for ProxyError {
    fn from(e: FramingError) -> Self {
        match e {
            FramingError::HeadTooLarge { .. } => ProxyError::HeadTooLarge(e.to_string()),
            FramingError::UnsupportedTransferCoding => ProxyError::NotImplemented(e.to_string()),
            _ => ProxyError::BadRequest(e.to_string()),
        }
    }
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// What a header name means to the relay, worked out once per header line when a head is
/// parsed (one comparison at most, by length), so that framing, hop-by-hop removal and the
/// identity headers never compare a name against a list again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    ContentLength,
    TransferEncoding,
    /// `Content_Length` / `Transfer_Encoding` (`_` for a `-`), which some servers read as
    /// the real one.
    FramingAlias,
    Host,
    Upgrade,
    Expect,
    Connection,
    ProxyConnection,
    KeepAlive,
    ProxyAuthenticate,
    ProxyAuthorization,
    Te,
    Trailer,
    /// `X-Pharox-*`.
    Pharox,
    Other,
}

impl Kind {
    /// The kind of a header name (any bytes; case-insensitive).
    pub(crate) fn of(name: &[u8]) -> Kind {
        let Some(&first) = name.first() else {
            return Kind::Other;
        };
        // One candidate by length and first letter (`| 0x20` lowers an ASCII letter; the
        // full comparison below decides), then one comparison: most names need none.
        let (lower, kind) = match (name.len(), first | 0x20) {
            (2, b't') => ("te", Kind::Te),
            (4, b'h') => ("host", Kind::Host),
            (6, b'e') => ("expect", Kind::Expect),
            (7, b'u') => ("upgrade", Kind::Upgrade),
            (7, b't') => ("trailer", Kind::Trailer),
            (10, b'c') => ("connection", Kind::Connection),
            (10, b'k') => ("keep-alive", Kind::KeepAlive),
            (14, b'c') => return framing(name, "content-length", Kind::ContentLength),
            (16, b'p') => ("proxy-connection", Kind::ProxyConnection),
            (17, b't') => return framing(name, "transfer-encoding", Kind::TransferEncoding),
            (18, b'p') => ("proxy-authenticate", Kind::ProxyAuthenticate),
            (19, b'p') => ("proxy-authorization", Kind::ProxyAuthorization),
            (9.., b'x') => ("x-pharox-", Kind::Pharox),
            _ => return Kind::Other,
        };
        if same_name(&name[..lower.len()], lower) {
            kind
        } else {
            Kind::Other
        }
    }

    /// Hop-by-hop (RFC 9110 §7.6.1), the proxy ones, or pharox's own: never forwarded as
    /// they came.
    pub(crate) fn is_hop(self) -> bool {
        matches!(
            self,
            Kind::Connection
                | Kind::ProxyConnection
                | Kind::KeepAlive
                | Kind::ProxyAuthenticate
                | Kind::ProxyAuthorization
                | Kind::Te
                | Kind::Trailer
                | Kind::TransferEncoding
                | Kind::Upgrade
                | Kind::Pharox
        )
    }
}

/// `kind` for `name` spelt `lower` (ignoring case), [`Kind::FramingAlias`] for it spelt with
/// `_` for a `-`, else nothing of ours.
fn framing(name: &[u8], lower: &str, kind: Kind) -> Kind {
    if same_name(name, lower) {
        return kind;
    }
    let folded = |b: &u8| {
        if *b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        }
    };
    if name.iter().map(folded).eq(lower.bytes()) {
        Kind::FramingAlias
    } else {
        Kind::Other
    }
}

/// `name` (no CR in it, as in every header name and list element) is `lower`, made of
/// lower-case letters and `-`, ignoring ASCII case: a few fixed-size loads that together
/// cover the name (overlapping where its length is not a multiple of theirs), an ASCII letter
/// lowered by setting bit 5 (which maps no other byte onto a letter, and only CR onto `-`).
/// No copy and no loop over bytes: names are compared on every header line.
fn same_name(name: &[u8], lower: &str) -> bool {
    let lower = lower.as_bytes();
    let len = name.len();
    if len != lower.len() {
        return false;
    }
    match len {
        0 => true,
        1 => name[0] | 0x20 == lower[0],
        2..=3 => folded2(name, lower, 0) && folded2(name, lower, len - 2),
        4..=7 => folded4(name, lower, 0) && folded4(name, lower, len - 4),
        _ => {
            let mut at = 0;
            while at + 8 < len {
                if !folded8(name, lower, at) {
                    return false;
                }
                at += 8;
            }
            folded8(name, lower, len - 8)
        }
    }
}

fn folded2(name: &[u8], lower: &[u8], at: usize) -> bool {
    let word = |b: &[u8]| u16::from_le_bytes([b[at], b[at + 1]]);
    word(name) | 0x2020 == word(lower)
}

fn folded4(name: &[u8], lower: &[u8], at: usize) -> bool {
    let word = |b: &[u8]| u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"));
    word(name) | 0x2020_2020 == word(lower)
}

fn folded8(name: &[u8], lower: &[u8], at: usize) -> bool {
    let word = |b: &[u8]| u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"));
    word(name) | 0x2020_2020_2020_2020 == word(lower)
}

/// A name equal to `lower` (given in lower case), ignoring ASCII case.
fn is(name: &[u8], lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower.as_bytes())
}

/// The non-empty elements of a comma-separated value, whitespace trimmed.
fn list(value: &[u8]) -> List<'_> {
    List { rest: value }
}

/// The iterator of [`list`]: one scan, no closures (most lists have a single element).
struct List<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for List<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        while !self.rest.is_empty() {
            let (element, rest) = match self.rest.iter().position(|&b| b == b',') {
                Some(comma) => (&self.rest[..comma], &self.rest[comma + 1..]),
                None => (self.rest, &self.rest[self.rest.len()..]),
            };
            self.rest = rest;
            let element = trim_ows(element);
            if !element.is_empty() {
                return Some(element);
            }
        }
        None
    }
}

/// `value` without leading and trailing SP / HTAB.
fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    TCHAR[b as usize]
}

/// [`is_tchar`] as a table: header names are checked byte by byte on every head built.
static TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

/// A non-empty run of `tchar`.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Visible ASCII.
fn is_vchar(b: u8) -> bool {
    (b'!'..=b'~').contains(&b)
}

/// Every byte of `s` is [`is_vchar`], computed without an early exit (many bytes per step):
/// every request target goes through it.
fn is_visible(s: &[u8]) -> bool {
    s.iter().fold(true, |ok, &b| ok & is_vchar(b))
}

/// A byte of field content: HTAB, SP, visible ASCII or obs-text (no other control, no DEL).
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// Every byte of `s` is [`is_field_byte`]. Computed without an early exit, so that it runs
/// many bytes per step: every header value of every head built goes through it.
fn is_field_content(s: &[u8]) -> bool {
    s.iter().fold(true, |ok, &b| {
        ok & ((b >= b' ' && b != 0x7f) | (b == b'\t'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_content_is_field_bytes_throughout() {
        for b in 0..=255u8 {
            assert_eq!(is_field_content(&[b]), is_field_byte(b), "byte {b:#04x}");
            assert_eq!(is_field_content(&[b'a', b, b'z']), is_field_byte(b));
        }
        assert!(is_field_content(b""));
    }

    #[test]
    fn the_tchar_table_is_rfc_9110s_set() {
        for b in 0..=255u8 {
            let rfc = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(is_tchar(b), rfc, "byte {b:#04x}");
        }
    }

    /// What each kind means, spelt out name by name (the classifier matches by length first).
    fn kind_by_list(name: &[u8]) -> Kind {
        let lower = name.to_ascii_lowercase();
        let folded: Vec<u8> = lower
            .iter()
            .map(|&b| if b == b'_' { b'-' } else { b })
            .collect();
        let named: &[(&str, Kind)] = &[
            ("content-length", Kind::ContentLength),
            ("transfer-encoding", Kind::TransferEncoding),
            ("host", Kind::Host),
            ("upgrade", Kind::Upgrade),
            ("expect", Kind::Expect),
            ("connection", Kind::Connection),
            ("proxy-connection", Kind::ProxyConnection),
            ("keep-alive", Kind::KeepAlive),
            ("proxy-authenticate", Kind::ProxyAuthenticate),
            ("proxy-authorization", Kind::ProxyAuthorization),
            ("te", Kind::Te),
            ("trailer", Kind::Trailer),
        ];
        if let Some((_, kind)) = named.iter().find(|(n, _)| n.as_bytes() == lower) {
            return *kind;
        }
        if folded == b"content-length" || folded == b"transfer-encoding" {
            return Kind::FramingAlias;
        }
        if lower.starts_with(b"x-pharox-") {
            return Kind::Pharox;
        }
        Kind::Other
    }

    #[test]
    fn names_compare_like_eq_ignore_ascii_case() {
        // Every length a load pattern covers differently: 1, 2–3, 4–7, 8, 9–15, 16, 17+.
        let targets = [
            "e",
            "te",
            "tee",
            "host",
            "expect",
            "upgrade",
            "trailer-",
            "x-pharox-",
            "content-length",
            "proxy-connection",
            "transfer-encoding",
            "proxy-authorization",
        ];
        for target in targets {
            for b in 0..=255u8 {
                if b == b'\r' {
                    continue;
                }
                for at in 0..target.len() {
                    let mut name = target.as_bytes().to_vec();
                    name[at] = b;
                    let want = name.eq_ignore_ascii_case(target.as_bytes());
                    assert_eq!(same_name(&name, target), want, "{name:?} {target}");
                }
            }
            assert!(same_name(target.to_ascii_uppercase().as_bytes(), target));
            assert!(!same_name(&target.as_bytes()[1..], target));
        }
    }

    #[test]
    fn header_kinds() {
        for (name, kind) in [
            ("Content-Length", Kind::ContentLength),
            ("content_length", Kind::FramingAlias),
            ("Transfer_Encoding", Kind::FramingAlias),
            ("TRANSFER-ENCODING", Kind::TransferEncoding),
            ("Content-Lengths", Kind::Other),
            ("X-Pharox-", Kind::Pharox),
            ("x-pharox-pool", Kind::Pharox),
            ("X-Pharox", Kind::Other),
            ("TE", Kind::Te),
            ("Upgrade", Kind::Upgrade),
            ("Trailer", Kind::Trailer),
            ("Keep-Alive", Kind::KeepAlive),
            ("Accept", Kind::Other),
            ("", Kind::Other),
        ] {
            assert_eq!(Kind::of(name.as_bytes()), kind, "{name}");
            assert_eq!(kind_by_list(name.as_bytes()), kind, "{name}");
        }
    }

    proptest::proptest! {
        #[test]
        fn header_kinds_match_their_definition(
            name in "(?i)(content[-_]length|transfer[-_]encoding|host|upgrade|expect|connection|\
                proxy-connection|keep-alive|proxy-authenticate|proxy-authorization|te|trailer|\
                x-pharox-[a-z]{0,3}|[a-z_-]{0,20})",
        ) {
            proptest::prop_assert_eq!(Kind::of(name.as_bytes()), kind_by_list(name.as_bytes()));
        }
    }

    #[test]
    fn statuses_and_proxy_errors() {
        let cases = [
            (FramingError::HeadTooLarge { limit: 1 }, 431),
            (FramingError::UnsupportedTransferCoding, 501),
            (FramingError::ContentLengthWithTransferEncoding, 400),
            (FramingError::BareLf, 400),
        ];
        for (e, status) in cases {
            assert_eq!(e.status(), status);
            let p = ProxyError::from(e);
            let seen = (p.status(), p.code(), p.is_client_fault());
            assert_eq!(seen, (status, "bad_request", true), "{e}");
            assert!(p.to_http().starts_with(&format!("HTTP/1.1 {status} ")));
        }
    }

    #[test]
    fn value_helpers() {
        assert_eq!(trim_ows(b" \t a b\t "), b"a b");
        assert_eq!(trim_ows(b" \t "), b"");
        let tokens: Vec<&[u8]> = list(b" close ,, Keep-Alive,\tx ").collect();
        assert_eq!(tokens, [&b"close"[..], b"Keep-Alive", b"x"]);
        for (value, want) in [
            (&b""[..], &[][..]),
            (b",", &[]),
            (b" , ,", &[]),
            (b"a", &[&b"a"[..]]),
            (b"a,", &[b"a"]),
            (b",a", &[b"a"]),
            (b"a b , c", &[b"a b", b"c"]),
        ] {
            assert_eq!(list(value).collect::<Vec<_>>(), want, "{value:?}");
        }
        assert!(is_token(b"X-a_b.~!") && !is_token(b"") && !is_token(b"a b"));
        assert!(is_field_byte(b'\t') && is_field_byte(0x80) && !is_field_byte(0x7f));
    }
}
