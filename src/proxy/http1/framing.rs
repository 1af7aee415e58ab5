//! How long a message body is (RFC 9112 §6.3), from what the headers say, refusing every
//! form two implementations could read differently: `Content-Length` with
//! `Transfer-Encoding`, a repeated or listed `Content-Length`, one that is not plain digits, a
//! request `Transfer-Encoding` other than exactly `chunked`, and `Transfer-Encoding` on
//! HTTP/1.0.

use super::{BodyFraming, FramingError, Kind, is_token, list, trim_ows};

/// What the headers of one head say about framing and the connection.
#[derive(Default)]
pub(super) struct Facts<'a> {
    content_length: Option<&'a [u8]>,
    content_lengths: usize,
    transfer_encoding: Option<&'a [u8]>,
    transfer_encodings: usize,
    /// `Content_Length` / `Transfer_Encoding` header lines.
    aliases: usize,
    /// `Host` header lines.
    pub(super) hosts: usize,
    /// Index of the first `Upgrade` header.
    pub(super) upgrade: Option<usize>,
    /// `Expect: 100-continue`.
    pub(super) expect_continue: bool,
    /// `Connection` lists `close`, `keep-alive`, `upgrade`.
    pub(super) close: bool,
    pub(super) keep_alive: bool,
    pub(super) upgrade_token: bool,
    /// Index of the first `Proxy-Authorization` header.
    pub(super) authorization: Option<usize>,
    /// Whether any `X-Pharox-*` header is there.
    pub(super) pharox: bool,
    /// Whether a `Connection` list (or `Proxy-Connection`, when it counts) names anything but
    /// `keep-alive`: only then can it name a header to remove.
    pub(super) connection_options: bool,
}

