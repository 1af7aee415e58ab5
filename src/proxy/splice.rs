//! Copying bytes both ways between a client and an upstream until either side closes, the
//! tunnel goes idle, or the daemon shuts down; counting the bytes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// One side closed and the other finished.
    Closed,
    /// An I/O error on either side.
    Error,
    /// No byte either way for the idle limit.
    Idle,
    /// The daemon is shutting down.
    Shutdown,
}

/// Bytes moved by a splice.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client to upstream.
    pub tx: u64,
    /// Upstream to client.
    pub rx: u64,
}

/// Counts bytes read through it and stamps the time of the last read.
struct Counted<'a, T> {
    inner: &'a mut T,
    bytes: &'a AtomicU64,
    last: &'a AtomicU64,
    start: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.bytes.fetch_add(n, Ordering::Relaxed);
            self.last
                .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Splices `client` and `upstream` until the end; returns how it ended and the byte counts.
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Option<Duration>,
    cancel: &CancellationToken,
) -> (SpliceEnd, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, rx, last) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    let mut c = Counted {
        inner: client,
        bytes: &tx,
        last: &last,
        start,
    };
    let mut u = Counted {
        inner: upstream,
        bytes: &rx,
        last: &last,
        start,
    };
    let end = {
        let copy = tokio::io::copy_bidirectional(&mut c, &mut u);
        tokio::pin!(copy);
        let mut deadline = idle.map(|d| start + d);
        loop {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut copy => break if r.is_ok() { SpliceEnd::Closed } else { SpliceEnd::Error },
                () = cancel.cancelled() => break SpliceEnd::Shutdown,
                () = sleep => {
                    let idle = idle.expect("a deadline implies an idle limit");
                    let last = start + Duration::from_millis(last.load(Ordering::Relaxed));
                    if Instant::now() >= last + idle {
                        break SpliceEnd::Idle;
                    }
                    deadline = Some(last + idle);
                }
            }
        }
    };
    (
        end,
        Transferred {
            tx: tx.load(Ordering::Relaxed),
            rx: rx.load(Ordering::Relaxed),
        },
    )
}
