//! Outgoing HTTP/1 heads for the relay: builders that refuse (and write nothing) rather than
//! emit CR, LF, NUL or a stray space from their input, and the proxy rewrites: a client's
//! request head for the upstream, an upstream's response head for the client.

use std::borrow::Cow;

use bytes::BytesMut;
use smallvec::SmallVec;

use super::uri::AbsoluteUri;
use super::{
    BodyFraming, Kind, RequestHead, ResponseHead, is_field_byte, is_field_content, is_token,
    is_vchar, list, trim_ows,
};
use crate::target::decimal;

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
    request_line_version(out, method, target, 1)
}

/// `method target HTTP/1.minor`.
fn request_line_version(
    out: &mut BytesMut,
    method: &[u8],
    target: &[u8],
    minor: u8,
) -> Result<(), BuildError> {
    if !is_token(method) {
        return Err(BuildError::Method);
    }
    if target.is_empty() || !target.iter().all(|&b| is_vchar(b)) {
        return Err(BuildError::Target);
    }
    let version: &[u8] = if minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    };
    put(out, &[method, b" ", target, version]);
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
    if !is_field_content(value) {
        return Err(BuildError::HeaderValue);
    }
    // One reservation, and each piece copied by its own call (constant lengths inline).
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// The `Connection` lines pharox writes, whole.
const CONNECTION_KEEP_ALIVE: &[u8] = b"Connection: keep-alive\r\n";
const CONNECTION_CLOSE: &[u8] = b"Connection: close\r\n";
const CONNECTION_UPGRADE: &[u8] = b"Connection: upgrade\r\n";

/// A header line of a parsed head, or one built here from checked parts: written as it is.
fn checked_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    debug_assert!(is_token(name) && is_field_content(value) && trim_ows(value) == value);
    put(out, &[name, b": ", value, b"\r\n"]);
}

/// Header lines checked once and kept rendered (`Name: value` and CRLF each), for lines that
/// go into many heads: a lease's stamp on every response, an upstream's credentials on every
/// request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderLines(Vec<u8>);

impl HeaderLines {
    /// No lines.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a line (the value trimmed), or refuses it as [`write_request_head`] would.
    pub fn push(&mut self, name: &[u8], value: &[u8]) -> Result<(), BuildError> {
        let mut line = BytesMut::new();
        header(&mut line, name, value)?;
        self.0.extend_from_slice(&line);
        Ok(())
    }

    /// The rendered lines.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

fn put(out: &mut BytesMut, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(part);
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
    /// Lines added last: the upstream proxy's own `Proxy-Authorization`, if it wants one.
    pub added: &'a HeaderLines,
}

impl RequestRewrite<'_> {
    /// Writes the upstream request head for `head`, whose target is `uri`: the client's HTTP
    /// version (an HTTP/1.0 client's request goes as HTTP/1.0, so that no upstream answers it
    /// with a chunked body it could not read), `Host`
    /// from the URI's authority (whatever `Host` the client sent), the client's headers but
    /// hop-by-hop ones, those named in `Connection` / `Proxy-Connection`, `X-Pharox-*` and
    /// framing headers (also as `Content_Length`-like aliases), then one framing header for
    /// [`RequestHead::framing`], `Connection`, and the added lines.
    ///
    /// The head's own parts were checked by the parser (and `uri`, of which the target form
    /// is a part, by its own), so none of them is checked again here.
    pub fn write(
        &self,
        head: &RequestHead,
        uri: &AbsoluteUri<'_>,
        out: &mut BytesMut,
    ) -> Result<(), BuildError> {
        let named = if head.has_connection_options() {
            connection_named(head.fields(), true)
        } else {
            SmallVec::new()
        };
        let upgrade = head.upgrade().is_some();
        let target = match self.form {
            TargetForm::Absolute => Cow::Borrowed(uri.as_str()),
            TargetForm::Origin => uri.origin_form(),
        };
        out.reserve(head.raw().len() + self.added.as_bytes().len() + 64);
        build(out, |out| {
            // The method is a token and the target visible ASCII (the request line's, or a
            // part of it after `/`): both were checked by the parser.
            let version: &[u8] = match head.version() {
                0 => b" HTTP/1.0\r\n",
                _ => b" HTTP/1.1\r\n",
            };
            put(
                out,
                &[head.method_bytes(), b" ", target.as_bytes(), version],
            );
            checked_header(out, b"Host", uri.authority.as_bytes());
            head.write_fields(out, |kind, name| {
                forwards_request_header(kind, name, &named, upgrade)
            });
            let mut digits = [0u8; 20];
            match head.framing() {
                BodyFraming::Length(n) => {
                    checked_header(out, b"Content-Length", decimal(n, &mut digits));
                }
                BodyFraming::Chunked => checked_header(out, b"Transfer-Encoding", b"chunked"),
                BodyFraming::None | BodyFraming::UntilClose => {}
            }
            out.extend_from_slice(match (upgrade, self.keep_alive) {
                (true, _) => CONNECTION_UPGRADE,
                (false, true) => CONNECTION_KEEP_ALIVE,
                (false, false) => CONNECTION_CLOSE,
            });
            out.extend_from_slice(self.added.as_bytes());
            Ok(())
        })
    }
}

