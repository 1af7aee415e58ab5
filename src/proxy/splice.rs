//! Copying bytes both ways between a client and an upstream until both sides close, the
//! tunnel goes idle, or the daemon shuts down; counting the bytes.
//!
//! Half-close is honoured (an EOF from one side is passed on as a write shutdown and the other
//! direction keeps flowing), but once a side has closed, the idle window shrinks to
//! [`HALF_CLOSE_GRACE`]: a peer that stays silent after its partner left would otherwise keep
//! a lease for the whole idle timeout, while a download still flowing is not cut.
//!
//! Between two plain TCP sockets ([`splice_tcp`]) a direction waits for readability *without*
//! a buffer and borrows one (64 KiB, from a per-thread pool) only while bytes flow: an idle
//! tunnel costs no copy buffer at all, and a busy one copies in large chunks. On Linux, a
//! direction whose read fills the whole buffer is a bulk transfer and moves on to `splice(2)`
//! through a pooled pipe: bytes go from one socket to the other inside the kernel, never
//! copied into this process (small exchanges stay on read/write, which costs fewer system
//! calls for them). Other streams (TLS upstreams, upgraded hyper connections) use tokio's
//! `copy_bidirectional`.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Idle window once one side reached EOF.
pub const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Copy buffer size of the TCP fast path.
const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per thread for reuse.
const POOL_MAX: usize = 32;

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed.
    Closed,
    /// An I/O error on either side.
    Error,
    /// No byte either way for the idle limit.
    Idle,
    /// One side closed and the other stayed silent for the grace period.
    HalfClosed,
    /// Closed by the daemon (shutdown or an operator).
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

/// What both directions report: bytes, last activity (ms since start), EOFs.
struct Activity {
    tx: AtomicU64,
    rx: AtomicU64,
    last: AtomicU64,
    eof: Notify,
    /// Directions that reached EOF (TCP path).
    eofs: AtomicU8,
    start: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            tx: AtomicU64::new(0),
            rx: AtomicU64::new(0),
            last: AtomicU64::new(0),
            eof: Notify::new(),
            eofs: AtomicU8::new(0),
            start: Instant::now(),
        }
    }

    fn moved(&self, counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    fn transferred(&self) -> Transferred {
        Transferred {
            tx: self.tx.load(Ordering::Relaxed),
            rx: self.rx.load(Ordering::Relaxed),
        }
    }
}

/// Runs `copy` until it ends, the tunnel idles (or half-closes and goes quiet), or `cancel`.
///
/// `copy` is pinned by the caller: taken by value, it would be stored twice in this future
/// (as the argument and as the pinned local), which every open tunnel would pay for.
async fn supervise<F: Future<Output = io::Result<()>>>(
    mut copy: Pin<&mut F>,
    act: &Activity,
    idle: Option<Duration>,
    cancel: &CancellationToken,
) -> SpliceEnd {
    // The idle window: the configured limit, shortened to the grace once a side closed.
    let grace = idle.map_or(HALF_CLOSE_GRACE, |i| i.min(HALF_CLOSE_GRACE));
    let mut half_closed = false;
    let mut window = idle;
    let mut deadline = window.map(|d| act.start + d);
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = copy.as_mut() => return if r.is_ok() { SpliceEnd::Closed } else { SpliceEnd::Error },
            () = cancel.cancelled() => return SpliceEnd::Shutdown,
            () = act.eof.notified(), if !half_closed => {
                half_closed = true;
                window = Some(grace);
                deadline = Some(Instant::now().max(act.last_activity()) + grace);
            }
            () = sleep => {
                let w = window.expect("a deadline implies a window");
                if Instant::now() >= act.last_activity() + w {
                    return if half_closed { SpliceEnd::HalfClosed } else { SpliceEnd::Idle };
                }
                deadline = Some(act.last_activity() + w);
            }
        }
    }
}

/// Counts bytes read through it, stamps the time of the last read, and signals EOF.
struct Counted<'a, T> {
    inner: &'a mut T,
    bytes: &'a AtomicU64,
    act: &'a Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.act.moved(self.bytes, n);
        } else if matches!(r, Poll::Ready(Ok(()))) && buf.remaining() > 0 {
            // A read that filled nothing into a non-full buffer is EOF.
            self.act.eof.notify_one();
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

/// Splices any two streams (tokio's `copy_bidirectional`, 8 KiB buffers per direction).
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
    let act = Activity::new();
    let mut c = Counted {
        inner: client,
        bytes: &act.tx,
        act: &act,
    };
    let mut u = Counted {
        inner: upstream,
        bytes: &act.rx,
        act: &act,
    };
    let copy = std::pin::pin!(async {
        tokio::io::copy_bidirectional(&mut c, &mut u)
            .await
            .map(|_| ())
    });
    let end = supervise(copy, &act, idle, cancel).await;
    (end, act.transferred())
}

