//! Message bodies for the HTTP/1 relay: a validating chunked decoder that only measures (the
//! relay forwards the exact bytes it was fed), and the copier that moves one body from a
//! source to a sink per its [`BodyFraming`], leaving whatever follows it in the buffer.
//!
//! The chunked grammar is RFC 9112 §7.1, read strictly: 1 to 16 hex digits of size, no
//! whitespace anywhere in a chunk line, extensions `;name[=token|quoted-string]` of at most
//! [`MAX_EXTENSIONS`] bytes a line, CRLF only, chunk data followed by exactly CRLF, and a trailer
//! section of at most [`MAX_TRAILERS`] bytes of well-formed header lines.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{BodyFraming, FramingError, is_field_byte, is_tchar};

/// Most bytes of chunk extensions on one chunk line.
pub const MAX_EXTENSIONS: usize = 4096;

/// Most bytes of the trailer section (its lines and the final CRLF).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Bytes read from the source at a time.
const READ_SIZE: usize = 64 * 1024;

/// What is wrong with a chunked body at the byte reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkFault {
    /// Not a hex digit where the chunk size is.
    #[error("invalid chunk size")]
    Size,
    /// A chunk size of more than 16 hex digits.
    #[error("chunk size too long")]
    SizeTooLong,
    /// A chunk extension that is not `;token[=token|quoted-string]`.
    #[error("invalid chunk extension")]
    Extension,
    /// More than [`MAX_EXTENSIONS`] bytes of chunk extensions.
    #[error("chunk extensions too long")]
    ExtensionTooLong,
    /// CR not followed by LF (or LF without CR).
    #[error("line ending other than CRLF")]
    LineEnding,
    /// Chunk data not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    /// A malformed trailer line.
    #[error("invalid trailer line")]
    Trailer,
    /// More than [`MAX_TRAILERS`] bytes of trailers.
    #[error("trailer section too large")]
    TrailerTooLarge,
}

/// Where the decoder is in the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the chunk size's hex digits.
    Size,
    /// Inside chunk extensions.
    Ext(Ext),
    /// After the CR ending a chunk line.
    SizeLf,
    /// Inside chunk data: bytes left.
    Data(u64),
    /// After chunk data, expecting CR, then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    /// After the final CR.
    EndLf,
    /// The message has ended.
    Done,
}

/// Where in a chunk extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    /// In a name (`started`: at least one byte of it seen).
    Name {
        started: bool,
    },
    /// Just after `=`.
    ValueStart,
    Token,
    Quoted,
    /// After a backslash in a quoted string.
    QuotedPair,
    /// After the closing quote.
    AfterQuoted,
}

/// How far [`ChunkedDecoder::feed`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input that belong to the message body.
    pub consumed: usize,
    /// Whether the body ended within them (what follows is the next message).
    pub done: bool,
}

