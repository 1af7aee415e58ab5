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
            (State::TrailerLf, _) => Err(ChunkFault::LineEnding),
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
    /// No read or write completed within the idle timeout.
    #[error("body idle")]
    Idle,
}

/// Copies one body framed by `framing` from `buffered` (bytes already read past the head) and
/// then `src` to `dst`, unchanged (chunk lines and trailers included), and returns how many
/// bytes it wrote. Bytes past the body stay in `buffered`, for the next message. No read or
/// write may wait longer than `idle`.
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

    /// Writes the first `n` buffered bytes and drops them from the buffer.
    async fn send(&mut self, n: usize) -> Result<(), BodyError> {
        if n == 0 {
            return Ok(());
        }
        timed(self.idle, self.dst.write_all(&self.buffered[..n]))
            .await?
            .map_err(BodyError::Sink)?;
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