/// Splices two TCP sockets, holding a copy buffer only while bytes flow; bulk transfers go
/// through `splice(2)` when `zero_copy` is on (and the platform has it).
pub async fn splice_tcp(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Option<Duration>,
    zero_copy: bool,
    cancel: &CancellationToken,
) -> (SpliceEnd, Transferred) {
    let act = Activity::new();
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let zero_copy = zero_copy && zero_copy::AVAILABLE;
    let copy = std::pin::pin!(async {
        tokio::try_join!(
            pump(&mut cr, &mut uw, &act.tx, &act, zero_copy),
            pump(&mut ur, &mut cw, &act.rx, &act, zero_copy)
        )
        .map(|_| ())
    });
    let end = supervise(copy, &act, idle, cancel).await;
    (end, act.transferred())
}

/// Splices a client socket with an upstream connection: the buffer-free TCP path when the
/// upstream is plain TCP, the generic one otherwise. Idle timeout and zero-copy come from
/// `limits`.
pub async fn splice_upstream(
    client: &mut TcpStream,
    upstream: &mut super::upstream::UpstreamIo,
    limits: &crate::config::LimitsConfig,
    cancel: &CancellationToken,
) -> (SpliceEnd, Transferred) {
    let idle = limits.idle_timeout();
    match upstream {
        super::upstream::UpstreamIo::Tcp(tcp) => {
            splice_tcp(client, tcp, idle, limits.zero_copy, cancel).await
        }
        // Boxed: its copy state would size every plain-TCP tunnel's future too.
        other => Box::pin(splice(client, other, idle, cancel)).await,
    }
}

/// One direction: wait for data without a buffer, then copy with a pooled one while reads
/// fill it; pass EOF on as a write shutdown.
///
/// Waiting is all an idle direction does, so that is all its future holds: the readiness
/// wait is the socket's own reader slot (no waiter node), and the copying runs as a boxed
/// burst, allocated while bytes flow (one allocation per burst, next to its system calls)
/// instead of sizing every idle tunnel's future by the copy loop's state.
///
/// Reads go through `poll_read`, which marks the socket not-ready after a short read, so a
/// drained socket costs no extra `EAGAIN` read: the next wait goes straight to the poller.
///
/// Every round spends a unit of the task's cooperative budget: waiting for readiness does
/// not, so without it a read refused for lack of budget would loop here without ever
/// yielding, and a long transfer would starve the other connections of its thread.
async fn pump(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    bytes: &AtomicU64,
    act: &Activity,
    zero_copy: bool,
) -> io::Result<()> {
    // Set once a read fills the buffer: from then on this direction splices.
    let mut bulk = false;
    loop {
        tokio::task::coop::consume_budget().await;
        std::future::poll_fn(|cx| src.as_ref().poll_read_ready(cx)).await?;
        let burst = if bulk {
            Box::pin(zero_copy::burst(src.as_ref(), dst.as_ref(), bytes, act)).await?
        } else {
            Box::pin(copy_burst(src, dst, bytes, act, zero_copy)).await?
        };
        match burst {
            Burst::Drained => {}
            Burst::Eof => return pass_eof(dst, act).await,
            Burst::Unsupported => bulk = false,
            Burst::Bulk => bulk = true,
        }
    }
}

/// Copies what `src` has now into `dst` through a pooled buffer: until a read comes short
/// (drained) or, with `zero_copy`, fills the buffer (a bulk transfer: splice from now on).
async fn copy_burst(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    bytes: &AtomicU64,
    act: &Activity,
    zero_copy: bool,
) -> io::Result<Burst> {
    let mut buf = take_buffer();
    let burst = loop {
        match read_now(src, &mut buf).await {
            Ok(None) => break Ok(Burst::Drained),
            Ok(Some(0)) => break Ok(Burst::Eof),
            Ok(Some(n)) => {
                act.moved(bytes, n);
                if let Err(e) = dst.write_all(&buf[..n]).await {
                    break Err(e);
                }
                if n < buf.len() {
                    break Ok(Burst::Drained); // Wait for the poller again.
                }
                if zero_copy {
                    break Ok(Burst::Bulk); // Still readable: the splice takes over at once.
                }
            }
            Err(e) => break Err(e),
        }
    };
    give_back(buf);
    burst
}

