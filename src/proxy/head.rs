//! Reading a client's request heads, within size and time limits (the first one tells HTTP
//! from SOCKS5; later ones come on keep-alive connections), and giving bytes read ahead back
//! to whoever serves the rest of the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::deadline::Deadline;
use super::http1::{Fields, RequestHead, take_request_reusing};
use crate::error::ProxyError;

/// Why no head could be read.
#[derive(Debug)]
pub enum HeadError {
    /// The client closed (or went quiet) before sending a byte: nothing to answer.
    Closed,
    /// Too slow, too large or malformed: answer with this error, then close.
    Bad(ProxyError),
    /// An I/O error: nothing to answer.
    Io(io::Error),
}

/// How a client opened its connection.
#[derive(Debug)]
pub enum Opening {
    /// An HTTP request head, and the bytes the client sent after it.
    Http(RequestHead, BytesMut),
    /// A SOCKS5 greeting (first byte 5; no HTTP method starts with it): the bytes read so far.
    Socks5(Bytes),
}

/// Reads what a client opens with: a SOCKS5 greeting or one request head (at most `max`
/// bytes, within `timeout`). No peek: the first read already carries the whole head of a
/// typical request.
pub async fn read_opening<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
    timeout: Duration,
) -> Result<Opening, HeadError> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK.min(max));
    let first = tokio::time::timeout(timeout, async {
        loop {
            let n = read_more(io, &mut buf, max).await?;
            if n == 0 {
                return Err(closed(&buf));
            }
            if buf[0] == 5 {
                return Ok(None);
            }
            if let Some(head) = parse_new(&mut buf, max, n, &mut Fields::new())? {
                return Ok(Some(head));
            }
        }
    })
    .await
    .map_err(|_| too_slow())??;
    Ok(match first {
        Some(head) => Opening::Http(head, buf),
        None => Opening::Socks5(buf.freeze()),
    })
}

/// Reads the next request head of a keep-alive connection into `buf` (which may already
/// hold some of it): the first byte may take until `idle` ends (`Ok(None)` if none came or
/// the client closed; set here to `idle_for` from now), the whole head then up to `timeout`. The head's header list is made in `spare`.
pub(crate) async fn read_request<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
    idle: &mut Deadline,
    idle_for: Option<Duration>,
    timeout: Duration,
    spare: &mut Fields,
) -> Result<Option<RequestHead>, HeadError> {
    if let Some(head) = parse(buf, max, spare)? {
        return Ok(Some(head));
    }
    if buf.is_empty() {
        idle.set_after(idle_for);
        let n = tokio::select! {
            biased;
            n = read_more(io, buf, max) => n?,
            () = idle.elapsed() => return Ok(None),
        };
        if n == 0 {
            return Ok(None);
        }
        // Most heads come whole in one read: no timer for them.
        if let Some(head) = parse_new(buf, max, n, spare)? {
            return Ok(Some(head));
        }
    }
    tokio::time::timeout(timeout, async {
        loop {
            let fresh = read_more(io, buf, max).await?;
            if fresh == 0 {
                return Err(closed(buf));
            }
            if let Some(head) = parse_new(buf, max, fresh, spare)? {
                return Ok(Some(head));
            }
        }
    })
    .await
    .map_err(|_| too_slow())?
}

fn too_slow() -> HeadError {
    HeadError::Bad(ProxyError::BadRequest(
        "request head not received in time".into(),
    ))
}

fn closed(buf: &BytesMut) -> HeadError {
    if buf.is_empty() {
        HeadError::Closed
    } else {
        HeadError::Bad(ProxyError::BadRequest(
            "connection closed inside the request head".into(),
        ))
    }
}

/// The first read of a connection goes into a buffer of this size: a typical head fits.
const READ_CHUNK: usize = 4096;
/// Room a head read wants: with less, the buffer first takes back the front that earlier
/// heads used, or grows (its allocation doubling), so that a head does not come in crumbs.
const MIN_ROOM: usize = READ_CHUNK / 2;

