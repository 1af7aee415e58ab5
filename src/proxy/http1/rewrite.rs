//! Outgoing HTTP/1 heads for the relay: builders that refuse (and write nothing) rather than
//! emit CR, LF, NUL or a stray space from their input, the strict parser of an absolute-form
//! request target, and the proxy rewrites: a client's request head for the upstream, an
//! upstream's response head for the client.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;
use smallvec::SmallVec;

use super::{
    BodyFraming, RequestHead, ResponseHead, is, is_field_byte, is_token, is_vchar, list, trim_ows,
};
use crate::error::ProxyError;

/// Why a head was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A method that is not a token.
    #[error("method is not a token")]
    Method,
    /// A request target that is empty or not visible ASCII.
    #[error("request target is not visible ASCII")]
    Target,
    /// A header name that is not a token.
    #[error("header name is not a token")]
    HeaderName,
    /// A header value with a control byte.
    #[error("header value has a control byte")]
    HeaderValue,
    /// A status code outside 100 to 999.
    #[error("status code out of range")]
    Status,
    /// A reason phrase with a control byte.
    #[error("reason phrase has a control byte")]
    Reason,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the proxy ones, in lower case.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Writes `method target HTTP/1.1`, the headers (values trimmed) and the blank line to `out`;
/// on an error nothing is written.
pub fn write_request_head<'h>(
    out: &mut BytesMut,
    method: &[u8],
    target: &[u8],
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
) -> Result<(), BuildError> {
    build(out, |out| {
        request_line(out, method, target)?;
        headers.into_iter().try_for_each(|(n, v)| header(out, n, v))
    })
}

/// Writes `HTTP/1.1 status reason`, the headers (values trimmed) and the blank line to `out`;
/// on an error nothing is written.
pub fn write_response_head<'h>(
    out: &mut BytesMut,
    status: u16,
    reason: &[u8],
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
) -> Result<(), BuildError> {
    build(out, |out| {
        status_line(out, status, reason)?;
        headers.into_iter().try_for_each(|(n, v)| header(out, n, v))
    })
}