/// A streaming validator of a chunked body: fed bytes as they arrive, it says how many belong
/// to the body and when the body ends. The result does not depend on how input is split.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Bytes accepted so far (the position of the next byte).
    position: u64,
    size: u64,
    digits: u8,
    /// Bytes of extensions on this line, or of trailers.
    meta: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            position: 0,
            size: 0,
            digits: 0,
            meta: 0,
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes accepted so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Takes the next bytes of the body. After an error the decoder must not be fed again.
    pub fn feed(&mut self, data: &[u8]) -> Result<Progress, FramingError> {
        let mut i = 0;
        while i < data.len() && self.state != State::Done {
            if let State::Data(left) = self.state {
                let n = left.min((data.len() - i) as u64);
                self.state = if n == left {
                    State::DataCr
                } else {
                    State::Data(left - n)
                };
                (i, self.position) = (i + n as usize, self.position + n);
                continue;
            }
            self.step(data[i]).map_err(|fault| FramingError::Chunked {
                offset: self.position,
                fault,
            })?;
            (i, self.position) = (i + 1, self.position + 1);
        }
        Ok(Progress {
            consumed: i,
            done: self.is_done(),
        })
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkFault> {
        self.state = match self.state {
            State::Size => self.size_digit(b)?,
            State::Ext(ext) => self.extension(ext, b)?,
            State::SizeLf => self.chunk_line_end(b)?,
            State::DataCr => expect(b, b'\r', State::DataLf, ChunkFault::DataEnd)?,
            State::DataLf => expect(b, b'\n', State::Size, ChunkFault::DataEnd)?,
            State::EndLf => expect(b, b'\n', State::Done, ChunkFault::LineEnding)?,
            trailer => self.trailer(trailer, b)?,
        };
        Ok(())
    }

    fn size_digit(&mut self, b: u8) -> Result<State, ChunkFault> {
        match (b, self.digits) {
            (b';', 1..) => {
                self.meta = 1;
                Ok(State::Ext(Ext::Name { started: false }))
            }
            (b'\r', 1..) => Ok(State::SizeLf),
            (b'\n', 1..) => Err(ChunkFault::LineEnding),
            (_, 16) if b.is_ascii_hexdigit() => Err(ChunkFault::SizeTooLong),
            _ => {
                let digit = (b as char).to_digit(16).ok_or(ChunkFault::Size)?;
                self.size = self.size << 4 | u64::from(digit);
                self.digits += 1;
                Ok(State::Size)
            }
        }
    }

    /// One byte of a chunk line's extensions, after the first `;`.
    fn extension(&mut self, ext: Ext, b: u8) -> Result<State, ChunkFault> {
        let complete = matches!(
            ext,
            Ext::Name { started: true } | Ext::Token | Ext::AfterQuoted
        );
        if b == b'\n' {
            return Err(ChunkFault::LineEnding);
        }
        if b == b'\r' {
            return if complete {
                Ok(State::SizeLf)
            } else {
                Err(ChunkFault::Extension)
            };
        }
        self.meta += 1;
        if self.meta > MAX_EXTENSIONS {
            return Err(ChunkFault::ExtensionTooLong);
        }
        let next = match (ext, b) {
            (Ext::Name { .. }, _) if is_tchar(b) => Ext::Name { started: true },
            (Ext::Name { started: true }, b'=') => Ext::ValueStart,
            (_, b';') if complete => Ext::Name { started: false },
            (Ext::ValueStart | Ext::Token, _) if is_tchar(b) => Ext::Token,
            (Ext::ValueStart, b'"') => Ext::Quoted,
            (Ext::Quoted, b'"') => Ext::AfterQuoted,
            (Ext::Quoted, b'\\') => Ext::QuotedPair,
            (Ext::Quoted, _) if is_qdtext(b) => Ext::Quoted,
            (Ext::QuotedPair, _) if is_field_byte(b) => Ext::Quoted,
            _ => return Err(ChunkFault::Extension),
        };
        Ok(State::Ext(next))
    }

    /// The LF ending a chunk line: data follows, or the trailers after the last chunk.
    fn chunk_line_end(&mut self, b: u8) -> Result<State, ChunkFault> {
        if b != b'\n' {
            return Err(ChunkFault::LineEnding);
        }
        let size = std::mem::take(&mut self.size);
        (self.digits, self.meta) = (0, 0);
        Ok(if size == 0 {
            State::TrailerStart
        } else {
            State::Data(size)
        })
    }

    /// One byte of the trailer section (header lines, then CRLF).
    fn trailer(&mut self, state: State, b: u8) -> Result<State, ChunkFault> {
        self.meta += 1;
        if self.meta > MAX_TRAILERS {
            return Err(ChunkFault::TrailerTooLarge);
        }
        match (state, b) {
            (State::TrailerStart, b'\r') => Ok(State::EndLf),
            (State::TrailerStart | State::TrailerName, _) if is_tchar(b) => Ok(State::TrailerName),
            (State::TrailerName, b':') => Ok(State::TrailerValue),
            (State::TrailerValue, b'\r') => Ok(State::TrailerLf),
            (State::TrailerValue, _) if is_field_byte(b) => Ok(State::TrailerValue),
            (State::TrailerLf, b'\n') => Ok(State::TrailerStart),
            (State::TrailerLf, _) | (_, b'\n') => Err(ChunkFault::LineEnding),
            _ => Err(ChunkFault::Trailer),
        }
    }
}

