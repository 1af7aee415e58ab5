//! The framing core of pharox's own HTTP/1 relay (RFC 9112): strict request and response head
//! parsing, and how long each message body is, with request-smuggling defence. The chunked
//! decoder and the body copier are in [`super::chunked`]; the head builders, the absolute-URI
//! parser and the proxy rewrites of a head are in [`super::rewrite`].
//!
//! Everything here refuses rather than guesses: a head or a body two HTTP implementations could
//! read two ways is an error. Every error a client causes answers 400, 431 (head over the
//! limit) or 501 (a transfer coding other than `chunked`), all with code `bad_request`, through
//! `From<FramingError> for ProxyError`. An upstream's faulty response is the caller's 502.
//!
//! What is refused, beyond httparse's own checks: a line ending in a bare LF, obs-fold,
//! whitespace before a header's colon, a control byte in a value, a method that is not a token,
//! a request target that is not visible ASCII, versions other than HTTP/1.0 and HTTP/1.1, more
//! than [`MAX_HEADERS`] header lines, two `Host` headers in a request, and every ambiguous body
//! framing (see [`BodyFraming`]).

use bytes::{Bytes, BytesMut};

use super::chunked::ChunkFault;
use super::rewrite::{AbsoluteUri, UriError};
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

/// Where a part of a head lies in its raw bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn of(self, raw: &[u8]) -> &[u8] {
        &raw[self.start..self.end]
    }

    /// Where `part`, a slice of `base`, lies in it.
    fn within(base: &[u8], part: &[u8]) -> Option<Span> {
        let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
        let end = start + part.len();
        (end <= base.len()).then_some(Span { start, end })
    }
}

/// A parsed request head: its raw bytes, where each part lies in them (no copy per header),
/// and what they mean for the connection.
#[derive(Debug, Clone)]
pub struct RequestHead {
    raw: Bytes,
    headers: Vec<(Span, Span)>,
    method: Span,
    target: Span,
    minor: u8,
    framing: BodyFraming,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: Option<usize>,
}

impl RequestHead {
    /// The raw head, request line to blank line (leading empty lines excluded).
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The method (a token).
    pub fn method(&self) -> &str {
        ascii(self.method.of(&self.raw))
    }

    /// The request target as sent (visible ASCII).
    pub fn target(&self) -> &str {
        ascii(self.target.of(&self.raw))
    }

    /// The minor version: 0 or 1.
    pub fn version(&self) -> u8 {
        self.minor
    }

    /// The header lines in order, names as sent, values without surrounding whitespace.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        fields(&self.raw, &self.headers)
    }

    /// The first value of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find(&self.raw, &self.headers, name)
    }

    /// How the body is delimited: never [`BodyFraming::UntilClose`].
    pub fn framing(&self) -> BodyFraming {
        self.framing
    }

    /// Whether the client wants the connection kept after this exchange (`Connection` and
    /// `Proxy-Connection`; HTTP/1.1 keeps it unless `close`, HTTP/1.0 only on `keep-alive`).
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// `Expect: 100-continue` on an HTTP/1.1 request.
    pub fn expect_continue(&self) -> bool {
        self.expect_continue
    }

    /// The `Upgrade` header's value when `Connection` lists `upgrade` (HTTP/1.1 only).
    pub fn upgrade(&self) -> Option<&[u8]> {
        self.upgrade.map(|i| self.headers[i].1.of(&self.raw))
    }

    /// The target parsed as an absolute URI.
    pub fn absolute_uri(&self) -> Result<AbsoluteUri<'_>, UriError> {
        AbsoluteUri::parse(self.target())
    }
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    raw: Bytes,
    headers: Vec<(Span, Span)>,
    minor: u8,
    code: u16,
    reason: Span,
    framing: BodyFraming,
    keep_alive: bool,
}

impl ResponseHead {
    /// The raw head, status line to blank line.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The status code (100 to 999).
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The reason phrase (possibly empty).
    pub fn reason(&self) -> &[u8] {
        self.reason.of(&self.raw)
    }

    /// The minor version: 0 or 1.
    pub fn version(&self) -> u8 {
        self.minor
    }

    /// The header lines in order, names as sent, values without surrounding whitespace.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        fields(&self.raw, &self.headers)
    }

    /// The first value of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find(&self.raw, &self.headers, name)
    }

    /// How the body is delimited.
    pub fn framing(&self) -> BodyFraming {
        self.framing
    }

    /// Whether another response can follow on this upstream connection.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// A 1xx other than 101: relay it and read the next head.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.code) && self.code != 101
    }

    /// 101: the connection now speaks another protocol.
    pub fn is_switching_protocols(&self) -> bool {
        self.code == 101
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while it is incomplete and shorter
/// than `max_head`; else the head and its length in `buf` (body bytes follow).
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
) -> Result<Option<(RequestHead, usize)>, FramingError> {
    let Some((start, end)) = locate_head(buf, max_head)? else {
        return Ok(None);
    };
    let mut head = request_layout(&buf[start..end])?;
    head.raw = Bytes::copy_from_slice(&buf[start..end]);
    Ok(Some((head, end)))
}