/// How to rewrite an upstream's response head for the client.
#[derive(Debug, Clone, Copy)]
pub struct ResponseRewrite<'a> {
    /// Whether the client's connection stays open after this response (forced off for a body
    /// delimited by the upstream closing).
    pub keep_alive: bool,
    /// Lines added to every response (`X-Pharox-Proxy-Id`, `X-Pharox-Lease-Id`, ...).
    pub stamp: &'a HeaderLines,
}

impl ResponseRewrite<'_> {
    /// Writes the client's response head for `head`: `HTTP/1.1` whatever the upstream spoke,
    /// its headers but hop-by-hop ones, those named in `Connection` and `X-Pharox-*` (the
    /// framing headers stay: the body is relayed unchanged; `Upgrade` stays on a 101), then
    /// the stamp and `Connection` (none on an interim 1xx). The head's parts were checked by
    /// the parser and are written as they are.
    pub fn write(&self, head: &ResponseHead, out: &mut BytesMut) -> Result<(), BuildError> {
        let named = if head.has_connection_options() {
            connection_named(head.fields(), false)
        } else {
            SmallVec::new()
        };
        let switching = head.is_switching_protocols();
        let connection: &[u8] = if switching {
            CONNECTION_UPGRADE
        } else if head.is_interim() {
            b""
        } else if self.keep_alive && head.framing() != BodyFraming::UntilClose {
            CONNECTION_KEEP_ALIVE
        } else {
            CONNECTION_CLOSE
        };
        out.reserve(head.raw().len() + self.stamp.as_bytes().len() + 32);
        build(out, |out| {
            match head.status_line_11() {
                Some(line) => put(out, &[line, b"\r\n"]),
                None => status_line(out, head.code(), head.reason())?,
            }
            head.write_fields(out, |kind, name| {
                forwards_response_header(kind, name, &named, switching)
            });
            out.extend_from_slice(self.stamp.as_bytes());
            out.extend_from_slice(connection);
            Ok(())
        })
    }
}

/// Header names listed in `Connection` (and `Proxy-Connection`, for requests), but those
/// removed anyway (`keep-alive`, `upgrade`, ...: hop-by-hop by their kind).
pub(super) fn connection_named<'a>(
    fields: impl Iterator<Item = (Kind, &'a [u8], &'a [u8])>,
    proxy_connection: bool,
) -> SmallVec<[&'a [u8]; 4]> {
    let mut named = SmallVec::new();
    for (kind, _, value) in fields {
        if kind == Kind::Connection || (proxy_connection && kind == Kind::ProxyConnection) {
            named.extend(list(value).filter(|t| !Kind::of(t).is_hop()));
        }
    }
    named
}

fn forwards_request_header(kind: Kind, name: &[u8], named: &[&[u8]], upgrade: bool) -> bool {
    if upgrade && kind == Kind::Upgrade {
        return true;
    }
    !(is_hop(kind, name, named)
        || matches!(
            kind,
            Kind::Host | Kind::ContentLength | Kind::TransferEncoding | Kind::FramingAlias
        ))
}

fn forwards_response_header(kind: Kind, name: &[u8], named: &[&[u8]], switching: bool) -> bool {
    matches!(kind, Kind::ContentLength | Kind::TransferEncoding)
        || (switching && kind == Kind::Upgrade)
        || !is_hop(kind, name, named)
}