fn expect(b: u8, want: u8, next: State, fault: ChunkFault) -> Result<State, ChunkFault> {
    if b == want { Ok(next) } else { Err(fault) }
}

/// `qdtext` (RFC 9110 §5.6.4): field content but `"` and `\`.
fn is_qdtext(b: u8) -> bool {
    is_field_byte(b) && b != b'"' && b != b'\\'
}

/// Why a body could not be copied, and which side failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading the source failed.
    #[error("reading the body: {0}")]
    Source(#[source] io::Error),
    /// Writing the sink failed.
    #[error("writing the body: {0}")]
    Sink(#[source] io::Error),
    /// The body breaks its framing.
    #[error(transparent)]
    Malformed(FramingError),
    /// The source ended before the body did.
    #[error("body truncated")]
    Truncated,
    /// A read or write call made no progress within the idle timeout.
    #[error("body idle")]
    Idle,
}

/// Copies one body framed by `framing` from `buffered` (bytes already read past the head) and
/// then `src` to `dst`, unchanged (chunk lines and trailers included), and returns how many
/// bytes it wrote. Bytes past the body stay in `buffered`, for the next message. No read or
/// write call may wait longer than `idle`. On an error, what was already forwarded stays
/// forwarded: neither connection can carry another message, close both.
pub async fn copy_body<R, W>(
    src: &mut R,
    buffered: &mut BytesMut,
    dst: &mut W,
    framing: BodyFraming,
    idle: Option<Duration>,
) -> Result<u64, BodyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut copy = BodyCopy {
        src,
        buffered,
        dst,
        idle,
        copied: 0,
    };
    match framing {
        BodyFraming::None => return Ok(0),
        BodyFraming::Length(n) => copy.length(n).await?,
        BodyFraming::Chunked => copy.chunked().await?,
        BodyFraming::UntilClose => copy.until_close().await?,
    }
    timed(idle, copy.dst.flush())
        .await?
        .map_err(BodyError::Sink)?;
    Ok(copy.copied)
}

/// One body being copied.
struct BodyCopy<'a, R: ?Sized, W: ?Sized> {
    src: &'a mut R,
    buffered: &'a mut BytesMut,
    dst: &'a mut W,
    idle: Option<Duration>,
    copied: u64,
}

impl<R, W> BodyCopy<'_, R, W>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    async fn length(&mut self, mut left: u64) -> Result<(), BodyError> {
        while left > 0 {
            if self.buffered.is_empty() && self.fill().await? == 0 {
                return Err(BodyError::Truncated);
            }
            let n = left.min(self.buffered.len() as u64);
            self.send(n as usize).await?;
            left -= n;
        }
        Ok(())
    }

    async fn chunked(&mut self) -> Result<(), BodyError> {
        let mut decoder = ChunkedDecoder::new();
        loop {
            if self.buffered.is_empty() && self.fill().await? == 0 {
                return Err(BodyError::Truncated);
            }
            let progress = decoder
                .feed(&self.buffered[..])
                .map_err(BodyError::Malformed)?;
            self.send(progress.consumed).await?;
            if progress.done {
                return Ok(());
            }
        }
    }

    async fn until_close(&mut self) -> Result<(), BodyError> {
        loop {
            if self.buffered.is_empty() && self.fill().await? == 0 {
                return Ok(());
            }
            self.send(self.buffered.len()).await?;
        }
    }

    /// Reads once into the (empty) buffer; 0 at the end of the source.
    async fn fill(&mut self) -> Result<usize, BodyError> {
        self.buffered.reserve(READ_SIZE);
        timed(self.idle, self.src.read_buf(self.buffered))
            .await?
            .map_err(BodyError::Source)
    }

    /// Writes the first `n` buffered bytes and drops them from the buffer; each write call
    /// must make progress within the idle time (a slow but steady sink is not idle).
    async fn send(&mut self, n: usize) -> Result<(), BodyError> {
        let mut sent = 0;
        while sent < n {
            let wrote = timed(self.idle, self.dst.write(&self.buffered[sent..n]))
                .await?
                .map_err(BodyError::Sink)?;
            if wrote == 0 {
                return Err(BodyError::Sink(io::ErrorKind::WriteZero.into()));
            }
            sent += wrote;
        }
        self.buffered.advance(n);
        self.copied += n as u64;
        Ok(())
    }
}