/// Like [`parse_request`], but takes the head out of `buf` without copying it (on an error
/// `buf` is left as it was).
pub fn take_request(
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<RequestHead>, FramingError> {
    let Some((start, end)) = locate_head(buf, max_head)? else {
        return Ok(None);
    };
    let mut head = request_layout(&buf[start..end])?;
    head.raw = buf.split_to(end).freeze().slice(start..);
    Ok(Some(head))
}

/// Parses a response head at the start of `buf` (see [`parse_request`]); `head_request` says
/// whether it answers a HEAD request (no body, whatever the headers say).
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
    head_request: bool,
) -> Result<Option<(ResponseHead, usize)>, FramingError> {
    let Some((start, end)) = locate_head(buf, max_head)? else {
        return Ok(None);
    };
    let mut head = response_layout(&buf[start..end], head_request)?;
    head.raw = Bytes::copy_from_slice(&buf[start..end]);
    Ok(Some((head, end)))
}

/// Like [`parse_response`], but takes the head out of `buf` without copying it.
pub fn take_response(
    buf: &mut BytesMut,
    max_head: usize,
    head_request: bool,
) -> Result<Option<ResponseHead>, FramingError> {
    let Some((start, end)) = locate_head(buf, max_head)? else {
        return Ok(None);
    };
    let mut head = response_layout(&buf[start..end], head_request)?;
    head.raw = buf.split_to(end).freeze().slice(start..);
    Ok(Some(head))
}

