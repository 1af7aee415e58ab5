//! Request and response heads: where a head ends in the read buffer, the shape of every line
//! (CRLF only, no obs-fold, no whitespace before a colon), the start line's parts, and the
//! header lines (httparse tokenises), kept as spans of the raw bytes.

use bytes::{Bytes, BytesMut};

use super::framing::{Facts, request_framing, response_framing};
use super::uri::{AbsoluteUri, UriError};
use super::{
    BodyFraming, FramingError, Kind, MAX_HEADERS, is, is_field_byte, is_token, is_visible, trim_ows,
};

/// Where a part of a head lies in its raw bytes (heads are far shorter than 4 GiB: see
/// [`MAX_SPAN`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

/// The longest head a [`Span`] can cover; a larger `max_head` is taken as this.
const MAX_SPAN: usize = u32::MAX as usize;

impl Span {
    fn new(start: usize, end: usize) -> Span {
        debug_assert!(start <= end && end <= MAX_SPAN);
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    fn of(self, raw: &[u8]) -> &[u8] {
        &raw[self.start as usize..self.end as usize]
    }

    /// Where `part`, a slice of `base`, lies in it.
    fn within(base: &[u8], part: &[u8]) -> Option<Span> {
        let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
        let end = start + part.len();
        (end <= base.len()).then(|| Span::new(start, end))
    }
}

/// The header lines of a head. (Kept inline, a dozen of them made every move of a head a
/// copy of hundreds of bytes, which cost more than the allocation saved; a keep-alive
/// connection hands each head's list back for the next one instead.)
pub(crate) type Fields = Vec<Field>;

/// A header line of a parsed head: where its name and value lie, and what the name means.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    name: Span,
    value: Span,
    pub(crate) kind: Kind,
    /// Written `Name: value` CRLF in the head: the line can be copied as it is.
    plain: bool,
}

/// A parsed request head: its raw bytes, where each part lies in them (no copy per header),
/// and what they mean for the connection.
#[derive(Debug, Clone)]
pub struct RequestHead {
    raw: Bytes,
    headers: Fields,
    method: Span,
    target: Span,
    minor: u8,
    framing: BodyFraming,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: Option<usize>,
    /// Index of the first `Proxy-Authorization` header.
    authorization: Option<usize>,
    /// Whether `X-Pharox-*` headers are there.
    pharox: bool,
    /// Whether a `Connection` / `Proxy-Connection` list names more than `keep-alive`.
    connection_options: bool,
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

    /// Whether the method is exactly `method` (methods are case-sensitive).
    pub fn method_is(&self, method: &str) -> bool {
        self.method.of(&self.raw) == method.as_bytes()
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

    /// The header lines with their kinds: names are tokens and values field content without
    /// surrounding whitespace (the parser refused anything else), so they can be written out
    /// again without another check.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (Kind, &[u8], &[u8])> {
        kinded(&self.raw, &self.headers)
    }

    /// Writes the header lines `keep` accepts to `out` (see [`write_fields`]).
    pub(crate) fn write_fields(&self, out: &mut BytesMut, keep: impl FnMut(Kind, &[u8]) -> bool) {
        write_fields(&self.raw, &self.headers, out, keep);
    }

    /// The first `Proxy-Authorization` value.
    pub(crate) fn authorization(&self) -> Option<&[u8]> {
        self.authorization
            .map(|i| self.headers[i].value.of(&self.raw))
    }

    /// The head's header list, for the next head of the connection.
    pub(crate) fn into_fields(self) -> Fields {
        self.headers
    }

    /// Whether the head has `X-Pharox-*` headers.
    pub(crate) fn has_pharox_headers(&self) -> bool {
        self.pharox
    }

    /// Whether a `Connection` or `Proxy-Connection` list names more than `keep-alive` (only
    /// such a list can name headers to remove).
    pub(crate) fn has_connection_options(&self) -> bool {
        self.connection_options
    }

    /// The method as sent (a token).
    pub(crate) fn method_bytes(&self) -> &[u8] {
        self.method.of(&self.raw)
    }

    /// The first value of a header of this kind.
    pub(crate) fn field(&self, kind: Kind) -> Option<&[u8]> {
        match kind {
            Kind::ProxyAuthorization => self.authorization(),
            _ => self.fields().find(|f| f.0 == kind).map(|f| f.2),
        }
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
        self.upgrade.map(|i| self.headers[i].value.of(&self.raw))
    }