/// Runs `io`, within `idle` if set.
async fn timed<T>(
    idle: Option<Duration>,
    io: impl Future<Output = io::Result<T>>,
) -> Result<io::Result<T>, BodyError> {
    match idle {
        Some(limit) => tokio::time::timeout(limit, io)
            .await
            .map_err(|_| BodyError::Idle),
        None => Ok(io.await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChunkFault::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, duplex};

    /// Feeds `data` in pieces cut at `cuts`: (bytes of the body, whether it ended).
    fn run(data: &[u8], cuts: &[usize]) -> Result<(usize, bool), FramingError> {
        let mut decoder = ChunkedDecoder::new();
        let (mut total, mut from) = (0, 0);
        for to in cuts.iter().copied().chain([data.len()]) {
            let piece = &data[from..to.max(from)];
            from = to.max(from);
            let p = decoder.feed(piece)?;
            total += p.consumed;
            if p.done {
                return Ok((total, true));
            }
            assert_eq!(p.consumed, piece.len(), "all of it belongs to the body");
        }
        Ok((total, false))
    }

    fn whole(data: &[u8]) -> Result<(usize, bool), FramingError> {
        run(data, &[])
    }

    fn fault(data: &[u8]) -> Option<(ChunkFault, u64)> {
        match whole(data) {
            Err(FramingError::Chunked { offset, fault }) => Some((fault, offset)),
            _ => None,
        }
    }

    #[test]
    fn measures_valid_bodies() {
        let cases: &[&[u8]] = &[
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"0\r\n\r\n",
            b"000\r\n\r\n",
            b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
            b"5;a\r\nhello\r\n0;last\r\n\r\n",
            b"5;a=b;c=d\r\nhello\r\n0\r\n\r\n",
            b"5;name=\"q \\\" d;\t\xe9\"\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"\";b=\"x\"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nEmpty:\r\nY: a b\t\r\n\r\n",
            b"0000000000000005\r\nhello\r\n0\r\n\r\n",
        ];
        for body in cases {
            let mut with_next = body.to_vec();
            with_next.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            assert_eq!(
                whole(&with_next),
                Ok((body.len(), true)),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let mut decoder = ChunkedDecoder::new();
        assert_eq!(
            decoder.feed(b"0\r\n\r\nrest").unwrap(),
            Progress {
                consumed: 5,
                done: true
            }
        );
        assert_eq!(
            decoder.feed(b"more").unwrap(),
            Progress {
                consumed: 0,
                done: true
            }
        );
        assert!(decoder.is_done());
        assert_eq!(decoder.position(), 5);
    }

    #[test]
    fn reports_each_fault_where_it_is() {
        let cases: &[(&[u8], ChunkFault, u64)] = &[
            (b"g\r\n", Size, 0),
            (b"\r\n", Size, 0),
            (b" 5\r\n", Size, 0),
            (b"-5\r\n", Size, 0),
            (b"+5\r\n", Size, 0),
            (b"5 \r\n", Size, 1),
            (b"5\t\r\n", Size, 1),
            (b"0x5\r\n", Size, 1),
            (b"5 ;a\r\n", Size, 1),
            (b"00000000000000005\r\n", SizeTooLong, 16),
            (b"5\n", LineEnding, 1),
            (b"5\r\r", LineEnding, 2),
            (b"5\rhello", LineEnding, 2),
            (b"5;\r\n", Extension, 2),
            (b"5;;a\r\n", Extension, 2),
            (b"5;=a\r\n", Extension, 2),
            (b"5; a\r\n", Extension, 2),
            (b"5;a \r\n", Extension, 3),
            (b"5;a=\r\n", Extension, 4),
            (b"5;a==b\r\n", Extension, 4),
            (b"5;a=b c\r\n", Extension, 5),
            (b"5;a=\"x\r\n", Extension, 6),
            (b"5;a=\"x\"y\r\n", Extension, 7),
            (b"5;a=\"\0\"\r\n", Extension, 5),
            (b"5;a=\"\\\r\"\r\n", Extension, 6),
            (b"5;a\n", LineEnding, 3),
            (b"5\r\nhelloX", DataEnd, 8),
            (b"5\r\nhello\n", DataEnd, 8),
            (b"5\r\nhello\rX", DataEnd, 9),
            (b"5\r\nhello!!\r\n", DataEnd, 8),
            (b"0\r\n X: a\r\n\r\n", Trailer, 3),
            (b"0\r\nX : a\r\n\r\n", Trailer, 4),
            (b"0\r\n: a\r\n\r\n", Trailer, 3),
            (b"0\r\nX\r\n\r\n", Trailer, 4),
            (b"0\r\nX: a\0\r\n\r\n", Trailer, 7),
            (b"0\r\nX: a\n\r\n", LineEnding, 7),
            (b"0\r\nX: a\rY", LineEnding, 8),
            (b"0\r\n\n", LineEnding, 3),
            (b"0\r\n\rX", LineEnding, 4),
        ];
        for (body, want, at) in cases {
            assert_eq!(
                fault(body),
                Some((*want, *at)),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn limits_extensions_and_trailers() {
        let ext = |n: usize| format!("1;{}\r\nx\r\n0\r\n\r\n", "a".repeat(n)).into_bytes();
        assert!(
            whole(&ext(MAX_EXTENSIONS - 1)).is_ok(),
            "`;` and the name: at the limit"
        );
        assert_eq!(
            fault(&ext(MAX_EXTENSIONS)),
            Some((ExtensionTooLong, 1 + MAX_EXTENSIONS as u64))
        );
        let trailers = |n: usize| format!("0\r\nX: {}\r\n\r\n", "v".repeat(n)).into_bytes();
        // The section is "X: " + value + CRLF + CR (the final LF is not counted).
        assert!(whole(&trailers(MAX_TRAILERS - 6)).is_ok());
        assert_eq!(
            fault(&trailers(MAX_TRAILERS - 5)),
            Some((TrailerTooLarge, 3 + MAX_TRAILERS as u64))
        );
        let max = b"FFFFFFFFFFFFFFFF\r\n";
        assert_eq!(
            whole(max),
            Ok((max.len(), false)),
            "u64::MAX bytes of data to come"
        );
    }

    /// A chunked encoding of `chunks` (empty ones skipped) with `ext` on every chunk line and
    /// these trailer lines.
    fn encode(chunks: &[Vec<u8>], ext: &str, trailers: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:x}{ext}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("0{ext}\r\n").as_bytes());
        for t in trailers {
            out.extend_from_slice(format!("{t}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6)
    }

    fn extension() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "",
            ";a",
            ";a=b",
            ";a=\"x y\"",
            ";k=v;n",
            ";q=\"\\\"\"",
        ])
    }

    fn trailers() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec("[A-Za-z-]{1,8}: [ -~]{0,12}", 0..3)
    }

    fn cuts(len: usize) -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(0..=len, 0..8).prop_map(|mut c| {
            c.sort_unstable();
            c
        })
    }

    /// A valid message with a few bytes overwritten, or random bytes.
    fn maybe_chunked() -> impl Strategy<Value = Vec<u8>> {
        let mangled = (
            chunks(),
            extension(),
            trailers(),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        )
            .prop_map(|(c, e, t, edits)| {
                let mut body = encode(&c, e, &t);
                for (at, b) in edits {
                    let i = at.index(body.len());
                    body[i] = b;
                }
                body
            });
        prop_oneof![mangled, proptest::collection::vec(any::<u8>(), 0..64)]
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_result(
            (data, cuts) in maybe_chunked().prop_flat_map(|d| { let n = d.len(); (Just(d), cuts(n)) }),
        ) {
            prop_assert_eq!(run(&data, &cuts), whole(&data));
        }

        #[test]
        fn encoded_bodies_end_exactly_where_they_should(
            chunks in chunks(),
            ext in extension(),
            trailers in trailers(),
            next in proptest::collection::vec(any::<u8>(), 0..16),
            seed in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let body = encode(&chunks, ext, &trailers);
            let mut data = body.clone();
            data.extend_from_slice(&next);
            let mut cuts: Vec<usize> = seed.iter().map(|i| i.index(data.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(run(&data, &cuts), Ok((body.len(), true)));
        }
    }

    /// Copies one body from `buffered` and then a pipe fed `pieces` of `sent` by another task:
    /// the result, what the sink got, and what is left (buffered, then unread).
    async fn copy_through_pipe(
        sent: Vec<u8>,
        pieces: Vec<usize>,
        pipe: usize,
        buffered: &[u8],
        framing: BodyFraming,
    ) -> (Result<u64, BodyError>, Vec<u8>, Vec<u8>) {
        let (mut tx, mut rx) = duplex(pipe);
        let mut buffered = BytesMut::from(buffered);
        let writer = async move {
            let mut at = 0;
            for size in pieces.iter().chain(std::iter::repeat(&usize::MAX)) {
                if at == sent.len() {
                    break;
                }
                let to = at.saturating_add(*size).min(sent.len());
                tx.write_all(&sent[at..to]).await.unwrap();
                tokio::task::yield_now().await;
                at = to;
            }
        };
        let reader = async move {
            let mut dst = Vec::new();
            let result = copy_body(&mut rx, &mut buffered, &mut dst, framing, None).await;
            let mut rest = buffered.to_vec();
            rx.read_to_end(&mut rest).await.unwrap();
            (result, dst, rest)
        };
        tokio::join!(writer, reader).1
    }

    async fn copy_from(
        sent: &[u8],
        buffered: &[u8],
        framing: BodyFraming,
    ) -> (Result<u64, BodyError>, Vec<u8>, Vec<u8>) {
        copy_through_pipe(sent.to_vec(), vec![], 7, buffered, framing).await
    }

    #[tokio::test]
    async fn copies_a_length_body_and_leaves_the_next_request() {
        let (n, dst, rest) = copy_from(b"lo world!NEXT", b"hel", BodyFraming::Length(12)).await;
        assert_eq!(n.unwrap(), 12);
        assert_eq!(dst, b"hello world!");
        assert_eq!(rest, b"NEXT");
        let (n, dst, rest) = copy_from(b"", b"abcNEXT", BodyFraming::Length(3)).await;
        assert_eq!(
            (n.unwrap(), &dst[..], &rest[..]),
            (3, &b"abc"[..], &b"NEXT"[..])
        );
        let (n, dst, rest) = copy_from(b"x", b"y", BodyFraming::None).await;
        assert_eq!((n.unwrap(), dst.len(), &rest[..]), (0, 0, &b"yx"[..]));
        let (n, _, rest) = copy_from(b"x", b"", BodyFraming::Length(0)).await;
        assert_eq!((n.unwrap(), &rest[..]), (0, &b"x"[..]));
    }

    #[tokio::test]
    async fn copies_a_chunked_body_unchanged() {
        let body = b"5;x=y\r\nhello\r\n0\r\nTrailer: t\r\n\r\n";
        let mut sent = body[3..].to_vec();
        sent.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let (n, dst, rest) = copy_from(&sent, &body[..3], BodyFraming::Chunked).await;
        assert_eq!(n.unwrap(), body.len() as u64);
        assert_eq!(dst, body);
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn copies_until_close() {
        let (n, dst, rest) = copy_from(b" and the rest", b"head", BodyFraming::UntilClose).await;
        assert_eq!(
            (n.unwrap(), &dst[..], rest.len()),
            (17, &b"head and the rest"[..], 0)
        );
    }

    #[tokio::test]
    async fn truncated_and_malformed_bodies() {
        let (r, dst, _) = copy_from(b"hel", b"", BodyFraming::Length(5)).await;
        assert!(matches!(r, Err(BodyError::Truncated)), "{r:?}");
        assert_eq!(dst, b"hel", "what arrived was forwarded");
        let (r, _, _) = copy_from(b"5\r\nhello\r\n", b"", BodyFraming::Chunked).await;
        assert!(matches!(r, Err(BodyError::Truncated)), "{r:?}");
        let (r, dst, _) = copy_from(b"5\r\nhello\r\n0\r\n\r", b"", BodyFraming::Chunked).await;
        assert!(matches!(r, Err(BodyError::Truncated)), "{r:?}");
        assert_eq!(dst.len(), 14);
        let (r, _, _) = copy_from(b"5\r\nhelloXX", b"", BodyFraming::Chunked).await;
        let want = FramingError::Chunked {
            offset: 8,
            fault: DataEnd,
        };
        assert!(
            matches!(r, Err(BodyError::Malformed(e)) if e == want),
            "{r:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_source_times_out() {
        let (_tx, mut rx) = duplex(64);
        let mut buffered = BytesMut::from(&b"he"[..]);
        let mut dst = Vec::new();
        let started = tokio::time::Instant::now();
        let idle = Some(Duration::from_secs(5));
        let r = copy_body(
            &mut rx,
            &mut buffered,
            &mut dst,
            BodyFraming::Length(5),
            idle,
        )
        .await;
        assert!(matches!(r, Err(BodyError::Idle)), "{r:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(dst, b"he");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_sink_times_out() {
        let (mut tx, mut rx) = duplex(64);
        let (mut sink, _unread) = duplex(4);
        tx.write_all(b"hello").await.unwrap();
        let idle = Some(Duration::from_secs(5));
        let r = copy_body(
            &mut rx,
            &mut BytesMut::new(),
            &mut sink,
            BodyFraming::Length(5),
            idle,
        )
        .await;
        assert!(matches!(r, Err(BodyError::Idle)), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_sink_is_not_idle() {
        let (mut sink, mut client) = duplex(4);
        let reader = async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4];
            while got.len() < 20 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let n = client.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got
        };
        let (mut buffered, mut src) = (BytesMut::from(&[7u8; 20][..]), Broken);
        let idle = Some(Duration::from_secs(5));
        let copy = copy_body(
            &mut src,
            &mut buffered,
            &mut sink,
            BodyFraming::Length(20),
            idle,
        );
        let (copied, got) = tokio::join!(copy, reader);
        assert_eq!((copied.unwrap(), got), (20, vec![7u8; 20]));
    }

    /// A source that fails.
    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    #[tokio::test]
    async fn says_which_side_failed() {
        let r = copy_body(
            &mut Broken,
            &mut BytesMut::new(),
            &mut Vec::new(),
            BodyFraming::Chunked,
            None,
        )
        .await;
        assert!(matches!(r, Err(BodyError::Source(_))), "{r:?}");
        let (mut sink, reader) = duplex(4);
        drop(reader);
        let mut buffered = BytesMut::from(&b"hello"[..]);
        let r = copy_body(
            &mut Broken,
            &mut buffered,
            &mut sink,
            BodyFraming::Length(5),
            None,
        )
        .await;
        assert!(matches!(r, Err(BodyError::Sink(_))), "{r:?}");
    }

    /// A message (the framing and its bytes) followed by bytes of the next one.
    fn message() -> impl Strategy<Value = (BodyFraming, Vec<u8>)> {
        let length = proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| (BodyFraming::Length(b.len() as u64), b));
        let chunked = (chunks(), extension(), trailers())
            .prop_map(|(c, e, t)| (BodyFraming::Chunked, encode(&c, e, &t)));
        prop_oneof![length, chunked]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn copy_body_moves_exactly_the_body(
            (framing, body) in message(),
            next in proptest::collection::vec(any::<u8>(), 0..40),
            pipe in 1usize..64,
            pieces in proptest::collection::vec(1usize..50, 1..10),
            already in any::<prop::sample::Index>(),
        ) {
            let stream = [&body[..], &next].concat();
            let split = already.index(stream.len() + 1);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let sent = stream[split..].to_vec();
            let (n, dst, rest) =
                rt.block_on(copy_through_pipe(sent, pieces, pipe, &stream[..split], framing));
            let n = n.unwrap();
            prop_assert_eq!(n, body.len() as u64);
            prop_assert_eq!(dst, body);
            prop_assert_eq!(rest, next);
        }
    }
}