/// Passes an EOF on. The second EOF needs no shutdown: both sockets close right after, and
/// close sends the FIN.
async fn pass_eof(dst: &mut WriteHalf<'_>, act: &Activity) -> io::Result<()> {
    act.eof.notify_one();
    if act.eofs.fetch_add(1, Ordering::Relaxed) == 0 {
        dst.shutdown().await
    } else {
        Ok(())
    }
}

/// How a zero-copy burst ended.
enum Burst {
    /// The source has nothing more for now.
    Drained,
    /// The source reached EOF.
    Eof,
    /// No pipe could be had, or the kernel cannot splice these sockets: copy instead.
    Unsupported,
    /// A copy filled its whole buffer: splice from now on.
    Bulk,
}

/// `splice(2)` between TCP sockets through a pipe (Linux).
#[cfg(target_os = "linux")]
mod zero_copy {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::AtomicU64;

    use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Activity, Burst};

    /// Splicing is available on this platform.
    pub const AVAILABLE: bool = true;
    /// Pipes kept per thread for reuse (two descriptors each).
    const PIPES_MAX: usize = 16;
    /// Bytes asked for per splice (the pipe's default capacity).
    const CHUNK: usize = 64 * 1024;

    /// A pipe with nothing in it.
    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    thread_local! {
        static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    fn take_pipe() -> io::Result<Pipe> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
        Ok(Pipe { read, write })
    }

    /// Keeps an empty pipe for the next burst.
    fn give_back(pipe: Pipe) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < PIPES_MAX {
                p.push(pipe);
            }
        });
    }

    /// Moves what `src` has into `dst` through a pipe until `src` would block or ends. The
    /// pipe is emptied into `dst` after every read, so it goes back to the pool empty; on an
    /// error (or if this future is dropped) it is closed with whatever it held.
    pub async fn burst(
        src: &TcpStream,
        dst: &TcpStream,
        bytes: &AtomicU64,
        act: &Activity,
    ) -> io::Result<Burst> {
        let Ok(pipe) = take_pipe() else {
            // Out of descriptors (or pipe memory): this direction copies instead.
            return Ok(Burst::Unsupported);
        };
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        loop {
            let into_pipe = src.try_io(Interest::READABLE, || {
                Ok(splice(src, None, &pipe.write, None, CHUNK, flags)?)
            });
            let n = match into_pipe {
                Ok(0) => {
                    give_back(pipe);
                    return Ok(Burst::Eof);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    give_back(pipe);
                    return Ok(Burst::Drained);
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    give_back(pipe);
                    return Ok(Burst::Unsupported);
                }
                Err(e) => return Err(e),
            };
            act.moved(bytes, n);
            tokio::task::coop::consume_budget().await;
            let mut left = n;
            while left > 0 {
                dst.writable().await?;
                let out_of_pipe = dst.try_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe.read, None, dst, None, left, flags)?)
                });
                match out_of_pipe {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Elsewhere: always copy.
#[cfg(not(target_os = "linux"))]
mod zero_copy {
    use std::io;
    use std::sync::atomic::AtomicU64;

    use tokio::net::TcpStream;

    use super::{Activity, Burst};

    /// Splicing is not available on this platform.
    pub const AVAILABLE: bool = false;

    pub async fn burst(
        _: &TcpStream,
        _: &TcpStream,
        _: &AtomicU64,
        _: &Activity,
    ) -> io::Result<Burst> {
        Ok(Burst::Unsupported)
    }
}

/// Reads what is there now: `None` if nothing is (the socket is then marked not-ready).
async fn read_now(src: &mut ReadHalf<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *src).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Ready(Ok(None)),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(rb.filled().len()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    })
    .await
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A fast source and a fast sink on the copy path: the pump must give its thread back
    /// when its cooperative budget runs out, not spin on a socket it may not read yet.
    #[test]
    fn copy_path_yields_when_its_budget_runs_out() {
        const TOTAL: usize = 64 << 20;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (mut client, mut client_peer) = pair().await;
                let (mut upstream, mut upstream_peer) = pair().await;
                tokio::spawn(async move {
                    let chunk = vec![7u8; 1 << 20];
                    for _ in 0..TOTAL >> 20 {
                        upstream_peer.write_all(&chunk).await.unwrap();
                    }
                });
                let sink = tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut got = 0;
                    while got < TOTAL {
                        got += client_peer.read(&mut buf).await.unwrap();
                    }
                    got
                });
                let cancel = CancellationToken::new();
                let splice = tokio::spawn(async move {
                    super::splice_tcp(&mut client, &mut upstream, None, false, &cancel).await
                });
                let got = sink.await.unwrap();
                splice.abort();
                let _ = done_tx.send(got);
            });
        });
        let got = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the copy stalled: a pump spun without yielding");
        assert_eq!(got, TOTAL);
    }
}