/// Runs `write` on `out`, then ends the head; or takes back what it wrote if it fails.
fn build(
    out: &mut BytesMut,
    write: impl FnOnce(&mut BytesMut) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    let start = out.len();
    match write(out) {
        Ok(()) => {
            out.extend_from_slice(b"\r\n");
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

fn request_line(out: &mut BytesMut, method: &[u8], target: &[u8]) -> Result<(), BuildError> {
    if !is_token(method) {
        return Err(BuildError::Method);
    }
    if target.is_empty() || !target.iter().all(|&b| is_vchar(b)) {
        return Err(BuildError::Target);
    }
    put(out, &[method, b" ", target, b" HTTP/1.1\r\n"]);
    Ok(())
}

fn status_line(out: &mut BytesMut, status: u16, reason: &[u8]) -> Result<(), BuildError> {
    if !(100..=999).contains(&status) {
        return Err(BuildError::Status);
    }
    let reason = trim_ows(reason);
    if !reason.iter().all(|&b| is_field_byte(b)) {
        return Err(BuildError::Reason);
    }
    let mut digits = [0u8; 20];
    put(
        out,
        &[
            b"HTTP/1.1 ",
            decimal(status.into(), &mut digits),
            b" ",
            reason,
            b"\r\n",
        ],
    );
    Ok(())
}

fn header(out: &mut BytesMut, name: &[u8], value: &[u8]) -> Result<(), BuildError> {
    if !is_token(name) {
        return Err(BuildError::HeaderName);
    }
    let value = trim_ows(value);
    if !value.iter().all(|&b| is_field_byte(b)) {
        return Err(BuildError::HeaderValue);
    }
    put(out, &[name, b": ", value, b"\r\n"]);
    Ok(())
}

fn put(out: &mut BytesMut, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// `n` in decimal, written into `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Why a request target is not a usable absolute URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// Not `scheme://authority...`.
    #[error("not an absolute URI")]
    NotAbsolute,
    /// A scheme other than http and https.
    #[error("unsupported scheme")]
    UnsupportedScheme,
    /// A byte that is not visible ASCII.
    #[error("invalid character in the URI")]
    Character,
    /// A fragment (`#`), which a request never carries.
    #[error("fragment in the URI")]
    Fragment,
    /// Credentials (`user@`) in the authority.
    #[error("user information in the URI")]
    UserInfo,
    /// No host.
    #[error("empty host")]
    EmptyHost,
    /// A host that is neither an IP literal nor a DNS name of letters, digits and hyphens.
    #[error("invalid host")]
    InvalidHost,
    /// A port that is empty, 0, over 65535 or not digits.
    #[error("invalid port")]
    InvalidPort,
}

impl From<UriError> for ProxyError {
    fn from(e: UriError) -> Self {
        ProxyError::BadRequest(e.to_string())
    }
}

/// The scheme of an absolute URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http`.
    Http,
    /// `https` (for the caller to refuse: those go through CONNECT).
    Https,
}

impl Scheme {
    /// 80 or 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// An absolute-form request target (`http://authority/path?query`), checked strictly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbsoluteUri<'a> {
    /// The scheme.
    pub scheme: Scheme,
    /// `host[:port]` as sent (the value for `Host`).
    pub authority: &'a str,
    /// The host to connect to: a DNS name, an IPv4 literal, or an IPv6 literal without its
    /// brackets.
    pub host: &'a str,
    /// The port, explicit or the scheme's default.
    pub port: u16,
    /// Path and query as sent (possibly empty; see [`AbsoluteUri::origin_form`]).
    pub path_and_query: &'a str,
    uri: &'a str,
}

impl<'a> AbsoluteUri<'a> {
    /// Parses `uri`: a scheme, `://`, an authority without user information, then an optional
    /// path and query; visible ASCII only, no fragment.
    pub fn parse(uri: &'a str) -> Result<Self, UriError> {
        if !uri.bytes().all(is_vchar) {
            return Err(UriError::Character);
        }
        if uri.contains('#') {
            return Err(UriError::Fragment);
        }
        let (scheme, rest) = uri.split_once("://").ok_or(UriError::NotAbsolute)?;
        let scheme = parse_scheme(scheme)?;
        let (authority, path_and_query) =
            rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if authority.contains('@') {
            return Err(UriError::UserInfo);
        }
        let (host, port) = host_port(authority)?;
        Ok(AbsoluteUri {
            port: port.unwrap_or(scheme.default_port()),
            scheme,
            authority,
            host,
            path_and_query,
            uri,
        })
    }

    /// The whole URI (the absolute-form target).
    pub fn as_str(&self) -> &'a str {
        self.uri
    }

    /// The origin-form target: path and query, `/` if the path is empty.
    pub fn origin_form(&self) -> Cow<'a, str> {
        match self.path_and_query.as_bytes().first() {
            None => Cow::Borrowed("/"),
            Some(b'?') => Cow::Owned(format!("/{}", self.path_and_query)),
            Some(_) => Cow::Borrowed(self.path_and_query),
        }
    }
}

fn parse_scheme(scheme: &str) -> Result<Scheme, UriError> {
    let alpha = scheme.starts_with(|c: char| c.is_ascii_alphabetic());
    if !alpha
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        Err(UriError::NotAbsolute)
    } else if scheme.eq_ignore_ascii_case("http") {
        Ok(Scheme::Http)
    } else if scheme.eq_ignore_ascii_case("https") {
        Ok(Scheme::Https)
    } else {
        Err(UriError::UnsupportedScheme)
    }
}

