//! Reading a client's first request head, within size and time limits, and giving the bytes
//! back to whoever serves the rest of the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::error::ProxyError;

/// Most header lines accepted in one head.
const MAX_HEADERS: usize = 128;

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// Method, e.g. `CONNECT`.
    pub method: String,
    /// Request target as sent.
    pub target: String,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The raw bytes of the head (request line to blank line).
    pub raw: Bytes,
    /// Bytes the client sent after the head.
    pub rest: Bytes,
}

impl Head {
    /// The first value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
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

/// Reads one request head from `io` (at most `max` bytes, within `timeout`).
pub async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
    timeout: Duration,
) -> Result<Head, HeadError> {
    match tokio::time::timeout(timeout, read_head_inner(io, max)).await {
        Ok(r) => r,
        Err(_) => Err(HeadError::Bad(ProxyError::BadRequest(
            "request head not received in time".into(),
        ))),
    }
}

async fn read_head_inner<R: AsyncRead + Unpin>(io: &mut R, max: usize) -> Result<Head, HeadError> {
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
        if let Some(head) = parse(&mut buf)? {
            return Ok(head);
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
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default().to_owned();
    let headers = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let raw = buf.split_to(len).freeze();
    let rest = std::mem::take(buf).freeze();
    Ok(Some(Head {
        method,
        target,
        headers,
        raw,
        rest,
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