/// Finds the head in `buf` (after any empty lines, RFC 9112 §2.2) and checks each line's
/// shape: CRLF endings, no obs-fold, no whitespace before a colon. `(start, end)` of the head.
fn locate_head(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, FramingError> {
    let window = &buf[..buf.len().min(max)];
    let mut start = 0;
    while window[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let mut line = start;
    while let Some(lf) = window[line..].iter().position(|&b| b == b'\n') {
        let lf = line + lf;
        if lf == line || window[lf - 1] != b'\r' {
            return Err(FramingError::BareLf);
        }
        let content = &window[line..lf - 1];
        if content.is_empty() {
            return Ok(Some((start, lf + 1)));
        }
        if line != start {
            check_field_line(content)?;
        }
        line = lf + 1;
    }
    if buf.len() >= max {
        return Err(FramingError::HeadTooLarge { limit: max });
    }
    Ok(None)
}

fn check_field_line(line: &[u8]) -> Result<(), FramingError> {
    if matches!(line[0], b' ' | b'\t') {
        return Err(FramingError::ObsFold);
    }
    match line.iter().position(|&b| b == b':') {
        Some(colon) if colon > 0 && matches!(line[colon - 1], b' ' | b'\t') => {
            Err(FramingError::SpaceBeforeColon)
        }
        _ => Ok(()),
    }
}

/// The first line of a located head, without its CRLF, and where the header lines start.
fn start_line(head: &[u8]) -> (&[u8], usize) {
    let lf = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    (&head[..lf.saturating_sub(1)], lf + 1)
}

fn request_layout(head: &[u8]) -> Result<RequestHead, FramingError> {
    let (line, fields_at) = start_line(head);
    let (method, target, minor) = request_line(line)?;
    let headers = header_spans(head, fields_at)?;
    let facts = Facts::of(head, &headers, true);
    if facts.hosts > 1 {
        return Err(FramingError::DuplicateHost);
    }
    Ok(RequestHead {
        framing: request_framing(&facts, minor)?,
        keep_alive: !facts.close && (minor == 1 || facts.keep_alive),
        expect_continue: minor == 1 && facts.expect_continue,
        upgrade: facts.upgrade.filter(|_| minor == 1 && facts.upgrade_token),
        raw: Bytes::new(),
        headers,
        method,
        target,
        minor,
    })
}

fn response_layout(head: &[u8], head_request: bool) -> Result<ResponseHead, FramingError> {
    let (line, fields_at) = start_line(head);
    let (minor, code, reason) = status_line(line)?;
    let headers = header_spans(head, fields_at)?;
    let facts = Facts::of(head, &headers, false);
    let framing = response_framing(&facts, minor, code, head_request)?;
    let reusable = framing != BodyFraming::UntilClose && code != 101;
    Ok(ResponseHead {
        keep_alive: reusable && !facts.close && (minor == 1 || facts.keep_alive),
        raw: Bytes::new(),
        headers,
        minor,
        code,
        reason,
        framing,
    })
}

/// `method SP target SP version`: each part checked, single spaces only.
fn request_line(line: &[u8]) -> Result<(Span, Span, u8), FramingError> {
    let first = line.iter().position(|&b| b == b' ');
    let last = line.iter().rposition(|&b| b == b' ');
    let (Some(first), Some(last)) = (first, last.filter(|&l| Some(l) != first)) else {
        return Err(FramingError::InvalidStartLine);
    };
    let (method, target) = (&line[..first], &line[first + 1..last]);
    if !is_token(method) {
        return Err(FramingError::InvalidMethod);
    }
    if target.is_empty() || !target.iter().all(|&b| is_vchar(b)) {
        return Err(FramingError::InvalidTarget);
    }
    let minor = version(&line[last + 1..])?;
    let span = |start, end| Span { start, end };
    Ok((span(0, first), span(first + 1, last), minor))
}

/// `version SP 3DIGIT [SP reason]`.
fn status_line(line: &[u8]) -> Result<(u8, u16, Span), FramingError> {
    let minor = version(line.get(..8).unwrap_or(line))?;
    let code = match line.get(8..12) {
        Some([b' ', digits @ ..]) if digits.iter().all(u8::is_ascii_digit) => digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0')),
        _ => return Err(FramingError::InvalidStatus),
    };
    if code < 100 {
        return Err(FramingError::InvalidStatus);
    }
    let reason = match line.get(12) {
        None => Span { start: 12, end: 12 },
        Some(b' ') if line[13..].iter().all(|&b| is_field_byte(b)) => Span {
            start: 13,
            end: line.len(),
        },
        Some(b' ') => return Err(FramingError::InvalidReason),
        Some(_) => return Err(FramingError::InvalidStatus),
    };
    Ok((minor, code, reason))
}

fn version(v: &[u8]) -> Result<u8, FramingError> {
    match v {
        b"HTTP/1.1" => Ok(1),
        b"HTTP/1.0" => Ok(0),
        _ => Err(FramingError::UnsupportedVersion),
    }
}

/// The header lines of `head` from `from` (httparse tokenises; names are tokens, values
/// field content), as spans of `head`.
fn header_spans(head: &[u8], from: usize) -> Result<Vec<(Span, Span)>, FramingError> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let block = &head[from.min(head.len())..];
    let headers = match httparse::parse_headers(block, &mut parsed) {
        Ok(httparse::Status::Complete((len, headers))) if len == block.len() => headers,
        Ok(_) | Err(httparse::Error::HeaderName) => return Err(FramingError::InvalidHeaderName),
        Err(httparse::Error::TooManyHeaders) => return Err(FramingError::TooManyHeaders),
        Err(_) => return Err(FramingError::InvalidHeaderValue),
    };
    headers
        .iter()
        .map(|h| {
            let name = Span::within(head, h.name.as_bytes());
            let value = Span::within(head, h.value);
            name.zip(value).ok_or(FramingError::InvalidHeaderName)
        })
        .collect()
}

/// What the headers of one head say about framing and the connection.
#[derive(Default)]
struct Facts<'a> {
    content_length: Option<&'a [u8]>,
    content_lengths: usize,
    transfer_encoding: Option<&'a [u8]>,
    transfer_encodings: usize,
    hosts: usize,
    /// Index of the first `Upgrade` header.
    upgrade: Option<usize>,
    expect_continue: bool,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
}

impl<'a> Facts<'a> {
    /// `proxy_connection`: whether `Proxy-Connection` counts as `Connection` (requests).
    fn of(raw: &'a [u8], headers: &'a [(Span, Span)], proxy_connection: bool) -> Self {
        let mut f = Facts::default();
        for (i, (name, value)) in fields(raw, headers).enumerate() {
            if is(name, "content-length") {
                f.content_lengths += 1;
                f.content_length.get_or_insert(value);
            } else if is(name, "transfer-encoding") {
                f.transfer_encodings += 1;
                f.transfer_encoding.get_or_insert(value);
            } else if is(name, "host") {
                f.hosts += 1;
            } else if is(name, "upgrade") {
                f.upgrade.get_or_insert(i);
            } else if is(name, "expect") {
                f.expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
            } else if is(name, "connection") || (proxy_connection && is(name, "proxy-connection")) {
                f.connection(value);
            }
        }
        f
    }

