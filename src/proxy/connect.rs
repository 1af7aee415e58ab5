//! CONNECT tunnels on the raw client socket: identify, lease, dial through the upstream and
//! finish its handshake, and only then answer 200 and splice. A client that goes away while
//! we wait for a lease or an upstream stops the work at once.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Span, debug};

use super::head::Head;
use super::splice::{SpliceEnd, Transferred};
use super::{DialMode, ProxyState, Runtime, finish, parse_authority, record_identity, reply_error};

/// Handles a CONNECT whose head has been read.
pub async fn handle(state: &Arc<ProxyState>, rt: &Runtime, mut client: TcpStream, head: Head) {
    let started = Instant::now();
    Span::current().record("kind", "connect");
    let prepared = async {
        let target = parse_authority(head.target())?;
        let id = head.identify(&rt.auth)?;
        record_identity(&id, &target, None);
        let (held, upstream, early) = state
            .lease_and_dial(rt, &id, &target, DialMode::Tunnel, &[])
            .await?;
        Ok::<_, crate::error::ProxyError>((id, held, upstream, early))
    };
    let result = tokio::select! {
        biased;
        r = prepared => r,
        () = client_gone(&client) => {
            debug!("client left during the upstream handshake");
            return finish(state, "connect", None, "client_closed", Transferred::default(), started);
        }
    };
    let (id, held, mut upstream, early) = match result {
        Ok(ok) => ok,
        Err(e) => {
            finish(
                state,
                "connect",
                None,
                e.code(),
                Transferred::default(),
                started,
            );
            return reply_error(&mut client, &e).await;
        }
    };
    Span::current().record("proxy", held.proxy().id.as_str());
    let mut reply = format!(
        "HTTP/1.1 200 Connection established\r\nX-Pharox-Proxy-Id: {}\r\nX-Pharox-Lease-Id: {}\r\n",
        held.proxy().id,
        held.lease_id()
    );
    for (k, v) in held.session_headers() {
        reply.push_str(&format!("{k}: {v}\r\n"));
    }
    reply.push_str("\r\n");
    if client.write_all(reply.as_bytes()).await.is_err()
        || (!head.rest.is_empty() && upstream.write_all(&head.rest).await.is_err())
        || (!early.is_empty() && client.write_all(&early).await.is_err())
    {
        return finish(
            state,
            "connect",
            Some(&id.pool),
            "client_closed",
            Transferred::default(),
            started,
        );
    }
    drop((early, head));
    let (end, bytes) =
        super::splice::splice_upstream(&mut client, upstream, rt.limits(), &held.cancel).await;
    drop(held);
    finish(
        state,
        "connect",
        Some(&id.pool),
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

/// Resolves when the client has closed its side (or failed); never if it sent data.
pub async fn client_gone(client: &TcpStream) {
    let mut b = [0u8; 1];
    loop {
        if client.readable().await.is_err() {
            return;
        }
        match client.peek(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(_) => std::future::pending::<()>().await,
        }
    }
}