/// Hop-by-hop, named in `Connection`, or ours.
fn is_hop(kind: Kind, name: &[u8], named: &[&[u8]]) -> bool {
    kind.is_hop() || named.iter().any(|n| n.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::super::{parse_request, parse_response};
    use super::*;
    use proptest::prelude::*;

    type Headers<'a> = &'a [(&'a [u8], &'a [u8])];

    fn request_head(
        method: &[u8],
        target: &[u8],
        headers: Headers<'_>,
    ) -> Result<BytesMut, BuildError> {
        let mut out = BytesMut::from(&b"before"[..]);
        let r = write_request_head(&mut out, method, target, headers.iter().copied());
        if r.is_err() {
            assert_eq!(out, &b"before"[..], "nothing written on an error");
        }
        r.map(|()| out.split_off(6))
    }

    #[test]
    fn builds_heads_or_refuses() {
        let out = request_head(b"GET", b"/a?b", &[(b"Host", b" a \t"), (b"X-E", b"")]).unwrap();
        assert_eq!(out, &b"GET /a?b HTTP/1.1\r\nHost: a\r\nX-E: \r\n\r\n"[..]);
        let refused: &[(&[u8], &[u8], Headers<'_>, BuildError)] = &[
            (b"GE T", b"/", &[], BuildError::Method),
            (b"", b"/", &[], BuildError::Method),
            (b"GET\r\n", b"/", &[], BuildError::Method),
            (b"GET", b"", &[], BuildError::Target),
            (b"GET", b"/a b", &[], BuildError::Target),
            (b"GET", b"/\r\nX: y", &[], BuildError::Target),
            (b"GET", b"/\0", &[], BuildError::Target),
            (b"GET", b"/\xe9", &[], BuildError::Target),
            (b"GET", b"/", &[(b"", b"v")], BuildError::HeaderName),
            (b"GET", b"/", &[(b"X Y", b"v")], BuildError::HeaderName),
            (b"GET", b"/", &[(b"X:", b"v")], BuildError::HeaderName),
            (b"GET", b"/", &[(b"X\r\n", b"v")], BuildError::HeaderName),
            (
                b"GET",
                b"/",
                &[(b"X", b"a\r\nInjected: 1")],
                BuildError::HeaderValue,
            ),
            (b"GET", b"/", &[(b"X", b"a\nb")], BuildError::HeaderValue),
            (b"GET", b"/", &[(b"X", b"a\rb")], BuildError::HeaderValue),
            (b"GET", b"/", &[(b"X", b"a\0b")], BuildError::HeaderValue),
            (b"GET", b"/", &[(b"X", b"a\x7f")], BuildError::HeaderValue),
            (
                b"GET",
                b"/",
                &[(b"Ok", b"1"), (b"X", b"\r\n")],
                BuildError::HeaderValue,
            ),
        ];
        for (method, target, headers, want) in refused {
            assert_eq!(
                request_head(method, target, headers),
                Err(*want),
                "{method:?} {target:?} {headers:?}"
            );
        }
        let mut out = BytesMut::new();
        let cl: Headers<'_> = &[(b"Content-Length", b"0")];
        write_response_head(&mut out, 204, b" No Content ", cl.iter().copied()).unwrap();
        assert_eq!(
            out,
            &b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"[..]
        );
        for (status, reason, want) in [
            (99, &b"Low"[..], BuildError::Status),
            (1000, b"High", BuildError::Status),
            (200, b"O\r\nK", BuildError::Reason),
            (200, b"\0", BuildError::Reason),
        ] {
            let mut out = BytesMut::new();
            assert_eq!(write_response_head(&mut out, status, reason, []), Err(want));
            assert!(out.is_empty());
        }
    }

    fn rewrite_request(raw: &str, rewrite: RequestRewrite<'_>) -> Result<String, BuildError> {
        let (head, _) = parse_request(raw.as_bytes(), 8192).unwrap().unwrap();
        let uri = head.absolute_uri().unwrap();
        let mut out = BytesMut::new();
        rewrite.write(&head, &uri, &mut out)?;
        Ok(String::from_utf8(out.to_vec()).unwrap())
    }

    const NO_LINES: &HeaderLines = &HeaderLines(Vec::new());
    const DIRECT: RequestRewrite<'static> = RequestRewrite {
        form: TargetForm::Origin,
        keep_alive: true,
        added: NO_LINES,
    };

    #[test]
    fn rewrites_a_request_for_the_origin() {
        let raw = "POST http://a.example:8080?q HTTP/1.0\r\nHost: evil.example\r\n\
            Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nProxy-Connection: keep-alive\r\n\
            Proxy-Authorization: Basic d29ya2VyOnB3\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
            Trailer: X-T\r\nUpgrade: h2c\r\nX-Pharox-Pool: latam\r\nx-pharox-session: s\r\n\
            Content-Length: 5\r\n\
            Accept: */*\r\nuser-agent: t\r\n\r\n";
        let out = rewrite_request(raw, DIRECT).unwrap();
        // An HTTP/1.0 client's request goes on as HTTP/1.0 (no chunked answer it cannot read).
        let want = "POST /?q HTTP/1.0\r\nHost: a.example:8080\r\nAccept: */*\r\nuser-agent: t\r\n\
            Content-Length: 5\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(out, want);
    }

    #[test]
    fn rewrites_a_request_for_an_upstream_proxy() {
        let raw = "GET http://a/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut auth = HeaderLines::new();
        auth.push(b"Proxy-Authorization", b" Basic dXA6c2VjcmV0 ")
            .unwrap();
        let via = RequestRewrite {
            form: TargetForm::Absolute,
            keep_alive: false,
            added: &auth,
        };
        let out = rewrite_request(raw, via).unwrap();
        let want = "GET http://a/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
            Connection: close\r\nProxy-Authorization: Basic dXA6c2VjcmV0\r\n\r\n";
        assert_eq!(out, want);
        let (reparsed, _) = parse_request(out.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(
            (reparsed.framing(), reparsed.keep_alive()),
            (BodyFraming::Chunked, false)
        );
        // Added lines are checked once, when they are made.
        let mut bad = HeaderLines::new();
        assert_eq!(
            bad.push(b"Proxy-Authorization", b"x\r\nX-Injected: 1"),
            Err(BuildError::HeaderValue)
        );
        assert_eq!(
            bad.push(b"Proxy Authorization", b"x"),
            Err(BuildError::HeaderName)
        );
        assert_eq!(bad, HeaderLines::new(), "nothing kept of a refused line");
    }

    #[test]
    fn keeps_an_upgrade() {
        let raw = "GET http://a/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n\
            Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n";
        let want = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\
            Connection: upgrade\r\n\r\n";
        assert_eq!(rewrite_request(raw, DIRECT).unwrap(), want);
    }

    fn rewrite_response(raw: &str, keep_alive: bool) -> String {
        let (head, _) = parse_response(raw.as_bytes(), 8192, false)
            .unwrap()
            .unwrap();
        let mut stamp = HeaderLines::new();
        stamp.push(b"X-Pharox-Proxy-Id", b"p1").unwrap();
        stamp.push(b"X-Pharox-Lease-Id", b"l1").unwrap();
        let mut out = BytesMut::new();
        ResponseRewrite {
            keep_alive,
            stamp: &stamp,
        }
        .write(&head, &mut out)
        .unwrap();
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn rewrites_responses_for_the_client() {
        let raw = "HTTP/1.0 200 Fine\r\nConnection: close, X-Hop, Content-Length\r\nX-Hop: 1\r\n\
            Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Pharox-Error: spoofed\r\n\
            Content-Type: text/plain\r\nContent-Length: 2\r\n\r\n";
        let want = "HTTP/1.1 200 Fine\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\
            X-Pharox-Proxy-Id: p1\r\nX-Pharox-Lease-Id: l1\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(rewrite_response(raw, true), want);
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        let want = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\
            X-Pharox-Proxy-Id: p1\r\nX-Pharox-Lease-Id: l1\r\nConnection: close\r\n\r\n";
        assert_eq!(rewrite_response(chunked, false), want);
        let until_close = rewrite_response("HTTP/1.1 200 OK\r\n\r\n", true);
        assert!(
            until_close.ends_with("Connection: close\r\n\r\n"),
            "{until_close}"
        );
        let switching =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        let want = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            X-Pharox-Proxy-Id: p1\r\nX-Pharox-Lease-Id: l1\r\nConnection: upgrade\r\n\r\n";
        assert_eq!(rewrite_response(switching, true), want);
        let interim = rewrite_response("HTTP/1.1 100 Continue\r\n\r\n", true);
        assert!(!interim.contains("Connection"), "{interim}");
    }

    /// Mostly `good`, sometimes arbitrary bytes.
    fn mostly(good: &'static str) -> impl Strategy<Value = Vec<u8>> {
        let good = good.prop_map(String::into_bytes);
        prop_oneof![8 => good, 1 => proptest::collection::vec(any::<u8>(), 0..8)]
    }

    fn token() -> impl Strategy<Value = Vec<u8>> {
        mostly("[!#$%&'*+.^_`|~0-9A-Za-z-]{1,10}")
    }

    /// Field values: clean, hostile (CR, LF, NUL, injected lines) or arbitrary.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        let clean = "[ -~\t\u{e9}]{0,16}".prop_map(String::into_bytes);
        let hostile = "[ -~\t\r\n\0]{0,16}".prop_map(String::into_bytes);
        let injected = "[a-z]{0,4}\r\nX-Injected: [a-z]{1,4}".prop_map(String::into_bytes);
        prop_oneof![
            6 => clean,
            1 => hostile,
            1 => injected,
            1 => proptest::collection::vec(any::<u8>(), 0..16),
        ]
    }

    fn headers() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
        let not_framing = |(n, _): &(Vec<u8>, Vec<u8>)| {
            !["host", "content-length", "transfer-encoding"]
                .iter()
                .any(|h| n.eq_ignore_ascii_case(h.as_bytes()))
        };
        proptest::collection::vec((token(), value()).prop_filter("framing", not_framing), 0..8)
    }

    /// CRLF only as line ends: one per line, and no CR, LF or NUL anywhere else.
    fn lines_are_clean(out: &[u8], lines: usize) {
        assert!(out.ends_with(b"\r\n\r\n"));
        assert_eq!(out.windows(2).filter(|w| w == b"\r\n").count(), lines + 1);
        let crs = out.iter().filter(|&&b| b == b'\r').count();
        let lfs = out.iter().filter(|&&b| b == b'\n').count();
        assert_eq!((crs, lfs), (lines + 1, lines + 1));
        assert!(!out.contains(&0));
    }

    proptest! {
        #[test]
        fn copied_status_lines_are_what_would_be_built(
            line in "HTTP/1\\.[01] [0-9]{3}( [ -~\t]{0,12})?",
        ) {
            let raw = format!("{line}\r\n\r\n");
            if let Ok(Some((head, _))) = parse_response(raw.as_bytes(), 8192, false) {
                let mut built = BytesMut::new();
                status_line(&mut built, head.code(), head.reason()).unwrap();
                match head.status_line_11() {
                    Some(copied) => prop_assert_eq!(&built[..], &[copied, b"\r\n"].concat()[..]),
                    // Only lines that would come out differently are rebuilt.
                    None => {
                        let sent = format!("{line}\r\n");
                        prop_assert_ne!(&built[..], sent.as_bytes());
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn built_requests_are_clean_and_parse_back(
            method in token(),
            target in mostly("[!-~]{1,24}"),
            headers in headers(),
        ) {
            let mut out = BytesMut::new();
            let pairs = headers.iter().map(|(n, v)| (&n[..], &v[..]));
            if write_request_head(&mut out, &method, &target, pairs).is_err() {
                prop_assert!(out.is_empty());
                return Ok(());
            }
            lines_are_clean(&out, 1 + headers.len());
            let (head, len) = parse_request(&out, out.len()).unwrap().unwrap();
            prop_assert_eq!(len, out.len());
            prop_assert_eq!(head.method().as_bytes(), &method[..]);
            prop_assert_eq!(head.target().as_bytes(), &target[..]);
            let want: Vec<_> = headers.iter().map(|(n, v)| (&n[..], trim_ows(v))).collect();
            prop_assert_eq!(head.headers().collect::<Vec<_>>(), want);
        }

        #[test]
        fn built_responses_are_clean_and_parse_back(
            status in any::<u16>(),
            reason in value(),
            headers in headers(),
        ) {
            let mut out = BytesMut::new();
            let pairs = headers.iter().map(|(n, v)| (&n[..], &v[..]));
            if write_response_head(&mut out, status, &reason, pairs).is_err() {
                prop_assert!(out.is_empty());
                return Ok(());
            }
            lines_are_clean(&out, 1 + headers.len());
            let (head, _) = parse_response(&out, out.len(), true).unwrap().unwrap();
            prop_assert_eq!((head.code(), head.reason()), (status, trim_ows(&reason)));
            let want: Vec<_> = headers.iter().map(|(n, v)| (&n[..], trim_ows(v))).collect();
            prop_assert_eq!(head.headers().collect::<Vec<_>>(), want);
        }
    }
}