    /// The target parsed as an absolute URI.
    pub fn absolute_uri(&self) -> Result<AbsoluteUri<'_>, UriError> {
        AbsoluteUri::parse_visible(self.target(), None)
    }

    /// [`RequestHead::absolute_uri`], not checking again an authority equal to `known`.
    pub(crate) fn absolute_uri_known(
        &self,
        known: Option<&str>,
    ) -> Result<AbsoluteUri<'_>, UriError> {
        AbsoluteUri::parse_visible(self.target(), known)
    }
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    raw: Bytes,
    headers: Fields,
    minor: u8,
    code: u16,
    reason: Span,
    framing: BodyFraming,
    keep_alive: bool,
    /// Whether a `Connection` list names more than `keep-alive`.
    connection_options: bool,
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

    /// The header lines with their kinds: names are tokens and values field content without
    /// surrounding whitespace (the parser refused anything else), so they can be written out
    /// again without another check.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (Kind, &[u8], &[u8])> {
        kinded(&self.raw, &self.headers)
    }

    /// Writes the header lines `keep` accepts to `out` (see [`write_fields`]).
    pub(crate) fn write_fields(&self, out: &mut BytesMut, keep: impl FnMut(Kind, &[u8]) -> bool) {
        write_fields(&self.raw, &self.headers, out, keep);
    }

    /// Whether a `Connection` list names more than `keep-alive`.
    pub(crate) fn has_connection_options(&self) -> bool {
        self.connection_options
    }

    /// The head's header list, for the next head of the connection.
    pub(crate) fn into_fields(self) -> Fields {
        self.headers
    }

    /// The status line without its CRLF if it is `HTTP/1.1 code reason` with a reason
    /// without surrounding whitespace: what the rewrite would write, so it is sent as it is.
    pub(crate) fn status_line_11(&self) -> Option<&[u8]> {
        let reason = self.reason();
        let plain = self.minor == 1 && self.reason.start == 13 && trim_ows(reason) == reason;
        plain.then(|| &self.raw[..self.reason.end as usize])
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
    let Some(found) = find_head(buf, max_head, &mut Fields::new())? else {
        return Ok(None);
    };
    let (start, end) = (found.start, found.end);
    let mut head = request_layout(&buf[start..end], found)?;
    head.raw = Bytes::copy_from_slice(&buf[start..end]);
    Ok(Some((head, end)))
}

