//! CONNECT tunnels on the raw client socket: identify, lease, dial through the upstream and
//! finish its handshake, and only then answer 200 and splice. A client that goes away while
//! we wait for a lease or an upstream stops the work at once.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::head::Head;
use super::splice::splice;
use super::{DialMode, ProxyState, parse_authority, reply_error};

/// Handles a CONNECT whose head has been read.
pub async fn handle(state: &Arc<ProxyState>, mut client: TcpStream, head: Head) {
    let prepared = async {
        let target = parse_authority(&head.target)?;
        let id = head.identify(&state.auth)?;
        let (held, upstream, early) = state.lease_and_dial(&id, &target, DialMode::Tunnel).await?;
        Ok((target, id, held, upstream, early))
    };
    let result = tokio::select! {
        r = prepared => r,
        () = client_gone(&client) => {
            debug!("client left during the upstream handshake");
            return;
        }
    };
    let (target, id, held, mut upstream, early) = match result {
        Ok(ok) => ok,
        Err(e) => return reply_error(&mut client, &e).await,
    };
    let reply = format!(
        "HTTP/1.1 200 Connection established\r\nX-Pharox-Proxy-Id: {}\r\nX-Pharox-Lease-Id: {}\r\n\r\n",
        held.proxy().id,
        held.lease_id()
    );
    if client.write_all(reply.as_bytes()).await.is_err()
        || (!head.rest.is_empty() && upstream.write_all(&head.rest).await.is_err())
        || (!early.is_empty() && client.write_all(&early).await.is_err())
    {
        return;
    }
    let (end, bytes) = splice(
        &mut client,
        &mut upstream,
        state.limits.idle_timeout(),
        &state.cancel,
    )
    .await;
    info!(
        consumer = %id.consumer, pool = %id.pool, proxy = %held.proxy().id, target = %target.authority(),
        tx = bytes.tx, rx = bytes.rx, outcome = ?end, "tunnel closed"
    );
    drop(held);
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