    fn connection(&mut self, value: &[u8]) {
        for token in list(value) {
            self.close |= token.eq_ignore_ascii_case(b"close");
            self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            self.upgrade_token |= token.eq_ignore_ascii_case(b"upgrade");
        }
    }
}

/// What a `Transfer-Encoding` list ends in.
enum Codings {
    /// Exactly `chunked`.
    Chunked,
    /// Other codings, then `chunked`.
    ChunkedAfterOthers,
    /// A final coding other than `chunked`.
    NotChunked,
}

fn request_framing(f: &Facts<'_>, minor: u8) -> Result<BodyFraming, FramingError> {
    match transfer_codings(f, minor)? {
        Some(Codings::Chunked) => Ok(BodyFraming::Chunked),
        Some(Codings::ChunkedAfterOthers) => Err(FramingError::UnsupportedTransferCoding),
        Some(Codings::NotChunked) => Err(FramingError::NotChunked),
        None => length_framing(f),
    }
}

/// RFC 9112 §6.3, except that `Content-Length` with `Transfer-Encoding` is an error here too.
fn response_framing(
    f: &Facts<'_>,
    minor: u8,
    code: u16,
    head_request: bool,
) -> Result<BodyFraming, FramingError> {
    if head_request || code < 200 || code == 204 || code == 304 {
        return Ok(BodyFraming::None);
    }
    match transfer_codings(f, minor)? {
        Some(Codings::Chunked | Codings::ChunkedAfterOthers) => Ok(BodyFraming::Chunked),
        Some(Codings::NotChunked) => Ok(BodyFraming::UntilClose),
        None => match length_framing(f)? {
            BodyFraming::None => Ok(BodyFraming::UntilClose),
            length => Ok(length),
        },
    }
}

/// The message's transfer codings, if it has any, refusing every ambiguous form.
fn transfer_codings(f: &Facts<'_>, minor: u8) -> Result<Option<Codings>, FramingError> {
    let Some(value) = f.transfer_encoding else {
        return Ok(None);
    };
    if f.content_length.is_some() {
        return Err(FramingError::ContentLengthWithTransferEncoding);
    }
    if minor == 0 {
        return Err(FramingError::TransferEncodingHttp10);
    }
    if f.transfer_encodings > 1 {
        return Err(FramingError::DuplicateTransferEncoding);
    }
    let (mut count, mut chunked, mut last_chunked) = (0, false, false);
    for coding in value.split(|&b| b == b',').map(trim_ows) {
        let is_chunked = coding.eq_ignore_ascii_case(b"chunked");
        if !is_token(coding) || (is_chunked && chunked) {
            return Err(FramingError::InvalidTransferEncoding);
        }
        (count, chunked, last_chunked) = (count + 1, chunked | is_chunked, is_chunked);
    }
    Ok(Some(match (last_chunked, count) {
        (true, 1) => Codings::Chunked,
        (true, _) => Codings::ChunkedAfterOthers,
        (false, _) => Codings::NotChunked,
    }))
}

fn length_framing(f: &Facts<'_>) -> Result<BodyFraming, FramingError> {
    let Some(value) = f.content_length else {
        return Ok(BodyFraming::None);
    };
    if f.content_lengths > 1 {
        return Err(FramingError::DuplicateContentLength);
    }
    let value = trim_ows(value);
    if value.contains(&b',') {
        return Err(FramingError::ContentLengthList);
    }
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(FramingError::InvalidContentLength);
    }
    value
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .map(BodyFraming::Length)
        .ok_or(FramingError::InvalidContentLength)
}

fn fields<'a>(
    raw: &'a [u8],
    headers: &'a [(Span, Span)],
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    headers.iter().map(|(n, v)| (n.of(raw), v.of(raw)))
}

fn find<'a>(raw: &'a [u8], headers: &'a [(Span, Span)], name: &str) -> Option<&'a [u8]> {
    fields(raw, headers)
        .find(|(n, _)| is(n, name))
        .map(|(_, v)| v)
}

/// A name equal to `lower` (given in lower case), ignoring ASCII case.
pub(crate) fn is(name: &[u8], lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower.as_bytes())
}

/// The non-empty elements of a comma-separated value, whitespace trimmed.
pub(crate) fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// `value` without leading and trailing SP / HTAB.
pub(crate) fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// `tchar` (RFC 9110 §5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A non-empty run of `tchar`.
pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Visible ASCII.
pub(crate) fn is_vchar(b: u8) -> bool {
    (b'!'..=b'~').contains(&b)
}

/// A byte of field content: HTAB, SP, visible ASCII or obs-text (no other control, no DEL).
pub(crate) fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// Bytes checked to be ASCII by the parser, as text.
fn ascii(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}
