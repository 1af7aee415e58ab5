//! SOCKS5 on the proxy port (RFC 1928, username/password auth RFC 1929), told apart from HTTP
//! by its first byte (5). The username carries the same grammar as the HTTP one, and leasing,
//! failover, limits and metrics (`kind="socks5"`) are shared with CONNECT.
//!
//! Error mapping (reply field of the SOCKS5 answer; the mapping itself is
//! `ProxyError::socks_reply`):
//!
//! | situation | answer |
//! |---|---|
//! | past `limits.max_connections` | method `0xFF`, close |
//! | auth required but the client offers no username/password method | method `0xFF` |
//! | credentials missing, wrong, or a bad username | RFC 1929 status `0x01`, close |
//! | pool exhausted, unknown or forbidden pool, destination denied, session limit | `0x02` not allowed by ruleset |
//! | every upstream refused or failed | `0x05` connection refused |
//! | an upstream could not reach the host | `0x04` host unreachable |
//! | upstream timed out | `0x06` TTL expired |
//! | BIND, UDP ASSOCIATE, any other command | `0x07` command not supported |
//! | unknown address type | `0x08` address type not supported |
//! | malformed request (a domain that is not an IP literal or LDH name, port 0), storage unavailable, out of local resources | `0x01` general failure |

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Span, debug};

use super::head::Rewind;
use super::splice::Transferred;
use super::tunnel::{self, Open, Reply};
use super::{DialMode, ProxyState, Runtime, finish, record_identity};
use crate::error::{ProxyError, socks_reply as rep};
use crate::target::{Host, Target, canonical};