/// `host[:port]`, the host an IP literal (IPv6 in brackets) or a DNS name.
fn host_port(authority: &str) -> Result<(&str, Option<u16>), UriError> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or(UriError::InvalidHost)?;
            host.parse::<Ipv6Addr>()
                .map_err(|_| UriError::InvalidHost)?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or(UriError::InvalidHost)?),
                ),
            }
        }
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            check_host(host)?;
            (host, port)
        }
    };
    Ok((host, port.map(parse_port).transpose()?))
}

/// A DNS name of LDH labels, or (when it ends in a number, as URL parsers read it) a
/// dotted-quad IPv4 address: `127.1` and `0x7f.1` are refused, not read as addresses.
fn check_host(host: &str) -> Result<(), UriError> {
    if host.is_empty() {
        return Err(UriError::EmptyHost);
    }
    let last = host.rsplit('.').next().unwrap_or(host);
    let hex = last.strip_prefix("0x").or_else(|| last.strip_prefix("0X"));
    let numeric = (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
        || hex.is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    let valid = if numeric {
        host.parse::<Ipv4Addr>().is_ok()
    } else {
        host.len() <= 253 && host.split('.').all(is_dns_label)
    };
    if valid {
        Ok(())
    } else {
        Err(UriError::InvalidHost)
    }
}

fn is_dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn parse_port(port: &str) -> Result<u16, UriError> {
    if !(1..=5).contains(&port.len()) || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UriError::InvalidPort);
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(UriError::InvalidPort),
        Ok(port) => Ok(port),
    }
}

/// Which request-target form the upstream gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    /// `http://host/path`: the upstream is an HTTP proxy.
    Absolute,
    /// `/path`: a direct connection to the origin (or through a SOCKS tunnel).
    Origin,
}

/// How to rewrite a client's request head for the upstream.
#[derive(Debug, Clone, Copy)]
pub struct RequestRewrite<'a> {
    /// The target form to send.
    pub form: TargetForm,
    /// Whether to ask the upstream to keep the connection (`Connection: keep-alive` or
    /// `close`; an upgrade request sends `Connection: upgrade`).
    pub keep_alive: bool,
    /// The upstream proxy's own `Proxy-Authorization` value, if it wants one.
    pub proxy_authorization: Option<&'a [u8]>,
}

impl RequestRewrite<'_> {
    /// Writes the upstream request head for `head`, whose target is `uri`: `HTTP/1.1`, `Host`
    /// from the URI's authority (whatever `Host` the client sent), the client's headers but
    /// hop-by-hop ones, those named in `Connection` / `Proxy-Connection`, `X-Pharox-*` and
    /// framing headers (also as `Content_Length`-like aliases), then one framing header for
    /// [`RequestHead::framing`], `Connection`, and `Proxy-Authorization` if given.
    pub fn write(
        &self,
        head: &RequestHead,
        uri: &AbsoluteUri<'_>,
        out: &mut BytesMut,
    ) -> Result<(), BuildError> {
        let named = connection_named(head.headers(), true);
        let upgrade = head.upgrade().is_some();
        let target = match self.form {
            TargetForm::Absolute => Cow::Borrowed(uri.as_str()),
            TargetForm::Origin => uri.origin_form(),
        };
        out.reserve(head.raw().len() + 128);
        build(out, |out| {
            request_line(out, head.method().as_bytes(), target.as_bytes())?;
            header(out, b"Host", uri.authority.as_bytes())?;
            for (name, value) in head.headers() {
                if forwards_request_header(name, &named, upgrade) {
                    header(out, name, value)?;
                }
            }
            let mut digits = [0u8; 20];
            match head.framing() {
                BodyFraming::Length(n) => header(out, b"Content-Length", decimal(n, &mut digits))?,
                BodyFraming::Chunked => header(out, b"Transfer-Encoding", b"chunked")?,
                BodyFraming::None | BodyFraming::UntilClose => {}
            }
            let connection: &[u8] = match (upgrade, self.keep_alive) {
                (true, _) => b"upgrade",
                (false, true) => b"keep-alive",
                (false, false) => b"close",
            };
            header(out, b"Connection", connection)?;
            match self.proxy_authorization {
                Some(auth) => header(out, b"Proxy-Authorization", auth),
                None => Ok(()),
            }
        })
    }
}