impl<'a> Facts<'a> {
    /// From each header line's index, kind and value (lines of no kind of ours may be left
    /// out); `proxy_connection`: whether `Proxy-Connection` counts as `Connection` (requests).
    pub(super) fn of(
        headers: impl Iterator<Item = (usize, Kind, &'a [u8])>,
        proxy_connection: bool,
    ) -> Self {
        let mut f = Facts::default();
        for (i, kind, value) in headers {
            match kind {
                Kind::ContentLength => {
                    f.content_lengths += 1;
                    f.content_length.get_or_insert(value);
                }
                Kind::TransferEncoding => {
                    f.transfer_encodings += 1;
                    f.transfer_encoding.get_or_insert(value);
                }
                Kind::FramingAlias => f.aliases += 1,
                Kind::Host => f.hosts += 1,
                Kind::Upgrade => {
                    f.upgrade.get_or_insert(i);
                }
                Kind::Expect => f.expect_continue |= value.eq_ignore_ascii_case(b"100-continue"),
                Kind::Connection => f.connection(value),
                Kind::ProxyConnection if proxy_connection => f.connection(value),
                Kind::ProxyAuthorization => {
                    f.authorization.get_or_insert(i);
                }
                Kind::Pharox => f.pharox = true,
                _ => {}
            }
        }
        f
    }

    fn connection(&mut self, value: &[u8]) {
        // Nearly every list is a lone `keep-alive` or `close`, as sent.
        match value {
            b"keep-alive" | b"Keep-Alive" => {
                self.keep_alive = true;
                return;
            }
            b"close" | b"Close" => {
                self.close = true;
                self.connection_options = true;
                return;
            }
            _ => {}
        }
        for token in list(value) {
            let keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
            self.keep_alive |= keep_alive;
            self.connection_options |= !keep_alive;
            self.close |= token.eq_ignore_ascii_case(b"close");
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

pub(super) fn request_framing(f: &Facts<'_>, minor: u8) -> Result<BodyFraming, FramingError> {
    if f.aliases > 0 {
        return Err(FramingError::FramingAlias);
    }
    match transfer_codings(f, minor)? {
        Some(Codings::Chunked) => Ok(BodyFraming::Chunked),
        Some(Codings::ChunkedAfterOthers) => Err(FramingError::UnsupportedTransferCoding),
        Some(Codings::NotChunked) => Err(FramingError::NotChunked),
        None => length_framing(f),
    }
}

/// RFC 9112 §6.3, except that `Content-Length` with `Transfer-Encoding` is an error here too.
pub(super) fn response_framing(
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

#[cfg(test)]
mod tests {
    use super::super::{ResponseHead, parse_request, parse_response};
    use super::*;
    use FramingError::*;

    /// The framing of a request with these header lines (each without its CRLF).
    fn request(version: &str, lines: &[&str]) -> Result<BodyFraming, FramingError> {
        let lines: String = lines.iter().map(|l| format!("{l}\r\n")).collect();
        let head = format!("POST http://a/ HTTP/{version}\r\nHost: a\r\n{lines}\r\n");
        let (head, _) = parse_request(head.as_bytes(), 8192)?.expect("complete");
        Ok(head.framing())
    }

    fn response_head(
        status: &str,
        lines: &[&str],
        head: bool,
    ) -> Result<ResponseHead, FramingError> {
        let lines: String = lines.iter().map(|l| format!("{l}\r\n")).collect();
        let raw = format!("HTTP/{status}\r\n{lines}\r\n");
        Ok(parse_response(raw.as_bytes(), 8192, head)?
            .expect("complete")
            .0)
    }

    fn response(status: &str, lines: &[&str], head: bool) -> Result<BodyFraming, FramingError> {
        response_head(status, lines, head).map(|r| r.framing())
    }

    const TE: &str = "Transfer-Encoding: chunked";

    #[test]
    fn refuses_every_ambiguous_request_framing() {
        let cases: &[(FramingError, &[&[&str]])] = &[
            // Framing headers spelt with `_`, which some servers read as `-`.
            (
                FramingAlias,
                &[
                    &["Transfer_Encoding: chunked"],
                    &["Content-Length: 5", "content_length: 6"],
                ],
            ),
            // CL.TE and TE.CL
            (
                ContentLengthWithTransferEncoding,
                &[
                    &["Content-Length: 5", TE],
                    &[TE, "Content-Length: 5"],
                    &[TE, "Content-Length: 0"],
                    &["Content-Length: 5", "Transfer-Encoding: identity"],
                ],
            ),
            // CL.CL
            (
                DuplicateContentLength,
                &[
                    &["Content-Length: 5", "Content-Length: 5"],
                    &["Content-Length: 5", "content-length: 6"],
                ],
            ),
            (
                ContentLengthList,
                &[
                    &["Content-Length: 5, 6"],
                    &["Content-Length: 5, 5"],
                    &["Content-Length: 5,"],
                    &["Content-Length: ,5"],
                ],
            ),
            (
                InvalidContentLength,
                &[
                    &["Content-Length: +5"],
                    &["Content-Length: -1"],
                    &["Content-Length: 1.5"],
                    &["Content-Length: 0x5"],
                    &["Content-Length: 5 5"],
                    &["Content-Length: 5\t5"],
                    &["Content-Length: 5;"],
                    &["Content-Length: "],
                    &["Content-Length: 18446744073709551616"],
                    &["Content-Length: 99999999999999999999999999"],
                    &["Content-Length: \u{0665}"],
                ],
            ),
            // TE.TE: anything but exactly one `chunked` token
            (
                NotChunked,
                &[
                    &["Transfer-Encoding: chunked, identity"],
                    &["Transfer-Encoding: identity"],
                    &["Transfer-Encoding: gzip"],
                    &["Transfer-Encoding: xchunked"],
                    &["Transfer-Encoding: chunkedx"],
                    &["Transfer-Encoding: chunked, gzip"],
                ],
            ),
            (
                InvalidTransferEncoding,
                &[
                    &["Transfer-Encoding: \"chunked\""],
                    &["Transfer-Encoding: chunk\ted"],
                    &["Transfer-Encoding: chunked\tx"],
                    &["Transfer-Encoding: chunked x"],
                    &["Transfer-Encoding: chunked;q=1"],
                    &["Transfer-Encoding: chunked, chunked"],
                    &["Transfer-Encoding: ,chunked"],
                    &["Transfer-Encoding: chunked,"],
                    &["Transfer-Encoding: chunked,,"],
                    &["Transfer-Encoding: "],
                ],
            ),
            (
                DuplicateTransferEncoding,
                &[
                    &[TE, TE],
                    &[TE, "Transfer-Encoding: identity"],
                    &["Transfer-Encoding: identity", TE],
                ],
            ),
            (
                UnsupportedTransferCoding,
                &[&["Transfer-Encoding: gzip, chunked"]],
            ),
            (InvalidHeaderValue, &[&["Transfer-Encoding: chunked\x0b"]]),
            (
                SpaceBeforeColon,
                &[&["Transfer-Encoding : chunked"], &["Content-Length : 5"]],
            ),
            (ObsFold, &[&["Transfer-Encoding:", " chunked"]]),
        ];
        for (want, heads) in cases {
            for lines in *heads {
                assert_eq!(request("1.1", lines), Err(*want), "{lines:?}");
            }
        }
        assert_eq!(request("1.0", &[TE]), Err(TransferEncodingHttp10));
        assert_eq!(request("1.0", &[TE, TE]), Err(TransferEncodingHttp10));
    }

    #[test]
    fn accepts_plain_request_framing() {
        let cases: &[(&[&str], BodyFraming)] = &[
            (&[], BodyFraming::None),
            (&["Content-Length: 5"], BodyFraming::Length(5)),
            (&["Content-Length:5"], BodyFraming::Length(5)),
            (&["Content-Length: \t 5 \t"], BodyFraming::Length(5)),
            (&["content-length: 005"], BodyFraming::Length(5)),
            (&["Content-Length: 0"], BodyFraming::Length(0)),
            (
                &["Content-Length: 18446744073709551615"],
                BodyFraming::Length(u64::MAX),
            ),
            (&[TE], BodyFraming::Chunked),
            (&["transfer-encoding: CHUNKED"], BodyFraming::Chunked),
            (&["Transfer-Encoding:\tchunked \t"], BodyFraming::Chunked),
        ];
        for (lines, want) in cases {
            assert_eq!(request("1.1", lines), Ok(*want), "{lines:?}");
        }
        assert_eq!(
            request("1.0", &["Content-Length: 3"]),
            Ok(BodyFraming::Length(3))
        );
    }

    #[test]
    fn response_framing() {
        let cases: &[(&str, &[&str], bool, BodyFraming)] = &[
            (
                "1.1 200 OK",
                &["Content-Length: 3"],
                false,
                BodyFraming::Length(3),
            ),
            ("1.1 200 OK", &[TE], false, BodyFraming::Chunked),
            (
                "1.1 200 OK",
                &["Transfer-Encoding: gzip, chunked"],
                false,
                BodyFraming::Chunked,
            ),
            (
                "1.1 200 OK",
                &["Transfer-Encoding: gzip"],
                false,
                BodyFraming::UntilClose,
            ),
            (
                "1.1 200 OK",
                &["Transfer-Encoding: chunked, gzip"],
                false,
                BodyFraming::UntilClose,
            ),
            ("1.1 200 OK", &[], false, BodyFraming::UntilClose),
            ("1.0 200 OK", &[], false, BodyFraming::UntilClose),
            (
                "1.1 200 OK",
                &["Content-Length: 3"],
                true,
                BodyFraming::None,
            ),
            ("1.1 200 OK", &[TE], true, BodyFraming::None),
            (
                "1.1 204 No Content",
                &["Content-Length: 3"],
                false,
                BodyFraming::None,
            ),
            ("1.1 304 Not Modified", &[TE], false, BodyFraming::None),
            ("1.1 100 Continue", &[], false, BodyFraming::None),
            (
                "1.1 101 Switching Protocols",
                &["Upgrade: h2c"],
                false,
                BodyFraming::None,
            ),
            (
                "1.0 200 OK",
                &["Content-Length: 3"],
                false,
                BodyFraming::Length(3),
            ),
        ];
        for (status, lines, head, want) in cases {
            assert_eq!(
                response(status, lines, *head),
                Ok(*want),
                "{status} {lines:?}"
            );
        }
        let refused: &[(&[&str], FramingError)] = &[
            (
                &["Content-Length: 3", TE],
                ContentLengthWithTransferEncoding,
            ),
            (&["Content-Length: 3, 3"], ContentLengthList),
            (
                &["Content-Length: 3", "Content-Length: 3"],
                DuplicateContentLength,
            ),
            (&["Content-Length: -3"], InvalidContentLength),
            (
                &["Transfer-Encoding: chunked, chunked"],
                InvalidTransferEncoding,
            ),
            (&[TE, "Transfer-Encoding: gzip"], DuplicateTransferEncoding),
        ];
        for (lines, want) in refused {
            assert_eq!(
                response("1.1 200 OK", lines, false),
                Err(*want),
                "{lines:?}"
            );
        }
        assert_eq!(
            response("1.0 200 OK", &[TE], false),
            Err(TransferEncodingHttp10)
        );
    }

    #[test]
    fn response_keep_alive() {
        let cases: &[(&str, &[&str], bool)] = &[
            ("1.1 200 OK", &["Content-Length: 3"], true),
            (
                "1.1 200 OK",
                &["Content-Length: 3", "Connection: close"],
                false,
            ),
            ("1.1 200 OK", &[], false),
            ("1.1 200 OK", &["Transfer-Encoding: gzip"], false),
            ("1.0 200 OK", &["Content-Length: 3"], false),
            (
                "1.0 200 OK",
                &["Content-Length: 3", "Connection: keep-alive"],
                true,
            ),
            ("1.1 101 Switching Protocols", &[], false),
            ("1.1 204 No Content", &[], true),
        ];
        for (status, lines, want) in cases {
            let r = response_head(status, lines, false).unwrap();
            assert_eq!(r.keep_alive(), *want, "{status} {lines:?}");
        }
    }
}
