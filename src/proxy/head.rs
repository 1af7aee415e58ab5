//! Reading a client's first request head, within size and time limits, and giving the bytes
//! back to whoever serves the rest of the connection.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::error::ProxyError;

/// Most header lines accepted in one head.
const MAX_HEADERS: usize = 128;

/// A parsed request head: the raw bytes and where each part lies in them (no copy per
/// header).
#[derive(Debug)]
pub struct Head {
    /// The raw bytes of the head (request line to blank line).
    pub raw: Bytes,
    /// Bytes the client sent after the head.
    pub rest: Bytes,
    method: Range<usize>,
    target: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Head {
    /// Method, e.g. `CONNECT`.
    pub fn method(&self) -> &str {
        self.text(&self.method)
    }

    /// Request target as sent.
    pub fn target(&self) -> &str {
        self.text(&self.target)
    }

    /// The first value of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| self.raw[k.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.raw[v.clone()])
    }

    fn text(&self, r: &Range<usize>) -> &str {
        // Checked as UTF-8 by the parser (method and target are ASCII tokens).
        std::str::from_utf8(&self.raw[r.clone()]).unwrap_or_default()
    }
}

/// Why no head could be read.
#[derive(Debug)]
pub enum HeadError {
    /// The client closed before sending a byte: nothing to answer.
    Closed,
    /// Too slow, too large or malformed: answer 400.
    Bad(ProxyError),
    /// An I/O error: nothing to answer.
    Io(io::Error),
}

/// How a client opened its connection.
#[derive(Debug)]
pub enum Opening {
    /// An HTTP request head.
    Http(Head),
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
    match tokio::time::timeout(timeout, read_opening_inner(io, max)).await {
        Ok(r) => r,
        Err(_) => Err(HeadError::Bad(ProxyError::BadRequest(
            "request head not received in time".into(),
        ))),
    }
}

async fn read_opening_inner<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Opening, HeadError> {
    let mut buf = BytesMut::with_capacity(4096.min(max));
    loop {
        if buf.len() >= max {
            return Err(HeadError::Bad(ProxyError::BadRequest(format!(
                "request head larger than {max} bytes"
            ))));
        }
        let want = (max - buf.len()).min(8192);
        buf.reserve(want);
        let n = io
            .read_buf(&mut (&mut buf).limit(want))
            .await
            .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Bad(ProxyError::BadRequest(
                    "connection closed inside the request head".into(),
                ))
            });
        }
        if buf[0] == 5 {
            return Ok(Opening::Socks5(buf.freeze()));
        }
        if let Some(head) = parse(&mut buf)? {
            return Ok(Opening::Http(head));
        }
    }
}

fn parse(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(HeadError::Bad(ProxyError::BadRequest(format!(
                "malformed request head: {e}"
            ))));
        }
    };
    let (base, end) = (buf.as_ptr() as usize, buf.len());
    // Every part the parser returns is a slice of `buf`; anything else reads as empty.
    let span = |part: Option<&[u8]>| {
        part.and_then(|p| {
            let start = (p.as_ptr() as usize).checked_sub(base)?;
            (start + p.len() <= end).then(|| start..start + p.len())
        })
        .unwrap_or(0..0)
    };
    let method = span(req.method.map(str::as_bytes));
    let target = span(req.path.map(str::as_bytes));
    let headers = req
        .headers
        .iter()
        .map(|h| (span(Some(h.name.as_bytes())), span(Some(h.value))))
        .collect();
    let raw = buf.split_to(len).freeze();
    let rest = std::mem::take(buf).freeze();
    Ok(Some(Head {
        raw,
        rest,
        method,
        target,
        headers,
    }))
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
