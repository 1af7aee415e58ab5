//! The one tunnel tail, shared by CONNECT (on a fresh connection or after plain requests on a
//! keep-alive one) and SOCKS5: once a lease is held and its upstream dialled, answer the
//! client, pass on what each side sent early, splice until the tunnel ends, and record it.
//!
//! A tunnel whose copy ended in an error (an upstream reset mid-transfer, say) is closed with
//! a reset towards the client too (`SO_LINGER` 0), so a cut transfer never looks complete.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Span;

use super::held::LeaseUse;
use super::splice::{SpliceEnd, Transferred, splice_upstream};
use super::upstream::UpstreamIo;
use super::{ProxyState, Runtime, finish};
use crate::error::socks_reply;

/// How the client is told that its tunnel is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `HTTP/1.1 200 Connection established` with the lease's headers.
    Http,
    /// A SOCKS5 success reply (bound address unspecified: CONNECT clients do not use it).
    Socks5,
}

impl Reply {
    fn kind(self) -> &'static str {
        match self {
            Reply::Http => "connect",
            Reply::Socks5 => "socks5",
        }
    }

    fn bytes(self, lease: &LeaseUse) -> Vec<u8> {
        match self {
            Reply::Socks5 => vec![5, socks_reply::OK, 0, 1, 0, 0, 0, 0, 0, 0],
            Reply::Http => {
                const STATUS: &[u8] = b"HTTP/1.1 200 Connection established\r\n";
                // One allocation: the status line, the stamp's two or four lines, the end.
                let mut out = Vec::with_capacity(STATUS.len() + 160);
                out.extend_from_slice(STATUS);
                lease.write_stamp(&mut out);
                out.extend_from_slice(b"\r\n");
                out
            }
        }
    }
}

/// What a tunnel starts from.
pub struct Open {
    /// The client's connection.
    pub client: TcpStream,
    /// Bytes the client sent after its request, before the answer.
    pub client_early: Bytes,
    /// The lease the tunnel uses.
    pub lease: LeaseUse,
    /// The connection to the target through the upstream.
    pub upstream: UpstreamIo,
    /// Bytes the upstream sent after its handshake.
    pub upstream_early: Bytes,
    /// When the client connection started.
    pub started: Instant,
}

/// A tunnel whose client has been answered: what the splice needs, and nothing else (an
/// idle tunnel keeps this for its whole life).
pub struct Greeted {
    client: TcpStream,
    lease: LeaseUse,
    upstream: UpstreamIo,
    started: Instant,
    reply: Reply,
}

/// Answers the client and passes on what each side sent early: the tunnel to splice, or
/// `None` (recorded, upstream closed, lease given back) when the client could not be told.
/// A step of its own, so that its writes and the early bytes are not part of the
/// splice's future.
pub async fn greet(state: &ProxyState, reply: Reply, mut open: Open) -> Option<Greeted> {
    Span::current().record("proxy", open.lease.proxy().id.as_str());
    let greeted = open
        .client
        .write_all(&reply.bytes(&open.lease))
        .await
        .is_ok()
        && (open.client_early.is_empty()
            || open.upstream.write_all(&open.client_early).await.is_ok())
        && (open.upstream_early.is_empty()
            || open.client.write_all(&open.upstream_early).await.is_ok());
    if greeted {
        return Some(Greeted {
            client: open.client,
            lease: open.lease,
            upstream: open.upstream,
            started: open.started,
            reply,
        });
    }
    let pool = open.lease.held().lease().pool_name.clone();
    // The upstream connection closes before the lease is given back (max_concurrency).
    drop(open.upstream);
    drop(open.lease);
    finish(
        state,
        reply.kind(),
        Some(&pool),
        "client_closed",
        Transferred::default(),
        open.started,
    );
    None
}

/// A tunnel connection's future: `opening` (boxed by the caller, so that the handshake,
/// lease, dial and answer are freed once the tunnel is open), then the splice. Until then
/// this future holds the box's pointer, and afterwards only the splice.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
pub fn serve<F>(
    state: Arc<ProxyState>,
    rt: Arc<Runtime>,
    opening: Pin<Box<F>>,
) -> impl Future<Output = ()> + Send + 'static
where
    F: Future<Output = Option<Greeted>> + Send + 'static,
{
    async move {
        let tunnel = {
            let Some(greeted) = opening.await else {
                return;
            };
            run(&state, &rt, greeted)
        };
        tunnel.await;
    }
}

/// Splices until the tunnel ends, then records the connection. The upstream connection is
/// closed, then the lease given back, when the splice ends.
///
/// A plain function returning a block, not an `async fn`: an `async fn` moves its arguments
/// into locals and keeps the argument slots too, so every open tunnel would carry its
/// sockets twice; the block uses what it captured in place.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn run<'a>(
    state: &'a ProxyState,
    rt: &'a Runtime,
    mut tunnel: Greeted,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        let cancelled = tunnel.lease.cancelled();
        let (end, bytes) = splice_upstream(
            &mut tunnel.client,
            &mut tunnel.upstream,
            rt.limits(),
            cancelled,
        )
        .await;
        let pool = tunnel.lease.held().lease().pool_name.clone();
        drop(tunnel.upstream);
        drop(tunnel.lease);
        if end == SpliceEnd::Error {
            // Pass the failure on: a reset, not a clean end of stream.
            let _ = socket2::SockRef::from(&tunnel.client).set_linger(Some(Duration::ZERO));
        }
        finish(
            state,
            tunnel.reply.kind(),
            Some(&pool),
            outcome(end),
            bytes,
            tunnel.started,
        );
    }
}

/// Metric label for how a tunnel ended.
pub fn outcome(end: SpliceEnd) -> &'static str {
    match end {
        SpliceEnd::Closed => "ok",
        SpliceEnd::Error => "error",
        SpliceEnd::Idle => "idle",
        SpliceEnd::HalfClosed => "half_closed",
        SpliceEnd::Shutdown => "closed_by_proxy",
    }
}
