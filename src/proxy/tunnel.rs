//! The one tunnel tail, shared by CONNECT (on a fresh connection or after plain requests on a
//! keep-alive one) and SOCKS5: once a lease is held and its upstream dialled, answer the
//! client, pass on what each side sent early, splice until the tunnel ends, and record it.
//!
//! A tunnel whose copy ended in an error (an upstream reset mid-transfer, say) is closed with
//! a reset towards the client too (`SO_LINGER` 0), so a cut transfer never looks complete.

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
                let mut out = b"HTTP/1.1 200 Connection established\r\n".to_vec();
                for (k, v) in lease.stamp() {
                    out.extend_from_slice(k.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(v.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
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

/// Answers the client, splices until the tunnel ends, then records the connection. The
/// lease is given back when this returns (its `LeaseUse` is dropped here).
pub async fn run(state: &ProxyState, rt: &Runtime, reply: Reply, open: Open) {
    let Open {
        mut client,
        client_early,
        lease,
        mut upstream,
        upstream_early,
        started,
    } = open;
    let pool = lease.held().lease().pool_name.clone();
    Span::current().record("proxy", lease.proxy().id.as_str());
    let greeted = client.write_all(&reply.bytes(&lease)).await.is_ok()
        && (client_early.is_empty() || upstream.write_all(&client_early).await.is_ok())
        && (upstream_early.is_empty() || client.write_all(&upstream_early).await.is_ok());
    if !greeted {
        // The upstream connection closes before the lease is given back (max_concurrency).
        drop(upstream);
        drop(lease);
        return finish(
            state,
            reply.kind(),
            Some(&pool),
            "client_closed",
            Transferred::default(),
            started,
        );
    }
    drop((client_early, upstream_early));
    let (end, bytes) = splice_upstream(&mut client, upstream, rt.limits(), lease.cancelled()).await;
    drop(lease);
    if end == SpliceEnd::Error {
        // Pass the failure on: a reset, not a clean end of stream.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    }
    finish(
        state,
        reply.kind(),
        Some(&pool),
        outcome(end),
        bytes,
        started,
    );
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
