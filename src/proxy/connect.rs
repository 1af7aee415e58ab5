//! CONNECT tunnels on the raw client socket: identify, lease, dial through the upstream and
//! finish its handshake, and only then answer 200 and splice (the tail is in `tunnel.rs`). A
//! client that goes away while we wait for a lease or an upstream stops the work at once.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use tokio::io::ReadBuf;
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
///
/// The opening step (identification, lease, dial and the client's answer, or the error
/// answer) is a boxed future of its own, made here before anything is awaited: it takes the
/// client socket, the head and the read buffer with it, and is freed once the tunnel is
/// open. The tunnel's future thus holds only what the tunnel needs, not the opening's state
/// nor this function's arguments, for the connection's whole life. State and runtime are
/// owned, so the caller can box the future as the connection's kind as soon as the head is
/// read.
pub fn handle(
    state: Arc<ProxyState>,
    rt: Arc<Runtime>,
    client: TcpStream,
    head: RequestHead,
    rest: BytesMut,
) -> impl Future<Output = ()> + Send + 'static {
    let opening = {
        let (state, rt) = (state.clone(), rt.clone());
        Box::pin(async move {
            let open = open(&state, &rt, client, head, rest).await?;
            tunnel::greet(&state, Reply::Http, open).await
        })
    };
    tunnel::serve(state, rt, opening)
}

/// Identifies, leases and dials: what the tunnel starts from, or `None` once the client has
/// been answered (or has left).
async fn open(
    state: &Arc<ProxyState>,
    rt: &Runtime,
    mut client: TcpStream,
    head: RequestHead,
    rest: BytesMut,
) -> Option<Open> {
    let started = Instant::now();
    Span::current().record("kind", "connect");
    let prepared = async {
        let target = Target::parse_authority(head.target())?;
        let id = super::identify(&rt.auth, &head)?;
        record_identity(&id, &target, None);
        let (lease, upstream, early) = state
            .lease_and_dial(rt, &id, &target, DialMode::Tunnel, &[])
            .await?;
        Ok::<_, crate::error::ProxyError>((lease, upstream, early))
    };
    let result = tokio::select! {
        biased;
        r = prepared => r,
        () = client_gone(&client) => {
            debug!("client left during the upstream handshake");
            finish(state, "connect", None, "client_closed", Transferred::default(), started);
            return None;
        }
    };
    match result {
        Ok((lease, upstream, upstream_early)) => Some(Open {
            client,
            client_early: rest.freeze(),
            lease,
            upstream,
            upstream_early,
            started,
        }),
        Err(e) => {
            finish(
                state,
                "connect",
                None,
                e.code(),
                Transferred::default(),
                started,
            );
            reply_error(&mut client, &e).await;
            None
        }
    }
}

/// Resolves when the client has closed its side (or failed); never if it sent data. Waits
/// in the socket's own reader slot (no waiter list to join and leave).
pub fn client_gone(client: &TcpStream) -> impl Future<Output = ()> + '_ {
    let mut sent_data = false;
    std::future::poll_fn(move |cx| {
        if sent_data {
            return Poll::Pending;
        }
        let mut byte = [0u8; 1];
        match client.poll_peek(cx, &mut ReadBuf::new(&mut byte)) {
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(_)) => {
                sent_data = true;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    })
}