/// Reads once, at most up to `max` bytes in `buf` (one more than `max` is never needed: a
/// full buffer without a head is an error the parser reports).
///
/// The buffer grows only when it has less than [`MIN_ROOM`] left: reserving a larger read
/// up front made every connection hold 16 KiB while its first head was read, and the heap
/// kept the high-water mark of the openings under way.
async fn read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<usize, HeadError> {
    let want = max.saturating_sub(buf.len()).clamp(1, 16 * 1024);
    if buf.capacity() - buf.len() < MIN_ROOM {
        buf.reserve(want.min(MIN_ROOM));
    }
    io.read_buf(&mut (&mut *buf).limit(want))
        .await
        .map_err(HeadError::Io)
}

/// A complete head taken out of `buf`, `None` while incomplete; the strict RFC 9112 checks
/// of [`http1`](super::http1) apply to every request, the first and every later one.
fn parse(
    buf: &mut BytesMut,
    max: usize,
    spare: &mut Fields,
) -> Result<Option<RequestHead>, HeadError> {
    if buf.is_empty() {
        return Ok(None);
    }
    take_request_reusing(buf, max, spare).map_err(|e| HeadError::Bad(e.into()))
}

/// [`parse`], but only when the last `fresh` bytes read brought a line end or filled the
/// buffer: a client sending its head a byte at a time costs one scan per line, not one per
/// byte.
fn parse_new(
    buf: &mut BytesMut,
    max: usize,
    fresh: usize,
    spare: &mut Fields,
) -> Result<Option<RequestHead>, HeadError> {
    let new = &buf[buf.len().saturating_sub(fresh)..];
    if memchr::memchr(b'\n', new).is_some() || buf.len() >= max {
        parse(buf, max, spare)
    } else {
        Ok(None)
    }
}

/// An I/O object that first yields `prefix`, then reads from `inner`.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// Puts `prefix` back in front of `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// What is left of the prefix (not read yet).
    pub fn into_prefix(self) -> Bytes {
        self.prefix
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn opening_of(bytes: &[u8], max: usize) -> Result<Opening, HeadError> {
        let mut io = bytes;
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(read_opening(&mut io, max, SECOND))
    }

    #[test]
    fn a_small_opening_head_is_read_into_one_small_buffer() {
        let Ok(Opening::Http(head, rest)) = opening_of(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            64 * 1024,
        ) else {
            panic!("not a head");
        };
        assert_eq!(head.target(), "example.com:443");
        assert!(rest.is_empty());
        // What the connection holds while its opening is served: no more than one chunk.
        assert!(rest.capacity() <= READ_CHUNK, "{}", rest.capacity());
    }

    #[test]
    fn a_head_larger_than_one_chunk_grows_the_buffer_and_keeps_what_follows() {
        let mut raw = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n".to_vec();
        for i in 0..40 {
            raw.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "v".repeat(400)).as_bytes());
        }
        raw.extend_from_slice(b"\r\nearly");
        assert!(raw.len() > 4 * READ_CHUNK);
        let opening = opening_of(&raw, 64 * 1024);
        let Ok(Opening::Http(head, rest)) = opening else {
            panic!("not a head: {opening:?}");
        };
        assert_eq!(head.target(), "http://example.com/");
        assert_eq!(&rest[..], b"early");
    }

    #[test]
    fn a_head_over_the_limit_is_refused() {
        let mut raw = b"GET http://example.com/ HTTP/1.1\r\n".to_vec();
        raw.extend_from_slice(format!("X-Big: {}\r\n\r\n", "v".repeat(8000)).as_bytes());
        assert!(matches!(
            opening_of(&raw, 4096),
            Err(HeadError::Bad(ProxyError::HeadTooLarge(_)))
        ));
    }
}
