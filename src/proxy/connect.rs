//! CONNECT tunnels on the raw client socket: identify, lease, dial through the upstream and
//! finish its handshake, and only then answer 200 and splice (the tail is in `tunnel.rs`). A
//! client that goes away while we wait for a lease or an upstream stops the work at once.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Span, debug};

use bytes::BytesMut;

use super::http1::RequestHead;
use super::splice::Transferred;
use super::tunnel::{self, Open, Reply};
use super::{DialMode, ProxyState, Runtime, finish, record_identity, reply_error};
use crate::target::Target;

/// Handles a CONNECT whose head has been read.
pub async fn handle(
    state: &Arc<ProxyState>,
    rt: &Runtime,
    mut client: TcpStream,
    head: RequestHead,
    rest: BytesMut,
) {
    let started = Instant::now();
    Span::current().record("kind", "connect");
    // Boxed: the identification, lease and dial state is freed once the tunnel is open,
    // instead of sizing the connection's future for its whole life.
    let prepared = Box::pin(async {
        let target = Target::parse_authority(head.target())?;
        let id = super::identify(&rt.auth, &head)?;
        record_identity(&id, &target, None);
        let (lease, upstream, early) = state
            .lease_and_dial(rt, &id, &target, DialMode::Tunnel, &[])
            .await?;
        Ok::<_, crate::error::ProxyError>((lease, upstream, early))
    });
    let result = tokio::select! {
        biased;
        r = prepared => r,
        () = client_gone(&client) => {
            debug!("client left during the upstream handshake");
            return finish(state, "connect", None, "client_closed", Transferred::default(), started);
        }
    };
    // The head (and the read buffer it shares) is not kept for the tunnel's life.
    drop(head);
    let (lease, upstream, upstream_early) = match result {
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
    let open = Open {
        client,
        client_early: rest.freeze(),
        lease,
        upstream,
        upstream_early,
        started,
    };
    tunnel::run(state, rt, Reply::Http, open).await;
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