/// Like [`parse_request`], but takes the head out of `buf` without copying it (on an error
/// `buf` is left as it was).
pub fn take_request(
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<RequestHead>, FramingError> {
    take_request_reusing(buf, max_head, &mut Fields::new())
}

/// [`take_request`], the head's header list made in `spare` (a list handed back by
/// [`RequestHead::into_fields`]; taken when a head is returned).
pub(crate) fn take_request_reusing(
    buf: &mut BytesMut,
    max_head: usize,
    spare: &mut Fields,
) -> Result<Option<RequestHead>, FramingError> {
    let Some(found) = find_head(buf, max_head, spare)? else {
        return Ok(None);
    };
    let (start, end) = (found.start, found.end);
    let mut head = request_layout(&buf[start..end], found)?;
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
    let Some(found) = find_head(buf, max_head, &mut Fields::new())? else {
        return Ok(None);
    };
    let (start, end) = (found.start, found.end);
    let mut head = response_layout(&buf[start..end], head_request, found)?;
    head.raw = Bytes::copy_from_slice(&buf[start..end]);
    Ok(Some((head, end)))
}

/// Like [`parse_response`], but takes the head out of `buf` without copying it.
pub fn take_response(
    buf: &mut BytesMut,
    max_head: usize,
    head_request: bool,
) -> Result<Option<ResponseHead>, FramingError> {
    take_response_reusing(buf, max_head, head_request, &mut Fields::new())
}

/// [`take_response`] with a spare header list (see [`take_request_reusing`]).
pub(crate) fn take_response_reusing(
    buf: &mut BytesMut,
    max_head: usize,
    head_request: bool,
    spare: &mut Fields,
) -> Result<Option<ResponseHead>, FramingError> {
    let Some(found) = find_head(buf, max_head, spare)? else {
        return Ok(None);
    };
    let (start, end) = (found.start, found.end);
    let mut head = response_layout(&buf[start..end], head_request, found)?;
    head.raw = buf.split_to(end).freeze().slice(start..);
    Ok(Some(head))
}

/// A head found in a buffer: where it lies, and its header lines tokenised (spans from
/// `start`).
struct Found {
    start: usize,
    end: usize,
    /// The length of the start line (without its CRLF).
    line: usize,
    headers: Fields,
}

/// Finds and tokenises the head at the start of `buf`: [`fast_head`] when it takes the head,
/// else [`locate_head`] and [`header_spans`], which accept exactly the same heads and say what
/// is wrong with the others. `Ok(None)` while the head is incomplete.
fn find_head(buf: &[u8], max: usize, spare: &mut Fields) -> Result<Option<Found>, FramingError> {
    if let Some(found) = fast_head(buf, max, spare) {
        return Ok(Some(found));
    }
    let Some((start, end)) = locate_head(buf, max)? else {
        return Ok(None);
    };
    let head = &buf[start..end];
    let (line, fields_at) = start_line(head);
    let headers = header_spans(head, fields_at, spare)?;
    Ok(Some(Found {
        start,
        end,
        line: line.len(),
        headers,
    }))
}

/// The common case in one pass: httparse finds the end of the head while it tokenises the
/// header lines, and the line endings it skipped are checked from the spans it returns (CRLF
/// after the start line, after each header line's value and its trailing whitespace, and as
/// the blank line). httparse refuses obs-fold (a line starting with whitespace is no header
/// name). `None` (`spare` untouched) for anything else: an incomplete head, a bare LF, a
/// refused line; [`locate_head`] then decides.
fn fast_head(buf: &[u8], max: usize, spare: &mut Fields) -> Option<Found> {
    let window = &buf[..buf.len().min(max.min(MAX_SPAN))];
    let mut start = 0;
    while window[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let rest = &window[start..];
    let lf = memchr::memchr(b'\n', rest)?;
    if lf == 0 || rest[lf - 1] != b'\r' {
        return None;
    }
    let fields_at = lf + 1;
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    let mut all;
    let parsed = match httparse::parse_headers(&rest[fields_at..], &mut few) {
        Err(httparse::Error::TooManyHeaders) => {
            all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            httparse::parse_headers(&rest[fields_at..], &mut all)
        }
        r => r,
    };
    let Ok(httparse::Status::Complete((len, headers))) = parsed else {
        return None;
    };
    let end = fields_at + len;
    let head = &rest[..end];
    if !head.ends_with(b"\r\n") {
        return None;
    }
    let mut fields = std::mem::take(spare);
    if push_fields(head, headers, &mut fields, true).is_err() {
        *spare = fields;
        return None;
    }
    Some(Found {
        start,
        end: start + end,
        line: lf - 1,
        headers: fields,
    })
}

/// Finds the head in `buf` (after any empty lines, RFC 9112 §2.2) and checks each line's
/// shape: CRLF endings, no obs-fold (whitespace before a colon is found with the names, see
/// [`name_fault`]), at most [`MAX_HEADERS`]
/// header lines (counted as they come, so a head never holds more than that many LFs and a
/// caller re-parsing after each read that brought an LF scans a bounded number of times).
/// `(start, end)` of the head.
fn locate_head(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, FramingError> {
    let max = max.min(MAX_SPAN);
    let window = &buf[..buf.len().min(max)];
    let mut start = 0;
    while window[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let (mut line, mut fields) = (start, 0);
    while let Some(lf) = memchr::memchr(b'\n', &window[line..]) {
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
            fields += 1;
            if fields > MAX_HEADERS {
                return Err(FramingError::TooManyHeaders);
            }
        }
        line = lf + 1;
    }
    if buf.len() >= max {
        return Err(FramingError::HeadTooLarge { limit: max });
    }
    Ok(None)
}

/// A field line's shape as far as it is checked before tokenising: no obs-fold. (Whitespace
/// before the colon makes the name no token, which the tokeniser refuses; [`name_fault`]
/// then says which fault it was.)
fn check_field_line(line: &[u8]) -> Result<(), FramingError> {
    if matches!(line[0], b' ' | b'\t') {
        return Err(FramingError::ObsFold);
    }
    Ok(())
}

/// Why the field lines of `block` (a located head's, CRLF-terminated) hold an invalid name:
/// whitespace before a colon, or another byte that is no `tchar`.
fn name_fault(block: &[u8]) -> FramingError {
    let space_before_colon = block.split(|&b| b == b'\n').any(|line| {
        memchr::memchr(b':', line).is_some_and(|c| c > 0 && matches!(line[c - 1], b' ' | b'\t'))
    });
    if space_before_colon {
        FramingError::SpaceBeforeColon
    } else {
        FramingError::InvalidHeaderName
    }
}

/// The first line of a located head, without its CRLF, and where the header lines start.
fn start_line(head: &[u8]) -> (&[u8], usize) {
    let lf = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    (&head[..lf.saturating_sub(1)], lf + 1)
}

fn request_layout(head: &[u8], found: Found) -> Result<RequestHead, FramingError> {
    let line = &head[..found.line];
    let (method, target, minor) = request_line(line)?;
    let headers = found.headers;
    let facts = facts(head, &headers, true);
    if facts.hosts > 1 {
        return Err(FramingError::DuplicateHost);
    }
    Ok(RequestHead {
        framing: request_framing(&facts, minor)?,
        keep_alive: !facts.close && (minor == 1 || facts.keep_alive),
        expect_continue: minor == 1 && facts.expect_continue,
        upgrade: facts.upgrade.filter(|_| minor == 1 && facts.upgrade_token),
        authorization: facts.authorization,
        pharox: facts.pharox,
        connection_options: facts.connection_options,
        raw: Bytes::new(),
        headers,
        method,
        target,
        minor,
    })
}

fn response_layout(
    head: &[u8],
    head_request: bool,
    found: Found,
) -> Result<ResponseHead, FramingError> {
    let line = &head[..found.line];
    let (minor, code, reason) = status_line(line)?;
    let headers = found.headers;
    let facts = facts(head, &headers, false);
    let framing = response_framing(&facts, minor, code, head_request)?;
    let reusable = framing != BodyFraming::UntilClose && code != 101;
    Ok(ResponseHead {
        keep_alive: reusable && !facts.close && (minor == 1 || facts.keep_alive),
        connection_options: facts.connection_options,
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
    if target.is_empty() || !is_visible(target) {
        return Err(FramingError::InvalidTarget);
    }
    let minor = version(&line[last + 1..])?;
    let span = Span::new;
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
        None => Span::new(12, 12),
        Some(b' ') if line[13..].iter().all(|&b| is_field_byte(b)) => Span::new(13, line.len()),
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
fn header_spans(head: &[u8], from: usize, spare: &mut Fields) -> Result<Fields, FramingError> {
    let mut fields = std::mem::take(spare);
    fields.clear();
    // Most heads have a few fields: a small array first, since initialising all
    // `MAX_HEADERS` entries for every head costs more than parsing a typical one.
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    let parsed = match spans_into(head, from, &mut few, &mut fields) {
        Err(FramingError::TooManyHeaders) => {
            let mut all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            spans_into(head, from, &mut all, &mut fields)
        }
        r => r,
    };
    match parsed {
        Ok(()) => Ok(fields),
        Err(e) => {
            *spare = fields;
            Err(e)
        }
    }
}

/// Entries of the first parse attempt of [`header_spans`].
const FEW_HEADERS: usize = 16;

fn spans_into<'h>(
    head: &'h [u8],
    from: usize,
    parsed: &mut [httparse::Header<'h>],
    fields: &mut Fields,
) -> Result<(), FramingError> {
    let block = &head[from.min(head.len())..];
    let headers = match httparse::parse_headers(block, parsed) {
        Ok(httparse::Status::Complete((len, headers))) if len == block.len() => headers,
        Ok(_) | Err(httparse::Error::HeaderName) => return Err(name_fault(block)),
        Err(httparse::Error::TooManyHeaders) => return Err(FramingError::TooManyHeaders),
        Err(_) => return Err(FramingError::InvalidHeaderValue),
    };
    push_fields(head, headers, fields, false)
}

/// The spans of httparse's `headers` (slices of `head`) into `fields`; with `check_crlf`,
/// an error unless each line ends in CRLF (after the value's trailing whitespace).
fn push_fields(
    head: &[u8],
    headers: &[httparse::Header<'_>],
    fields: &mut Fields,
    check_crlf: bool,
) -> Result<(), FramingError> {
    fields.clear();
    fields.reserve(headers.len());
    for h in headers.iter() {
        let name = Span::within(head, h.name.as_bytes());
        let value = Span::within(head, h.value);
        let (name, value) = name.zip(value).ok_or(FramingError::InvalidHeaderName)?;
        let (n, v) = (name.end as usize, value.end as usize);
        let crlf = head.get(v..v + 2) == Some(b"\r\n");
        if check_crlf && !crlf && !crlf_after_whitespace(&head[v..]) {
            return Err(FramingError::BareLf);
        }
        let plain = crlf && value.start as usize == n + 2 && head.get(n..n + 2) == Some(b": ");
        fields.push(Field {
            name,
            value,
            kind: Kind::of(h.name.as_bytes()),
            plain,
        });
    }
    Ok(())
}

/// Whether `rest` (what follows a header value) is `*(SP / HTAB) CRLF`, then anything.
fn crlf_after_whitespace(rest: &[u8]) -> bool {
    let ws = rest
        .iter()
        .position(|&b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(rest.len());
    rest[ws..].starts_with(b"\r\n")
}

fn fields<'a>(raw: &'a [u8], headers: &'a [Field]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    headers.iter().map(|f| (f.name.of(raw), f.value.of(raw)))
}

/// What the header lines say about framing and the connection: only lines of a kind of
/// ours are looked at.
fn facts<'a>(raw: &'a [u8], headers: &[Field], proxy_connection: bool) -> Facts<'a> {
    let ours = headers
        .iter()
        .enumerate()
        .filter(|(_, f)| f.kind != Kind::Other)
        .map(|(i, f)| (i, f.kind, f.value.of(raw)));
    Facts::of(ours, proxy_connection)
}

fn kinded<'a>(
    raw: &'a [u8],
    headers: &'a [Field],
) -> impl Iterator<Item = (Kind, &'a [u8], &'a [u8])> {
    headers
        .iter()
        .map(|f| (f.kind, f.name.of(raw), f.value.of(raw)))
}

/// Writes the header lines of `headers` that `keep` accepts (given kind and name) to `out`,
/// each as `Name: value` CRLF: runs of lines written that way in `raw` are copied in one
/// piece, the others rebuilt from their parts (the parser checked them all).
fn write_fields(
    raw: &[u8],
    headers: &[Field],
    out: &mut BytesMut,
    mut keep: impl FnMut(Kind, &[u8]) -> bool,
) {
    let mut run = 0..0;
    for f in headers {
        let name = f.name.of(raw);
        if !keep(f.kind, name) {
            continue;
        }
        let (start, end) = (f.name.start as usize, f.value.end as usize);
        if f.plain && !run.is_empty() && run.end == start {
            run.end = end + 2;
            continue;
        }
        out.extend_from_slice(&raw[run]);
        if f.plain {
            run = start..end + 2;
        } else {
            run = 0..0;
            for part in [name, b": ", f.value.of(raw), b"\r\n"] {
                out.extend_from_slice(part);
            }
        }
    }
    out.extend_from_slice(&raw[run]);
}

fn find<'a>(raw: &'a [u8], headers: &'a [Field], name: &str) -> Option<&'a [u8]> {
    fields(raw, headers)
        .find(|(n, _)| is(n, name))
        .map(|(_, v)| v)
}

/// Bytes checked to be ASCII by the parser, as text.
fn ascii(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use FramingError::*;
    use proptest::prelude::*;

    const MAX: usize = 64 * 1024;

    fn request(head: &[u8]) -> Result<RequestHead, FramingError> {
        let (head, len) = parse_request(head, MAX)?.expect("complete");
        assert_eq!(len, head.raw().len());
        Ok(head)
    }

    fn response(head: &[u8]) -> Result<ResponseHead, FramingError> {
        Ok(parse_response(head, MAX, false)?.expect("complete").0)
    }

    #[test]
    fn refuses_malformed_request_heads() {
        let cases: &[(FramingError, &[&[u8]])] = &[
            (
                BareLf,
                &[
                    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: a\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: a\r\n\n",
                    b"\nGET / HTTP/1.1\r\n\r\n",
                ],
            ),
            (
                ObsFold,
                &[
                    b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
                    b"GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n",
                    b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
                ],
            ),
            (
                SpaceBeforeColon,
                &[
                    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n",
                    b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
                ],
            ),
            (
                InvalidHeaderValue,
                &[
                    b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
                    b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
                    b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n",
                    b"GET / HTTP/1.1\r\nX: \x0b\r\n\r\n",
                ],
            ),
            (
                InvalidHeaderName,
                &[
                    b"GET / HTTP/1.1\r\nX(y): a\r\n\r\n",
                    b"GET / HTTP/1.1\r\nno-colon\r\n\r\n",
                    b"GET / HTTP/1.1\r\n: a\r\n\r\n",
                    b"GET / HTTP/1.1\r\nX\xff: a\r\n\r\n",
                ],
            ),
            (
                InvalidMethod,
                &[
                    b"G@T / HTTP/1.1\r\n\r\n",
                    b" / HTTP/1.1\r\n\r\n",
                    b"G\0T / HTTP/1.1\r\n\r\n",
                ],
            ),
            (
                InvalidTarget,
                &[
                    b"GET  / HTTP/1.1\r\n\r\n",
                    b"GET /a b HTTP/1.1\r\n\r\n",
                    b"GET /\x80 HTTP/1.1\r\n\r\n",
                    b"GET /\tx HTTP/1.1\r\n\r\n",
                    b"GET /\rx HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1 \r\n\r\n",
                ],
            ),
            (InvalidStartLine, &[b"GET /\r\n\r\n", b"GET\r\n\r\n"]),
            (
                UnsupportedVersion,
                &[
                    b"GET / HTTP/2.0\r\n\r\n",
                    b"GET / HTTP/1.2\r\n\r\n",
                    b"GET / http/1.1\r\n\r\n",
                    b"GET / HTTP/0.9\r\n\r\n",
                ],
            ),
            (
                DuplicateHost,
                &[b"GET http://a/ HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"],
            ),
        ];
        for (want, heads) in cases {
            for head in *heads {
                let got = parse_request(head, MAX).map(|_| ());
                assert_eq!(got, Err(*want), "{:?}", String::from_utf8_lossy(head));
            }
        }
    }

    #[test]
    fn parses_a_get_and_its_parts() {
        let raw = b"GET http://example.com/a?b HTTP/1.1\r\nHost: example.com\r\nX-Empty:\r\n\
            X-Sp: \r\nAccept: */*\r\nX-Obs: caf\xc3\xa9\r\n\r\n";
        let head = request(raw).unwrap();
        assert_eq!(head.method(), "GET");
        assert_eq!(head.target(), "http://example.com/a?b");
        assert_eq!(head.version(), 1);
        assert_eq!(head.raw().as_ref(), raw);
        let headers: Vec<_> = head.headers().collect();
        let want: [(&[u8], &[u8]); 5] = [
            (b"Host", b"example.com"),
            (b"X-Empty", b""),
            (b"X-Sp", b""),
            (b"Accept", b"*/*"),
            (b"X-Obs", b"caf\xc3\xa9"),
        ];
        assert_eq!(headers, want);
        assert_eq!(head.header("accept"), Some(&b"*/*"[..]));
        assert_eq!(head.header("ACCEPT"), Some(&b"*/*"[..]));
        assert_eq!(head.header("missing"), None);
        assert_eq!(head.framing(), BodyFraming::None);
        assert!(head.keep_alive() && !head.expect_continue() && head.upgrade().is_none());
        assert_eq!(head.absolute_uri().unwrap().host, "example.com");
    }

    #[test]
    fn connection_options() {
        let cases: &[(&str, &str, bool)] = &[
            ("1.1", "", true),
            ("1.1", "Connection: close\r\n", false),
            ("1.1", "Connection: keep-alive, Close\r\n", false),
            ("1.1", "Proxy-Connection: close\r\n", false),
            ("1.0", "", false),
            ("1.0", "Connection: keep-alive\r\n", true),
            ("1.0", "Connection: foo, Keep-Alive\r\n", true),
            ("1.0", "Proxy-Connection: keep-alive\r\n", true),
            (
                "1.0",
                "Connection: keep-alive\r\nProxy-Connection: close\r\n",
                false,
            ),
        ];
        for (v, lines, want) in cases {
            let head = request(format!("GET / HTTP/{v}\r\n{lines}\r\n").as_bytes()).unwrap();
            assert_eq!(head.keep_alive(), *want, "{v} {lines:?}");
        }
    }

    #[test]
    fn connection_lists_naming_more_than_keep_alive() {
        let get = |lines: &str| {
            request(format!("GET / HTTP/1.1\r\n{lines}\r\n").as_bytes())
                .unwrap()
                .has_connection_options()
        };
        assert!(!get(""));
        assert!(!get(
            "Connection: keep-alive\r\nProxy-Connection: Keep-Alive ,\r\n"
        ));
        assert!(get("Connection: keep-alive, X-Trace\r\n"));
        assert!(get("Connection: close\r\n"));
        assert!(get("Proxy-Connection: X-Trace\r\n"));
        let got = |lines: &str| {
            parse_response(
                format!("HTTP/1.1 200 OK\r\n{lines}\r\n").as_bytes(),
                4096,
                false,
            )
            .unwrap()
            .unwrap()
            .0
            .has_connection_options()
        };
        assert!(!got("Connection: Keep-Alive\r\n"));
        assert!(got("Connection: keep-alive, X-Trace\r\n"));
        // A response's `Proxy-Connection` names nothing: it is only removed.
        assert!(!got("Proxy-Connection: X-Trace\r\n"));
    }

    #[test]
    fn expect_and_upgrade() {
        let get = |v: &str, lines: &str| {
            request(format!("GET / HTTP/{v}\r\n{lines}\r\n").as_bytes()).unwrap()
        };
        assert!(get("1.1", "Expect: 100-Continue\r\n").expect_continue());
        assert!(!get("1.0", "Expect: 100-continue\r\n").expect_continue());
        assert!(!get("1.1", "Expect: 100-continue-x\r\n").expect_continue());
        let ws = "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n";
        assert_eq!(get("1.1", ws).upgrade(), Some(&b"websocket"[..]));
        assert_eq!(get("1.0", ws).upgrade(), None);
        assert_eq!(get("1.1", "Upgrade: websocket\r\n").upgrade(), None);
        assert_eq!(get("1.1", "Connection: upgrade\r\n").upgrade(), None);
    }

    #[test]
    fn leaves_the_body_and_pipelined_requests_in_the_buffer() {
        let buf = b"\r\nPOST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            GET /next HTTP/1.1\r\n\r\nGET";
        let (first, len) = parse_request(buf, MAX).unwrap().unwrap();
        assert_eq!(first.framing(), BodyFraming::Length(5));
        assert!(
            first.raw().starts_with(b"POST"),
            "leading empty lines skipped"
        );
        assert_eq!(&buf[len..len + 5], b"hello");
        let (second, len2) = parse_request(&buf[len + 5..], MAX).unwrap().unwrap();
        assert_eq!(second.target(), "/next");
        let third = parse_request(&buf[len + 5 + len2..], MAX).unwrap();
        assert!(third.is_none());

        let mut bytes = BytesMut::from(&buf[..]);
        let head = take_request(&mut bytes, MAX).unwrap().unwrap();
        assert_eq!(head.raw(), first.raw());
        assert!(bytes.starts_with(b"helloGET /next"));
        let refused = &b"GET / HTTP/1.1\r\nX : y\r\n\r\nrest"[..];
        let mut bad = BytesMut::from(refused);
        assert_eq!(
            take_request(&mut bad, MAX).map(|_| ()),
            Err(SpaceBeforeColon)
        );
        assert_eq!(bad, refused, "an error leaves the buffer alone");
        let mut resp = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..]);
        let head = take_response(&mut resp, MAX, false).unwrap().unwrap();
        assert_eq!(
            (head.framing(), &resp[..]),
            (BodyFraming::Length(2), &b"ok"[..])
        );
    }

    #[test]
    fn size_limit_and_incomplete_heads() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 0..head.len() {
            assert_eq!(
                parse_request(&head[..cut], MAX).map(|r| r.is_none()),
                Ok(true)
            );
        }
        assert!(parse_request(head, head.len()).unwrap().is_some());
        let limit = head.len() - 1;
        assert_eq!(
            parse_request(head, limit).map(|_| ()),
            Err(HeadTooLarge { limit })
        );
        assert_eq!(
            parse_request(b"", 0).map(|_| ()),
            Err(HeadTooLarge { limit: 0 })
        );
        let long = [b'a'; 100];
        assert_eq!(
            parse_request(&long, 100).map(|_| ()),
            Err(HeadTooLarge { limit: 100 })
        );
        assert_eq!(
            parse_request(&long[..99], 100).map(|r| r.is_none()),
            Ok(true)
        );
        let many = |n: usize| {
            let lines: String = (0..n).map(|i| format!("X-{i}: v\r\n")).collect();
            parse_request(format!("GET / HTTP/1.1\r\n{lines}\r\n").as_bytes(), MAX).map(|_| ())
        };
        assert_eq!(many(MAX_HEADERS), Ok(()));
        assert_eq!(many(MAX_HEADERS + 1), Err(TooManyHeaders));
        // Around the size of the first parse attempt: every field is kept, in order.
        for n in [FEW_HEADERS - 1, FEW_HEADERS, FEW_HEADERS + 1, MAX_HEADERS] {
            let lines: String = (0..n).map(|i| format!("X-{i}: v{i}\r\n")).collect();
            let text = format!("GET / HTTP/1.1\r\n{lines}\r\n");
            let (head, _) = parse_request(text.as_bytes(), MAX).unwrap().unwrap();
            let got: Vec<_> = head.headers().collect();
            assert_eq!(got.len(), n);
            assert_eq!(got[n - 1].1, format!("v{}", n - 1).as_bytes());
        }
        let lines = "X: v\r\n".repeat(MAX_HEADERS + 1);
        let unfinished = format!("GET / HTTP/1.1\r\n{lines}");
        let early = parse_request(unfinished.as_bytes(), MAX).map(|_| ());
        assert_eq!(
            early,
            Err(TooManyHeaders),
            "refused before the head is complete"
        );
    }

    #[test]
    fn status_lines() {
        let r = response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(
            (r.code(), r.reason(), r.version()),
            (404, &b"Not Found"[..], 1)
        );
        assert_eq!(r.header("content-length"), Some(&b"0"[..]));
        assert_eq!(response(b"HTTP/1.1 200\r\n\r\n").unwrap().reason(), b"");
        assert_eq!(response(b"HTTP/1.1 200 \r\n\r\n").unwrap().reason(), b"");
        assert_eq!(
            response(b"HTTP/1.0 200 \xe9\r\n\r\n").unwrap().reason(),
            b"\xe9"
        );
        let r = response(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
        assert!(r.is_interim() && !r.is_switching_protocols());
        let r = response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").unwrap();
        assert!(!r.is_interim() && r.is_switching_protocols() && !r.keep_alive());
        let cases: &[(FramingError, &[&[u8]])] = &[
            (
                InvalidStatus,
                &[
                    b"HTTP/1.1 20 OK",
                    b"HTTP/1.1 099 Low",
                    b"HTTP/1.1 2000 OK",
                    b"HTTP/1.1  200 OK",
                    b"HTTP/1.1 2x0 OK",
                    b"HTTP/1.1",
                ],
            ),
            (
                InvalidReason,
                &[b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 200 O\x7fK"],
            ),
            (
                UnsupportedVersion,
                &[b"HTTP/2 200 OK", b"HTTP/1.2 200 OK", b"ICY 200 OK"],
            ),
            (ObsFold, &[b"HTTP/1.1 200 OK\r\nX: a\r\n b"]),
            (BareLf, &[b"HTTP/1.1 200 OK\nX: a"]),
        ];
        for (want, lines) in cases {
            for line in *lines {
                let head = [line, &b"\r\n\r\n"[..]].concat();
                let got = response(&head).map(|_| ());
                assert_eq!(got, Err(*want), "{:?}", String::from_utf8_lossy(line));
            }
        }
    }

    /// A valid head with a few random bytes overwritten.
    fn mangled_head() -> impl Strategy<Value = Vec<u8>> {
        let base = b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
            Content-Length: 5\r\nConnection: keep-alive, Upgrade\r\n\r\n"
            .to_vec();
        let edits = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8);
        edits.prop_map(move |edits| {
            let mut head = base.clone();
            for (at, b) in edits {
                let i = at.index(head.len());
                head[i] = b;
            }
            head
        })
    }

    /// [`fast_head`] takes exactly the heads that [`locate_head`] and [`header_spans`] take,
    /// with the same bounds and fields.
    fn fast_path_agrees(buf: &[u8], max: usize) {
        let fast = fast_head(buf, max, &mut Fields::new());
        let exact = locate_head(buf, max)
            .ok()
            .flatten()
            .and_then(|(start, end)| {
                let head = &buf[start..end];
                let headers = header_spans(head, start_line(head).1, &mut Fields::new()).ok()?;
                Some((start, end, start_line(head).0.len(), headers))
            });
        let parts = |f: &Fields| -> Vec<_> {
            f.iter()
                .map(|f| (f.name, f.value, f.kind, f.plain))
                .collect()
        };
        match (fast, exact) {
            (None, None) => {}
            (Some(fast), Some((start, end, line, headers))) => {
                assert_eq!((fast.start, fast.end, fast.line), (start, end, line));
                assert_eq!(parts(&fast.headers), parts(&headers));
            }
            (fast, exact) => panic!(
                "fast path {}, exact path {} for {:?}",
                if fast.is_some() { "took it" } else { "did not" },
                if exact.is_some() {
                    "took it"
                } else {
                    "did not"
                },
                String::from_utf8_lossy(buf)
            ),
        }
    }

    /// A head with its line structure edited: CR, LF, whitespace and colons put anywhere
    /// (bare LFs, lone CRs, obs-fold, whitespace before colons, early or missing blank lines).
    fn mangled_line_ends() -> impl Strategy<Value = Vec<u8>> {
        let base = b"\r\nGET http://a/ HTTP/1.1\r\nHost: a\r\nX-A:  b \t\r\nX-B:\r\n\
            Connection: close\r\n\r\nbody"
            .to_vec();
        let byte = prop::sample::select(&b"\r\n \t:a"[..]);
        let edit = (any::<prop::sample::Index>(), byte, any::<bool>());
        proptest::collection::vec(edit, 0..6).prop_map(move |edits| {
            let mut head = base.clone();
            for (at, b, insert) in edits {
                let i = at.index(head.len());
                if insert {
                    head.insert(i, b);
                } else {
                    head[i] = b;
                }
            }
            head
        })
    }

    fn never_panics(buf: &[u8], max: usize) {
        fast_path_agrees(buf, max);
        match parse_request(buf, max) {
            Ok(Some((head, len))) => {
                assert!(len <= buf.len() && len <= max);
                assert!(buf[..len].ends_with(head.raw()));
                let _ = (head.method(), head.target(), head.headers().count());
                let _ = (head.upgrade(), head.absolute_uri());
                fields_are_writable(head.fields());
                copies_fields_as_rebuilt(&head.raw, &head.headers);
                let kinds = || head.fields().map(|f| f.0);
                assert_eq!(head.authorization(), head.header("proxy-authorization"));
                assert_eq!(
                    head.has_pharox_headers(),
                    kinds().any(|k| k == Kind::Pharox)
                );
                // Only a head with connection options can name a header to remove.
                let named = super::super::rewrite::connection_named(head.fields(), true);
                assert!(head.has_connection_options() || named.is_empty());
            }
            Ok(None) => assert!(buf.len() < max),
            Err(_) => {}
        }
        for head_request in [false, true] {
            if let Ok(Some((head, len))) = parse_response(buf, max, head_request) {
                assert!(len <= buf.len() && len <= max && head.code() >= 100);
                fields_are_writable(head.fields());
                copies_fields_as_rebuilt(&head.raw, &head.headers);
                let named = super::super::rewrite::connection_named(head.fields(), false);
                assert!(head.has_connection_options() || named.is_empty());
            }
        }
    }

    /// [`write_fields`] writes what rebuilding each kept line from its parts would, whichever
    /// lines are kept.
    fn copies_fields_as_rebuilt(raw: &[u8], headers: &[Field]) {
        for pattern in [
            0u64,
            u64::MAX,
            0x5555_5555_5555_5555,
            0xaaaa_aaaa_aaaa_aaaa,
            0x3c3c,
        ] {
            let kept = |i: usize| pattern >> (i % 64) & 1 == 1;
            let mut out = BytesMut::new();
            let mut i = 0;
            write_fields(raw, headers, &mut out, |_, _| {
                i += 1;
                kept(i - 1)
            });
            let mut want = Vec::new();
            for (i, (name, value)) in fields(raw, headers).enumerate() {
                if kept(i) {
                    want.extend_from_slice(&[name, b": ", value, b"\r\n"].concat());
                }
            }
            assert_eq!(out, want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    /// What the rewrites rely on to copy a parsed head's lines without checking them again.
    fn fields_are_writable<'a>(fields: impl Iterator<Item = (Kind, &'a [u8], &'a [u8])>) {
        for (kind, name, value) in fields {
            assert!(is_token(name), "{name:?}");
            assert!(super::super::is_field_content(value), "{value:?}");
            assert_eq!(super::super::trim_ows(value), value);
            assert_eq!(kind, Kind::of(name));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            buf in proptest::collection::vec(any::<u8>(), 0..600),
            max in prop_oneof![0usize..700, any::<usize>()],
        ) {
            never_panics(&buf, max);
        }

        #[test]
        fn mangled_heads_never_panic(buf in mangled_head(), max in 0usize..200) {
            never_panics(&buf, max);
        }

        #[test]
        fn heads_with_mangled_line_ends_never_panic(buf in mangled_line_ends(), max in 0usize..200) {
            never_panics(&buf, max);
        }

        #[test]
        fn hostile_header_lines_are_refused_or_writable(
            lines in proptest::collection::vec(
                (
                    "[!-~]{0,6}|(?i)x-pharox-[a-z]{0,2}|content[-_]length",
                    proptest::collection::vec(any::<u8>(), 0..12),
                ),
                1..6,
            ),
        ) {
            for start in [&b"GET http://a/ HTTP/1.1\r\n"[..], b"HTTP/1.1 200 OK\r\n"] {
                let mut head = start.to_vec();
                for (name, value) in &lines {
                    head.extend_from_slice(name.as_bytes());
                    head.push(b':');
                    head.extend_from_slice(value);
                    head.extend_from_slice(b"\r\n");
                }
                head.extend_from_slice(b"\r\n");
                never_panics(&head, head.len());
            }
        }
    }
}