/// How to rewrite an upstream's response head for the client.
#[derive(Debug, Clone, Copy)]
pub struct ResponseRewrite<'a> {
    /// Whether the client's connection stays open after this response (forced off for a body
    /// delimited by the upstream closing).
    pub keep_alive: bool,
    /// Headers added to every response (`X-Pharox-Proxy-Id`, `X-Pharox-Lease-Id`, ...).
    pub stamp: &'a [(&'a [u8], &'a [u8])],
}

impl ResponseRewrite<'_> {
    /// Writes the client's response head for `head`: `HTTP/1.1` whatever the upstream spoke,
    /// its headers but hop-by-hop ones, those named in `Connection` and `X-Pharox-*` (the
    /// framing headers stay: the body is relayed unchanged; `Upgrade` stays on a 101), then
    /// the stamp and `Connection` (none on an interim 1xx).
    pub fn write(&self, head: &ResponseHead, out: &mut BytesMut) -> Result<(), BuildError> {
        let named = connection_named(head.headers(), false);
        let switching = head.is_switching_protocols();
        let connection: Option<&[u8]> = if switching {
            Some(b"upgrade")
        } else if head.is_interim() {
            None
        } else if self.keep_alive && head.framing() != BodyFraming::UntilClose {
            Some(b"keep-alive")
        } else {
            Some(b"close")
        };
        out.reserve(head.raw().len() + 128);
        build(out, |out| {
            status_line(out, head.code(), head.reason())?;
            for (name, value) in head.headers() {
                if forwards_response_header(name, &named, switching) {
                    header(out, name, value)?;
                }
            }
            for (name, value) in self.stamp {
                header(out, name, value)?;
            }
            connection.map_or(Ok(()), |c| header(out, b"Connection", c))
        })
    }
}

/// Header names listed in `Connection` (and `Proxy-Connection`, for requests).
fn connection_named<'a>(
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    proxy_connection: bool,
) -> SmallVec<[&'a [u8]; 4]> {
    headers
        .filter(|(n, _)| is(n, "connection") || (proxy_connection && is(n, "proxy-connection")))
        .flat_map(|(_, v)| list(v))
        .collect()
}

fn forwards_request_header(name: &[u8], named: &[&[u8]], upgrade: bool) -> bool {
    if upgrade && is(name, "upgrade") {
        return true;
    }
    !(is_hop(name, named) || is(name, "host") || is_framing_alias(name))
}

fn forwards_response_header(name: &[u8], named: &[&[u8]], switching: bool) -> bool {
    is(name, "content-length")
        || is(name, "transfer-encoding")
        || (switching && is(name, "upgrade"))
        || !is_hop(name, named)
}

/// Hop-by-hop, named in `Connection`, or ours.
fn is_hop(name: &[u8], named: &[&[u8]]) -> bool {
    HOP_BY_HOP.iter().any(|h| is(name, h))
        || named.iter().any(|n| n.eq_ignore_ascii_case(name))
        || name.len() >= 9 && name[..9].eq_ignore_ascii_case(b"x-pharox-")
}

/// `Content-Length` or `Transfer-Encoding`, also spelt with `_` (which some servers read as
/// `-`): never forwarded from a client, whose framing is re-stated.
fn is_framing_alias(name: &[u8]) -> bool {
    let canonical = |want: &str| {
        name.len() == want.len()
            && name.iter().zip(want.bytes()).all(|(&b, w)| {
                (if b == b'_' {
                    b'-'
                } else {
                    b.to_ascii_lowercase()
                }) == w
            })
    };
    canonical("content-length") || canonical("transfer-encoding")
}