/// Why the handshake stopped before a tunnel.
enum Stop {
    /// Answered (or nothing to answer); the code is for metrics.
    Done(&'static str),
    /// Answer with this reply code.
    Reply(u8, &'static str),
}

impl From<std::io::Error> for Stop {
    fn from(_: std::io::Error) -> Self {
        Stop::Done("client_closed")
    }
}

/// Serves a SOCKS5 client whose first bytes (`greeting`, starting with 5) have been read.
///
/// As for CONNECT, the handshake, lease, dial and answer run in a boxed opening step, freed
/// once the tunnel is open: an open tunnel's future holds only the splice.
pub fn handle(
    state: Arc<ProxyState>,
    rt: Arc<Runtime>,
    client: TcpStream,
    greeting: Bytes,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let opening = {
        let (state, rt) = (state.clone(), rt.clone());
        Box::pin(async move {
            let open = open(&state, &rt, client, greeting).await?;
            tunnel::greet(&state, Reply::Socks5, open).await
        })
    };
    tunnel::serve(state, rt, opening)
}

/// Negotiates, leases and dials: what the tunnel starts from, or `None` once the client has
/// been answered (or has left).
async fn open(
    state: &Arc<ProxyState>,
    rt: &Runtime,
    mut client: TcpStream,
    greeting: Bytes,
) -> Option<Open> {
    let started = Instant::now();
    Span::current().record("kind", "socks5");
    let limits = rt.limits();
    // Small reads of the handshake come from one buffer; what the client sent past its
    // request (optimistic data) goes to the upstream first.
    let mut io = BufReader::with_capacity(512, Rewind::new(greeting, &mut client));
    let negotiated = tokio::time::timeout(limits.head_timeout(), negotiate(rt, &mut io)).await;
    // Unread: what the buffer holds, then what is left of the first read.
    let mut early_client = io.buffer().to_vec();
    early_client.extend_from_slice(&io.into_inner().into_prefix());
    let (id, target) = match negotiated {
        Ok(Ok(v)) => v,
        Ok(Err(stop)) => {
            stopped(state, &mut client, stop, started).await;
            return None;
        }
        Err(_) => {
            finish(
                state,
                "socks5",
                None,
                "bad_request",
                Transferred::default(),
                started,
            );
            return None;
        }
    };
    record_identity(&id, &target, None);
    let dialed = tokio::select! {
        biased;
        r = state.lease_and_dial(rt, &id, &target, DialMode::Tunnel, &[]) => r,
        () = super::connect::client_gone(&client) => {
            finish(state, "socks5", None, "client_closed", Transferred::default(), started);
            return None;
        }
    };
    let (lease, upstream, upstream_early) = match dialed {
        Ok(v) => v,
        Err(e) => {
            super::log_error(&e);
            stopped(
                state,
                &mut client,
                Stop::Reply(e.socks_reply(), e.code()),
                started,
            )
            .await;
            return None;
        }
    };
    Some(Open {
        client,
        client_early: Bytes::from(early_client),
        lease,
        upstream,
        upstream_early,
        started,
    })
}

async fn stopped(state: &ProxyState, client: &mut TcpStream, stop: Stop, started: Instant) {
    let code = match stop {
        Stop::Done(code) => code,
        Stop::Reply(rep, code) => {
            let _ = client.write_all(&[5, rep, 0, 1, 0, 0, 0, 0, 0, 0]).await;
            code
        }
    };
    super::close_gracefully(client).await;
    finish(state, "socks5", None, code, Transferred::default(), started);
}

/// Greeting, authentication and the request; returns who asks and where to.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    rt: &Runtime,
    c: &mut S,
) -> Result<(crate::identity::Identity, Target), Stop> {
    let mut head = [0u8; 2];
    c.read_exact(&mut head).await?;
    let mut methods = vec![0u8; head[1] as usize];
    c.read_exact(&mut methods).await?;
    let credentials = if methods.contains(&2) {
        c.write_all(&[5, 2]).await?;
        Some(read_credentials(c).await?)
    } else if methods.contains(&0) && !rt.auth.required() {
        c.write_all(&[5, 0]).await?;
        None
    } else {
        c.write_all(&[5, 0xff]).await?;
        return Err(Stop::Done("auth_required"));
    };
    let no_headers = |_: &str| None;
    let identified = rt.auth.identify_credentials(
        credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
        &no_headers,
    );
    let refused_credentials = matches!(
        identified,
        Err(ProxyError::AuthRequired | ProxyError::AuthFailed | ProxyError::BadUsername(_))
    );
    if credentials.is_some() {
        c.write_all(&[1, if refused_credentials { 1 } else { 0 }])
            .await?;
    }
    if let (true, Err(e)) = (refused_credentials, &identified) {
        debug!(code = e.code(), error = %e, "SOCKS5 authentication refused");
        return Err(Stop::Done(e.code()));
    }
    // Credentials are fine; a pool problem is answered in the reply to the request.
    let target = read_request(c).await?;
    match identified {
        Ok(id) => Ok((id, target)),
        Err(e) => {
            super::log_error(&e);
            Err(Stop::Reply(e.socks_reply(), e.code()))
        }
    }
}

async fn read_credentials<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut S,
) -> Result<(String, String), Stop> {
    let mut ver_len = [0u8; 2];
    c.read_exact(&mut ver_len).await?;
    if ver_len[0] != 1 {
        c.write_all(&[1, 1]).await?;
        return Err(Stop::Done("bad_request"));
    }
    let mut user = vec![0u8; ver_len[1] as usize];
    c.read_exact(&mut user).await?;
    let mut plen = [0u8; 1];
    c.read_exact(&mut plen).await?;
    let mut pass = vec![0u8; plen[0] as usize];
    c.read_exact(&mut pass).await?;
    match (String::from_utf8(user), String::from_utf8(pass)) {
        (Ok(u), Ok(p)) => Ok((u, p)),
        _ => {
            c.write_all(&[1, 1]).await?;
            Err(Stop::Done("auth_failed"))
        }
    }
}

async fn read_request<S: AsyncRead + Unpin>(c: &mut S) -> Result<Target, Stop> {
    let mut req = [0u8; 4];
    c.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(Stop::Reply(rep::GENERAL, "bad_request"));
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            c.read_exact(&mut a).await?;
            Host::Ip(IpAddr::V4(Ipv4Addr::from(a)))
        }
        4 => {
            let mut a = [0u8; 16];
            c.read_exact(&mut a).await?;
            Host::Ip(canonical(IpAddr::V6(Ipv6Addr::from(a))))
        }
        3 => {
            let mut len = [0u8; 1];
            c.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            c.read_exact(&mut name).await?;
            // Only an IP literal or an LDH name: nothing that could go into a head raw.
            let parsed = std::str::from_utf8(&name)
                .ok()
                .map(Host::parse)
                .and_then(Result::ok);
            match parsed {
                Some(h) => h,
                None => return Err(Stop::Reply(rep::GENERAL, "bad_request")),
            }
        }
        _ => return Err(Stop::Reply(rep::ADDRESS, "bad_request")),
    };
    let mut port = [0u8; 2];
    c.read_exact(&mut port).await?;
    if req[1] != 1 {
        return Err(Stop::Reply(rep::COMMAND, "bad_request"));
    }
    Target::new(host, u16::from_be_bytes(port))
        .map_err(|_| Stop::Reply(rep::GENERAL, "bad_request"))
}
