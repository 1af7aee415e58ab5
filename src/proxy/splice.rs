//! Copying bytes both ways between a client and an upstream until both sides close, the
//! tunnel goes idle, or the daemon shuts down; counting the bytes.
//!
//! Half-close is honoured (an EOF from one side is passed on as a write shutdown and the other
//! direction keeps flowing), but once a side has closed, the idle window shrinks to
//! [`HALF_CLOSE_GRACE`]: a peer that stays silent after its partner left would otherwise keep
//! a lease for the whole idle timeout, while a download still flowing is not cut.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Idle window once one side reached EOF.
pub const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// One side closed and the other finished.
    Closed,
    /// An I/O error on either side.
    Error,
    /// No byte either way for the idle limit.
    Idle,
    /// One side closed and the other stayed silent for the grace period.
    HalfClosed,
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

/// Counts bytes read through it, stamps the time of the last read, and signals EOF.
struct Counted<'a, T> {
    inner: &'a mut T,
    bytes: &'a AtomicU64,
    last: &'a AtomicU64,
    eof: &'a Notify,
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
        } else if matches!(r, Poll::Ready(Ok(()))) && buf.remaining() > 0 {
            // A read that filled nothing into a non-full buffer is EOF.
            self.eof.notify_one();
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
    let eof = Notify::new();
    let start = Instant::now();
    let mut c = Counted {
        inner: client,
        bytes: &tx,
        last: &last,
        eof: &eof,
        start,
    };
    let mut u = Counted {
        inner: upstream,
        bytes: &rx,
        last: &last,
        eof: &eof,
        start,
    };
    let end = {
        let copy = tokio::io::copy_bidirectional(&mut c, &mut u);
        tokio::pin!(copy);
        // The idle window: the configured limit, shortened to the grace once a side closed.
        let grace = idle.map_or(HALF_CLOSE_GRACE, |i| i.min(HALF_CLOSE_GRACE));
        let mut half_closed = false;
        let mut window = idle;
        let mut deadline = window.map(|d| start + d);
        loop {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let last_activity = || start + Duration::from_millis(last.load(Ordering::Relaxed));
            tokio::select! {
                r = &mut copy => break if r.is_ok() { SpliceEnd::Closed } else { SpliceEnd::Error },
                () = cancel.cancelled() => break SpliceEnd::Shutdown,
                () = eof.notified(), if !half_closed => {
                    half_closed = true;
                    window = Some(grace);
                    deadline = Some(Instant::now().max(last_activity()) + grace);
                }
                () = sleep => {
                    let w = window.expect("a deadline implies a window");
                    if Instant::now() >= last_activity() + w {
                        break if half_closed { SpliceEnd::HalfClosed } else { SpliceEnd::Idle };
                    }
                    deadline = Some(last_activity() + w);
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
